"""The stability-plasticity knob in the report: each row's knob curve, its table, and the Pareto front.

``ftforget knob`` stores, per run, one point per knob value ``a`` (``knob.jsonl``: new-task val and test
top-1, probe top-1 with its bootstrap interval, drop from ``a = 0`` with its paired interval). A row of the
report (a run or a seed group) gets one :class:`KnobPoint` per ``a`` that all its runs measured: the mean
over its runs and, for two or more, the sample std. The Pareto front is taken over every point of the
stability-plasticity plane: the rows' own points and all knob points.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ftforget.files import atomic_write
from ftforget.report.groups import RunGroup

KNOB_CSV = "knob_points.csv"


@dataclass
class KnobPoint:
    """One knob value of one report row; fractions, the mean over the row's runs (std for n >= 2).

    ``probe_ci`` and ``drop_ci`` are the single run's bootstrap 95% intervals (None for a seed group).
    """

    row: str
    alpha: float
    n: int
    new_task_val_acc1: float | None
    new_task_test_acc1: float | None
    new_task_test_acc1_std: float | None
    probe_top1: float
    probe_top1_std: float | None
    drop_abs: float
    drop_abs_std: float | None
    probe_ci_lo: float | None = None
    probe_ci_hi: float | None = None
    drop_ci_lo: float | None = None
    drop_ci_hi: float | None = None


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return (values[0], None) if len(values) == 1 else (statistics.fmean(values), statistics.stdev(values))


def group_knob(group: RunGroup) -> list[KnobPoint]:
    """The knob points of one row: every ``a`` that each of its runs measured, in increasing order."""
    per_run = [{float(p["alpha"]): p for p in run.knob} for run in group.runs]
    if not per_run or not all(per_run):
        return []
    common = sorted(set.intersection(*(set(points) for points in per_run)))
    out = []
    for a in common:
        points = [points[a] for points in per_run]
        tests = [p["new_task_test_acc1"] for p in points if p.get("new_task_test_acc1") is not None]
        vals = [p["new_task_val_acc1"] for p in points if p.get("new_task_val_acc1") is not None]
        test, test_std = _mean_std(tests) if len(tests) == len(points) else (None, None)
        probe, probe_std = _mean_std([float(p["top1"]) for p in points])
        drop, drop_std = _mean_std([float(p["drop_abs"]) for p in points])
        single = points[0] if len(points) == 1 else {}
        probe_ci, drop_ci = single.get("top1_ci") or [None, None], single.get("drop_abs_ci") or [None, None]
        out.append(
            KnobPoint(
                group.label,
                a,
                len(points),
                statistics.fmean(vals) if len(vals) == len(points) else None,
                test,
                test_std,
                probe,
                probe_std,
                drop,
                drop_std,
                *probe_ci,
                *drop_ci,
            )  # fmt: skip
        )
    return out


def knob_curves(groups: list[RunGroup]) -> dict[str, list[KnobPoint]]:
    """Row label -> its knob points, for the rows that have any (in the table's order)."""
    curves = {group.label: group_knob(group) for group in groups}
    return {label: points for label, points in curves.items() if points}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates (>= in both coordinates, > in one), both maximised;
    ordered by the first coordinate. Equal points are all on the front."""
    front = [
        i
        for i, (x, y) in enumerate(points)
        if not any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in points)
    ]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def _pct(value: float | None, std: float | None = None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{100 * value:{'+' if signed else ''}.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _ci(lo: float | None, hi: float | None, signed: bool = False) -> str:
    if lo is None or hi is None:
        return ""
    fmt = "{:+.2f}" if signed else "{:.2f}"
    return f" [{fmt.format(100 * lo)}, {fmt.format(100 * hi)}]"


def knob_markdown(curves: dict[str, list[KnobPoint]]) -> str:
    """The knob table: one line per (row, a), percentages with intervals (single runs) or ± std (groups)."""
    lines = [
        "| method | a | new-task val | new-task test | probe top-1 [95% CI] | drop from a=0 [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for label, points in curves.items():
        for p in points:
            lines.append(
                f"| {label} | {p.alpha:g} | {_pct(p.new_task_val_acc1)} | "
                f"{_pct(p.new_task_test_acc1, p.new_task_test_acc1_std)} | "
                f"{_pct(p.probe_top1, p.probe_top1_std)}{_ci(p.probe_ci_lo, p.probe_ci_hi)} | "
                f"{_pct(p.drop_abs, p.drop_abs_std, signed=True)}{_ci(p.drop_ci_lo, p.drop_ci_hi, signed=True)} |"
            )
    return "\n".join(lines) + "\n"


def write_knob_csv(curves: dict[str, list[KnobPoint]], path: Path) -> None:
    """Every knob point as a CSV row (fractions, as stored), atomically."""
    names = [f.name for f in fields(KnobPoint)]

    def write(f) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        for points in curves.values():
            writer.writerows(asdict(p) for p in points)
        f.write(text.getvalue().encode())

    atomic_write(path, write)
