"""What one task of a stream hands to the next, and how a task's accuracy is measured afterwards.

After task ``i`` its final weights (the sub-run's ``last.ckpt``) become a plain timm backbone, the
weights the next task's fit starts from (``--model.init_args.checkpoint``):

- full and top-k fine-tuning, linear probing: the backbone as it is;
- LoRA: the adapters merged into the frozen weights (the next task gets fresh adapters on the merged
  base; ``scale · B @ A`` is added once, as :meth:`~ftforget.adapters.lora.LoRALinear.merge` does);
- Block Expansion: the expanded backbone, one plain ViT that is deeper (``depth`` grows by ``p`` every
  task; the next task inserts its own identity copies into it).

The task's head is kept (task-incremental): ``R[i][j]`` is task ``j``'s head on the backbone carried
out of task ``i``, on task ``j``'s test split. With one shared head (``heads: shared``, class-incremental)
``R[i][j]`` is task ``i``'s head, over every class of tasks ``1..i``, on task ``j``'s test split with its
labels offset by the classes of the tasks before ``j``.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from ftforget.adapters.lora import LoRALinear, merge_lora
from ftforget.backbones import build_backbone
from ftforget.files import atomic_write
from ftforget.inference import eval_mode
from ftforget.methods.registry import load_method
from ftforget.runs import CONFIG_FILE


def plain_backbone_state(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of ``backbone`` under plain timm names, LoRA merged: each adapted Linear's
    ``P.base.*`` becomes ``P.*`` and its ``lora_A``/``lora_B`` go (merged into the weight first)."""
    merge_lora(backbone)
    paths = [name for name, m in backbone.named_modules() if isinstance(m, LoRALinear)]
    out: dict[str, torch.Tensor] = {}
    for key, value in backbone.state_dict().items():
        owner = next((p for p in paths if key.startswith(f"{p}.")), None)
        if owner is None:
            out[key] = value.detach().clone()
            continue
        rest = key[len(owner) + 1 :]
        if rest.startswith("base."):
            out[f"{owner}.{rest[len('base.') :]}"] = value.detach().clone()
        # lora_A.* / lora_B.*: merged into the weight above
    return out


def carried_weights(ckpt: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone a task hands on (see the module's docstring) and the ``backbone_kwargs`` that build it
    (the method's, with ``depth`` set to its number of blocks); checked by loading it strictly."""
    model = load_method(ckpt)
    state = plain_backbone_state(model.backbone)
    kwargs = {**(model.hparams.backbone_kwargs or {}), "depth": len(model.backbone.blocks)}
    build_backbone(model.hparams.backbone, **kwargs).load_state_dict(state, strict=True)
    return state, kwargs


def write_carried(ckpt: Path, path: Path) -> dict[str, Any]:
    """Writes the carried backbone of ``ckpt`` to ``path`` (timm ``.pth``) and its build settings beside it
    (``.yaml``), both atomically; returns the settings (``backbone``, ``backbone_kwargs``)."""
    state, kwargs = carried_weights(ckpt)
    name = str(
        torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]["backbone"]
    )
    settings = {"backbone": name, "backbone_kwargs": kwargs}
    atomic_write(path, lambda f: torch.save(state, f))
    text = yaml.safe_dump(settings, sort_keys=True).encode()
    atomic_write(path.with_suffix(".yaml"), lambda f: f.write(text))
    return settings


def read_carried(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The carried backbone written by :func:`write_carried`, rebuilt, and its settings."""
    settings = yaml.safe_load(path.with_suffix(".yaml").read_text())
    backbone = build_backbone(settings["backbone"], checkpoint=path, **settings["backbone_kwargs"])
    return backbone, settings


def task_head(ckpt: Path) -> nn.Linear:
    """The head a task trained (its checkpoint's ``head.weight`` and ``head.bias``)."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    weight, bias = state["head.weight"], state["head.bias"]
    head = nn.Linear(weight.shape[1], weight.shape[0])
    head.load_state_dict({"weight": weight, "bias": bias})
    return head


def run_data_module(run_dir: Path) -> Any:
    """The data module a sub-run was fitted on, rebuilt from its ``config.yaml`` (``class_path`` and
    ``init_args``; arguments its class does not take, such as a link the CLI added, are left out)."""
    data = (yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {})["data"]
    module, _, name = str(data["class_path"]).rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    accepted = inspect.signature(cls).parameters
    init_args = {k: v for k, v in (data.get("init_args") or {}).items() if k in accepted}
    return cls(**init_args)


def label_offset(ckpt: Path) -> int:
    """The earlier classes before a task's own in its head (``model.init_args.label_offset``; 0 without)."""
    hparams = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["hyper_parameters"]
    return int(hparams.get("label_offset", 0))


@torch.no_grad()
def test_hits(backbone: nn.Module, head: nn.Linear, data: Any, label_offset: int = 0) -> torch.Tensor:
    """The ``(N,)`` bool vector: whether ``head(backbone(x))`` names each test image's class, in the order of
    the data module's test split, in eval mode; the argmax over every output of ``head``, a label ``y`` being
    output ``y + label_offset`` (a head shared with earlier tasks)."""
    data.setup("test")
    hits = []
    model = nn.Sequential(backbone, head)
    with eval_mode(model):
        for batch in data.test_dataloader():
            hits.append(model(batch[0]).argmax(1) == batch[1] + label_offset)
    return torch.cat(hits)
