"""Error bars and curve statistics of forgetting measurements: pure functions on numbers and hit vectors.

The bootstrap intervals resample the probe's queries. For a mean of 0/1 outcomes, resampling ``n``
outcomes with replacement is exactly a binomial draw on the hit count, and for the paired difference of
two 0/1 outcomes on the same queries (values -1, 0, 1) exactly a multinomial draw on the three counts, so
an interval costs ``B`` random numbers whatever the number of queries.

A per-query hit vector travels between processes and into checkpoints packed, 8 queries a byte, as a
base64 string (:func:`pack_hits`, :func:`unpack_hits`): 50,000 queries take 8,336 characters.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Mapping, Sequence

import numpy as np

#: bootstrap resamples of an interval
RESAMPLES = 2000
#: the interval's coverage
LEVEL = 0.95
#: the relative drops (fractions of the step-0 accuracy) whose first step the report gives
DROP_THRESHOLDS = (0.05, 0.10, 0.50)


def pack_hits(hits: np.ndarray | Sequence[bool]) -> str:
    """A 0/1 vector as a base64 string of its bits (:func:`numpy.packbits`, big-endian bit order)."""
    bits = np.packbits(np.asarray(hits, dtype=bool))
    return base64.b64encode(bits.tobytes()).decode("ascii")


def unpack_hits(packed: str, n: int) -> np.ndarray:
    """The ``(n,)`` bool vector that :func:`pack_hits` packed.

    Raises:
        ValueError: ``packed`` holds fewer than ``n`` bits.
    """
    raw = np.frombuffer(base64.b64decode(packed), dtype=np.uint8)
    if raw.size * 8 < n:
        raise ValueError(f"packed hit vector holds {raw.size * 8} bits, expected {n}")
    return np.unpackbits(raw, count=n).astype(bool)


def _percentiles(draws: np.ndarray, level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(draws, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_mean_ci(
    hits: int, n: int, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``n`` 0/1 outcomes of which ``hits`` are 1.

    Each resample of the ``n`` outcomes (with replacement) has ``Binomial(n, hits / n)`` ones, so the
    resampled means are drawn as such, exactly and at a cost independent of ``n``.

    Args:
        hits: the number of 1s (e.g. top-1 hits).
        n: the number of outcomes (queries), ``>= 1``.
        resamples: the bootstrap resamples ``B``.
        level: the interval's coverage.
        seed: the generator's seed (the interval is a function of its arguments).

    Returns:
        ``(lo, hi)``, fractions in [0, 1] with ``lo <= hits / n <= hi``.

    Raises:
        ValueError: ``n < 1``, ``hits`` outside ``[0, n]``, ``resamples < 1`` or ``level`` outside (0, 1).
    """
    if n < 1 or not 0 <= hits <= n or resamples < 1:
        raise ValueError(f"need n >= 1, 0 <= hits <= n and resamples >= 1, got {hits=}, {n=}, {resamples=}")
    draws = np.random.default_rng(seed).binomial(n, hits / n, size=resamples) / n
    return _percentiles(draws, level)


def paired_counts(before: np.ndarray, after: np.ndarray) -> tuple[int, int, int]:
    """``(lost, gained, n)`` of two 0/1 vectors over the same queries: hit before but not after, the
    reverse, and the number of queries.

    Raises:
        ValueError: the vectors' shapes differ.
    """
    before, after = np.asarray(before, dtype=bool), np.asarray(after, dtype=bool)
    if before.shape != after.shape:
        raise ValueError(f"paired hit vectors differ in shape: {before.shape} vs {after.shape}")
    return int((before & ~after).sum()), int((~before & after).sum()), int(before.size)


