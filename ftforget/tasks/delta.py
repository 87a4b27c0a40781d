"""What a method changed relative to its base: the task's own tensors, and how the rest maps onto the base.

Every method trains exactly the parameters that ``requires_grad`` (``FineTuningModule.set_trainable``);
everything else in its state dict is the base backbone's weights, under the same names except where the
method's surgery moved them:

- LoRA wraps a Linear ``P`` as ``P.base`` (:class:`~ftforget.adapters.lora.LoRALinear`);
- Block Expansion inserts its new blocks into ``blocks``, which renumbers the original blocks after them.

:func:`base_key_map` undoes exactly these two moves, and checks the result against the base.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import nn

from ftforget.adapters.lora import LoRALinear

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
    lora_paths = [
        name
        for name, m in model.backbone.named_modules()
        if isinstance(m, LoRALinear)  # type: ignore[union-attr]
    ]
    new_blocks = _new_block_indices(model)
    out: dict[str, str] = {}
    for key in model.state_dict():
        if key in task or not key.startswith(BACKBONE):
            continue
        name = key[len(BACKBONE) :]
        for path in lora_paths:
            if name.startswith(f"{path}.base."):
                name = f"{path}.{name[len(path) + len('.base.') :]}"
                break
        if new_blocks and name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            j = int(index)
            name = f"blocks.{j - sum(1 for n in new_blocks if n < j)}.{rest}"
        out[key] = name
    return out


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
