"""Exporting a run's checkpoint: which base it was fine-tuned from, its class names, the file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ftforget.backbones import build_backbone
from ftforget.methods.base import FineTuningModule
from ftforget.methods.registry import load_method
from ftforget.tasks.delta import check_frozen_against_base, frozen_base_part, state_hash
from ftforget.tasks.exported import ExportedTask, make_task, write_task


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote: the task, the file, its size and where the base came from."""

    task: ExportedTask
    path: Path
    file_bytes: int
    base_source: str

    def summary(self) -> str:
        return (
            f"exported {self.task.label()} to {self.path}: {self.task.num_parameters:,} parameters, "
            f"{self.file_bytes:,} bytes ({self.file_bytes / 2**20:.2f} MiB); base {self.task.base_name} "
            f"({self.base_source}) SHA-256 {self.task.base_sha256}; classes: {self.task.class_names_source}"
        )


def base_weights(
    model: FineTuningModule, base_file: str | os.PathLike[str] | None, pretrained: bool = False
) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict of the base ``model`` was fine-tuned from, and how to name it.

    From ``base_file`` (any format ``model.init_args.checkpoint`` accepts) or timm's pretrained weights;
    otherwise, for a method that froze every base weight (LoRA, Block Expansion, linear probe), from the
    checkpoint itself. The checkpoint's frozen weights must equal the base's bit for bit.

    Raises:
        ValueError: no base can be found (top-k and full fine-tuning changed base weights: give the file),
            or the checkpoint's frozen weights differ from the base's.
    """
    name, kwargs = str(model.hparams.backbone), dict(model.hparams.backbone_kwargs or {})
    if base_file is not None or pretrained:
        base = build_backbone(
            name, checkpoint=base_file, pretrained=pretrained and base_file is None, **kwargs
        )
        state = {k: v.detach() for k, v in base.state_dict().items()}
        source = f"{str(base_file)!r}" if base_file is not None else f"timm's pretrained {name}"
        check_frozen_against_base(model, state, source)
        return state, source
    state = frozen_base_part(model)
    expected = set(build_backbone(name, **kwargs).state_dict())
    missing = sorted(expected - set(state))
    if missing:
        raise ValueError(
            f"{type(model).__name__} changed base weights ({', '.join(missing[:3])}, ...) and the base's weights "
            "file is unknown: give it with --base FILE (the run's model.init_args.checkpoint)"
        )
    return state, "the checkpoint's frozen weights"


def class_names_from_config(config: dict[str, Any] | None) -> tuple[list[str] | None, str]:
    """The head's class names as the run's data module defines them, and where they came from.

    Known: the digits' ``new_digits``, and a data module whose ``classes`` attribute lists them (image
    folders read their ``train/`` sub-folders). Otherwise ``None``: the export names classes by index.
    """
    data = (config or {}).get("data") or {}
    init = data.get("init_args") or {}
    class_path = str(data.get("class_path", ""))
    if class_path.endswith("DigitsDataModule") and init.get("new_digits"):
        return [str(d) for d in init["new_digits"]], "data.init_args.new_digits"
    if class_path.endswith("ImageFolderDataModule") and init.get("root"):
        train = Path(str(init["root"])).expanduser() / "train"
        if train.is_dir():
            names = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
            if names:
                return names, f"the sub-folders of {str(train)!r}"
    return None, "indices (the run's data module does not name its classes here)"


def export_checkpoint(
    ckpt_path: str | os.PathLike[str],
    output: str | os.PathLike[str],
    base_file: str | os.PathLike[str] | None = None,
    pretrained: bool = False,
    config: dict[str, Any] | None = None,
) -> ExportResult:
    """Exports the method saved in ``ckpt_path`` to ``output`` (a ``.safetensors`` file).

    Args:
        ckpt_path: a checkpoint written by ``ftforget fit``.
        output: the file to write.
        base_file: the base backbone's weights file (see :func:`base_weights`).
        pretrained: the base is timm's pretrained weights (downloaded).
        config: the run's ``config.yaml`` as a dict, for the class names.
    """
    model = load_method(ckpt_path)
    state, source = base_weights(model, base_file, pretrained)
    names, names_source = class_names_from_config(config)
    if names is not None and len(names) != model.head.out_features:
        names, names_source = (
            None,
            f"indices ({names_source} lists {len(names)}, the head has {model.head.out_features})",
        )
    task = make_task(model, state_hash(state), names, names_source)
    size = write_task(task, output)
    return ExportResult(task, Path(output), size, source)
