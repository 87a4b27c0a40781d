"""The paper-style table: one row per run, every number read from what the run logged.

Accuracies are the logged fractions, unchanged (the Markdown shows them as percentages); the drops are
the ones the forgetting callback logged against its step-0 measurement, computed here only when a run
did not log them.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ftforget.methods import registry
from ftforget.report.runs import ReportError, Run

#: the step of the paper's claim ("loses over 70% ... after just 10 iterations")
EARLY_STEP = 10
#: TensorBoard stores scalars as float32, exact for integers only up to 2**24
FLOAT32_EXACT_INT = 2**24


@dataclass
class Row:
    """One run's line of the table; fractions in [0, 1], None where the run did not log the value."""

    method: str
    trainable_params: int | None
    params_exact: bool
    new_task_test_acc1: float | None
    probe_acc_step0: float | None
    probe_acc_step10: float | None
    probe_acc_end: float
    end_step: int
    drop_abs: float | None
    drop_rel: float | None
    mean: float | None
    probe: str
    k: int | None
    run: str


def _model_config(run: Run) -> tuple[str, dict]:
    model = run.config.get("model") or {}
    if not isinstance(model, dict):
        return "", {}
    return str(model.get("class_path", "")), dict(model.get("init_args") or {})


def method_label(run: Run) -> str:
    """A readable method name from the run's ``config.yaml`` (e.g. ``LoRA r=4``), else the directory."""
    class_path, init_args = _model_config(run)
    return registry.method_label(class_path, init_args) if class_path else str(run.path)


def _method_rank(run: Run) -> int:
    return registry.method_rank(_model_config(run)[0])


def run_labels(runs: list[Run]) -> dict[Path, str]:
    """:func:`method_label` of each run, with ``(<name>/<version>)`` appended where two runs share one."""
    labels = {run.path: method_label(run) for run in runs}
    counts = Counter(labels.values())
    return {
        path: f"{label} ({path.parent.name}/{path.name})" if counts[label] > 1 else label
        for path, label in labels.items()
    }


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


def summarize(run: Run, label: str | None = None) -> Row:
    """The table row of one run, named ``label`` (default: :func:`method_label`).

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
    drop_abs = run.logged_at("drop_abs", end_step)
    if drop_abs is None and start is not None:
        drop_abs = start - end
    drop_rel = run.logged_at("drop_rel", end_step)
    if drop_rel is None and start:
        drop_rel = (start - end) / start
    params, params_exact = trainable_params(run)
    test = run.last("test/acc1")
    head = run.headline_measurements()
    return Row(
        method=method_label(run) if label is None else label,
        trainable_params=params,
        params_exact=params_exact,
        new_task_test_acc1=None if test is None else test[1],
        probe_acc_step0=start,
        probe_acc_step10=curve.get(EARLY_STEP),
        probe_acc_end=end,
        end_step=end_step,
        drop_abs=drop_abs,
        drop_rel=drop_rel,
        mean=None if test is None else (test[1] + end) / 2.0,
        probe=str(head[0].get("probe", "")) if head else "",
        k=int(head[0]["k"]) if head else None,
        run=str(run.path),
    )


def build_table(runs: list[Run]) -> list[Row]:
    """Rows of all ``runs`` in the paper's method order (then by label and path).

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
    labels = run_labels(runs)
    return [summarize(run, labels[run.path]) for run in in_table_order(runs)]


def in_table_order(runs: list[Run]) -> list[Run]:
    """``runs`` in the paper's method order, then by label and path: the order of rows and of colours."""
    return sorted(runs, key=lambda r: (_method_rank(r), method_label(r), str(r.path)))


def _params(row: Row) -> str:
    if row.trainable_params is None:
        return "—"
    return ("" if row.params_exact else "≈") + f"{row.trainable_params:,}"


def _pct(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100.0 * value:.2f}"


def to_markdown(rows: list[Row]) -> str:
    """The table in Markdown, accuracies and drops in percent (drop_abs in points).

    ``≈`` marks a parameter count that the event file's float32 may have rounded.
    """
    end_steps = {row.end_step for row in rows}
    # One shared last step goes in the header; otherwise each cell says its own.
    same_end = len(end_steps) == 1
    end_title = f"probe @{rows[0].end_step}" if same_end else "probe @end"
    header = [
        "method", "trainable params", "new-task test acc", "probe @0", f"probe @{EARLY_STEP}",
        end_title, "drop (points)", "drop (relative %)", "mean",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row.method,
            _params(row),
            _pct(row.new_task_test_acc1),
            _pct(row.probe_acc_step0),
            _pct(row.probe_acc_step10),
            _pct(row.probe_acc_end) + ("" if same_end else f" (step {row.end_step})"),
            _pct(row.drop_abs),
            _pct(row.drop_rel),
            _pct(row.mean),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_csv(rows: list[Row], path: Path) -> None:
    """The table with the exact logged values (fractions, full precision); empty cells where missing."""
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
