"""What every fine-tuning data module shares: global batch size, loaders, the optional forgetting probe."""

from __future__ import annotations

from abc import abstractmethod

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from ftforget.data.probe import ProbeData
from ftforget.data.resumable import EvalShard, ResumableLoader, ResumableSampler, SeededItems, run_seed


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
        self._train_override: tuple[Dataset, bool] | None = None

    @abstractmethod
    def build_datasets(self) -> dict[str, Dataset]:
        """The ``train``, ``val`` and ``test`` datasets; items are ``(image, label)``."""

    def setup(self, stage: str | None = None) -> None:
        # The probe is set up by whoever measures it (the forgetting callback), once it knows the model.
        if not self._datasets:
            self._datasets = self.build_datasets()

    def check_inputs(self, stage: str) -> None:
        """Checks the data before a stage starts (``ftforget fit`` calls it before the trainer writes anything):
        a missing or corrupt dataset fails here, naming the option. Builds the datasets once."""
        del stage  # every stage needs the same files
        self.setup()

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
        """A loader of one split at the per-device batch size; shuffled training loaders drop the last batch.
        Under DDP an unshuffled (evaluation) split is shared without padding (:class:`EvalShard`)."""
        dataset = self.dataset(split)
        trainer = self.trainer
        sampler = None
        if not shuffle and trainer is not None and trainer.world_size > 1:
            sampler = EvalShard(len(dataset), trainer.global_rank, trainer.world_size)  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch_size(),
            shuffle=shuffle,
            sampler=sampler,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def replace_train_dataset(self, dataset: Dataset, in_memory: bool = False) -> None:
        """From now on the train loader yields batches of ``dataset`` instead of the built training set.

        Args:
            dataset: items ``(input, label)``; shuffled and batched as the training set.
            in_memory: the items are ready tensors: load them in this process (worker processes would
                only add start-up cost).
        """
        self._train_override = (dataset, in_memory)

    def train_dataloader(self) -> DataLoader:
        """The training batches: an order drawn from ``(seed, epoch)``, augmentation seeded per sample, and a
        mid-epoch resume that continues where the checkpoint left off (:mod:`ftforget.data.resumable`)."""
        dataset, in_memory = self._train_override or (self.dataset("train"), False)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batch_size = self.per_device_batch_size()
        seed = run_seed()
        workers = 0 if in_memory else self.num_workers  # features in memory: workers would only add start-up
        sampler = ResumableSampler(len(dataset), seed, batch_size, rank, world, self._done_batches)  # type: ignore[arg-type]
        return ResumableLoader(
            SeededItems(dataset),
            batch_size=batch_size,
            sampler=sampler,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(seed),
        )

    def _done_batches(self) -> int:
        """Batches of the current epoch already trained: Lightning's restored progress on a mid-epoch resume,
        0 when an epoch starts."""
        trainer = self.trainer
        return 0 if trainer is None else int(trainer.fit_loop.epoch_loop.batch_progress.current.completed)

    def val_dataloader(self) -> DataLoader:
        return self.loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader("test", shuffle=False)
