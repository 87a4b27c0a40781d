"""Measuring forgetting: DINO's weighted k-NN on an old-domain probe, during training or from a checkpoint.

Layered bottom-up, each module importing only those above it in this list:

- :mod:`~ftforget.forgetting.knn`: the pure k-NN (top-k per bank shard, merge, weighted vote);
- :mod:`~ftforget.forgetting.config`: :class:`KNNConfig`, every setting of the probe, written once;
- :mod:`~ftforget.forgetting.collectives`: gathers and reductions, no-ops in one process;
- :mod:`~ftforget.forgetting.features`: this rank's shard of features, extracted or cached;
- :mod:`~ftforget.forgetting.cache`: weight fingerprints and the on-disk feature cache;
- :mod:`~ftforget.forgetting.sharded_knn`: the k-NN driver over a bank sharded across ranks;
- :mod:`~ftforget.forgetting.evaluate`: one measurement of a feature function on a probe;
- :mod:`~ftforget.forgetting.callback`: :class:`ForgettingCallback`, the measurement at fixed global steps.

``ftforget measure`` (:mod:`ftforget.commands.measure`) measures outside training with the same pieces.

The names below are imported on first use (PEP 562), so that the k-NN and the distributed helpers load
without Lightning (fast start-up of spawned worker processes).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DEFAULT_EVAL_STEPS": "config",
    "ForgettingCallback": "callback",
    "KNNConfig": "config",
    "ProbeMeasurement": "evaluate",
    "evaluate_probe": "evaluate",
    "knn_predict": "knn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