def bootstrap_drop_ci(
    lost: int, gained: int, n: int, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0
) -> tuple[float, float]:
    """Paired percentile bootstrap interval of a drop ``mean(before) - mean(after)`` on the same queries.

    The queries are resampled jointly for both measurements; the per-query difference is +1 (``lost``
    queries), -1 (``gained``) or 0 (the rest), so a resample's counts are
    ``Multinomial(n, (lost, gained, rest) / n)`` and its drop ``(lost* - gained*) / n``, drawn exactly.

    Args:
        lost: queries hit before and missed after (:func:`paired_counts`).
        gained: queries missed before and hit after.
        n: all queries, ``>= 1``.
        resamples: the bootstrap resamples ``B``.
        level: the interval's coverage.
        seed: the generator's seed.

    Returns:
        ``(lo, hi)`` of the drop, a fraction in [-1, 1], with ``lo <= (lost - gained) / n <= hi``.

    Raises:
        ValueError: negative counts, ``lost + gained > n``, ``n < 1``, ``resamples < 1``, or ``level``
            outside (0, 1).
    """
    if n < 1 or lost < 0 or gained < 0 or lost + gained > n or resamples < 1:
        raise ValueError(f"need n >= 1, 0 <= lost + gained <= n, got {lost=}, {gained=}, {n=}")
    probs = np.array([lost, gained, n - lost - gained], dtype=float) / n
    counts = np.random.default_rng(seed).multinomial(n, probs, size=resamples)
    return _percentiles((counts[:, 0] - counts[:, 1]) / n, level)


def auc_norm(curve: Mapping[int, float]) -> float | None:
    """The normalised area under an accuracy curve over log-spaced steps.

    With ``x = log10(1 + step)``, the trapezoid integral of the accuracy over ``x`` between the first and
    the last measured step, divided by ``x_last - x_first``: the curve's mean level on a log-step axis, so
    a flat curve gives its level and a curve in [0, 1] gives a value in [0, 1]. A curve of one step gives
    that step's accuracy; an empty one None.
    """
    if not curve:
        return None
    steps = sorted(curve)
    if len(steps) == 1:
        return float(curve[steps[0]])
    x = np.log10(1.0 + np.asarray(steps, dtype=float))
    y = np.asarray([curve[s] for s in steps], dtype=float)
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))
    return area / float(x[-1] - x[0])


def steps_to_drop(curve: Mapping[int, float], threshold: float) -> int | None:
    """The first measured step whose relative drop ``(acc_0 - acc_t) / acc_0`` exceeds ``threshold``
    (strictly), None if none does or the curve has no step 0 with a positive accuracy."""
    base = curve.get(0)
    if not base or base <= 0:
        return None
    for step in sorted(curve):
        if (base - curve[step]) / base > threshold:
            return step
    return None


def max_drop(curve: Mapping[int, float]) -> float | None:
    """The largest absolute drop ``acc_0 - acc_t`` over the measured steps (0 or more, as step 0's drop
    is 0), None without step 0."""
    base = curve.get(0)
    if base is None:
        return None
    return max(base - value for value in curve.values())


def final_drop(curve: Mapping[int, float]) -> float | None:
    """The absolute drop ``acc_0 - acc_last`` at the last measured step, None without step 0."""
    base = curve.get(0)
    if base is None:
        return None
    return base - curve[max(curve)]


def curve_statistics(
    curve: Mapping[int, float], thresholds: Sequence[float] = DROP_THRESHOLDS
) -> dict[str, float | int | None]:
    """:func:`auc_norm`, :func:`max_drop`, :func:`final_drop` and :func:`steps_to_drop` of each
    threshold (keys ``steps_to_drop_<percent>``, e.g. ``steps_to_drop_5``) of one curve."""
    stats: dict[str, float | int | None] = {
        "auc_norm": auc_norm(curve),
        "max_drop": max_drop(curve),
        "final_drop": final_drop(curve),
    }
    for threshold in thresholds:
        stats[f"steps_to_drop_{threshold_name(threshold)}"] = steps_to_drop(curve, threshold)
    return stats


def threshold_name(threshold: float) -> str:
    """``0.05`` -> ``"5"``, ``0.125`` -> ``"12.5"``: a threshold as a percentage without trailing zeros."""
    percent = round(100.0 * threshold, 6)
    return str(int(percent)) if math.isclose(percent, round(percent)) else f"{percent:g}"
