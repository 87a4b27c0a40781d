"""Visual Prompt Tuning (Jia et al., ECCV 2022): learnable tokens in the sequence of a frozen ViT.

timm's token sequence is ``[CLS, registers..., patches...]`` (``num_prefix_tokens`` leading tokens).
:class:`PromptedBlock` wraps a block and places ``n`` prompt tokens right after the prefix tokens:

- **shallow**: the first block inserts the prompts; they then flow through every block like any token;
- **deep**: the first block inserts its prompts and every later block *replaces* the prompt outputs of the
  block before with its own new prompts (VPT-deep: a fresh set per layer).

The last block drops the prompt tokens again, so the final norm and the pooling see exactly the original
sequence: the feature is the CLS token, never a prompt (and an average pool, if the backbone used one, would
not count them). Prompts are drawn as VPT's code does, uniform in ``±sqrt(6 / (3 * patch_area + dim))``.
VPT is not an identity at initialisation (the CLS token attends to the prompts from the first step), so
step 0 of a VPT run is already not the pretrained network.

Trainable parameters: ``n * dim`` (shallow) or ``depth * n * dim`` (deep); ViT-B/16, n = 32, deep:
294,912, the same as LoRA r=8 on q and v.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class PromptedBlock(nn.Module):
    """A timm block with prompt tokens inserted, replaced or removed around it.

    Args:
        block: the wrapped block (``self.block``).
        prefix: the number of leading tokens that come before the prompts (CLS and registers).
        num_prompts: prompt tokens in the sequence.
        prompts: this block's new prompts (``(num_prompts, dim)``), or None to pass the incoming ones on.
        first: the sequence entering this block has no prompts yet (insert ``prompts``).
        last: drop the prompt tokens after this block.
    """

    def __init__(
        self,
        block: nn.Module,
        prefix: int,
        num_prompts: int,
        prompts: nn.Parameter | None,
        first: bool,
        last: bool,
    ) -> None:
        super().__init__()
        if first and prompts is None:
            raise ValueError("the first prompted block needs prompts")
        self.block = block
        self.prefix, self.num_prompts, self.first, self.last = prefix, num_prompts, first, last
        self.prompts = prompts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, n = self.prefix, self.num_prompts
        if self.prompts is not None:
            rest = x[:, p:] if self.first else x[:, p + n :]
            prompts = self.prompts.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :p], prompts, rest], dim=1)
        x = self.block(x)
        if self.last:
            x = torch.cat([x[:, :p], x[:, p + n :]], dim=1)
        return x

    def extra_repr(self) -> str:
        return f"prefix={self.prefix}, num_prompts={self.num_prompts}, first={self.first}, last={self.last}"


def _init_prompts(vit: nn.Module, num_prompts: int) -> nn.Parameter:
    dim = vit.embed_dim
    patch = vit.patch_embed.patch_size
    area = int(patch[0]) * int(patch[1]) if isinstance(patch, tuple | list) else int(patch) ** 2
    bound = math.sqrt(6.0 / float(3 * area + dim))
    ref = vit.cls_token if vit.cls_token is not None else next(vit.parameters())
    prompts = torch.empty(num_prompts, dim, device=ref.device, dtype=ref.dtype)
    nn.init.uniform_(prompts, -bound, bound)
    return nn.Parameter(prompts)


def apply_prompts(vit: nn.Module, num_prompts: int, deep: bool) -> list[nn.Parameter]:
    """Wraps every block of a timm ViT in :class:`PromptedBlock`, in place (VPT shallow or deep).

    Args:
        vit: a timm ``VisionTransformer`` with a class token.
        num_prompts: prompt tokens (>= 1).
        deep: a new set of prompts at every block (VPT-deep), else at the first block only.

    Returns:
        The prompt parameters, first block's first (all that VPT trains besides the head).
    """
    if num_prompts < 1:
        raise ValueError(f"VPT num_prompts must be >= 1, got {num_prompts}")
    if getattr(vit, "cls_token", None) is None:
        raise ValueError("VPT needs a ViT with a class token (its feature is the CLS token)")
    prefix = int(vit.num_prefix_tokens)
    depth = len(vit.blocks)
    params = []
    for i in range(depth):
        prompts = _init_prompts(vit, num_prompts) if (deep or i == 0) else None
        if prompts is not None:
            params.append(prompts)
        vit.blocks[i] = PromptedBlock(vit.blocks[i], prefix, num_prompts, prompts, i == 0, i == depth - 1)
    return params
