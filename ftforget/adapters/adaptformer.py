"""AdaptFormer (Chen et al., NeurIPS 2022): a bottleneck MLP in parallel with every block's MLP.

In each timm ``Block`` the MLP branch ``x + mlp(norm2(x))`` becomes
``x + mlp(norm2(x)) + s * up(relu(down(x)))``: the adapter reads the same residual stream ``x`` as the
MLP branch, before ``norm2``, as AdaptFormer's ViT code does (``ffn_option="parallel"``,
``ffn_adapter_layernorm_option="none"``), and its output is scaled by a fixed ``s`` (0.1 in the paper).
``down`` (``dim -> bottleneck``) is initialised like a LoRA A (Kaiming-uniform, a = sqrt(5)), ``up`` and
both biases at zero, so every adapter adds exactly ``0`` at initialisation: the network is the pretrained
one bit for bit.

Surgery: the block's ``norm2`` moves inside :class:`ParallelAdapterMLP` (``block.norm2`` becomes an
``nn.Identity``) so that the adapter can see the stream before the norm; the block's own ``forward`` is
unchanged. Trainable parameters per block: ``2 * dim * bottleneck + bottleneck + dim`` (ViT-B/16,
bottleneck 16: 25,360; 12 blocks: 304,320).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class BottleneckAdapter(nn.Module):
    """``s * up(relu(down(x)))`` with ``up`` zero-initialised.

    Args:
        dim: input and output width.
        bottleneck: the hidden width (>= 1).
        scale: the fixed output scale ``s``.
    """

    def __init__(self, dim: int, bottleneck: int, scale: float = 0.1) -> None:
        super().__init__()
        if bottleneck < 1:
            raise ValueError(f"AdaptFormer bottleneck must be >= 1, got {bottleneck}")
        self.scale = float(scale)
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x))) * self.scale


class ParallelAdapterMLP(nn.Module):
    """A block's ``mlp(norm(x))`` plus a parallel :class:`BottleneckAdapter` of ``x``.

    Args:
        norm: the block's ``norm2`` (moved here).
        mlp: the block's MLP.
        adapter: the parallel adapter.
    """

    def __init__(self, norm: nn.Module, mlp: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.norm, self.mlp, self.adapter = norm, mlp, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x)) + self.adapter(x)


def apply_adaptformer(vit: nn.Module, bottleneck: int = 16, scale: float = 0.1) -> list[BottleneckAdapter]:
    """Adds a parallel bottleneck adapter to the MLP of every block of a timm ViT, in place.

    Returns:
        The new adapters (all that AdaptFormer trains).
    """
    adapters = []
    for block in vit.blocks:
        ref = block.mlp.fc1.weight
        adapter = BottleneckAdapter(block.mlp.fc1.in_features, bottleneck, scale).to(ref.device, ref.dtype)
        block.mlp = ParallelAdapterMLP(block.norm2, block.mlp, adapter)
        block.norm2 = nn.Identity()
        adapters.append(adapter)
    return adapters
