"""The report's figures: forgetting curves against iterations, and the stability-plasticity plane.

Each function draws on a given Axes (a notebook cell) or on a new Figure, and returns the Figure; the
``ftforget report`` command saves them as PNG with the Agg backend. Both figures have one entry per
table row (a seed group is drawn as its mean with a ± std band or error bars), in the table's order, with
the same colour and marker, and keep their legend to the right of the axes so that ten rows leave the
data readable.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter

from ftforget.report.groups import RunGroup, group_runs
from ftforget.report.knob import KnobPoint, pareto_front
from ftforget.report.runs import Run
from ftforget.report.table import EARLY_STEP, Row

CURVES_PNG = "forgetting_curves.png"
PLANE_PNG = "stability_plasticity.png"
#: one marker per row (with matplotlib's ten colours: ten rows that differ in both)
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
#: the share of the data's range added above and below it on the y axis
Y_MARGIN = 0.08
_LEGEND = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0, "fontsize": "small"}


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    # A bare Figure, not pyplot: no global state and no GUI backend, so it is safe in a CLI and in threads.
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def _style(i: int) -> dict[str, str]:
    """Row ``i``'s colour and marker, the same in both figures."""
    return {"color": f"C{i % 10}", "marker": MARKERS[i % len(MARKERS)]}


@dataclass
class MeanCurve:
    """A row's curve in percent: the mean over its runs at each step, and the sample std where two or
    more runs measured that step (None elsewhere)."""

    steps: list[int]
    mean: list[float]
    std: list[float | None]


def mean_curve(group: RunGroup) -> MeanCurve:
    """The group's k-NN top-1 curve in percent; a single run's values unchanged (times 100)."""
    curves = [run.probe_curve() for run in group.runs]
    steps = sorted({step for curve in curves for step in curve})
    mean, std = [], []
    for step in steps:
        values = [100.0 * curve[step] for curve in curves if step in curve]
        mean.append(values[0] if len(values) == 1 else statistics.fmean(values))
        std.append(statistics.stdev(values) if len(values) > 1 else None)
    return MeanCurve(steps, mean, std)


def _tight_ylim(ax: Axes, values: list[float]) -> None:
    """A y range around ``values`` with :data:`Y_MARGIN` on both sides (at least half a point), in
    [0, 100] only where the data needs it."""
    lo, hi = min(values), max(values)
    pad = max(Y_MARGIN * (hi - lo), 0.5)
    bottom = max(lo - pad, 0.0) if lo >= 0.0 else lo - pad
    top = min(hi + pad, 100.0) if hi <= 100.0 else hi + pad
    ax.set_ylim(bottom, top)


def plot_forgetting_curves(runs: list[Run], ax: Axes | None = None) -> Figure:
    """Old-domain k-NN top-1 (%) against the global step, one line per table row.

    A seed group is drawn as its mean curve with a shaded ± sample std band. The x axis is symlog (linear
    below 1, logarithmic above) so that step 0, the pretrained backbone, sits at the origin while the
    early steps, where forgetting is fastest, stay readable; the y axis is fitted to the data. Reference
    lines: the step-0 level (when all rows share it) and the paper's "10 iterations", named in a second
    legend under the rows' one, both to the right of the axes.
    """
    fig, ax = _axes(ax, (8.5, 4.8))
    groups = group_runs([r for r in runs if r.has_measurements()])
    curves = [mean_curve(group) for group in groups]
    plotted: list[float] = []
    for i, (group, curve) in enumerate(zip(groups, curves, strict=True)):
        style = _style(i)
        ax.plot(curve.steps, curve.mean, markersize=4, linewidth=1.5, label=group.label, **style)
        band = [(s, m - d, m + d) for s, m, d in zip(curve.steps, curve.mean, curve.std, strict=True) if d]
        if band:
            steps, lower, upper = zip(*band, strict=True)
            ax.fill_between(steps, lower, upper, color=style["color"], alpha=0.2, linewidth=0)
            plotted += [*lower, *upper]
        plotted += curve.mean
    references = []
    starts = {round(c.mean[0], 6) for c in curves if c.steps[0] == 0}
    if len(starts) == 1 and all(c.steps[0] == 0 for c in curves):
        (level,) = starts
        line = ax.axhline(level, color="0.4", linestyle="--", linewidth=1, zorder=1.5)  # under the curves
        line.set_label(f"step 0 (pretrained): {level:.2f}%")
        references.append(line)
    line = ax.axvline(EARLY_STEP, color="0.4", linestyle=":", linewidth=1.2, zorder=1.5)
    line.set_label(f"{EARLY_STEP} iterations (the paper's early point)")
    references.append(line)
    ax.set_xscale("symlog", linthresh=1.0)
    if plotted:
        _tight_ylim(ax, plotted)
        # From just left of step 0 to a bit past the last step (the log part's margin), so that no
        # marker is cut and the axis does not extend into negative steps.
        last = max(max(curve.steps) for curve in curves)
        ax.set_xlim(-0.3, max(last, EARLY_STEP) * 1.25)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))  # 10, not 10^1
    ax.set_xlabel("fine-tuning iterations (symlog)")
    ax.set_ylabel("old-domain k-NN top-1 (%)")
    ax.set_title("Forgetting during fine-tuning")
    ax.grid(True, which="major", alpha=0.3)
    # The reference lines get a legend of their own (kept as an artist), below the rows' legend.
    ref_legend = ax.legend(
        handles=references,
        title="reference lines",
        **{**_LEGEND, "loc": "lower left", "bbox_to_anchor": (1.02, 0.0), "title_fontsize": "small"},
    )
    ax.add_artist(ref_legend)
    # add_artist clips to the axes, which would also keep the legend out of the layout's bounding box.
    ref_legend.set_clip_on(False)
    ax.legend(handles=[line for line in ax.get_lines() if line not in references], **_LEGEND)
    return fig


