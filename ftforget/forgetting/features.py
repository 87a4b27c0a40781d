"""Probe features of this rank's shard of a dataset: extracted with the one inference loop, or cached.

Shards are contiguous index ranges with no padding (:func:`~ftforget.forgetting.collectives.shard_range`):
a sample is extracted by exactly one rank, whatever the dataset size and world size, and no collective
runs here, so ranks with shards of different sizes never wait for each other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ftforget.data.probe import IndexedDataset
from ftforget.forgetting.collectives import dist_info, shard_range
from ftforget.forgetting.config import KNNConfig, to_dtype
from ftforget.forgetting.knn import normalize
from ftforget.guards import check_finite
from ftforget.inference import FeatureFn, autocast_context, iterate_features
from ftforget.progress import progress_bar

if TYPE_CHECKING:
    from ftforget.forgetting.cache import FeatureCache


@dataclass
class ShardFeatures:
    """One rank's L2-normalised features of its contiguous shard of a dataset."""

    features: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def to(self, device: torch.device) -> ShardFeatures:
        return ShardFeatures(self.features.to(device), self.labels.to(device), self.indices.to(device))


def sharded_loader(
    dataset: Dataset, batch_size: int, num_workers: int, device: torch.device, **kwargs: Any
) -> DataLoader:
    """A sequential loader over this rank's shard of ``dataset`` (no DistributedSampler: it pads)."""
    rank, world = dist_info()
    subset = Subset(dataset, shard_range(len(dataset), rank, world))  # type: ignore[arg-type]
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        **kwargs,
    )


#: ``(part, dataset, config, device) -> ShardFeatures | None``: another way to compute a shard's features
#: (the frozen-prefix reuse of :mod:`ftforget.forgetting.prefix`); None means the plain extraction.
ShardExtractor = Callable[[str, Dataset, KNNConfig, torch.device], "ShardFeatures | None"]

_EXTRACTOR: ContextVar[ShardExtractor | None] = ContextVar("ftforget_shard_extractor", default=None)


@contextmanager
def shard_extractor(extractor: ShardExtractor | None) -> Iterator[None]:
    """Inside, :func:`shard_features` asks ``extractor`` first; its None falls back to :func:`extract_features`.

    The extractor must return exactly what :func:`extract_features` would (same features, bit for bit,
    labels and indices): it is a faster route, never another measurement.
    """
    token = _EXTRACTOR.set(extractor)
    try:
        yield
    finally:
        _EXTRACTOR.reset(token)


def collect_features(
    outputs: Iterable[tuple[torch.Tensor, Any, Any]],
    n: int,
    device: torch.device,
    storage_dtype: torch.dtype,
    desc: str,
) -> ShardFeatures:
    """Normalises and stores the ``(features, targets, indices)`` batches of an ``n``-sample shard.

    Rank 0 shows a progress bar named ``desc`` (:func:`~ftforget.progress.progress_bar`).
    """
    labels = torch.empty(n, dtype=torch.long, device=device)
    indices = torch.empty(n, dtype=torch.long, device=device)
    features: torch.Tensor | None = None
    pos = 0
    with progress_bar(n, desc) as bar:
        for out, targets, idx in outputs:
            out = normalize(out)
            if features is None:  # the width is known after the first batch; preallocating avoids a 2x cat
                features = torch.empty(n, out.shape[1], dtype=storage_dtype, device=device)
            features[pos : pos + len(out)] = out.to(storage_dtype)
            labels[pos : pos + len(out)] = torch.as_tensor(targets, device=device)
            indices[pos : pos + len(out)] = torch.as_tensor(idx, device=device)
            pos += len(out)
            bar.update(len(out))
    if features is None:
        features = torch.empty(0, 0, dtype=storage_dtype, device=device)
    return ShardFeatures(features, labels, indices)


@torch.no_grad()
def extract_features(
    feature_fn: FeatureFn,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    storage_dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
    desc: str = "probe features",
) -> ShardFeatures:
    """L2-normalised features of this rank's shard of ``dataset``, kept on ``device``.

    Items are re-indexed by their position in ``dataset`` (:class:`IndexedDataset`), which is what the
    de-duplication and the exactly-once check rely on. Rank 0 shows a progress bar named ``desc``
    (:func:`~ftforget.progress.progress_bar`; it counts this rank's shard, the others run as fast).
    """
    loader = sharded_loader(IndexedDataset(dataset), batch_size, num_workers, device)
    context = partial(autocast_context, device, autocast_dtype)
    outputs = (
        (out, targets, idx) for out, (targets, idx) in iterate_features(feature_fn, loader, device, context)
    )
    return collect_features(outputs, len(loader.dataset), device, storage_dtype, desc)  # type: ignore[arg-type]


def shard_features(
    part: str,
    dataset: Dataset,
    feature_fn: FeatureFn,
    config: KNNConfig,
    device: torch.device,
    cache: FeatureCache | None = None,
    key: str | None = None,
) -> tuple[ShardFeatures, bool]:
    """This rank's features of ``dataset`` and whether they came from the cache (``key`` given).

    A cached shard is used only if it covers exactly this rank's index range; otherwise the features
    are extracted (by the :func:`shard_extractor` in force, else :func:`extract_features`) and, with a
    cache, written back.
    """
    rank, world = dist_info()
    if cache is not None and key is not None:
        hit = cache.load(key, part, rank, world, device)
        expected = shard_range(len(dataset), rank, world)  # type: ignore[arg-type]
        if hit is not None and torch.equal(hit.indices.cpu(), torch.arange(expected.start, expected.stop)):
            return hit, True
    extractor = _EXTRACTOR.get()
    shard = extractor(part, dataset, config, device) if extractor is not None else None
    if shard is None:
        shard = extract_features(
            feature_fn,
            dataset,
            config.batch_size,
            config.num_workers,
            device,
            storage_dtype=to_dtype(config.bank_dtype),  # type: ignore[arg-type]
            autocast_dtype=to_dtype(config.autocast_dtype),
            desc=f"probe features ({part})",
        )
    check_finite(shard.features, f"probe features ({part})")  # never measured, nor cached
    if cache is not None and key is not None:
        cache.save(key, part, rank, world, shard)
    return shard, False
