"""SSF (Lian et al., NeurIPS 2022): a learnable per-channel scale and shift after each operation.

:class:`ScaleShift` wraps a module ``op`` and computes ``op(x) * scale + shift`` over the last (channel)
dimension. ``scale`` starts at ones and ``shift`` at zeros, so every wrapper is an exact identity at
initialisation (``y * 1 + 0 == y`` in floating point), and so is the whole network. (The SSF paper draws
them from N(1, 0.02) and N(0, 0.02); ftforget starts at the identity so that step 0 is the pretrained
network, as for every other method.) After training, the scale and shift could fold into the preceding
linear layer or norm (the paper's re-parameterisation); ftforget runs them as they are.

:func:`apply_ssf` wraps, as the paper's ViT code does, in every block: ``norm1``, ``attn.qkv``,
``attn.proj``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``; and the patch embedding's projection and the final norm.
For ViT-B/16 that is, per block,
``2 * (768 + 2304 + 768 + 768 + 3072 + 768) = 16,896`` parameters, plus ``2 * 768`` for the patch embedding
and ``2 * 768`` for the final norm: 205,824 in all.
"""

from __future__ import annotations

from torch import nn


class ScaleShift(nn.Module):
    """``op(x) * scale + shift`` per output channel (last dimension, or dimension 1 for a convolution).

    Args:
        op: the wrapped module (kept as ``self.op``; its own parameters are not touched here).
        channels: the number of output channels of ``op``.
        channel_dim: where the channels are in ``op``'s output: -1 (tokens) or 1 (a Conv2d's map).
    """

    def __init__(self, op: nn.Module, channels: int, channel_dim: int = -1) -> None:
        super().__init__()
        self.op = op
        self.channel_dim = channel_dim
        ref = next(op.parameters())
        self.scale = nn.Parameter(ref.new_ones(channels))
        self.shift = nn.Parameter(ref.new_zeros(channels))

    def forward(self, x):
        y = self.op(x)
        if self.channel_dim == -1:
            return y * self.scale + self.shift
        shape = [1] * y.dim()
        shape[self.channel_dim] = -1
        return y * self.scale.view(shape) + self.shift.view(shape)

    def extra_repr(self) -> str:
        return f"channels={self.scale.numel()}"


def _wrap(parent: nn.Module, attr: str, channel_dim: int = -1) -> ScaleShift:
    op = getattr(parent, attr)
    if isinstance(op, nn.Linear):
        channels = op.out_features
    elif isinstance(op, nn.LayerNorm):
        channels = op.normalized_shape[-1]
    elif isinstance(op, nn.Conv2d):
        channels = op.out_channels
    else:
        raise TypeError(f"SSF: cannot wrap {attr} of type {type(op).__name__} (Linear, LayerNorm or Conv2d)")
    wrapped = ScaleShift(op, channels, channel_dim)
    setattr(parent, attr, wrapped)
    return wrapped


#: the operations of a timm ``Block`` that SSF follows, as (module path) from the block
SSF_BLOCK_OPS = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def apply_ssf(vit: nn.Module) -> list[ScaleShift]:
    """Wraps the operations of a timm ViT listed in :data:`SSF_BLOCK_OPS` (every block), its patch
    projection and its final norm in :class:`ScaleShift`, in place.

    Returns:
        The new wrappers; their ``scale`` and ``shift`` are all that SSF trains.
    """
    wrappers = [_wrap(vit.patch_embed, "proj", channel_dim=1)]
    for block in vit.blocks:
        for path in SSF_BLOCK_OPS:
            parent_name, _, attr = path.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            wrappers.append(_wrap(parent, attr))
    if isinstance(getattr(vit, "norm", None), nn.LayerNorm):
        wrappers.append(_wrap(vit, "norm"))
    return wrappers
