"""Linear probing: the backbone is frozen, only the new head trains."""

from __future__ import annotations

from typing import Any

from ftforget.methods.base import FineTuningModule


class LinearProbing(FineTuningModule):
    """Linear probing. Takes every argument of :class:`FineTuningModule`."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.set_trainable([self.head])
