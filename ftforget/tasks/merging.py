"""Merging LoRA tasks into one set of weights (task arithmetic), the contrast to routing.

Each exported LoRA task ``i`` is a low-rank update of the base's adapted projections,
``ΔW_i = (alpha_i / r_i) · B_i A_i`` on its rows of each Linear. Task arithmetic (Ilharco et al., 2023)
adds the updates of all tasks, scaled by one coefficient ``λ``:

    W = W_0 + λ · Σ_i ΔW_i

``λ = 1`` (the default) keeps each task's own update at full strength: merging a single task gives
exactly that task's merged model (up to float rounding of the addition). With several tasks their
updates interfere, and no single ``λ`` restores each task's own function: this is what routing avoids.
Each task keeps its own head; the merged backbone serves all of them (and the old domain, whose features
it no longer computes exactly).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ftforget.adapters.lora import LoRALinear, apply_lora
from ftforget.tasks.delta import BACKBONE, state_hash
from ftforget.tasks.exported import ExportedTask, check_base


def lora_deltas(base: nn.Module, task: ExportedTask) -> dict[str, torch.Tensor]:
    """``base key -> ΔW`` (full-size weight updates) of one exported LoRA task on ``base``."""
    if task.method != "LoRA":
        raise ValueError(f"task arithmetic here merges LoRA tasks; got a {task.method} task")
    args = task.method_args
    work = copy.deepcopy(base)
    apply_lora(
        work, r=int(args.get("r", 8)), alpha=args.get("alpha"),
        targets=args.get("targets") or ["q", "v"], dropout=float(args.get("dropout", 0.0)),
    )  # fmt: skip
    adapters = {k[len(BACKBONE) :]: v for k, v in task.tensors.items() if k.startswith(BACKBONE)}
    missing, unexpected = work.load_state_dict(adapters, strict=False)
    if unexpected or any("lora_" in key for key in missing):
        raise ValueError(f"the LoRA task's tensors do not match its adapters ({sorted(unexpected)[:3]})")
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in work.named_modules():
            if isinstance(module, LoRALinear):
                delta = torch.zeros_like(module.base.weight)
                for slice_name, (start, stop) in module.slices.items():
                    delta[start:stop] = module.delta_weight(slice_name)
                deltas[f"{name}.weight"] = delta
    return deltas


def merge_lora_tasks(
    base: nn.Module, tasks: Sequence[ExportedTask], scale: float = 1.0, ignore_base_hash: bool = False
) -> nn.Module:
    """A new backbone with weights ``W_0 + scale · Σ_i ΔW_i`` (see the module docstring).

    Args:
        base: the base backbone every task was exported from (left unchanged).
        tasks: exported LoRA tasks.
        scale: the task-arithmetic coefficient λ.
        ignore_base_hash: merge tasks exported from another base anyway.
    """
    if not tasks:
        raise ValueError("merge at least one task")
    base_hash = state_hash(base.state_dict())
    for task in tasks:
        check_base(task, base_hash, "to merge onto", ignore_base_hash)
    total: dict[str, torch.Tensor] = {}
    for task in tasks:
        for key, delta in lora_deltas(base, task).items():
            total[key] = total[key] + delta if key in total else delta
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for key, delta in total.items():
            merged.get_parameter(key).add_(scale * delta)
    return merged.requires_grad_(False).eval()
