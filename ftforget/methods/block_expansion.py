"""Block Expansion: identity copies of blocks are inserted and trained; the original network stays frozen."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch

from ftforget.adapters.block_expansion import expand, expansion_skipped, paper_positions
from ftforget.methods.base import FineTuningModule


class BlockExpansion(FineTuningModule):
    """Block Expansion fine-tuning; the new blocks (all their parameters) and the head train.

    Give exactly one of ``p`` and ``positions``.

    Args:
        p: number of new blocks, placed as the paper does: after the last block of each group of
            ``depth / p`` blocks (p must divide the depth).
        positions: explicit original block indices after which a copy is inserted. The official code's
            p=1 run used ``[10]`` (its ``split=11``): the copy sits before the last original block.
        **kwargs: the arguments of :class:`FineTuningModule`. The final norm stays frozen.
    """

    table_label = "Block Expansion p={p}"

    @classmethod
    def describe(cls, init_args: dict[str, Any]) -> str:
        if init_args.get("p") is None and init_args.get("positions") is not None:
            return f"Block Expansion after blocks {init_args['positions']}"
        return super().describe(init_args)

    def __init__(self, p: int | None = None, positions: list[int] | None = None, **kwargs: Any) -> None:
        if (p is None) == (positions is None):
            raise ValueError(
                f"BlockExpansion needs exactly one of p and positions, got p={p}, positions={positions}"
            )
        super().__init__(**kwargs)
        depth = len(self.backbone.blocks)
        chosen = paper_positions(depth, p) if p is not None else list(positions)
        self.new_block_indices = expand(self.backbone, chosen)
        new_blocks = [self.backbone.blocks[i] for i in self.new_block_indices]
        self.set_trainable([*new_blocks, self.head])

    def anchored_weights(self) -> dict[str, torch.Tensor]:
        """Refused: the new blocks Block Expansion trains have no counterpart in another network's weights
        (their indices name other blocks there), so L2-SP to a fixed anchor has nothing to compare."""
        raise ValueError(
            "model.init_args.anchor_weights with l2sp_weight: Block Expansion trains new blocks, which have no "
            "counterpart in the anchor's weights; use distill_weight (distillation to the anchor) instead"
        )

    def pretrained_context(self) -> AbstractContextManager:
        """The network without its new blocks: the pretrained function, with no copy of any weight."""
        return expansion_skipped(self.backbone, self.new_block_indices)

    @property
    def frozen_prefix_depth(self) -> int:
        """The original blocks before the first new one never change (:func:`ftforget.inference.frozen_prefix_depth`)."""
        return min(self.new_block_indices)
