"""The vision PEFT methods that Hugging Face PEFT does not ship: BitFit, SSF, AdaptFormer, VPT.

Each is small surgery from :mod:`ftforget.adapters` plus the choice of what trains (selected by module
identity). BitFit, SSF and AdaptFormer compute exactly the pretrained function at initialisation; VPT does
not (its prompts are attended to from the first step). None has a frozen prefix of blocks for the probe to
reuse: BitFit and SSF change the patch embedding, AdaptFormer and VPT the first block.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from ftforget.adapters.adaptformer import apply_adaptformer
from ftforget.adapters.bitfit import bias_parameters
from ftforget.adapters.prompts import apply_prompts
from ftforget.adapters.ssf import apply_ssf
from ftforget.methods.base import FineTuningModule


class BitFit(FineTuningModule):
    """BitFit (Ben Zaken et al., 2022): every bias of the backbone (Linear, LayerNorm, patch projection) and
    the head train; ViT-B/16: 102,912 biases. Takes every argument of :class:`FineTuningModule`."""

    table_label = "BitFit"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.set_trainable([*bias_parameters(self.backbone), self.head])


class SSF(FineTuningModule):
    """SSF (Lian et al., 2022): a per-channel scale and shift after every operation
    (:mod:`ftforget.adapters.ssf`), identity at initialisation; they and the head train. Takes every
    argument of :class:`FineTuningModule`."""

    table_label = "SSF"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ssf_layers = apply_ssf(self.backbone)
        self.set_trainable([*(p for m in self.ssf_layers for p in (m.scale, m.shift)), self.head])


class AdaptFormer(FineTuningModule):
    """AdaptFormer (Chen et al., 2022): a parallel bottleneck adapter beside every block's MLP
    (:mod:`ftforget.adapters.adaptformer`), identity at initialisation; the adapters and the head train.

    Args:
        bottleneck: the adapter's hidden width (the paper: 64; 16 matches LoRA r=8's budget on ViT-B).
        scale: the fixed scale of the adapter's output (the paper: 0.1).
        **kwargs: the arguments of :class:`FineTuningModule`.
    """

    table_label = "AdaptFormer b={bottleneck}"

    def __init__(self, bottleneck: int = 16, scale: float = 0.1, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.adapters = apply_adaptformer(self.backbone, bottleneck=bottleneck, scale=scale)
        self.set_trainable([*self.adapters, self.head])

    @contextmanager
    def adapter_disabled(self) -> Iterator[None]:
        """Every adapter's output scale set to 0: the pretrained function, exactly."""
        scales = [a.scale for a in self.adapters]
        for a in self.adapters:
            a.scale = 0.0
        try:
            yield
        finally:
            for a, s in zip(self.adapters, scales, strict=True):
                a.scale = s

    def pretrained_context(self) -> AbstractContextManager:
        return self.adapter_disabled()


class VisualPromptTuning(FineTuningModule):
    """Visual Prompt Tuning (Jia et al., 2022), shallow or deep (:mod:`ftforget.adapters.prompts`); the
    prompts and the head train. The feature is the CLS token after the final norm, prompts excluded.

    Args:
        num_prompts: prompt tokens (VPT: 1-200 depending on the task).
        deep: a new set of prompts at every block (VPT-deep), else only at the input of the first (shallow).
        **kwargs: the arguments of :class:`FineTuningModule`.
    """

    table_label = "VPT-{depth} {num_prompts} prompts"

    @classmethod
    def describe(cls, init_args: dict[str, Any]) -> str:
        """``VPT-deep 32 prompts`` or ``VPT-shallow 64 prompts``."""
        return super().describe({**init_args, "depth": "deep" if init_args.get("deep", True) else "shallow"})

    def __init__(self, num_prompts: int = 32, deep: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.prompts = apply_prompts(self.backbone, num_prompts=num_prompts, deep=deep)
        self.set_trainable([*self.prompts, self.head])
