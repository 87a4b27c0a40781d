"""Full fine-tuning: every backbone parameter and the head train."""

from __future__ import annotations

from typing import Any

from ftforget.methods.base import FineTuningModule


class FullFineTuning(FineTuningModule):
    """Full fine-tuning. Takes every argument of :class:`FineTuningModule`."""

    table_label = "full fine-tuning"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.set_trainable([self.backbone, self.head])
