"""Top-k fine-tuning: the last k transformer blocks and the head train, everything below stays frozen."""

from __future__ import annotations

from typing import Any

from ftforget.methods.base import FineTuningModule


class TopKFineTuning(FineTuningModule):
    """Fine-tunes the last ``k`` blocks.

    Args:
        k: how many of the last blocks train (1 <= k <= depth).
        train_final_norm: whether the final LayerNorm, which sits after the last block, trains too
            (it adds ``2 * embed_dim`` parameters; the paper's count of top-3 leaves it frozen).
        **kwargs: the arguments of :class:`FineTuningModule`.
    """

    table_label = "top-{k} blocks"

    def __init__(self, k: int = 3, train_final_norm: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        depth = len(self.backbone.blocks)
        if not 1 <= k <= depth:
            raise ValueError(f"TopKFineTuning k={k} must be between 1 and the backbone depth {depth}")
        modules = [*self.backbone.blocks[depth - k :], self.head]
        if train_final_norm:
            modules.append(self.backbone.norm)
        self.set_trainable(modules)

    @property
    def frozen_prefix_depth(self) -> int:
        """The blocks below the last ``k`` never change (:func:`ftforget.inference.frozen_prefix_depth`)."""
        return len(self.backbone.blocks) - self.hparams.k
