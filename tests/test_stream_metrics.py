"""The stream metrics of a hand-made 3-task accuracy matrix equal their hand computation (exact binary
fractions: every sum below is exact in floating point)."""

from __future__ import annotations

import pytest

from ftforget.stream.metrics import (
    average_accuracy,
    average_forgetting,
    backward_transfer,
    check_matrix,
    forward_transfer,
    single_task_transfer,
    stream_metrics,
)

# Task-incremental: R[i][j] for i < j does not exist (task j's head is not trained yet).
R = [
    [0.75, None, None],
    [0.875, 0.5, None],  # task 0 got better while task 1 was learnt (positive backward step)
    [0.625, 0.25, 1.0],
]


def test_three_task_stream_by_hand() -> None:
    # ACC = (0.625 + 0.25 + 1.0) / 3
    assert average_accuracy(R) == 1.875 / 3
    # F: task 0: max(0.75, 0.875) - 0.625 = 0.25 (the max is not the diagonal); task 1: 0.5 - 0.25 = 0.25
    assert average_forgetting(R) == 0.25
    # BWT: ((0.625 - 0.75) + (0.25 - 0.5)) / 2 = -0.1875: differs from -F because R[1][0] > R[0][0]
    assert backward_transfer(R) == -0.1875
    # GEM's FWT needs R[j-1][j]: not measured in a task-incremental stream
    assert forward_transfer(R, [0.5, 0.5, 0.5]) is None
    # against single-task references: ((0.5 - 0.375) + (1.0 - 0.875)) / 2
    assert single_task_transfer(R, [0.75, 0.375, 0.875]) == 0.125
    assert stream_metrics(R, reference=[0.75, 0.375, 0.875]) == {
        "average_accuracy": 1.875 / 3,
        "average_forgetting": 0.25,
        "backward_transfer": -0.1875,
        "forward_transfer": None,
        "single_task_transfer": 0.125,
    }


def test_full_matrix_forward_transfer_and_forgetting_over_earlier_rows() -> None:
    full = [[0.75, 0.625, 0.125], [0.875, 0.5, 0.375], [0.625, 0.25, 1.0]]
    # FWT: ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.625 - 0.125) + (0.375 - 0.25)) / 2
    assert forward_transfer(full, [0.5, 0.125, 0.25]) == 0.3125
    # F's max runs over every earlier row, R[0][1] = 0.625 included: ((0.875 - 0.625) + (0.625 - 0.25)) / 2
    assert average_forgetting(full) == 0.3125


def test_one_task_has_only_an_average_accuracy() -> None:
    assert stream_metrics([[0.5]]) == {
        "average_accuracy": 0.5, "average_forgetting": None, "backward_transfer": None,
        "forward_transfer": None, "single_task_transfer": None,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("matrix", "message"),
    [([], "no task"), ([[0.5, None]], "row 0 has 2 entries"), ([[0.5, None], [None, 0.5]], r"R\[1\]\[0\]")],
)
def test_malformed_matrices_are_named(matrix, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_matrix(matrix)


def test_bootstrap_of_constant_hits_is_the_point() -> None:
    import numpy as np

    from ftforget.stream.bootstrap import stream_metrics_ci

    ones, zeros = np.ones(8, bool), np.zeros(8, bool)
    # every image right or every image wrong: each resample gives R itself, the interval is a point
    constant = [[ones], [zeros, ones], [zeros, zeros, ones]]  # R = [[1], [0, 1], [0, 0, 1]]
    ci = stream_metrics_ci(constant, resamples=50)
    assert ci["average_accuracy"] == (1 / 3, 1 / 3)  # (0 + 0 + 1) / 3
    assert ci["average_forgetting"] == (1.0, 1.0)  # ((max(1, 0) - 0) + (1 - 0)) / 2
    assert ci["backward_transfer"] == (-1.0, -1.0)  # ((0 - 1) + (0 - 1)) / 2
    assert ci["forward_transfer"] is None and ci["single_task_transfer"] is None


def test_bootstrap_interval_holds_the_estimate_and_is_reproducible() -> None:
    import numpy as np

    from ftforget.stream.bootstrap import stream_metrics_ci

    rng = np.random.default_rng(3)
    a, b = rng.random(40) < 0.8, rng.random(40) < 0.9
    hits = [[a], [a & (rng.random(40) < 0.7), b]]  # task 0 loses some images, never gains one
    ci = stream_metrics_ci(hits, resamples=200, seed=1)
    assert ci == stream_metrics_ci(hits, resamples=200, seed=1)
    forgetting = a.mean() - hits[1][0].mean()
    lo, hi = ci["average_forgetting"]
    assert 0 <= lo <= forgetting <= hi  # paired: the drop is never negative in any resample
