"""A :class:`~ftforget.methods.PeftMethod` run in Hugging Face PEFT's own format.

:func:`export_peft` writes a directory that ``peft.PeftModel.from_pretrained`` loads onto the same timm
model (headless, built from the same base weights)::

    adapter_config.json            PEFT's config of the adapter
    adapter_model.safetensors      the adapter's tensors, written by PEFT's own save_pretrained
    ftforget_head.safetensors      the new task's linear head (``weight``, ``bias``; not part of PEFT's format)

:func:`load_peft` is the reading side: ``PeftModel.from_pretrained`` on a base backbone, and the head. Logits
``head(peft_model(x))`` are bit-identical to the run's.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from ftforget.backbones import build_backbone
from ftforget.methods import PeftMethod

#: the head's file in an exported directory
HEAD_FILE = "ftforget_head.safetensors"


def export_peft(model: PeftMethod, output_dir: str | os.PathLike[str]) -> Path:
    """Writes ``model``'s adapter in PEFT's format, and its head, into ``output_dir`` (created).

    The adapter is put, tensor for tensor, into a ``PeftModel`` of a fresh backbone that carries the run's
    frozen weights, and that model's ``save_pretrained`` writes the files: the format is PEFT's own.

    Raises:
        ValueError: ``model`` is not a :class:`~ftforget.methods.PeftMethod`, or its init changed the base weights (PiSSA, OLoRA, ...): PEFT's format stores an adapter
            relative to the original weights, which would need PEFT's conversion of the run's start.
    """
    if not isinstance(model, PeftMethod):
        raise ValueError(f"PEFT's format holds PEFT adapters; {type(model).__name__} is not a PeftMethod")
    if not model.base_untouched:
        raise ValueError(
            "this run's LoRA init moved part of each weight into the adapter (PiSSA, OLoRA, ...): its adapter "
            "is not one for the original weights; export it in ftforget's format instead"
        )
    hp = model.hparams
    fresh = build_backbone(str(hp.backbone), **dict(hp.backbone_kwargs or {}))
    config = copy.deepcopy(model.peft_tuner.peft_config["default"])
    config.inference_mode = False
    peft_model = get_peft_model(fresh, config)
    # every tensor of the trained backbone (its frozen base, the adapter, PEFT's constants) into PEFT's model
    peft_model.base_model.model.load_state_dict(model.backbone.state_dict(), strict=True)
    out = Path(output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    head = {k: v.detach().cpu().contiguous().clone() for k, v in model.head.state_dict().items()}
    save_file(head, str(out / HEAD_FILE))
    return out


def load_peft(directory: str | os.PathLike[str], base: nn.Module) -> tuple[PeftModel, nn.Linear]:
    """``peft.PeftModel.from_pretrained(base, directory)`` in eval mode, and the exported head.

    Args:
        directory: written by :func:`export_peft`.
        base: the headless timm backbone with the base weights (it is adapted in place by PEFT).
    """
    path = Path(directory).expanduser()
    peft_model = PeftModel.from_pretrained(base, str(path)).eval()
    state = load_file(str(path / HEAD_FILE))
    head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    with torch.no_grad():
        head.load_state_dict(state)
    return peft_model, head.eval()
