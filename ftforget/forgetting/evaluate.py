"""One k-NN measurement of a feature function on a probe, in one process or across all ranks.

Shared by :class:`~ftforget.forgetting.callback.ForgettingCallback` (live model, during training) and
``ftforget measure`` (a checkpoint, after training), so that both measure exactly the same thing.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from ftforget.data.probe import ProbeData
from ftforget.forgetting.cache import FeatureCache, cache_key
from ftforget.forgetting.distributed import (
    FeatureFn,
    ShardFeatures,
    all_reduce_sum,
    dist_info,
    extract_features,
    gather_queries,
    shard_range,
    sharded_knn_counts,
)
from ftforget.forgetting.knn import DEFAULT_K, DEFAULT_TEMPERATURE, check_knn_args, check_labels

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str | None, option: str) -> torch.dtype | None:
    """Maps ``float32``/``float16``/``bfloat16`` (or None) to a torch dtype; names the option on error."""
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"{option}={name!r} is not one of {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class KNNConfig:
    """How the probe is measured.

    Args:
        k: neighbour counts, evaluated in one pass; the first is the headline one (DINO: 20; also 10, 100, 200).
        temperature: DINO's T in the vote weight ``exp(sim / T)``.
        batch_size: images per forward pass during feature extraction (per rank).
        num_workers: data-loading workers per rank.
        bank_dtype: storage of the bank and query features: ``float32`` (DINO), ``float16`` or ``bfloat16``.
        autocast_dtype: autocast dtype of the forward pass on CUDA (None: fp32); CPU always runs fp32.
        query_chunk: queries per similarity block.
        bank_chunk: bank rows per similarity block.
    """

    k: list[int] = field(default_factory=lambda: [DEFAULT_K])
    temperature: float = DEFAULT_TEMPERATURE
    batch_size: int = 256
    num_workers: int = 4
    bank_dtype: str = "float32"
    autocast_dtype: str | None = "bfloat16"
    query_chunk: int = 1024
    bank_chunk: int = 65536

    def __post_init__(self) -> None:
        self.k = check_knn_args(self.k, self.temperature)
        for name in ("batch_size", "query_chunk", "bank_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        parse_dtype(self.bank_dtype, "bank_dtype")
        parse_dtype(self.autocast_dtype, "autocast_dtype")

    def extraction_settings(self, device: torch.device) -> dict[str, object]:
        """Everything besides weights and data that can change a feature's bits (for the cache key)."""
        return {
            "bank_dtype": self.bank_dtype,
            "autocast_dtype": self.autocast_dtype if device.type == "cuda" else None,
            "device_type": device.type,
            "batch_size": self.batch_size,  # batch composition can change the last bits of a forward pass
        }


@dataclass
class ProbeMeasurement:
    """Accuracies (fractions) per k and what they were computed on."""

    top1: dict[int, float]
    top5: dict[int, float]
    num_queries: int
    num_bank: int
    seconds: float
    cached: bool = False

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _shard(
    part: str,
    dataset: Dataset,
    feature_fn: FeatureFn,
    config: KNNConfig,
    device: torch.device,
    cache: FeatureCache | None,
    key: str | None,
) -> tuple[ShardFeatures, bool]:
    """This rank's features of ``dataset``: from the cache when possible, else extracted (and cached)."""
    rank, world = dist_info()
    if cache is not None and key is not None:
        hit = cache.load(key, part, rank, world, device)
        expected = shard_range(len(dataset), rank, world)  # type: ignore[arg-type]
        if hit is not None and torch.equal(hit.indices.cpu(), torch.arange(expected.start, expected.stop)):
            return hit, True
    shard = extract_features(
        feature_fn,
        dataset,
        config.batch_size,
        config.num_workers,
        device,
        storage_dtype=parse_dtype(config.bank_dtype, "bank_dtype"),  # type: ignore[arg-type]
        autocast_dtype=parse_dtype(config.autocast_dtype, "autocast_dtype"),
    )
    if cache is not None and key is not None:
        cache.save(key, part, rank, world, shard)
    return shard, False


def evaluate_probe(
    feature_fn: FeatureFn,
    probe: ProbeData,
    config: KNNConfig,
    device: torch.device,
    fingerprint: str | None = None,
    cache: FeatureCache | None = None,
) -> ProbeMeasurement:
    """Weighted k-NN top-1/top-5 of ``feature_fn`` on ``probe``; every rank must call it, all get the result.

    The caller sets eval mode, ``no_grad`` and any weight merging; this function only reads.

    Args:
        feature_fn: images -> features (e.g. ``pl_module.features``).
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
    check_knn_args(config.k, config.temperature, bank_size=n_bank)
    if n_query == 0:
        raise ValueError(f"probe {probe.name!r} has no query samples")
    key = None
    if cache is not None and fingerprint and probe.cache_key():
        key = cache_key(probe.cache_key(), fingerprint, config.extraction_settings(device))
    bank, bank_cached = _shard("bank", bank_ds, feature_fn, config, device, cache, key)
    queries, query_cached = _shard("queries", query_ds, feature_fn, config, device, cache, key)
    (counted_bank,) = all_reduce_sum([bank.indices.numel()], device)
    if int(counted_bank) != n_bank:
        raise RuntimeError(
            f"the bank shards hold {int(counted_bank)} samples, expected each of {n_bank} once"
        )
    check_labels(bank.labels, probe.num_classes, f"probe {probe.name!r} bank")
    all_queries = gather_queries(queries, n_query)
    check_labels(all_queries.labels, probe.num_classes, f"probe {probe.name!r} query")
    counts = sharded_knn_counts(
        all_queries,
        bank,
        probe.num_classes,
        config.k,
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
    )


@contextmanager
def measurement_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode, ``no_grad`` and merged LoRA weights inside; the exact prior state restored on exit.

    Restored on exit: every submodule's own train/eval flag (a deliberately frozen submodule stays in
    eval mode) and the python, NumPy, torch CPU and CUDA random states, which data loaders and dropout
    would otherwise advance: the training trajectory is the same as without the measurement.
    """
    cuda_rng = torch.cuda.is_available() and torch.cuda.is_initialized()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if cuda_rng else None
    flags = [(m, m.training) for m in module.modules()]
    merged = (
        module.merged() if hasattr(module, "merged") else nullcontext()
    )  # LoRA: merge/unmerge is bit-exact
    try:
        module.eval()
        with torch.no_grad(), merged:
            yield
    finally:
        for m, flag in flags:
            m.training = flag
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
