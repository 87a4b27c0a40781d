"""What every fine-tuning data module shares: global batch size, loaders, the optional forgetting probe."""

from __future__ import annotations

from abc import abstractmethod

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ftforget.data.probe import ProbeData


class FineTuneDataModule(L.LightningDataModule):
    """A new-task data module with ``train``/``val``/``test`` splits and an optional forgetting probe.

    Subclasses set ``num_classes`` and implement :meth:`build_datasets`.

    Args:
        batch_size: the global batch size; each of the ``world_size`` processes loads
            ``batch_size / world_size``.
        num_workers: data-loading worker processes per training process.
        probe: the old-domain data that ``ForgettingCallback`` measures k-NN accuracy on.
    """

    num_classes: int

    def __init__(self, batch_size: int, num_workers: int, probe: ProbeData | None = None) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.probe = probe
        self._datasets: dict[str, Dataset] = {}
        self._cached_train: Dataset | None = None

    @abstractmethod
    def build_datasets(self) -> dict[str, Dataset]:
        """The ``train``, ``val`` and ``test`` datasets; items are ``(image, label)``."""

    def setup(self, stage: str | None = None) -> None:
        if not self._datasets:
            self._datasets = self.build_datasets()
        if self.probe is not None:
            self.probe.setup()

    def dataset(self, split: str) -> Dataset:
        """One split, after :meth:`setup`."""
        if not self._datasets:
            self.setup()
        return self._datasets[split]

    def per_device_batch_size(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        if self.batch_size % world:
            raise ValueError(
                f"data.batch_size={self.batch_size} is global and must divide by the world size {world}"
            )
        return self.batch_size // world

    def loader(self, split: str, shuffle: bool) -> DataLoader:
        """A loader of one split at the per-device batch size; shuffled training loaders drop the last batch."""
        return DataLoader(
            self.dataset(split),
            batch_size=self.per_device_batch_size(),
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def use_cached_train_features(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """From now on the train loader yields ``(feature, label)`` batches of these tensors (linear probe)."""
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} cached features but {len(labels)} labels")
        self._cached_train = TensorDataset(features, labels)

    def train_dataloader(self) -> DataLoader:
        if self._cached_train is not None:
            # Features live in memory: worker processes would only add start-up cost.
            return DataLoader(
                self._cached_train, batch_size=self.per_device_batch_size(), shuffle=True, drop_last=True
            )
        return self.loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)
