"""One k-NN measurement of a feature function on a probe, in one process or across all ranks.

Shared by :class:`~ftforget.forgetting.callback.ForgettingCallback` (live model, during training) and
``ftforget measure`` (a checkpoint, after training), so that both measure exactly the same thing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ftforget.data.probe import ProbeData, SubsetDraws
from ftforget.forgetting.cache import FeatureCache, cache_key
from ftforget.forgetting.collectives import all_reduce_sum
from ftforget.forgetting.config import KNNConfig, SubsetConfig
from ftforget.forgetting.features import ShardFeatures, shard_features, sharded_loader
from ftforget.forgetting.knn import check_knn_args, check_labels
from ftforget.forgetting.sharded_knn import gather_queries, sharded_knn_hits
from ftforget.inference import FeatureFn, autocast_context
from ftforget.stats import bootstrap_mean_ci, pack_hits, unpack_hits


def loader_top1(
    model: torch.nn.Module,
    loader: Any,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    batch_size: int = 1,
    label_offset: int = 0,
) -> float | None:
    """Top-1 of ``model``'s logits on ``loader``'s dataset (its batch size, else ``batch_size``; its workers
    and collate function), each sample counted once over the ranks; None if the dataset is empty. Every
    rank must call it; the caller sets the mode (:func:`ftforget.inference.measurement_mode`). A label
    ``y`` is class ``y + label_offset`` of the logits (a class-incremental head, the model's ``label_offset``)."""
    sharded = sharded_loader(
        loader.dataset,
        loader.batch_size or batch_size,
        loader.num_workers,
        device,
        collate_fn=loader.collate_fn,
    )
    correct, total = 0, 0
    for batch in sharded:
        x, y = batch[0].to(device), batch[1].to(device)
        with autocast_context(device, autocast_dtype):
            logits = model(x)
        correct += int((logits.argmax(dim=1) == y + label_offset).sum())
        total += len(y)
    correct, total = all_reduce_sum([correct, total], device)
    return correct / total if total else None


@dataclass
class ProbeMeasurement:
    """Accuracies (fractions) per k and what they were computed on.

    Attributes:
        top1: per k, top-1 over the queries; for a subset probe (``draws`` not empty) over every draw's
            queries pooled: every draw takes ``min(n, class size)`` queries of each class, so the draws
            have equal query counts and this is the mean over the draws.
        top5: the same for top-5.
        num_queries: the length of the hit vectors: the queries, pooled over the draws of a subset probe.
        num_bank: the bank size each k-NN searched (a subset probe: the largest draw's).
        seconds: the wall-clock of the whole measurement (extraction and k-NN).
        cached: the features came from the on-disk cache.
        top1_ci: per k, the percentile bootstrap 95% interval ``[lo, hi]`` of ``top1`` over the queries
            (:func:`~ftforget.stats.bootstrap_mean_ci`).
        top1_hits: per k, the per-query top-1 hit vector in query-index order (a subset probe: draw after
            draw), packed (:func:`~ftforget.stats.pack_hits`; :meth:`hits` unpacks it): the paired drop
            intervals need it, and packed it stays a short string in JSON and checkpoints.
        num_images: images passed through the network (a subset probe: the union of its draws, once).
        images_per_s: ``num_images / seconds``.
        draws: a subset probe's draws, each ``{"seed", "num_bank", "num_queries", "top1": {k: ...}}``;
            empty for the full probe.
        top1_spread: per k, the sample standard deviation of top-1 over the draws (None for one draw).
    """

    top1: dict[int, float]
    top5: dict[int, float]
    num_queries: int
    num_bank: int
    seconds: float
    cached: bool = False
    top1_ci: dict[int, list[float]] = field(default_factory=dict)
    top1_hits: dict[int, str] = field(default_factory=dict)
    num_images: int = 0
    images_per_s: float = 0.0
    draws: list[dict[str, Any]] = field(default_factory=list)
    top1_spread: dict[int, float | None] = field(default_factory=dict)

    def hits(self, k: int) -> np.ndarray:
        """The ``(num_queries,)`` bool top-1 hit vector of ``k``."""
        return unpack_hits(self.top1_hits[k], self.num_queries)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def subset_draws(probe: ProbeData, subset: SubsetConfig) -> SubsetDraws:
    """The draws of ``subset`` on ``probe`` (``setup()`` already called); the same on every rank."""
    return SubsetDraws.build(
        probe.bank_labels(),
        probe.query_labels(),
        subset.bank_per_class,
        subset.queries_per_class,
        subset.seeds,
    )


def _extract(
    probe: ProbeData,
    bank_ds: Dataset,
    query_ds: Dataset,
    feature_fn: FeatureFn,
    config: KNNConfig,
    device: torch.device,
    cache: FeatureCache | None,
    key: str | None,
) -> tuple[ShardFeatures, ShardFeatures, bool]:
    """This rank's bank shard and all queries (gathered), checked; and whether both came from the cache."""
    n_bank, n_query = len(bank_ds), len(query_ds)  # type: ignore[arg-type]
    if n_query == 0:
        raise ValueError(f"probe {probe.name!r} has no query samples")
    bank, bank_cached = shard_features("bank", bank_ds, feature_fn, config, device, cache, key)
    queries, query_cached = shard_features("queries", query_ds, feature_fn, config, device, cache, key)
    (counted_bank,) = all_reduce_sum([bank.indices.numel()], device)
    if int(counted_bank) != n_bank:
        raise RuntimeError(
            f"the bank shards hold {int(counted_bank)} samples, expected each of {n_bank} once"
        )
    check_labels(bank.labels, probe.num_classes, f"probe {probe.name!r} bank")
    all_queries = gather_queries(queries, n_query)
    check_labels(all_queries.labels, probe.num_classes, f"probe {probe.name!r} query")
    return bank, all_queries, bank_cached and query_cached


def evaluate_probe(
    feature_fn: FeatureFn,
    probe: ProbeData,
    config: KNNConfig,
    device: torch.device,
    fingerprint: str | None = None,
    cache: FeatureCache | None = None,
    subset: SubsetConfig | None = None,
    draws: SubsetDraws | None = None,
) -> ProbeMeasurement:
    """Weighted k-NN top-1/top-5 of ``feature_fn`` on ``probe``; every rank must call it, all get the result.

    The result also carries each k's bootstrap interval of top-1, its per-query hit vector (packed), and
    the measurement's wall-clock and images per second.

    The caller sets the mode (:func:`ftforget.inference.measurement_mode`); this function only reads.

    Args:
        feature_fn: images -> features (e.g. ``model.features``).
        probe: the bank and query data (``setup()`` already called).
        config: k values, temperature, batching and storage options.
        device: where features are computed and kept.
        fingerprint: hash of the weights behind ``feature_fn``; with ``cache`` and a non-empty
            ``probe.cache_key()`` it enables the on-disk feature cache.
        cache: the on-disk feature cache, or None.
        subset: measure a subset probe (:class:`~ftforget.forgetting.config.SubsetConfig`): the union of
            its draws' images is extracted once, then every draw runs its own k-NN; None (or a subset
            that is the whole probe): the full probe.
        draws: ``subset``'s draws when the caller already built them (:func:`subset_draws`).
    """
    start = time.perf_counter()
    key = None
    if cache is not None and fingerprint and probe.cache_key():
        probe_key = probe.cache_key()
        if subset is not None and not subset.is_full:
            probe_key += "|" + subset.signature()
        key = cache_key(probe_key, fingerprint, config.extraction_settings(device))
    if subset is None or subset.is_full:
        bank_ds, query_ds = probe.bank_dataset(), probe.query_dataset()
        check_knn_args(config.ks, config.temperature, bank_size=len(bank_ds))  # type: ignore[arg-type]
        bank, queries, cached = _extract(probe, bank_ds, query_ds, feature_fn, config, device, cache, key)
        parts = [(None, queries, bank)]
    else:
        draws = draws if draws is not None else subset_draws(probe, subset)
        check_knn_args(config.ks, config.temperature, bank_size=min(len(d.bank) for d in draws.draws))
        bank_ds, query_ds = probe.subset_datasets(draws.bank_union, draws.query_union)
        bank, queries, cached = _extract(probe, bank_ds, query_ds, feature_fn, config, device, cache, key)
        parts = []
        # This rank's bank rows and all query rows, as positions in the full probe: each draw selects its own.
        bank_positions = torch.tensor(draws.bank_union, dtype=torch.long)[bank.indices.cpu()]
        query_union = torch.tensor(draws.query_union, dtype=torch.long)
        for draw in draws.draws:
            mask = torch.isin(bank_positions, torch.tensor(draw.bank, dtype=torch.long)).to(
                bank.features.device
            )
            rows = torch.searchsorted(query_union, torch.tensor(draw.queries, dtype=torch.long))
            rows = rows.to(queries.features.device)
            draw_bank = ShardFeatures(bank.features[mask], bank.labels[mask], bank.indices[mask])
            draw_queries = ShardFeatures(queries.features[rows], queries.labels[rows], queries.indices[rows])
            parts.append((draw, draw_queries, draw_bank))
    results = []
    for draw, draw_queries, draw_bank in parts:
        counts, hits = sharded_knn_hits(
            draw_queries,
            draw_bank,
            probe.num_classes,
            config.ks,
            config.temperature,
            config.query_chunk,
            config.bank_chunk,
        )
        results.append((draw, counts, hits, draw_queries.features.shape[0]))
    n_query = sum(n for *_, n in results)
    top1_counts = {k: sum(c[k][0] for _, c, _, _ in results) for k in config.ks}
    top5_counts = {k: sum(c[k][1] for _, c, _, _ in results) for k in config.ks}
    per_draw = [
        {
            "seed": draw.seed,
            "num_bank": len(draw.bank),
            "num_queries": n,
            "top1": {k: c[k][0] / n for k in config.ks},
        }
        for draw, c, _, n in results
        if draw is not None
    ]
    spread = {
        k: statistics.stdev([d["top1"][k] for d in per_draw]) if len(per_draw) > 1 else None
        for k in config.ks
    }
    seconds = time.perf_counter() - start
    num_images = len(bank_ds) + len(query_ds)  # type: ignore[arg-type]
    return ProbeMeasurement(
        top1={k: top1_counts[k] / n_query for k in config.ks},
        top5={k: top5_counts[k] / n_query for k in config.ks},
        num_queries=n_query,
        num_bank=max(d["num_bank"] for d in per_draw) if per_draw else len(bank_ds),  # type: ignore[arg-type]
        seconds=seconds,
        cached=cached,
        top1_ci={k: list(bootstrap_mean_ci(top1_counts[k], n_query)) for k in config.ks},
        top1_hits={k: pack_hits(torch.cat([h[k] for _, _, h, _ in results]).numpy()) for k in config.ks},
        num_images=num_images,
        images_per_s=num_images / seconds if seconds > 0 else 0.0,
        draws=per_draw,
        top1_spread=spread if per_draw else {},
    )


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values`` (ascending), ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for t in range(i, j + 1):
            ranks[order[t]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation: the Pearson correlation of the average ranks (None when fewer than two
    values, or when either side's values are all equal)."""
    if len(a) != len(b):
        raise ValueError(f"spearman: {len(a)} and {len(b)} values")
    if len(a) < 2:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True)) / (va * vb) ** 0.5


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def fidelity_statistics(
    names: Sequence[str], full: Sequence[float], subset: Sequence[float], reference: int | None = None
) -> dict[str, Any]:
    """How faithfully a subset probe reproduces the full probe on the same models.

    Args:
        names: the models (checkpoints), one per accuracy.
        full: each model's top-1 on the full probe.
        subset: each model's top-1 on the subset probe (the mean over its draws).
        reference: the index of the step-0 model (the pretrained backbone), whose accuracy the drops are
            taken from; None: no drops.

    Returns:
        ``spearman``: the rank correlation of the accuracies across the models (:func:`spearman`);
        ``max_abs_acc_diff``: the largest ``|full - subset|`` over the models; ``max_abs_drop_diff``: the
        largest ``|drop_full - drop_subset|`` over the other models, a drop being ``acc(reference) - acc``
        (None without a reference or another model); ``orderings_preserved``: whether every pair of
        models compares the same way on both probes (the sign of the difference, a tie counting as its
        own order); ``pairs``: the number of pairs; ``reversed_pairs``: the pairs whose order changed,
        as ``[name_i, name_j]``.
    """
    if not len(names) == len(full) == len(subset):
        raise ValueError(
            f"fidelity: {len(names)} names, {len(full)} full and {len(subset)} subset accuracies"
        )
    if not names:
        raise ValueError("fidelity: no models to compare")
    reversed_pairs = [
        [names[i], names[j]]
        for i in range(len(names))
        for j in range(i + 1, len(names))
        if _sign(full[i] - full[j]) != _sign(subset[i] - subset[j])
    ]
    drops = None
    if reference is not None and len(names) > 1:
        drops = max(
            abs((full[reference] - full[i]) - (subset[reference] - subset[i]))
            for i in range(len(names))
            if i != reference
        )
    return {
        "spearman": spearman(full, subset),
        "max_abs_acc_diff": max(abs(f - s) for f, s in zip(full, subset, strict=True)),
        "max_abs_drop_diff": drops,
        "orderings_preserved": not reversed_pairs,
        "pairs": len(names) * (len(names) - 1) // 2,
        "reversed_pairs": reversed_pairs,
    }
