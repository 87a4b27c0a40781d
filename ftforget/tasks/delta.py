"""What a method changed relative to its base: the task's own tensors, and how the rest maps onto the base.

Every method trains exactly the parameters that ``requires_grad`` (``FineTuningModule.set_trainable``);
everything else in its state dict is the base backbone's weights, under the same names except where the
method's surgery moved them:

- LoRA wraps a Linear ``P`` as ``P.base`` (:class:`~ftforget.adapters.lora.LoRALinear`);
- Block Expansion inserts its new blocks into ``blocks``, which renumbers the original blocks after them;
- PEFT wraps a layer ``P`` as ``P.base_layer`` (any ``BaseTunerLayer``); its other frozen tensors (VeRA's
  shared projections, BOFT's permutations) are constants its construction rebuilds, not base weights;
- SSF wraps an operation ``P`` as ``P.op`` (:class:`~ftforget.adapters.ssf.ScaleShift`);
- AdaptFormer moves a block's ``mlp`` to ``mlp.mlp`` and its ``norm2`` to ``mlp.norm``
  (:class:`~ftforget.adapters.adaptformer.ParallelAdapterMLP`);
- VPT wraps each block ``blocks.i`` as ``blocks.i.block`` (:class:`~ftforget.adapters.prompts.PromptedBlock`).

:func:`base_key_map` undoes exactly these moves (the wrappers found by module identity), and checks the
result against the base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ftforget.adapters.adaptformer import ParallelAdapterMLP
from ftforget.adapters.lora import LoRALinear
from ftforget.adapters.prompts import PromptedBlock
from ftforget.adapters.ssf import ScaleShift

#: the prefix of the backbone's keys in a method's state dict
BACKBONE = "backbone."


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a state dict, canonical: independent of key order, device and memory layout.

    For each key in sorted order the hash reads the UTF-8 key, a NUL byte, the dtype's name (``float32``),
    a NUL byte, the shape as comma-separated integers, a NUL byte, then the tensor's bytes (contiguous,
    in the machine's byte order: little-endian on x86 and ARM). Two state dicts have the same hash when
    they hold the same names, dtypes, shapes and bit-identical values.
    """
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(key.encode())
        digest.update(b"\0" + str(tensor.dtype).removeprefix("torch.").encode() + b"\0")
        digest.update(",".join(str(s) for s in tensor.shape).encode() + b"\0")
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def task_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """What the method changed: its trainable parameters, under its state-dict names (``head.*`` included)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def _new_block_indices(model: nn.Module) -> list[int]:
    return list(getattr(model, "new_block_indices", []) or [])


def base_key_map(model: nn.Module) -> dict[str, str]:
    """``method state-dict key -> base backbone key`` for every backbone key of ``model`` that is not the
    task's.

    Frozen state outside the backbone and the head (training-time helpers such as a copy of the step-0
    weights for a regulariser) is not part of the function the model computes: it is left out.
    """
    task = set(task_tensors(model))
    moves = _wrapper_moves(model.backbone)  # type: ignore[arg-type]
    new_blocks = _new_block_indices(model)
    out: dict[str, str] = {}
    for key in model.state_dict():
        if key in task or not key.startswith(BACKBONE):
            continue
        name = _unwrapped(key[len(BACKBONE) :], moves)
        if name is None:  # a constant of the method (e.g. VeRA's shared projections), rebuilt by it
            continue
        if new_blocks and name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            j = int(index)
            name = f"blocks.{j - sum(1 for n in new_blocks if n < j)}.{rest}"
        out[key] = name
    return out


def _wrapper_moves(backbone: nn.Module) -> dict[str, dict[str, str | None]]:
    """``wrapper path -> {inner prefix: the base's prefix for it, or None for the wrapper's constants}``,
    the more specific prefixes first (ftforget's wrappers do not nest)."""
    moves: dict[str, dict[str, str | None]] = {}
    for path, m in backbone.named_modules():
        parent = path.rpartition(".")[0]
        if isinstance(m, LoRALinear):
            moves[path] = {"base.": f"{path}."}
        elif isinstance(m, BaseTunerLayer):
            moves[path] = {"base_layer.": f"{path}.", "": None}
        elif isinstance(m, ScaleShift):
            moves[path] = {"op.": f"{path}."}
        elif isinstance(m, ParallelAdapterMLP):
            moves[path] = {"mlp.": f"{path}.", "norm.": f"{parent}.norm2." if parent else "norm2."}
        elif isinstance(m, PromptedBlock):
            moves[path] = {"block.": f"{path}."}
    return moves


def _unwrapped(name: str, moves: dict[str, dict[str, str | None]]) -> str | None:
    """The base's name of a tensor inside a wrapper (None: a constant of the wrapper); others unchanged."""
    for path in sorted(moves, key=len, reverse=True):
        if name.startswith(f"{path}."):
            rest = name[len(path) + 1 :]
            for inner, base in moves[path].items():
                if rest.startswith(inner):
                    return None if base is None else base + rest[len(inner) :]
    return name


def method_constants(model: nn.Module) -> list[str]:
    """State-dict keys of frozen tensors the method's construction makes itself (VeRA's shared random
    projections from their seed, AdaLoRA's rank numbers): neither the task's nor the base's."""
    task = set(task_tensors(model))
    moves = _wrapper_moves(model.backbone)  # type: ignore[arg-type]
    return [
        key
        for key in model.state_dict()
        if key.startswith(BACKBONE) and key not in task and _unwrapped(key[len(BACKBONE) :], moves) is None
    ]


def frozen_base_part(model: nn.Module) -> dict[str, torch.Tensor]:
    """The method's frozen weights under the base's key names (a subset of the base's state dict)."""
    state = model.state_dict()
    return {base: state[key] for key, base in base_key_map(model).items()}


def check_frozen_against_base(model: nn.Module, base: Mapping[str, torch.Tensor], base_source: str) -> None:
    """Raises ``ValueError`` unless every frozen weight of ``model`` is bit-identical to the base's."""
    for key, value in frozen_base_part(model).items():
        if key not in base:
            raise ValueError(
                f"the base {base_source} has no weight {key!r}, which the checkpoint's method needs"
            )
        if (
            base[key].shape != value.shape
            or base[key].dtype != value.dtype
            or not torch.equal(base[key], value)
        ):
            raise ValueError(
                f"the checkpoint's frozen weight {key!r} differs from that of the base {base_source}: the run was "
                "not fine-tuned from this base (give the base it started from with --base)"
            )
