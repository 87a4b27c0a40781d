"""What the forgetting probe measures on: a labelled memory bank and labelled queries of the old domain.

A data module that supports forgetting measurement holds a :class:`ProbeData` as ``datamodule.probe``.
The ImageNet-1k probe (:class:`ftforget.data.imagenet.ImageNetProbe`) and the embedded demo's probe
implement it; the forgetting callback and ``ftforget measure`` only use this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from torch.utils.data import Dataset


class IndexedDataset(Dataset):
    """Wraps a dataset so that items are ``(image, label, index)``: gathered features can be de-duplicated."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        image, label = self.dataset[index][:2]
        return image, label, index


class ProbeData(ABC):
    """A k-NN probe: bank and query datasets whose items are ``(image, label, index)``.

    Subclasses validate their inputs in :meth:`setup` and raise errors that name the offending path, so
    that a bad probe fails before training starts.
    """

    #: a short name used in logs and the measurement file, e.g. ``imagenet1k``
    name: str = "probe"

    @property
    @abstractmethod
    def num_classes(self) -> int:
        """Number of classes of the probe domain."""

    @abstractmethod
    def setup(self) -> None:
        """Checks the inputs and builds the datasets (idempotent, cheap after the first call)."""

    @abstractmethod
    def bank_dataset(self) -> Dataset:
        """The labelled memory bank (ImageNet-1k: the train images, or a per-class subset)."""

    @abstractmethod
    def query_dataset(self) -> Dataset:
        """The labelled queries (ImageNet-1k: the val images, or a subset)."""

    def match_input_size(self, size: int) -> None:
        """Told the model's input side before :meth:`setup`; a probe whose image size is unset adopts it."""
        del size  # fixed-size probes ignore it

    def match_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Told the measured backbone's pretrained mean/std before :meth:`setup`; a probe that normalises
        images may adopt them."""
        del mean, std  # probes with fixed inputs ignore it

    def cache_key(self) -> str:
        """Identifies the probe's data and transform for on-disk feature caches (override to enable caching)."""
        return ""
