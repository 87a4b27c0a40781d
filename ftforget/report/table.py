"""The paper-style table: one row per run or seed group, every number read from what the runs logged.

Accuracies are the logged fractions, unchanged (the Markdown shows them as percentages); the drops are
the ones the forgetting callback logged against its step-0 measurement, computed here only when a run
did not log them. A seed group's row holds the mean and the sample std of each run's values (its drops
are the mean of each run's drops, not the drop of the mean curve).
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ftforget.report.groups import RunGroup, group_runs, method_label
from ftforget.report.runs import ReportError, Run
from ftforget.stats import DROP_THRESHOLDS, curve_statistics, threshold_name

#: the step of the paper's claim ("loses over 70% ... after just 10 iterations")
EARLY_STEP = 10
#: TensorBoard stores scalars as float32, exact for integers only up to 2**24
FLOAT32_EXACT_INT = 2**24


#: the numeric columns that a seed group aggregates (mean, and sample std when two or more runs have them)
AGGREGATED = (
    "new_task_test_acc1",
    "probe_acc_step0",
    "probe_acc_step10",
    "probe_acc_end",
    "drop_abs",
    "drop_rel",
    "mean",
    "probe_share",
)
#: the steps-to-drop columns, one per threshold of :data:`ftforget.stats.DROP_THRESHOLDS`
STEPS_TO_DROP = tuple(f"steps_to_drop_{threshold_name(t)}" for t in DROP_THRESHOLDS)
#: the curve statistics (:func:`ftforget.stats.curve_statistics`) that a seed group aggregates like
#: :data:`AGGREGATED`; a steps-to-drop mean is over the runs that reached the drop (``<name>_runs``)
CURVE_STATS = ("auc_norm", "max_drop", *STEPS_TO_DROP)
#: the Markdown cell of a row without a new-task test accuracy (and of its mean)
NOT_TESTED = "— (not tested)"


@dataclass
class Row:
    """One row of the table: a run, or the mean of a seed group; fractions in [0, 1], None where missing.

    For a seed group (:mod:`~ftforget.report.groups`) every value of :data:`AGGREGATED` is the mean over
    the runs that logged it and ``<name>_std`` its sample standard deviation (``ddof=1``), None unless at
    least two runs logged it; a single run is a group of one (``n = 1``, no std). ``seeds`` and ``run``
    list the group's seeds and run directories, joined by ``;``.

    The curve statistics (:data:`CURVE_STATS`, :func:`ftforget.stats.curve_statistics` of each run's
    headline curve) aggregate the same way; ``steps_to_drop_<p>`` is the first step whose relative drop
    exceeds ``p`` %, its mean over the ``steps_to_drop_<p>_runs`` runs that reached it (None if none
    did). ``probe_acc_end_ci_lo/hi`` and ``drop_abs_ci_lo/hi`` are the bootstrap 95% intervals the
    forgetting callback stored with the last measurement (``top1_ci``, the paired ``drop_abs_ci``): a
    single run's only (None for a seed group, whose spread is the std over seeds, and for runs
    measured before intervals were stored).

    ``probe_share`` is the forgetting measurements' share of the run's wall-clock: the callback's
    ``probe_seconds_total`` over its ``elapsed`` (the fit's wall-clock, resumed sessions added up), both
    logged with the last measurement; None for runs that did not log them.
    """

    method: str
    n: int
    trainable_params: int | None
    params_exact: bool
    new_task_test_acc1: float | None
    new_task_test_acc1_std: float | None
    tested: int
    probe_acc_step0: float | None
    probe_acc_step0_std: float | None
    probe_acc_step10: float | None
    probe_acc_step10_std: float | None
    probe_acc_end: float
    probe_acc_end_std: float | None
    end_step: int
    drop_abs: float | None
    drop_abs_std: float | None
    drop_rel: float | None
    drop_rel_std: float | None
    mean: float | None
    mean_std: float | None
    probe: str
    k: int | None
    seeds: str
    run: str
    probe_acc_end_ci_lo: float | None = None
    probe_acc_end_ci_hi: float | None = None
    drop_abs_ci_lo: float | None = None
    drop_abs_ci_hi: float | None = None
    auc_norm: float | None = None
    auc_norm_std: float | None = None
    max_drop: float | None = None
    max_drop_std: float | None = None
    steps_to_drop_5: float | None = None
    steps_to_drop_5_std: float | None = None
    steps_to_drop_5_runs: int = 0
    steps_to_drop_10: float | None = None
    steps_to_drop_10_std: float | None = None
    steps_to_drop_10_runs: int = 0
    steps_to_drop_50: float | None = None
    steps_to_drop_50_std: float | None = None
    steps_to_drop_50_runs: int = 0
    probe_share: float | None = None
    probe_share_std: float | None = None


def run_labels(runs: list[Run]) -> dict[Path, str]:
    """Each run's row label (:func:`~ftforget.report.groups.group_runs`): a seed group's runs share one."""
    return {run.path: group.label for group in group_runs(runs) for run in group.runs}


def trainable_params(run: Run) -> tuple[int | None, bool]:
    """The trainable parameter count and whether it is exact.

    An integer in ``hparams.yaml`` (``params/trainable``) is exact; the event file's ``params/trainable``
    is a float32, exact below 2**24 only (ViT-B's 85,875,556 reads back as 85,875,552).
    """
    logged = run.hparams.get("params/trainable")
    if isinstance(logged, int):
        return logged, True
    last = run.last("params/trainable")
    if last is None:
        return None, True
    value = int(round(last[1]))
    return value, value < FLOAT32_EXACT_INT


def _measured(run: Run) -> dict[str, Any]:
    """The values of :data:`AGGREGATED` for one run, with its end step, probe and k.

    Raises:
        ReportError: the run has no forgetting measurement (naming its directory).
    """
    curve = run.probe_curve()
    if not curve:
        raise ReportError(
            f"run {str(run.path)!r} has no forgetting measurements: no 'forgetting/knn_top1' in its "
            "event files and no forgetting.jsonl (was it trained with ftforget.forgetting.ForgettingCallback?)"
        )
    end_step = max(curve)
    end = curve[end_step]
    start = curve.get(0)
    statistics_ = curve_statistics(curve)
    drop_abs = run.logged_at("drop_abs", end_step)
    if drop_abs is None:
        drop_abs = statistics_["final_drop"]  # acc_0 - acc_end, None without step 0
    drop_rel = run.logged_at("drop_rel", end_step)
    if drop_rel is None and start:
        drop_rel = (start - end) / start
    test = run.test_accuracy()
    head = run.headline_measurements()
    last = next((r for r in head if int(r["step"]) == end_step), {})
    top1_ci, drop_ci = _interval(last.get("top1_ci")), _interval(last.get("drop_abs_ci"))
    # The measurements' share of the run's wall-clock, both logged by the callback with its last line.
    probe_total, elapsed = last.get("probe_seconds_total"), last.get("elapsed")
    probe_share = (
        probe_total / elapsed if _is_number(probe_total) and _is_number(elapsed) and elapsed > 0 else None
    )
    return {
        **statistics_,
        "probe_acc_end_ci": top1_ci,
        "drop_abs_ci": drop_ci,
        "new_task_test_acc1": test,
        "probe_acc_step0": start,
        "probe_acc_step10": curve.get(EARLY_STEP),
        "probe_acc_end": end,
        "drop_abs": drop_abs,
        "drop_rel": drop_rel,
        "mean": None if test is None else (test + end) / 2.0,
        "probe_share": probe_share,
        "end_step": end_step,
        "probe": str(head[0].get("probe", "")) if head else "",
        "k": int(head[0]["k"]) if head else None,
    }


def _interval(value: Any) -> tuple[float, float] | None:
    """A stored ``[lo, hi]`` interval, or None where it is missing or malformed."""
    if (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, (int, float)) for v in value)
    ):
        return float(value[0]), float(value[1])
    return None


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """The mean and the sample standard deviation (``ddof=1``) of ``values``; the std is None for fewer
    than two values, both are None for none. The mean of one value is that value, exactly."""
    if not values:
        return None, None
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


def summarize_group(group: RunGroup) -> Row:
    """The table row of a seed group (or of a single run, a group of one).

    Raises:
        ReportError: a run has no forgetting measurement (naming its directory).
    """
    measured = [_measured(run) for run in group.runs]
    stats: dict[str, Any] = {}
    for name in (*AGGREGATED, *CURVE_STATS):
        values = [m[name] for m in measured if m[name] is not None]
        stats[name], stats[f"{name}_std"] = mean_std(values)
        if name in STEPS_TO_DROP:
            stats[f"{name}_runs"] = len(values)
    if len(measured) == 1:
        for name in ("probe_acc_end_ci", "drop_abs_ci"):
            interval = measured[0][name]
            if interval is not None:
                stats[f"{name}_lo"], stats[f"{name}_hi"] = interval
    counts = {trainable_params(run) for run in group.runs}
    params, params_exact = counts.pop() if len(counts) == 1 else (None, True)
    first = measured[0]
    return Row(
        method=group.label,
        n=group.n,
        trainable_params=params,
        params_exact=params_exact,
        tested=sum(m["new_task_test_acc1"] is not None for m in measured),
        end_step=max(m["end_step"] for m in measured),
        probe=first["probe"],
        k=first["k"],
        seeds=";".join("" if s is None else str(s) for s in group.seeds),
        run=";".join(str(p) for p in group.paths),
        **stats,
    )


def summarize(run: Run, label: str | None = None) -> Row:
    """The table row of one run, named ``label`` (default: :func:`~ftforget.report.groups.method_label`).

    Raises:
        ReportError: the run has no forgetting measurement (naming its directory).
    """
    return summarize_group(RunGroup([run], method_label(run) if label is None else label))


def build_table(runs: list[Run]) -> list[Row]:
    """Rows of all ``runs``, seed groups collapsed into one row each, in the paper's method order (then
    by label and directory).

    Raises:
        ReportError: a run has no forgetting measurements; the message names every such directory.
    """
    missing = [run for run in runs if not run.has_measurements()]
    if missing:
        names = "\n".join(f"  {run.path}" for run in missing)
        raise ReportError(
            f"{len(missing)} run(s) have no forgetting measurements (no 'forgetting/knn_top1' in the event "
            f"files and no forgetting.jsonl):\n{names}"
        )
    return [summarize_group(group) for group in group_runs(runs)]


def _params(row: Row) -> str:
    if row.trainable_params is None:
        return "—"
    return ("" if row.params_exact else "≈") + f"{row.trainable_params:,}"


def _pct(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100.0 * value:.2f}"


def _cell(row: Row, name: str) -> str:
    """``97.21 ± 0.35`` (the std only where two or more runs logged the value), ``—`` where none did."""
    value, std = getattr(row, name), getattr(row, f"{name}_std")
    return _pct(value) + ("" if std is None or value is None else f" ± {_pct(std)}")


def _tested_cell(row: Row, name: str) -> str:
    """A cell that needs the new-task test accuracy: :data:`NOT_TESTED` when no run has one, and
    ``(k of n tested)`` when only some of a group's runs have one."""
    if row.tested == 0:
        return NOT_TESTED
    partial = f" ({row.tested} of {row.n} tested)" if row.tested < row.n else ""
    return _cell(row, name) + partial


def to_markdown(rows: list[Row]) -> str:
    """The table in Markdown, accuracies and drops in percent (drop_abs in points).

    A seed group's cells show ``mean ± sample std`` and the column ``n`` (the number of seeds) is added
    when some row has more than one run; the column ``probe share of wall-clock %`` when some run logged
    its measurements' cost (``Row.probe_share``). ``≈`` marks a parameter count that the event file's float32 may
    have rounded; :data:`NOT_TESTED` marks a row without a new-task test accuracy.
    """
    end_steps = {row.end_step for row in rows}
    # One shared last step goes in the header; otherwise each cell says its own.
    same_end = len(end_steps) == 1
    end_title = f"probe @{rows[0].end_step}" if same_end else "probe @end"
    with_n = any(row.n > 1 for row in rows)
    with_share = any(row.probe_share is not None for row in rows)
    header = [
        "method", *(["n"] if with_n else []), "trainable params", "new-task test acc", "probe @0",
        f"probe @{EARLY_STEP}", end_title, "drop (points)", "drop (relative %)", "mean",
        *(["probe share of wall-clock %"] if with_share else []),
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.method,
            *([str(row.n)] if with_n else []),
            _params(row),
            _tested_cell(row, "new_task_test_acc1"),
            _cell(row, "probe_acc_step0"),
            _cell(row, "probe_acc_step10"),
            _cell(row, "probe_acc_end") + ("" if same_end else f" (step {row.end_step})"),
            _cell(row, "drop_abs"),
            _cell(row, "drop_rel"),
            _tested_cell(row, "mean"),
            *([_cell(row, "probe_share")] if with_share else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _interval_cell(row: Row, name: str) -> str:
    """``74.44 [71.11, 77.78]`` (percent, the bootstrap 95% interval where stored), else :func:`_cell`."""
    lo, hi = getattr(row, f"{name}_ci_lo"), getattr(row, f"{name}_ci_hi")
    if lo is None or hi is None or getattr(row, name) is None:
        return _cell(row, name)
    return f"{_pct(getattr(row, name))} [{_pct(lo)}, {_pct(hi)}]"


def _steps_cell(row: Row, name: str) -> str:
    """The first step past a drop: ``99``, ``120 ± 30`` over seeds, ``(2 of 3)`` when only some runs
    reached it, ``never`` when none did."""
    value, std, runs = getattr(row, name), getattr(row, f"{name}_std"), getattr(row, f"{name}_runs")
    if value is None:
        return "never"
    text = f"{value:.0f}" + ("" if std is None else f" ± {std:.0f}")
    return text + (f" ({runs} of {row.n})" if runs < row.n else "")


def statistics_markdown(rows: list[Row]) -> str:
    """The curve statistics table in Markdown, one line per row of :func:`to_markdown`.

    Columns: the last probe accuracy and its drop (points) with their bootstrap 95% intervals in
    brackets where stored (single runs), the normalised area under the curve over ``log10(1 + step)``
    (:func:`ftforget.stats.auc_norm`, percent), the largest drop (points), and the first step whose
    relative drop exceeds each threshold (``never`` where none does). Seed groups show mean ± std.
    """
    with_n = any(row.n > 1 for row in rows)
    header = [
        "method", *(["n"] if with_n else []), "probe @end [95% CI]", "drop (points) [95% CI]",
        "AUC (log steps)", "max drop (points)",
        *(f"steps to {threshold_name(t)}% drop" for t in DROP_THRESHOLDS),
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.method,
            *([str(row.n)] if with_n else []),
            _interval_cell(row, "probe_acc_end") + f" (step {row.end_step})",
            _interval_cell(row, "drop_abs"),
            _cell(row, "auc_norm"),
            _cell(row, "max_drop"),
            *(_steps_cell(row, name) for name in STEPS_TO_DROP),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    """The table with the exact logged values (fractions, full precision); empty cells where missing.

    A seed group's row holds each mean under the column's name, its sample std under ``<name>_std``
    (empty for one run), the number of runs ``n``, of tested runs ``tested``, and the seeds and run
    directories joined by ``;``.
    """
    names = [f.name for f in fields(Row)]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        for row in rows:
            # csv writes floats with repr(), which round-trips exactly, and None as an empty cell.
            writer.writerow(asdict(row))


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a table written by :func:`write_csv`, as strings (for tests and notebooks)."""
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