def plot_stability_plasticity(
    rows: list[Row], ax: Axes | None = None, knob: dict[str, list[KnobPoint]] | None = None
) -> Figure:
    """New-task test accuracy (plasticity) against old-domain k-NN accuracy at the end (stability).

    One point per table row, in the row's colour and marker, with ± sample std error bars for seed
    groups; rows without a new-task test accuracy are left out (the axes say so when none has one).
    With ``knob`` (row label -> :class:`~ftforget.report.knob.KnobPoint` list, ``ftforget knob``), each
    row's knob is a thin line of small markers from ``a = 0`` (the pretrained backbone under the new head:
    the step-0 probe accuracy) to ``a = 1`` (the fine-tuned model); the Pareto front over all points (rows and knob points, both axes
    maximised) is a dashed black line with the points on it ringed.
    """
    fig, ax = _axes(ax, (8.0, 5.2))
    handles = []
    everything: list[tuple[float, float]] = []
    for i, row in enumerate(rows):
        style = _style(i)
        curve = [(100.0 * p.probe_top1, 100.0 * p.new_task_test_acc1)
                 for p in (knob or {}).get(row.method, []) if p.new_task_test_acc1 is not None]  # fmt: skip
        if curve:
            xs, ys = zip(*curve, strict=True)
            ax.plot(xs, ys, color=style["color"], marker=style["marker"], markersize=3.5, linewidth=1.0,
                    alpha=0.75, zorder=2)  # fmt: skip
            everything += curve
            if row.new_task_test_acc1 is None:  # its knob is drawn: name it
                handles.append(Line2D([], [], linestyle="none", markersize=7, label=row.method, **style))
        if row.new_task_test_acc1 is None:
            continue
        x, y = 100.0 * row.probe_acc_end, 100.0 * row.new_task_test_acc1
        everything.append((x, y))
        xerr = None if row.probe_acc_end_std is None else 100.0 * row.probe_acc_end_std
        yerr = None if row.new_task_test_acc1_std is None else 100.0 * row.new_task_test_acc1_std
        ax.errorbar(
            [x], [y], xerr=xerr, yerr=yerr, linestyle="none", markersize=7, capsize=3, elinewidth=1, **style
        )
        label = row.method + (f" (n={row.n})" if row.n > 1 else "")
        handles.append(Line2D([], [], linestyle="none", markersize=7, label=label, **style))
    if knob and everything:
        front = [everything[i] for i in pareto_front(everything)]
        fx, fy = zip(*front, strict=True)
        ax.plot(fx, fy, color="black", linestyle="--", linewidth=1.0, zorder=1.5)
        ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="black", linewidths=1.0, zorder=3)
        handles.append(Line2D([], [], color="0.3", marker="o", markersize=3.5, linewidth=1.0,
                              label="knob W0 + a (W1 - W0): a = 0 at the\nstep-0 probe accuracy ... a = 1"))  # fmt: skip
        handles.append(Line2D([], [], color="black", linestyle="--", marker="o", markersize=9,
                              markerfacecolor="none", label="Pareto front (all points)"))  # fmt: skip
    if handles:
        ax.legend(handles=handles, **_LEGEND)
        ax.margins(0.12)
    else:
        ax.text(
            0.5, 0.5, "no run has a new-task test accuracy", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_xlabel("old-domain k-NN top-1 at the end (%) — stability")
    ax.set_ylabel("new-task test top-1 (%) — plasticity")
    ax.set_title("Stability-plasticity plane")
    ax.grid(True, alpha=0.3)
    return fig


def save_figures(
    runs: list[Run], rows: list[Row], out_dir: Path, knob: dict[str, list[KnobPoint]] | None = None
) -> tuple[list[Path], list[str]]:
    """The figures that have something to show, as PNG in ``out_dir``.

    A figure with nothing to show is not written, and a PNG of its name left in ``out_dir`` by an earlier
    report is removed, so that the directory never shows an outdated figure.

    Returns:
        The paths written, and one line per figure not written saying why.
    """
    curves = out_dir / CURVES_PNG
    plot_forgetting_curves(runs).savefig(curves, dpi=120)
    plane = out_dir / PLANE_PNG
    if knob or any(row.new_task_test_acc1 is not None for row in rows):
        plot_stability_plasticity(rows, knob=knob).savefig(plane, dpi=120)
        return [curves, plane], []
    plane.unlink(missing_ok=True)
    return [curves], [
        f"{PLANE_PNG} not written: no run has a new-task test accuracy (test/acc1) or knob points (ftforget knob)."
    ]
