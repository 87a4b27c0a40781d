"""One k-NN measurement of a feature function on a probe, in one process or across all ranks.

Shared by :class:`~ftforget.forgetting.callback.ForgettingCallback` (live model, during training) and
``ftforget measure`` (a checkpoint, after training), so that both measure exactly the same thing.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ftforget.data.probe import ProbeData
from ftforget.forgetting.cache import FeatureCache, cache_key
from ftforget.forgetting.collectives import all_reduce_sum
from ftforget.forgetting.config import KNNConfig
from ftforget.forgetting.features import shard_features
from ftforget.forgetting.knn import check_knn_args, check_labels
from ftforget.forgetting.sharded_knn import gather_queries, sharded_knn_hits
from ftforget.inference import FeatureFn
from ftforget.stats import bootstrap_mean_ci, pack_hits, unpack_hits


@dataclass
class ProbeMeasurement:
    """Accuracies (fractions) per k and what they were computed on.

    Attributes:
        top1_ci: per k, the percentile bootstrap 95% interval ``[lo, hi]`` of ``top1`` over the queries
            (:func:`~ftforget.stats.bootstrap_mean_ci`).
        top1_hits: per k, the per-query top-1 hit vector in query-index order, packed
            (:func:`~ftforget.stats.pack_hits`; :meth:`hits` unpacks it): the paired drop intervals
            need it, and packed it stays a short string in JSON and checkpoints.
    """

    top1: dict[int, float]
    top5: dict[int, float]
    num_queries: int
    num_bank: int
    seconds: float
    cached: bool = False
    top1_ci: dict[int, list[float]] = field(default_factory=dict)
    top1_hits: dict[int, str] = field(default_factory=dict)

    def hits(self, k: int) -> np.ndarray:
        """The ``(num_queries,)`` bool top-1 hit vector of ``k``."""
        return unpack_hits(self.top1_hits[k], self.num_queries)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def evaluate_probe(
    feature_fn: FeatureFn,
    probe: ProbeData,
    config: KNNConfig,
    device: torch.device,
    fingerprint: str | None = None,
    cache: FeatureCache | None = None,
) -> ProbeMeasurement:
    """Weighted k-NN top-1/top-5 of ``feature_fn`` on ``probe``; every rank must call it, all get the result.

    The result also carries each k's bootstrap interval of top-1 and its per-query hit vector (packed).

    The caller sets the mode (:func:`ftforget.inference.measurement_mode`); this function only reads.

    Args:
        feature_fn: images -> features (e.g. ``model.features``).
        probe: the bank and query data (``setup()`` already called).
        config: k values, temperature, batching and storage options.
        device: where features are computed and kept.
        fingerprint: hash of the weights behind ``feature_fn``; with ``cache`` and a non-empty
            ``probe.cache_key()`` it enables the on-disk feature cache.
        cache: the on-disk feature cache, or None.
    """
    start = time.perf_counter()
    bank_ds, query_ds = probe.bank_dataset(), probe.query_dataset()
    n_bank, n_query = len(bank_ds), len(query_ds)  # type: ignore[arg-type]
    check_knn_args(config.ks, config.temperature, bank_size=n_bank)
    if n_query == 0:
        raise ValueError(f"probe {probe.name!r} has no query samples")
    key = None
    if cache is not None and fingerprint and probe.cache_key():
        key = cache_key(probe.cache_key(), fingerprint, config.extraction_settings(device))
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
    counts, hits = sharded_knn_hits(
        all_queries,
        bank,
        probe.num_classes,
        config.ks,
        config.temperature,
        config.query_chunk,
        config.bank_chunk,
    )
    return ProbeMeasurement(
        top1={k: c[0] / n_query for k, c in counts.items()},
        top5={k: c[1] / n_query for k, c in counts.items()},
        num_queries=n_query,
        num_bank=n_bank,
        seconds=time.perf_counter() - start,
        cached=bank_cached and query_cached,
        top1_ci={k: list(bootstrap_mean_ci(c[0], n_query)) for k, c in counts.items()},
        top1_hits={k: pack_hits(h.numpy()) for k, h in hits.items()},
    )
