"""The optimiser and learning-rate schedule: the paper's recipe as the one default, any torch class allowed.

A method receives its optimiser and scheduler as plain ``{"class_path": ..., "init_args": {...}}`` dicts
(what ``ftforget fit --optimizer ... --lr_scheduler ...`` produces), so that they are saved in the
checkpoint's hyperparameters and ``load_from_checkpoint`` rebuilds the same module. They are
instantiated in ``configure_optimizers`` by :func:`build_optimizer` and :func:`build_lr_scheduler`.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

#: The paper's optimiser (official configs): SGD, momentum 0.9, no weight decay; lr 0.005 is the peak lr
#: of full fine-tuning, each method's config sets its own. The CLI's ``--optimizer`` default too.
DEFAULT_OPTIMIZER: dict[str, Any] = {
    "class_path": "torch.optim.SGD",
    "init_args": {"lr": 0.005, "momentum": 0.9, "weight_decay": 0.0},
}
#: The paper's schedule: linear warmup over 500 steps, then cosine to 0, stepped per optimizer step;
#: ``total_steps: None`` is filled with the trainer's number of optimizer steps. The CLI's
#: ``--lr_scheduler`` default too.
DEFAULT_LR_SCHEDULER: dict[str, Any] = {
    "class_path": "ftforget.methods.schedule.WarmupCosine",
    "init_args": {"warmup_steps": 500, "total_steps": None, "min_lr_ratio": 0.0},
}


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier: linear from 0 over ``warmup_steps``, then cosine down to ``min_ratio``.

    The same shape as ``transformers.get_cosine_schedule_with_warmup`` that the official code used:
    step 0 has multiplier 0 when there is a warmup.
    """
    if step < warmup_steps:
        return step / warmup_steps
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LambdaLR):
    """Linear warmup from 0 then cosine decay (:func:`warmup_cosine`), meant to be stepped per optimizer step.

    Args:
        optimizer: the optimiser whose learning rates (the peaks) are scheduled.
        warmup_steps: steps of the linear warmup from 0.
        total_steps: steps of the whole schedule; after it the multiplier stays at ``min_lr_ratio``.
            ``None`` (the default) is filled by the method with the trainer's number of optimizer steps.
        min_lr_ratio: the cosine ends at ``lr * min_lr_ratio``.
        last_epoch: the index of the last step, ``-1`` to start (as every torch scheduler).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 500,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"lr_scheduler.warmup_steps must be >= 0, got {warmup_steps}")
        if total_steps is None or total_steps < 1:
            raise ValueError(
                f"lr_scheduler.total_steps must be >= 1, got {total_steps} (a method fills None with the "
                "trainer's number of optimizer steps)"
            )
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"lr_scheduler.min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        self.warmup_steps, self.total_steps, self.min_lr_ratio = warmup_steps, total_steps, min_lr_ratio
        multiplier = partial(
            warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_lr_ratio
        )
        super().__init__(optimizer, multiplier, last_epoch=last_epoch)


def resolve_spec(spec: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """A plain-dict copy of an optimiser or scheduler spec; ``None`` is the default of ``what``.

    Args:
        spec: ``{"class_path": ..., "init_args": {...}}`` (a jsonargparse Namespace is converted too).
        what: ``"optimizer"`` or ``"lr_scheduler"``, for the default and the error messages.
    """
    defaults = {"optimizer": DEFAULT_OPTIMIZER, "lr_scheduler": DEFAULT_LR_SCHEDULER}
    if spec is None:
        return copy.deepcopy(defaults[what])
    if callable(getattr(spec, "as_dict", None)):  # a jsonargparse Namespace, e.g. from a CLI link
        spec = spec.as_dict()  # type: ignore[union-attr]
    if not isinstance(spec, Mapping) or "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
        raise ValueError(f"{what} must be a dict with 'class_path' and optionally 'init_args', got {spec!r}")
    init_args = spec.get("init_args") or {}
    if callable(getattr(init_args, "as_dict", None)):
        init_args = init_args.as_dict()
    return {"class_path": str(spec["class_path"]), "init_args": _plain(dict(init_args))}


def _plain(value: Any) -> Any:
    """A deep copy with tuples as lists: what YAML holds, so hparams.yaml and config.yaml round-trip."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return copy.deepcopy(value)


def _resolve(spec: Mapping[str, Any] | None, base: type, what: str) -> tuple[type, dict[str, Any]]:
    """The class (checked to subclass ``base``) and a copy of the init_args of ``spec``."""
    spec = resolve_spec(spec, what)
    class_path = spec["class_path"]
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name) if module_name else None
    except (ImportError, AttributeError):
        cls = None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise ValueError(f"{what}: {class_path!r} is not an importable subclass of {base.__qualname__}")
    return cls, spec["init_args"]


def build_optimizer(spec: Mapping[str, Any] | None, params: Iterable[torch.nn.Parameter]) -> Optimizer:
    """Instantiates the optimiser of ``spec`` (``None``: :data:`DEFAULT_OPTIMIZER`) over ``params``.

    Where the class has a ``fused`` argument that ``spec`` leaves unset, it is set to ``True`` when every
    parameter is on CUDA: one kernel launch updates them all (elsewhere torch picks its foreach default).
    """
    cls, init_args = _resolve(spec, Optimizer, "optimizer")
    params = list(params)
    accepts_fused = "fused" in inspect.signature(cls).parameters
    unset = init_args.get("fused") is None and not init_args.get("foreach")
    if accepts_fused and unset and params and all(p.device.type == "cuda" for p in params):
        init_args["fused"] = True
    try:
        return cls(params, **init_args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"optimizer: {cls.__qualname__}({_format(init_args)}) failed: {err}") from err


def build_lr_scheduler(spec: Mapping[str, Any] | None, optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """Instantiates the scheduler of ``spec`` (``None``: :data:`DEFAULT_LR_SCHEDULER`) on ``optimizer``.

    A ``total_steps`` argument of the class that ``spec`` leaves ``None`` gets ``total_steps``.
    """
    cls, init_args = _resolve(spec, LRScheduler, "lr_scheduler")
    if "total_steps" in inspect.signature(cls).parameters and init_args.get("total_steps") is None:
        init_args["total_steps"] = total_steps
    try:
        return cls(optimizer, **init_args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"lr_scheduler: {cls.__qualname__}({_format(init_args)}) failed: {err}") from err


def check_optimization(optimizer: Mapping[str, Any] | None, lr_scheduler: Mapping[str, Any] | None) -> None:
    """Builds both on a throwaway parameter, so that a bad class or argument fails before any training."""
    probe = build_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(1))])
    build_lr_scheduler(lr_scheduler, probe, total_steps=1)


def _format(init_args: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in init_args.items())


def paper_recipe(lr: float | None = None, warmup_steps: int | None = None) -> dict[str, dict[str, Any]]:
    """A method's ``optimizer`` and ``lr_scheduler`` arguments: the defaults with another peak lr or warmup.

    E.g. ``LoRA(r=4, **paper_recipe(lr=0.05))``, the Python counterpart of a config's
    ``optimizer: {init_args: {lr: 0.05}}``.
    """
    optimizer, lr_scheduler = copy.deepcopy(DEFAULT_OPTIMIZER), copy.deepcopy(DEFAULT_LR_SCHEDULER)
    if lr is not None:
        optimizer["init_args"]["lr"] = lr
    if warmup_steps is not None:
        lr_scheduler["init_args"]["warmup_steps"] = warmup_steps
    return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}
