"""One task in one file: what a method changed relative to its base, written as safetensors, and put back.

:func:`export_task` writes the method's trainable tensors (LoRA's A and B, Block Expansion's new blocks,
top-k's blocks, full fine-tuning's whole backbone, the linear probe's nothing) and always its head, with
metadata that names the base (timm name and :func:`~ftforget.tasks.delta.state_hash` of its weights), the
method and its arguments, the class names and the ftforget version. :func:`read_task` reads it back and
:func:`attach_task` puts it onto a base backbone: the result computes exactly what the run's checkpoint
computed, bit for bit, provided the base is the one it was trained from (the hash checks it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ftforget
from ftforget.files import atomic_write
from ftforget.methods.base import FineTuningModule
from ftforget.methods.registry import method_class
from ftforget.tasks.delta import base_key_map, method_constants, state_hash, task_tensors

#: the ``format`` entry of an exported task's metadata
FORMAT = "ftforget-task/1"
#: hyperparameters a task is rebuilt without: the base's weights come from the base, not a file or a download
_SOURCE_ARGS = ("checkpoint", "pretrained")
#: training-only options (where the method has them), off in a rebuilt task: they change how a run trains,
#: not the function it computes, and would otherwise build helpers (anchors, a teacher) or read files
_TRAINING_ONLY = {
    "l2sp_weight": 0.0,
    "distill_weight": 0.0,
    "anchor_weights": None,
    "lp_steps": 0,
    "head_from": None,
    "earlier_head_from": None,
}


class BaseMismatchError(ValueError):
    """The base backbone is not the one the task was exported from; the message shows both hashes."""


@dataclass
class ExportedTask:
    """A task as exported: its tensors (method state-dict names) and what is needed to put it on a base.

    Attributes:
        tensors: the method's trainable tensors, ``head.weight`` and ``head.bias`` included.
        method: the registered method class name (``LoRA``, ``BlockExpansion``, ...).
        method_args: the method's init arguments (its hyperparameters, weights source left out).
        base_name: the timm name of the base backbone.
        base_sha256: :func:`~ftforget.tasks.delta.state_hash` of the base backbone's state dict.
        class_names: the head's classes, in output order.
        class_names_source: where the names come from (``indices`` when the run named none).
        ftforget_version: the version that wrote the file.
        extra: other metadata (e.g. Block Expansion's ``new_block_indices``).
    """

    tensors: dict[str, torch.Tensor]
    method: str
    method_args: dict[str, Any]
    base_name: str
    base_sha256: str
    class_names: list[str]
    class_names_source: str = "indices"
    ftforget_version: str = ftforget.__version__
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def label(self) -> str:
        """The method's name in a table, e.g. ``LoRA r=4``."""
        return method_class(self.method).describe(self.method_args)

    def metadata(self) -> dict[str, str]:
        """The safetensors header metadata (strings only; structured values as JSON)."""
        return {
            "format": FORMAT,
            "ftforget_version": self.ftforget_version,
            "base_name": self.base_name,
            "base_sha256": self.base_sha256,
            "method": self.method,
            "method_args": json.dumps(self.method_args, sort_keys=True),
            "class_names": json.dumps(self.class_names),
            "class_names_source": self.class_names_source,
            "parameters": str(self.num_parameters),
            "extra": json.dumps(self.extra, sort_keys=True),
        }

    def build_args(self) -> dict[str, Any]:
        """Init arguments that rebuild the method's architecture with no weights loaded."""
        off = {k: v for k, v in _TRAINING_ONLY.items() if k in self.method_args}
        return {**self.method_args, **off, "checkpoint": None, "pretrained": False}


def method_args_of(model: FineTuningModule) -> dict[str, Any]:
    """The init arguments of a method instance, as JSON-ready values (weights source left out)."""
    args = {k: v for k, v in dict(model.hparams).items() if not k.startswith("_") and k not in _SOURCE_ARGS}
    return json.loads(json.dumps(args, default=str))


def make_task(
    model: FineTuningModule,
    base_sha256: str,
    class_names: list[str] | None = None,
    class_names_source: str | None = None,
) -> ExportedTask:
    """The task of a (loaded or live) method: its trainable tensors, cloned to contiguous CPU tensors.

    Args:
        model: the fine-tuned method.
        base_sha256: the hash of the base it was fine-tuned from (see :func:`base_state_hash`).
        class_names: the head's classes; ``None``: their indices (``class_names_source`` says so).
        class_names_source: where the names came from.
    """
    num_classes = int(model.head.out_features)
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for a head of {num_classes} classes")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in task_tensors(model).items()}
    extra = (
        {"new_block_indices": list(model.new_block_indices)} if hasattr(model, "new_block_indices") else {}
    )
    return ExportedTask(
        tensors=tensors,
        method=type(model).__name__,
        method_args=method_args_of(model),
        base_name=str(model.hparams.backbone),
        base_sha256=base_sha256,
        class_names=[str(c) for c in class_names]
        if class_names is not None
        else [str(i) for i in range(num_classes)],
        class_names_source=class_names_source or ("given" if class_names is not None else "indices"),
        extra=extra,
    )


def write_task(task: ExportedTask, path: str | os.PathLike[str]) -> int:
    """Writes ``task`` as one safetensors file, atomically; returns its size in bytes."""
    from safetensors.torch import save

    data = save(task.tensors, metadata=task.metadata())
    atomic_write(path, lambda f: f.write(data))
    return len(data)


def read_task(path: str | os.PathLike[str]) -> ExportedTask:
    """Reads a file written by :func:`write_task` (``ftforget export``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, or not an exported ftforget task.
    """
    from safetensors import safe_open

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"exported task {str(path)!r} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise ValueError(f"{str(path)!r} is not a safetensors file, or it is damaged ({err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"{str(path)!r} is not a task exported by ftforget export (metadata format {meta.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    method_class(meta["method"])  # a registered method, or a one-line error naming it
    return ExportedTask(
        tensors=tensors,
        method=meta["method"],
        method_args=json.loads(meta["method_args"]),
        base_name=meta["base_name"],
        base_sha256=meta["base_sha256"],
        class_names=json.loads(meta["class_names"]),
        class_names_source=meta.get("class_names_source", "indices"),
        ftforget_version=meta.get("ftforget_version", "unknown"),
        extra=json.loads(meta.get("extra", "{}")),
    )


def base_state_of(base: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base backbone's state dict (timm key names), from the backbone itself or a state dict."""
    return dict(base.state_dict() if isinstance(base, nn.Module) else base)


def check_base(task: ExportedTask, base_hash: str, base_source: str, ignore_base_hash: bool = False) -> None:
    """Refuses a base whose hash is not the task's, showing both (unless ``ignore_base_hash``)."""
    if base_hash != task.base_sha256 and not ignore_base_hash:
        raise BaseMismatchError(
            f"the base {base_source} has SHA-256 {base_hash}, but this {task.method} task was exported from a "
            f"{task.base_name} base with SHA-256 {task.base_sha256}; give the base it was trained from, or "
            "pass --ignore_base_hash (library: ignore_base_hash=True) to put it on this base anyway"
        )


def build_method(task: ExportedTask) -> FineTuningModule:
    """The task's method with its architecture (surgery done, randomly initialised), in eval mode."""
    return method_class(task.method)(**task.build_args()).eval()


def attach_task(
    task: ExportedTask,
    base: nn.Module | Mapping[str, torch.Tensor],
    base_source: str = "given",
    ignore_base_hash: bool = False,
) -> FineTuningModule:
    """Puts an exported task onto a base backbone: the method, rebuilt, with the base's weights where it
    froze them and the task's where it trained.

    The base is copied into a new model (for one backbone shared by many tasks see
    :class:`~ftforget.tasks.multitask.MultiTaskModel`). On the base it was exported from, the result
    computes exactly what the run's checkpoint computed (bit-identical features and logits).

    Args:
        task: from :func:`read_task`.
        base: the base backbone (a timm ViT) or its state dict.
        base_source: how error messages name the base (e.g. its file).
        ignore_base_hash: put the task on a base with another hash anyway.

    Raises:
        BaseMismatchError: the base's hash is not the task's (both shown).
        ValueError: the base lacks a weight the method needs, or a shape differs.
    """
    state = base_state_of(base)
    check_base(task, state_hash(state), base_source, ignore_base_hash)
    model = build_method(task)
    full: dict[str, torch.Tensor] = {}
    for key, base_key in base_key_map(model).items():
        if base_key not in state:
            raise ValueError(f"the base {base_source} has no weight {base_key!r}, which {task.method} needs")
        full[key] = state[base_key]
    built = model.state_dict()
    full.update({key: built[key] for key in method_constants(model)})  # rebuilt identically by construction
    unknown = sorted(set(task.tensors) - set(model.state_dict()))
    if unknown:
        raise ValueError(f"the task's tensors {unknown[:5]} are not weights of {task.label()}")
    full.update(task.tensors)
    try:
        model.load_state_dict(full, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"the task does not fit the base {base_source}: {' '.join(str(err).split())[:400]}"
        ) from None
    return model.eval()
