"""Linear probing: the backbone is frozen, only the new head trains."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from ftforget.forgetting.distributed import autocast_context
from ftforget.forgetting.evaluate import measurement_mode
from ftforget.methods.base import FineTuningModule


class LinearProbing(FineTuningModule):
    """Linear probing.

    Args:
        cache_features: compute the backbone features of the training set once, at the start of the fit,
            and train the head on them (an epoch then costs a matrix product). Exact when the training
            transform is deterministic; with random augmentation, the one augmented view drawn for the
            cache is reused in every epoch, which is *not* the same training as without the cache.
        **kwargs: the arguments of :class:`FineTuningModule`.
    """

    def __init__(self, cache_features: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.set_trainable([self.head])

    def training_logits(self, x: torch.Tensor) -> torch.Tensor:
        # A 2-d batch is a batch of cached features, an image batch is 4-d.
        return self.head(x) if x.ndim == 2 else self(x)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if not self.hparams.cache_features:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "use_cached_train_features"):
            raise ValueError(
                "model.cache_features=true needs a data module with use_cached_train_features "
                f"(ftforget's data modules have it), got {type(datamodule).__name__}"
            )
        features, labels = self.extract_features(datamodule.loader("train", shuffle=False))
        datamodule.use_cached_train_features(features, labels)
        rank_zero_info(
            f"LinearProbing: cached {len(labels):,} training features of width {features.shape[1]}"
        )

    def extract_features(self, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features of every batch of ``loader``, on the CPU.

        Under the forgetting probe's :func:`measurement_mode`, so train flags and random states come back
        exactly: the fit then draws the same batches as one without the cache.
        """
        feats, labels = [], []
        with measurement_mode(self):
            for batch in loader:
                x = batch[0].to(self.device, non_blocking=True)
                with autocast_context(self.device, torch.bfloat16):
                    feats.append(self.features(x).float().cpu())
                labels.append(batch[1].cpu())
        return torch.cat(feats), torch.cat(labels)
