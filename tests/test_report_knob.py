"""The report's knob: seed-group means of stored knob points, the table's cells, and the Pareto front,
checked against values worked out by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftforget.report.groups import RunGroup
from ftforget.report.knob import group_knob, knob_markdown, pareto_front
from ftforget.report.runs import Run


def test_pareto_front_by_hand():
    # (probe, test): (1, 5) is dominated by (2, 5); (3, 1) by (3, 3); (2, 5), (3, 3), (4, 2) trade off;
    # (0, 5) is dominated by (2, 5); the two copies of (4, 2) are both on the front.
    points = [(1, 5), (3, 1), (2, 5), (3, 3), (4, 2), (0, 5), (4, 2)]
    assert pareto_front(points) == [2, 3, 4, 6]
    assert pareto_front([(1.0, 1.0)]) == [0]


def _run(path: str, points: list[tuple[float, float, float, float, list[float], list[float]]]) -> Run:
    knob = [
        {"alpha": a, "top1": top1, "drop_abs": drop, "new_task_test_acc1": test, "new_task_val_acc1": test,
         "top1_ci": ci, "drop_abs_ci": dci}
        for a, top1, drop, test, ci, dci in points
    ]  # fmt: skip
    return Run(Path(path), knob=knob)


def test_a_seed_group_averages_the_points_both_runs_measured():
    one = _run(
        "r0", [(0.0, 0.9, 0.0, 0.5, [0.8, 1.0], [0.0, 0.0]), (1.0, 0.6, 0.3, 0.9, [0.5, 0.7], [0.2, 0.4])]
    )
    two = _run("r1", [(0.0, 0.9, 0.0, 0.7, [0.8, 1.0], [0.0, 0.0]), (0.5, 0.8, 0.1, 0.8, [0.7, 0.9], [0, 0.2]),
                      (1.0, 0.7, 0.2, 0.8, [0.6, 0.8], [0.1, 0.3])])  # fmt: skip
    points = group_knob(RunGroup([one, two], "LoRA r=8"))
    assert [p.alpha for p in points] == [0.0, 1.0]  # 0.5 only in one run
    end = points[1]
    assert end.n == 2
    assert end.probe_top1 == pytest.approx(0.65) and end.probe_top1_std == pytest.approx(0.0707107, abs=1e-6)
    assert end.new_task_test_acc1 == pytest.approx(0.85) and end.drop_abs == pytest.approx(0.25)
    assert end.probe_ci_lo is None  # a group's spread is its std, not one run's interval
    table = knob_markdown({"LoRA r=8": points})
    assert "| LoRA r=8 | 1 | 85.00 | 85.00 ± 7.07 | 65.00 ± 7.07 | +25.00 ± 7.07 |" in table

    (single,) = group_knob(RunGroup([one], "full"))[1:]
    assert (single.probe_ci_lo, single.probe_ci_hi, single.drop_ci_lo, single.drop_ci_hi) == (
        0.5,
        0.7,
        0.2,
        0.4,
    )
    table = knob_markdown({"full": group_knob(RunGroup([one], "full"))})
    assert "| full | 1 | 90.00 | 90.00 | 60.00 [50.00, 70.00] | +30.00 [+20.00, +40.00] |" in table
    assert group_knob(RunGroup([one, Run(Path("r2"))], "x")) == []  # a run without knob points: none
