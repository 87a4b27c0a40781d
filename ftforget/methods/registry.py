"""The one registry of methods: what checkpoints are rebuilt as, and how each method is named in reports.

Every command that reads a checkpoint (``ftforget measure``, ``report``, ``demo``) goes through
:func:`load_method`: the class comes from this registry, checked before anything is imported or built,
and the model is rebuilt by Lightning's ``load_from_checkpoint``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ftforget.backbones import weights_restored_later
from ftforget.methods.base import METHOD_KEY, FineTuningModule
from ftforget.methods.block_expansion import BlockExpansion
from ftforget.methods.full import FullFineTuning
from ftforget.methods.linear import LinearProbing
from ftforget.methods.lora import LoRA
from ftforget.methods.peft_method import PeftMethod
from ftforget.methods.topk import TopKFineTuning
from ftforget.methods.vision_peft import SSF, AdaptFormer, BitFit, VisualPromptTuning

#: name -> class: the paper's table order, then the PEFT methods (issue 20)
METHODS: dict[str, type[FineTuningModule]] = {
    cls.__name__: cls
    for cls in (
        FullFineTuning, TopKFineTuning, LinearProbing, LoRA, BlockExpansion,
        PeftMethod, BitFit, SSF, AdaptFormer, VisualPromptTuning,
    )
}  # fmt: skip


class MethodCheckpointError(ValueError):
    """A checkpoint cannot be rebuilt as a registered method; the message names the file or class."""


def method_class(class_path: str) -> type[FineTuningModule]:
    """The registered method named by ``class_path`` (``LoRA``, ``ftforget.methods.LoRA`` or the defining
    module's path); nothing is imported.

    Raises:
        MethodCheckpointError: no registered method has that name or path.
    """
    name = class_path.rsplit(".", 1)[-1]
    cls = METHODS.get(name)
    accepted = {name, f"ftforget.methods.{name}"} | ({f"{cls.__module__}.{name}"} if cls else set())
    if cls is None or class_path not in accepted:
        raise MethodCheckpointError(
            f"{class_path!r} is not an ftforget method; registered: "
            + ", ".join(f"ftforget.methods.{n}" for n in METHODS)
        )
    return cls


def checkpoint_names(checkpoint: dict[str, Any]) -> list[str]:
    """The class names a loaded checkpoint carries: its ``ftforget_method`` entry and LightningCLI's
    ``_class_path`` hyperparameter (either may be absent)."""
    hparams = checkpoint.get("hyper_parameters") or {}
    names = [checkpoint.get(METHOD_KEY), hparams.get("_class_path") if isinstance(hparams, dict) else None]
    return [str(n) for n in names if n]


def checkpoint_method(checkpoint: dict[str, Any]) -> type[FineTuningModule]:
    """The registered method a loaded checkpoint dict was saved by; every class name it carries must be a
    registered method, and they must agree (checked by name: nothing is imported).

    Raises:
        MethodCheckpointError: no name, an unregistered one (named in the message), or two that disagree.
    """
    names = checkpoint_names(checkpoint)
    if not names:
        raise MethodCheckpointError(
            "the checkpoint names no method (no 'ftforget_method' entry and no '_class_path' hyperparameter)"
        )
    classes = {method_class(name) for name in names}
    if len(classes) > 1:
        raise MethodCheckpointError(f"the checkpoint names two different methods: {names}")
    return classes.pop()


def load_method(ckpt_path: str | os.PathLike[str], **overrides: Any) -> FineTuningModule:
    """Rebuilds the ftforget method saved in ``ckpt_path`` on the CPU, in eval mode.

    The backbone is built without a download (the state dict holds every weight; checkpoints record no
    weights file, see ``FineTuningModule.on_save_checkpoint``); ``overrides`` replace hyperparameters.

    Raises:
        FileNotFoundError: ``ckpt_path`` does not exist.
        MethodCheckpointError: it is a directory, or not a readable checkpoint of a registered method.
    """
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        raise MethodCheckpointError(
            f"checkpoint {str(path)!r} is a directory; give a .ckpt file in it (e.g. checkpoints/last.ckpt), "
            "or the run directory with --run"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        reason = " ".join(f"{type(err).__name__}: {err}".split())[:200]
        raise MethodCheckpointError(
            f"{str(path)!r} is not a Lightning checkpoint, or it is damaged (torch.load: {reason}); give a .ckpt "
            "written by ftforget fit"
        ) from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise MethodCheckpointError(
            f"{str(path)!r} is not a Lightning checkpoint (no 'state_dict'); give a .ckpt written by ftforget fit"
        )
    try:
        cls = checkpoint_method(checkpoint)
    except MethodCheckpointError as err:
        raise MethodCheckpointError(f"{str(path)!r}: {err}") from None
    kwargs = {"pretrained": False, **overrides}
    with weights_restored_later():  # the state dict holds every weight (an anchor's and a teacher's too)
        model = cls.load_from_checkpoint(path, map_location="cpu", strict=True, weights_only=True, **kwargs)
    return model.eval()


def method_label(class_path: str, init_args: dict[str, Any]) -> str:
    """A readable name of a configured method, e.g. ``LoRA r=4`` (the class name if unregistered)."""
    try:
        cls = method_class(class_path)
    except MethodCheckpointError:
        return class_path.rsplit(".", 1)[-1]
    return cls.describe(init_args)


def method_rank(class_path: str) -> int:
    """The method's position in the paper's table (unregistered methods last)."""
    names = list(METHODS)
    name = class_path.rsplit(".", 1)[-1]
    return names.index(name) if name in names else len(names)
