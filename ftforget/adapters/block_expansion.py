"""Block Expansion (LLaMA-Pro style) for a timm ViT: interleave zero-initialised identity copies of blocks.

A copy of block ``i`` is inserted right after it with its attention output projection and its MLP's
second linear zeroed (weights and biases). With timm's pre-norm residual blocks,
``x + proj(attn(norm1(x))) + fc2(mlp(norm2(x)))`` then reduces to ``x``: the expanded network computes
exactly the function of the original, and only the copies are trained.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn


def paper_positions(depth: int, p: int) -> list[int]:
    """Where the paper puts ``p`` new blocks: after the last block of each group of ``depth / p`` blocks.

    For ViT-B (depth 12): p=1 -> [11], p=2 -> [5, 11], p=3 -> [3, 7, 11], p=4 -> [2, 5, 8, 11].
    """
    if p < 1 or depth % p != 0:
        raise ValueError(f"Block Expansion p={p} must be >= 1 and divide the backbone depth {depth}")
    split = depth // p
    return [i for i in range(depth) if (i + 1) % split == 0]


def expand(vit: nn.Module, positions: Sequence[int]) -> list[int]:
    """Inserts an identity copy of block ``i`` right after block ``i`` for each ``i`` in ``positions``, in place.

    Args:
        vit: a timm ``VisionTransformer``; its ``blocks`` Sequential is replaced.
        positions: indices into the original blocks, each at most once.

    Returns:
        The indices of the new blocks in the expanded ``vit.blocks``.
    """
    blocks = list(vit.blocks)
    depth = len(blocks)
    positions = list(positions)
    if not positions:
        raise ValueError("Block Expansion needs at least one position")
    bad = [i for i in positions if not 0 <= i < depth]
    if bad or len(set(positions)) != len(positions):
        raise ValueError(
            f"Block Expansion positions {positions} must be distinct block indices in [0, {depth - 1}]"
        )
    new_blocks: list[nn.Module] = []
    new_indices: list[int] = []
    for i, block in enumerate(blocks):
        new_blocks.append(block)
        if i in positions:
            new_indices.append(len(new_blocks))
            new_blocks.append(identity_copy(block))
    vit.blocks = nn.Sequential(*new_blocks)
    return new_indices


def identity_copy(block: nn.Module) -> nn.Module:
    """A deep copy of a timm ``Block`` whose residual branches output exactly zero."""
    new = copy.deepcopy(block)
    for layer in (new.attn.proj, new.mlp.fc2):
        nn.init.zeros_(layer.weight)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    new.requires_grad_(True)
    return new


@contextmanager
def expansion_skipped(vit: nn.Module, new_indices: Sequence[int]) -> Iterator[None]:
    """Runs ``vit`` without the blocks at ``new_indices`` (the original network's function, no copy of any
    weight); the expanded ``blocks`` are put back after."""
    expanded = vit.blocks
    skip = set(new_indices)
    vit.blocks = nn.Sequential(*(b for i, b in enumerate(expanded) if i not in skip))
    try:
        yield
    finally:
        vit.blocks = expanded
