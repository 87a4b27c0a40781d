"""The report's figures: forgetting curves against iterations, and the stability-plasticity plane.

Each function draws on a given Axes (a notebook cell) or on a new Figure, and returns the Figure; the
``ftforget report`` command saves them as PNG with the Agg backend.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ftforget.report.runs import Run
from ftforget.report.table import EARLY_STEP, Row, in_table_order, run_labels


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    if ax is not None:
        return ax.figure, ax
    # A bare Figure, not pyplot: no global state and no GUI backend, so it is safe in a CLI and in threads.
    fig = Figure(figsize=size, layout="constrained")
    return fig, fig.add_subplot()


def plot_forgetting_curves(runs: list[Run], ax: Axes | None = None) -> Figure:
    """Old-domain k-NN top-1 (%) against the global step, one line per run.

    The x axis is symlog (linear below 1, logarithmic above) so that step 0, the pretrained backbone,
    sits at the origin while the early steps, where forgetting is fastest, stay readable.
    """
    fig, ax = _axes(ax, (7.0, 4.5))
    # Colour i is the table's row i, in both figures.
    measured = [r for r in runs if r.has_measurements()]
    labels = run_labels(measured)
    for i, run in enumerate(in_table_order(measured)):
        curve = run.probe_curve()
        steps = list(curve)
        y = [100.0 * curve[s] for s in steps]
        ax.plot(steps, y, marker="o", markersize=3, color=f"C{i}", label=labels[run.path])
    ax.set_xscale("symlog", linthresh=1.0)
    ax.axvline(EARLY_STEP, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("fine-tuning iterations (symlog)")
    ax.set_ylabel("old-domain k-NN top-1 (%)")
    ax.set_title("Forgetting during fine-tuning")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")
    return fig


def plot_stability_plasticity(rows: list[Row], ax: Axes | None = None) -> Figure:
    """New-task test accuracy (plasticity) against old-domain k-NN accuracy at the end (stability).

    Runs without a new-task test accuracy are left out.
    """
    fig, ax = _axes(ax, (5.5, 4.5))
    for i, row in enumerate(rows):
        if row.new_task_test_acc1 is None:
            continue
        x, y = 100.0 * row.probe_acc_end, 100.0 * row.new_task_test_acc1
        ax.scatter([x], [y], s=40, color=f"C{i}")
        ax.annotate(row.method, (x, y), textcoords="offset points", xytext=(5, 4), fontsize="small")
    ax.set_xlabel("old-domain k-NN top-1 at the end (%)  — stability")
    ax.set_ylabel("new-task test top-1 (%)  — plasticity")
    ax.set_title("Stability-plasticity plane")
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    return fig


def save_figures(runs: list[Run], rows: list[Row], out_dir: Path) -> list[Path]:
    """Both figures as PNG in ``out_dir``; returns their paths."""
    paths = [out_dir / "forgetting_curves.png", out_dir / "stability_plasticity.png"]
    for fig, path in zip((plot_forgetting_curves(runs), plot_stability_plasticity(rows)), paths, strict=True):
        fig.savefig(path, dpi=120)
    return paths
