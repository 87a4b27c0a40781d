"""What the forgetting probe measures on: a labelled memory bank and labelled queries of the old domain.

A data module that supports forgetting measurement holds a :class:`ProbeData` as ``datamodule.probe``.
The ImageNet-1k probe (:class:`ftforget.data.imagenet.ImageNetProbe`) and the embedded demo's probe
implement it; the forgetting callback and ``ftforget measure`` only use this interface.
"""

from __future__ import annotations

import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch.utils.data import Dataset, Subset

log = logging.getLogger(__name__)
T = TypeVar("T")


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

    def bank_labels(self) -> list[int]:
        """The bank's labels in dataset order (subset draws group by them). The default reads every item;
        a probe whose items are costly to load (decoded images) overrides it."""
        return _labels_of(self.bank_dataset())

    def query_labels(self) -> list[int]:
        """The queries' labels in dataset order (see :meth:`bank_labels`)."""
        return _labels_of(self.query_dataset())

    def subset_datasets(self, bank: Sequence[int], queries: Sequence[int]) -> tuple[Dataset, Dataset]:
        """The bank and query datasets restricted to these positions (ascending), items re-indexed from 0.

        The default wraps :meth:`bank_dataset` and :meth:`query_dataset`; a probe that caches its pixels
        overrides it so that only the chosen images are cached.
        """
        return (
            IndexedDataset(_Unindexed(Subset(self.bank_dataset(), list(bank)))),
            IndexedDataset(_Unindexed(Subset(self.query_dataset(), list(queries)))),
        )


class _Unindexed(Dataset):
    """``(image, label)`` of a dataset's items (drops an :class:`IndexedDataset`'s old index)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        image, label = self.dataset[index][:2]
        return image, label


def _labels_of(dataset: Dataset) -> list[int]:
    return [int(dataset[i][1]) for i in range(len(dataset))]  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- subset draws
def draw_per_class(
    groups: Mapping[Hashable, Sequence[T]], n: int | None, seed: int, salt: str = ""
) -> dict[Hashable, list[T]]:
    """``n`` items of every class, the draw of ``seed``; all of a class that has fewer than ``n``.

    Each class's items are shuffled once, by a generator seeded with ``salt`` and the class alone (never
    with ``seed``), and seed ``s`` takes the window of ``n`` consecutive items starting at position
    ``s * n`` of that shuffle, wrapping around. So consecutive seeds give disjoint draws as long as the
    class has enough items (``draws * n <= class size``), and beyond that overlap as little as possible:
    the draws of seeds ``s .. s + D - 1`` together hold ``min(class size, D * n)`` distinct items, every
    item used ``floor`` or ``ceil`` of ``D * n / class size`` times. A class's pick depends on nothing but
    its own items, ``n``, ``seed`` and ``salt``, so it is the same in every process and run (a string
    seed is hashed with SHA-512 by :mod:`random`, independent of ``PYTHONHASHSEED``).

    Returns:
        ``class -> picked items``, in the order of ``groups``' items (not the shuffle's); ``n`` None
        returns every item.
    """
    if n is None:
        return {c: list(items) for c, items in groups.items()}
    if n < 1:
        raise ValueError(f"n per class must be >= 1 or None, got {n}")
    picked = {}
    for c, items in groups.items():
        order = list(range(len(items)))
        random.Random(f"{salt}:{c}").shuffle(order)
        take = min(n, len(items))
        start = (seed * take) % len(items) if items else 0
        window = [order[(start + i) % len(items)] for i in range(take)]
        picked[c] = [items[i] for i in sorted(window)]
    return picked


def positions_by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    """``label -> positions`` (ascending) of ``labels``, labels in ascending order."""
    groups: dict[int, list[int]] = {}
    for position, label in enumerate(labels):
        groups.setdefault(int(label), []).append(position)
    return dict(sorted(groups.items()))


@dataclass
class Draw:
    """One draw of a subset probe: its seed and the positions (ascending) of its bank and queries in the
    probe's full bank and query datasets."""

    seed: int
    bank: list[int]
    queries: list[int]


@dataclass
class SubsetDraws:
    """The draws of a subset probe and the union of the images they use (extracted once for all draws).

    Attributes:
        draws: one :class:`Draw` per seed.
        bank_union: positions in the full bank of every image some draw uses, ascending.
        query_union: the same for the queries.
        short_classes: ``part -> {class: images it has}`` for the classes with fewer than asked.
    """

    draws: list[Draw]
    bank_union: list[int]
    query_union: list[int]
    short_classes: dict[str, dict[int, int]] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        bank_labels: Sequence[int],
        query_labels: Sequence[int],
        bank_per_class: int | None,
        queries_per_class: int | None,
        seeds: Sequence[int],
    ) -> SubsetDraws:
        """The draws of ``seeds`` (:func:`draw_per_class`, salted ``bank`` and ``queries`` so that the two
        parts are shuffled independently); logs the classes that have fewer images than asked."""
        if not seeds:
            raise ValueError("a subset probe needs at least one draw")
        bank_groups, query_groups = positions_by_class(bank_labels), positions_by_class(query_labels)
        draws = []
        for seed in seeds:
            bank = draw_per_class(bank_groups, bank_per_class, seed, "bank")
            queries = draw_per_class(query_groups, queries_per_class, seed, "queries")
            draws.append(Draw(int(seed), sorted(sum(bank.values(), [])), sorted(sum(queries.values(), []))))
        short = {}
        for part, groups, n in (
            ("bank", bank_groups, bank_per_class),
            ("queries", query_groups, queries_per_class),
        ):
            if n is not None:
                short[part] = {c: len(p) for c, p in groups.items() if len(p) < n}
                if short[part]:
                    few = ", ".join(f"class {c}: {k}" for c, k in list(short[part].items())[:10])
                    log.warning(
                        f"subset probe: {len(short[part])} classes have fewer than {n} {part} images and give "
                        f"all they have ({few}{', ...' if len(short[part]) > 10 else ''})"
                    )
        return cls(
            draws,
            sorted(set().union(*(d.bank for d in draws))),
            sorted(set().union(*(d.queries for d in draws))),
            short,
        )
