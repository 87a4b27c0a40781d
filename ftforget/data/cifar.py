"""CIFAR-100 for fine-tuning, with a held-out validation split so that model selection never sees test."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset, Subset
from torchvision import datasets
from torchvision.transforms import v2 as T

from ftforget.data.base import FineTuneDataModule
from ftforget.data.probe import ProbeData
from ftforget.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ftforget.machine import default_num_workers

NORMALIZATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "half": ((0.5,) * 3, (0.5,) * 3)}

#: a normalisation: a name in :data:`NORMALIZATIONS`, or the ``(mean, std)`` itself
Stats = str | tuple[Sequence[float], Sequence[float]]


def _stats(normalization: Stats) -> tuple[Sequence[float], Sequence[float]]:
    return NORMALIZATIONS[normalization] if isinstance(normalization, str) else normalization


def train_transform(size: int, scale: tuple[float, float], normalization: Stats) -> T.Compose:
    """The paper's augmentation: RandomResizedCrop of the small image to ``size``, horizontal flip."""
    mean, std = _stats(normalization)
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(size, scale=scale, antialias=True),
            T.RandomHorizontalFlip(),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )


def eval_transform(size: int, normalization: Stats) -> T.Compose:
    """The paper's evaluation transform: Resize to ``size``."""
    mean, std = _stats(normalization)
    return T.Compose(
        [
            T.ToImage(),
            T.Resize((size, size), antialias=True),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(mean, std),
        ]
    )


def holdout_split(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """A fixed-seed (train, val) split of ``range(n)``; the same for every process and every run."""
    if not 0 < val_size < n:
        raise ValueError(
            f"data.val_size={val_size} must be between 1 and the training set size - 1 ({n - 1})"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[val_size:]), sorted(perm[:val_size])


class CIFAR100DataModule(FineTuneDataModule):
    """CIFAR-100 (torchvision's python format) for fine-tuning, plus an optional forgetting probe.

    Args:
        root: folder that holds (or will receive) ``cifar-100-python/``.
        download: download CIFAR-100 into ``root`` if it is not there (needs internet access).
        batch_size: the global batch size; each of the ``world_size`` processes loads
            ``batch_size / world_size``.
        num_workers: data-loading worker processes per training process (default: ``min(8, cores - 1)``,
            :func:`~ftforget.machine.default_num_workers`).
        val_size: images held out of the 50,000 training images for validation and model selection
            (the test split is only used by ``ftforget test``).
        split_seed: seed of the held-out split.
        image_size: side of the network input.
        crop_scale: RandomResizedCrop scale range.
        normalization: ``imagenet`` (mean/std of the DINO backbone's pretraining) or ``half`` (0.5/0.5,
            what the official code used for CIFAR while its ImageNet probe used ImageNet's).
        probe: the forgetting probe (e.g. ImageNet-1k) that ``ForgettingCallback`` measures on.
    """

    num_classes = 100

    def __init__(
        self,
        root: str = "data/cifar100",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = default_num_workers(),  # noqa: B008 (evaluated once: the machine)
        val_size: int = 5000,
        split_seed: int = 0,
        image_size: int = 224,
        crop_scale: tuple[float, float] = (0.08, 1.0),
        normalization: Literal["imagenet", "half"] = "imagenet",
        probe: ProbeData | None = None,
    ) -> None:
        super().__init__(batch_size, num_workers, probe)
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"data.normalization={normalization!r}: choose from {sorted(NORMALIZATIONS)}")
        self.save_hyperparameters(ignore=["probe"])
        self.root = Path(root).expanduser()

    def prepare_data(self) -> None:
        if self.hparams.download:
            datasets.CIFAR100(str(self.root), train=True, download=True)
            datasets.CIFAR100(str(self.root), train=False, download=True)

    def check_inputs(self, stage: str) -> None:
        if self.hparams.download:
            return  # Lightning's prepare_data downloads it first (on one process per node)
        super().check_inputs(stage)

    def _load(self, train: bool, transform: T.Compose) -> datasets.CIFAR100:
        try:
            return datasets.CIFAR100(str(self.root), train=train, transform=transform, download=False)
        except RuntimeError as err:
            raise FileNotFoundError(
                f"CIFAR-100 not found (or corrupt) under data.root={str(self.root)!r}: expected "
                f"{str(self.root / 'cifar-100-python')!r} with files 'train', 'test' and 'meta'. "
                "Download it with --data.download true (needs internet), or point --data.root at a copy."
            ) from err

    def build_datasets(self) -> dict[str, Dataset]:
        hp = self.hparams
        train_tf = train_transform(hp.image_size, tuple(hp.crop_scale), hp.normalization)
        eval_tf = eval_transform(hp.image_size, hp.normalization)
        train_aug, train_plain = self._load(True, train_tf), self._load(True, eval_tf)
        train_idx, val_idx = holdout_split(len(train_aug), hp.val_size, hp.split_seed)
        return {
            "train": Subset(train_aug, train_idx),
            "val": Subset(train_plain, val_idx),
            "test": self._load(False, eval_tf),
        }
