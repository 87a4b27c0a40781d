"""Bootstrap intervals of the stream metrics: the test images of every task resampled, paired across rows.

``R[i][j]`` is the mean of task ``j``'s per-image hits under the backbone of row ``i``; every row scores
the same images of task ``j``, so one resample of task ``j``'s images (with replacement) is applied to
every row at once. Forgetting and backward transfer are differences on the same images, and their
intervals keep that pairing. Percentile intervals, a fixed seed: the interval is a function of the hits.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ftforget.stats import LEVEL, RESAMPLES
from ftforget.stream.metrics import stream_metrics


def stream_metrics_ci(
    hits: Sequence[Sequence[np.ndarray]],
    reference: Sequence[float | None] | None = None,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> dict[str, tuple[float, float] | None]:
    """``metric -> (lo, hi)`` for each metric of :func:`~ftforget.stream.metrics.stream_metrics` (None
    where the metric is None); ``hits[i][j]`` the 0/1 vector of task ``j``'s test images under row ``i``
    (``j <= i``). ``reference`` (the single-task accuracies) is held fixed.

    Raises:
        ValueError: no rows, a row of the wrong length, vectors of one task with different lengths, or
            ``resamples < 1`` / ``level`` outside (0, 1).
    """
    T = len(hits)
    if T == 0 or any(len(row) != i + 1 for i, row in enumerate(hits)):
        raise ValueError("hits: row i must hold the vectors of tasks 0..i")
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"need resamples >= 1 and level in (0, 1), got {resamples=}, {level=}")
    sizes = [len(hits[j][j]) for j in range(T)]
    if any(len(hits[i][j]) != sizes[j] for i in range(T) for j in range(i + 1)):
        raise ValueError("hits: every row must score the same test images of a task")
    rng = np.random.default_rng(seed)
    vectors = [[np.asarray(v, dtype=np.float64) for v in row] for row in hits]
    draws: dict[str, list[float]] = {}
    for _ in range(resamples):
        picks = [rng.integers(0, n, n) for n in sizes]
        R = [[float(vectors[i][j][picks[j]].mean()) if j <= i else None for j in range(T)] for i in range(T)]
        for name, value in stream_metrics(R, reference=reference).items():
            if value is not None:
                draws.setdefault(name, []).append(value)
    alpha = (1.0 - level) / 2.0
    point = stream_metrics(
        [[float(vectors[i][j].mean()) if j <= i else None for j in range(T)] for i in range(T)],
        reference=reference,
    )
    out: dict[str, tuple[float, float] | None] = {}
    for name, value in point.items():
        if value is None:
            out[name] = None
            continue
        lo, hi = np.quantile(np.asarray(draws[name]), [alpha, 1.0 - alpha])
        out[name] = (float(lo), float(hi))
    return out
