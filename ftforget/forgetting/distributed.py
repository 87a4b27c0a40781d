"""Distributed feature extraction and the sharded k-NN; every helper is a no-op in a single process.

Rules kept here: every rank enters every collective (none is ever behind a rank check), shards are
contiguous index ranges with no padding (a sample is extracted by exactly one rank, whatever the dataset
size and world size), and no rank ever holds the whole bank: only the queries and each query chunk's
top-k candidates travel between ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset

from ftforget.data.probe import IndexedDataset
from ftforget.forgetting.knn import count_correct, local_topk, merge_topk, normalize, predict_from_topk

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device(fallback: torch.device) -> torch.device:
    """NCCL only moves CUDA tensors, gloo only CPU ones."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return fallback


def shard_range(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous slice of ``range(n)``; sizes differ by at most one and nothing is padded."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's tensor along dim 0, in rank order; row counts may differ (even be 0).

    A rank with no rows may not know the trailing shape yet (no batch ran), so the trailing shape is
    agreed on by a max-reduction first.
    """
    _, world = dist_info()
    if world == 1:
        return tensor
    device = _comm_device(tensor.device)
    ndim = torch.tensor([tensor.dim()], device=device)
    dist.all_reduce(ndim, op=dist.ReduceOp.MAX)
    shape = list(tensor.shape) + [0] * (int(ndim) - tensor.dim())
    sizes = torch.tensor(shape, device=device)
    gathered_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(gathered_sizes, sizes)
    trailing = torch.stack(gathered_sizes)[:, 1:].max(dim=0).values.tolist()
    rows = [int(s[0]) for s in gathered_sizes]
    padded = tensor.new_zeros((max(rows), *trailing), device=device)
    if tensor.shape[0]:
        padded[: tensor.shape[0]] = tensor.reshape(tensor.shape[0], *trailing).to(device)
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded)
    return torch.cat([b[:r] for b, r in zip(buffers, rows, strict=True)]).to(tensor.device)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sums a few numbers over ranks (float64, exact for counts)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(device))
    if dist_info()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank, so that all ranks take the same branch."""
    t = torch.tensor([1 if flag else 0], device=_comm_device(device))
    if dist_info()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


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


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast on CUDA when a dtype is given; nothing on CPU (fp32 there, as training)."""
    if device.type == "cuda" and dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


@torch.no_grad()
def extract_features(
    feature_fn: FeatureFn,
    dataset: Dataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    storage_dtype: torch.dtype = torch.float32,
    autocast_dtype: torch.dtype | None = None,
) -> ShardFeatures:
    """L2-normalised features of this rank's shard of ``dataset``, kept on ``device``.

    Items are re-indexed by their position in ``dataset`` (:class:`IndexedDataset`), which is what the
    de-duplication and the exactly-once check rely on. No collective runs here, so ranks with shards of
    different sizes never wait for each other.
    """
    loader = sharded_loader(IndexedDataset(dataset), batch_size, num_workers, device)
    n = len(loader.dataset)  # type: ignore[arg-type]
    labels = torch.empty(n, dtype=torch.long, device=device)
    indices = torch.empty(n, dtype=torch.long, device=device)
    features: torch.Tensor | None = None
    pos = 0
    for images, targets, idx in loader:
        with autocast_context(device, autocast_dtype):
            out = feature_fn(images.to(device, non_blocking=True))
        out = normalize(out)
        if features is None:  # the width is known after the first batch; preallocating avoids a 2x cat
            features = torch.empty(n, out.shape[1], dtype=storage_dtype, device=device)
        features[pos : pos + len(out)] = out.to(storage_dtype)
        labels[pos : pos + len(out)] = torch.as_tensor(targets, device=device)
        indices[pos : pos + len(out)] = torch.as_tensor(idx, device=device)
        pos += len(out)
    if features is None:
        features = torch.empty(0, 0, dtype=storage_dtype, device=device)
    return ShardFeatures(features, labels, indices)


def gather_queries(local: ShardFeatures, expected: int) -> ShardFeatures:
    """All ranks' query shards, ordered by sample index, after checking each sample appears exactly once.

    Raises:
        RuntimeError: a sample is missing or duplicated (a padding sampler, or a dataset whose length
            changed between ranks).
    """
    feats = all_gather_rows(local.features)
    labels = all_gather_rows(local.labels)
    indices = all_gather_rows(local.indices)
    order = indices.argsort()
    indices = indices[order]
    if indices.numel() != expected or not torch.equal(indices.cpu(), torch.arange(expected)):
        raise RuntimeError(
            f"distributed feature extraction covered {indices.numel()} query samples, expected each of "
            f"{expected} exactly once"
        )
    return ShardFeatures(feats[order], labels[order], indices)


def sharded_knn_counts(
    queries: ShardFeatures,
    bank: ShardFeatures,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    query_chunk: int = 1024,
    bank_chunk: int = 65536,
) -> dict[int, tuple[int, int]]:
    """Top-1 and top-5 hit counts per k of every query against the bank sharded over the ranks.

    Every rank holds all queries and its own bank shard; per query chunk (the same chunks on every rank)
    each rank finds its local top-k, the candidates are all-gathered and merged, and every rank votes on
    the merged top-k, so all ranks end with the same counts without a broadcast.
    """
    k_max = max(ks)
    _, world = dist_info()
    hits = {k: [0, 0] for k in ks}
    for start in range(0, queries.features.shape[0], query_chunk):
        q = queries.features[start : start + query_chunk].float()
        sims, labels = local_topk(q, bank.features, bank.labels, k_max, bank_chunk)
        if world > 1:
            all_sims = all_gather_rows(sims[None]).flatten(0, 1).split(len(q))
            all_labels = all_gather_rows(labels[None]).flatten(0, 1).split(len(q))
            sims, labels = merge_topk(all_sims, all_labels, k_max)
        preds = predict_from_topk(sims, labels, num_classes, ks, temperature)
        targets = queries.labels[start : start + query_chunk]
        for k, p in preds.items():
            top1, top5 = count_correct(p, targets)
            hits[k][0] += top1
            hits[k][1] += top5
    return {k: (h[0], h[1]) for k, h in hits.items()}
