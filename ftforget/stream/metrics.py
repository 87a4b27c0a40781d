"""The standard continual-learning metrics of an accuracy matrix, pure Python (no torch, no files).

``R[i][j]`` is the accuracy on task ``j``'s test split after training task ``i`` (0-based, ``T`` tasks);
an entry that was not measured is ``None`` (in a task-incremental stream the head of task ``j`` does
not exist before task ``j`` is trained, so ``R[i][j]`` for ``i < j`` is ``None``). With ``T - 1`` the
last task:

- average accuracy (Chaudhry et al. 2018, "Riemannian Walk"; GEM's ACC):
  ``ACC = 1/T · Σ_j R[T-1][j]``;
- average forgetting (Chaudhry et al. 2018): ``F = 1/(T-1) · Σ_{j<T-1} (max_{i<T-1} R[i][j] - R[T-1][j])``,
  the max over the measured ``R[i][j]`` (``j <= i``);
- backward transfer (Lopez-Paz & Ranzato 2017, GEM): ``BWT = 1/(T-1) · Σ_{j<T-1} (R[T-1][j] - R[j][j])``;
- forward transfer (GEM): ``FWT = 1/(T-1) · Σ_{j>=1} (R[j-1][j] - b[j])``, ``b[j]`` the accuracy on task
  ``j`` of the model at initialisation; defined only where ``R[j-1][j]`` was measured (not in a
  task-incremental stream, whose head of task ``j`` is new);
- transfer against single-task references (as in Veniat et al. 2021): ``1/(T-1) · Σ_{j>=1} (R[j][j] -
  ref[j])``, ``ref[j]`` the accuracy of task ``j`` learnt alone from the stream's first weights.

A metric that needs an entry that is ``None`` is ``None`` itself; so is every metric but ``ACC`` of a
one-task stream (there is no earlier task).
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float | None]]


def check_matrix(R: Matrix) -> int:
    """The number of tasks ``T``; ``R`` must be ``T x T`` with every ``R[i][j]``, ``j <= i``, measured.

    Raises:
        ValueError: an empty or non-square matrix, or a missing entry on or below the diagonal.
    """
    T = len(R)
    if T == 0:
        raise ValueError("accuracy matrix: no task")
    for i, row in enumerate(R):
        if len(row) != T:
            raise ValueError(f"accuracy matrix: row {i} has {len(row)} entries, expected {T}")
        missing = [j for j in range(i + 1) if row[j] is None]
        if missing:
            raise ValueError(f"accuracy matrix: R[{i}][{missing[0]}] (on or below the diagonal) is missing")
    return T


def average_accuracy(R: Matrix) -> float:
    """``1/T · Σ_j R[T-1][j]``: the final model's mean accuracy over every task."""
    T = check_matrix(R)
    return sum(R[T - 1][j] for j in range(T)) / T  # type: ignore[misc]


def average_forgetting(R: Matrix) -> float | None:
    """``1/(T-1) · Σ_{j<T-1} (max_{i<T-1} R[i][j] - R[T-1][j])``; None for one task."""
    T = check_matrix(R)
    if T < 2:
        return None
    drops = []
    for j in range(T - 1):
        best = max(R[i][j] for i in range(T - 1) if R[i][j] is not None)  # type: ignore[type-var]
        drops.append(best - R[T - 1][j])  # type: ignore[operator]
    return sum(drops) / (T - 1)


def backward_transfer(R: Matrix) -> float | None:
    """``1/(T-1) · Σ_{j<T-1} (R[T-1][j] - R[j][j])``; negative when tasks were forgotten; None for one task."""
    T = check_matrix(R)
    if T < 2:
        return None
    return sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)  # type: ignore[operator]


def forward_transfer(R: Matrix, initial: Sequence[float | None] | None) -> float | None:
    """GEM's ``1/(T-1) · Σ_{j>=1} (R[j-1][j] - b[j])`` with ``b = initial``; None for one task, without
    ``initial``, or where an ``R[j-1][j]`` or ``b[j]`` was not measured."""
    T = check_matrix(R)
    if T < 2 or initial is None:
        return None
    terms = [(R[j - 1][j], initial[j]) for j in range(1, T)]
    if any(a is None or b is None for a, b in terms):
        return None
    return sum(a - b for a, b in terms) / (T - 1)  # type: ignore[operator]


def single_task_transfer(R: Matrix, reference: Sequence[float | None] | None) -> float | None:
    """``1/(T-1) · Σ_{j>=1} (R[j][j] - ref[j])``: how much better task ``j`` is learnt after the earlier
    tasks than alone from the stream's first weights; None for one task or a missing reference."""
    T = check_matrix(R)
    if T < 2 or reference is None or len(reference) != T:
        return None
    if any(reference[j] is None for j in range(1, T)):
        return None
    return sum(R[j][j] - reference[j] for j in range(1, T)) / (T - 1)  # type: ignore[operator]


def stream_metrics(
    R: Matrix,
    initial: Sequence[float | None] | None = None,
    reference: Sequence[float | None] | None = None,
) -> dict[str, float | None]:
    """Every metric above, by name: ``average_accuracy``, ``average_forgetting``, ``backward_transfer``,
    ``forward_transfer`` (GEM, with ``initial``), ``single_task_transfer`` (with ``reference``)."""
    return {
        "average_accuracy": average_accuracy(R),
        "average_forgetting": average_forgetting(R),
        "backward_transfer": backward_transfer(R),
        "forward_transfer": forward_transfer(R, initial),
        "single_task_transfer": single_task_transfer(R, reference),
    }
