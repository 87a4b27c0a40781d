"""LoRA: low-rank updates on chosen projections of every block; the backbone itself stays frozen."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch

from ftforget.adapters.lora import (
    LoRALinear,
    apply_lora,
    lora_disabled,
    lora_merged,
    lora_modules,
    merge_lora,
    unmerge_lora,
)
from ftforget.methods.base import FineTuningModule


class LoRA(FineTuningModule):
    """LoRA fine-tuning; the adapters and the head train.

    Args:
        r: rank (>= 1).
        alpha: scale numerator (update multiplied by ``alpha / r``); ``None`` means ``alpha = r`` (scale 1,
            as the paper).
        targets: which projections get an adapter in every block: ``q``, ``k``, ``v`` (rows of timm's fused
            qkv), ``proj``, ``fc1``, ``fc2``. The paper adapts ``q`` and ``v``.
        dropout: dropout on the LoRA branch input.
        **kwargs: the arguments of :class:`FineTuningModule`.
    """

    table_label = "LoRA r={r}"

    def __init__(
        self,
        r: int = 8,
        alpha: float | None = None,
        targets: list[str] | None = None,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lora_layers = apply_lora(
            self.backbone, r=r, alpha=alpha, targets=targets or ["q", "v"], dropout=dropout
        )
        adapters = [m.lora_A for m in self.lora_layers] + [m.lora_B for m in self.lora_layers]
        self.set_trainable([*adapters, self.head])

    def merge(self) -> None:
        """Merges the adapters into the frozen weights (inference speed); :meth:`unmerge` undoes it exactly."""
        merge_lora(self.backbone)

    def unmerge(self) -> None:
        unmerge_lora(self.backbone)

    @contextmanager
    def merged(self) -> Iterator[None]:
        """Context in which the adapters are merged."""
        with lora_merged(self.backbone):
            yield

    def inference_context(self) -> AbstractContextManager:
        """Adapters merged while measuring: one matmul per projection, bit-exact restore after."""
        return self.merged()

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Context in which the backbone computes its original, pretrained function."""
        with lora_disabled(self.backbone):
            yield

    def pretrained_context(self) -> AbstractContextManager:
        """The adapters switched off: the pretrained function, with no copy of any weight."""
        return self.adapter_disabled()

    def anchored_weights(self) -> dict[str, torch.Tensor]:
        """Each adapted projection's weight with its update (``P.weight``: ``W + scale · B @ A``): L2-SP
        to a fixed anchor (``anchor_weights``) pulls the function, not the adapters, toward it."""
        return {
            f"{path}.weight": module.effective_weight()
            for path, module in self.backbone.named_modules()
            if isinstance(module, LoRALinear)
        }

    @torch.no_grad()
    def apply_knob(self, start: FineTuningModule, a: float) -> None:
        """``W0 + a (W1 - W0)`` for LoRA: the frozen weights are ``W0`` and the update ``W1 - W0`` is
        ``scale * B @ A`` (``B`` starts at zero), so the knob multiplies every adapter's scale by ``a``."""
        self.check_knob_start(start)
        for module in lora_modules(self.backbone):
            module.scale = module.alpha / module.r * a
