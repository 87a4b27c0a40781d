"""Linear probing: the backbone is frozen, only the new head trains."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ftforget.inference import iterate_features, measurement_mode
from ftforget.methods.base import FineTuningModule


@runtime_checkable
class ReplaceableTrainSet(Protocol):
    """The data-module side of the feature cache: hand out the training loader unshuffled, and train on
    another dataset from now on. ftforget's data modules implement it without knowing why."""

    def loader(self, split: str, shuffle: bool) -> DataLoader: ...

    def replace_train_dataset(self, dataset: Dataset, in_memory: bool = False) -> None: ...


class LinearProbing(FineTuningModule):
    """Linear probing.

    Args:
        cache_features: compute the backbone features of the training set once, at the start of the fit,
            and train the head on them (an epoch then costs a matrix product). Exact when the training
            transform is deterministic; with random augmentation, the one augmented view drawn for the
            cache is reused in every epoch, which is *not* the same training as without the cache.
        **kwargs: the arguments of :class:`FineTuningModule`.
    """

    table_label = "linear probe"

    def __init__(self, cache_features: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.set_trainable([self.head])
        self._training_on_features = False

    @property
    def frozen_prefix_depth(self) -> int:
        """Every block is frozen (:func:`ftforget.inference.frozen_prefix_depth`)."""
        return len(self.backbone.blocks)

    def training_logits(self, x: torch.Tensor) -> torch.Tensor:
        # After the handshake in on_fit_start the training batches are features, not images.
        return self.head(x) if self._training_on_features else self(x)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self._training_on_features = False
        if not self.hparams.cache_features:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, ReplaceableTrainSet):
            raise ValueError(
                "model.cache_features=true needs a data module with loader(split, shuffle) and "
                f"replace_train_dataset(dataset) (ftforget's data modules have them), got {type(datamodule).__name__}"
            )
        features, labels = self.extract_features(datamodule.loader("train", shuffle=False))
        datamodule.replace_train_dataset(TensorDataset(features, labels), in_memory=True)
        self._training_on_features = True
        rank_zero_info(
            f"LinearProbing: cached {len(labels):,} training features of width {features.shape[1]}"
        )

    def extract_features(self, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features of every batch of ``loader``, on the CPU, in the trainer's precision.

        Under :func:`~ftforget.inference.measurement_mode`, so train flags and random states come back
        exactly: the fit then draws the same batches as one without the cache.
        """
        forward_context = self.trainer.precision_plugin.forward_context
        feats, labels = [], []
        with measurement_mode(self):
            for out, (targets, *_) in iterate_features(self.features, loader, self.device, forward_context):
                feats.append(out.float().cpu())
                labels.append(targets.cpu())
        return torch.cat(feats), torch.cat(labels)
