"""The report's "Continual streams" part: what ``ftforget stream`` wrote, as a table, heat maps and a curve.

A *stream directory* (``<output>/<method>/seed<seed>/``, written by ``ftforget stream``) holds
``stream.yaml`` (the stream as started: its tasks, steps, seed, and the ``source`` stream file), then, as
the tasks end, ``accuracy_matrix.json`` (row ``i``: every earlier task's test accuracy after task ``i``,
as correct/total counts), ``stream_forgetting.jsonl`` (the pretraining-domain probe over the cumulative
step of the whole stream), and, once every task is done, ``stream_metrics.json`` (average accuracy,
forgetting, backward transfer, transfer against single-task references, their 95% bootstrap intervals)
and, with ``hot_swap: true``, ``hot_swap.json``. Each task is an ordinary run directory inside it
(``1-d45/``, ``2-d67/``, ..., and ``ref-2-d67/`` ... for the hot-swap references).

This module finds those directories under the paths given to ``ftforget report`` and writes:

- one row per stream directory (:func:`stream_rows`): Markdown (:func:`streams_markdown`) and CSV
  (:data:`STREAM_CSV`, the exact fractions);
- one heat map of R[i][j] per stream (``stream_matrix_<method>_seed<seed>.png``, :func:`plot_matrix`);
- one figure of the probe over the cumulative step, one line per stream, the task boundaries marked
  (:data:`STREAM_CURVE_PNG`, :func:`plot_stream_probe`).

A stream killed before its end (fewer matrix rows than tasks, or no ``stream_metrics.json`` yet) is
reported as incomplete: its row has no metrics and a note names it with the number of tasks done.

The file names are those of :mod:`ftforget.stream.run` (the report may not import the stream package;
``tests/test_report_stream.py`` checks that they are equal).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ftforget.files import atomic_write
from ftforget.methods import registry
from ftforget.report.runs import ReportError, read_measurements

STREAM_FILE = "stream.yaml"
MATRIX_FILE = "accuracy_matrix.json"
FORGETTING_FILE = "stream_forgetting.jsonl"
METRICS_FILE = "stream_metrics.json"
HOT_SWAP_FILE = "hot_swap.json"
#: the report's stream table with the exact values (fractions), one row per stream directory
STREAM_CSV = "stream_table.csv"
#: the probe over the cumulative step of every stream
STREAM_CURVE_PNG = "stream_forgetting.png"
#: each stream's heat map is ``stream_matrix_<name>.png``, ``<name>`` from its directory
MATRIX_PNG_PREFIX = "stream_matrix_"
#: the metrics of ``stream_metrics.json`` in the table, with their column titles
METRICS = {
    "average_accuracy": "ACC",
    "average_forgetting": "forgetting",
    "backward_transfer": "BWT",
    "single_task_transfer": "transfer vs. alone",
}


@dataclass
class Stream:
    """What the report reads from one stream directory (files that are not there yet are None / empty).

    Attributes:
        path: the stream directory.
        settings: its ``stream.yaml``.
        tasks: the task sub-runs' names in order (``1-d45``, ``2-d67``, ...).
        matrix: ``accuracy_matrix.json`` (``rows``: one per task done, ``correct`` and ``total`` counts).
        metrics: ``stream_metrics.json``, None until the stream ended.
        hot_swap: ``hot_swap.json``, None without ``hot_swap: true`` (or before its end).
        curve: the lines of ``stream_forgetting.jsonl``.
        label: the method's readable name (from the first task's ``config.yaml``, else the directory).
        k: the probe's k the report shows: the headline k of the rest of the report (the first line of the
            first task's ``forgetting.jsonl``), else the first k of ``stream_forgetting.jsonl``.
    """

    path: Path
    settings: dict[str, Any]
    tasks: list[str]
    matrix: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    hot_swap: dict[str, Any] | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    label: str = ""
    k: int | None = None

    @property
    def seed(self) -> int | None:
        seed = self.settings.get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def done(self) -> int:
        """The number of tasks whose row of R was written."""
        return len((self.matrix or {}).get("rows") or [])

    @property
    def complete(self) -> bool:
        """Every task done and ``stream_metrics.json`` written."""
        return self.metrics is not None and self.done == len(self.tasks)

    def values(self) -> list[list[float | None]]:
        """R as fractions (``correct / total``), ``T x T``: None above the diagonal and in rows not done."""
        T = len(self.tasks)
        rows = (self.matrix or {}).get("rows") or []
        out: list[list[float | None]] = []
        for i in range(T):
            row = rows[i] if i < len(rows) else {"correct": [], "total": []}
            correct, total = row["correct"], row["total"]
            out.append([correct[j] / total[j] if j < len(correct) else None for j in range(T)])
        return out

    def probe(self) -> list[dict[str, Any]]:
        """The curve's lines of probe ``k``, by cumulative step."""
        return sorted((r for r in self.curve if r.get("k") == self.k), key=lambda r: int(r["step"]))


def _is_stream(marker: Path) -> bool:
    """``stream.yaml`` as ``ftforget stream`` writes it (a mapping with ``source`` and ``tasks``), not a
    stream file a user named so (a stream file has no ``source`` key)."""
    try:
        data = yaml.safe_load(marker.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "source" in data and isinstance(data.get("tasks"), list)


def find_streams(paths: list[str | Path]) -> list[Path]:
    """Stream directories at or below each of ``paths`` (those that exist), sorted, each once."""
    found: set[Path] = set()
    for raw in paths:
        root = Path(raw)
        if root.is_dir():
            found |= {m.parent for m in root.rglob(STREAM_FILE) if m.is_file() and _is_stream(m)}
    return sorted(found)


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ReportError(
            f"{path} is not readable JSON ({err}); run its `ftforget stream` command again to rewrite it"
        ) from None
    if not isinstance(data, dict):
        raise ReportError(f"{path} is not a JSON object; run its `ftforget stream` command again")
    return data


def _label(path: Path, tasks: list[str]) -> str:
    config = path / tasks[0] / "config.yaml" if tasks else None
    if config is not None and config.is_file():
        try:
            model = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
        except yaml.YAMLError:
            model = {}
        if isinstance(model, dict) and model.get("class_path"):
            return registry.method_label(str(model["class_path"]), dict(model.get("init_args") or {}))
    return path.parent.name  # the stream's method directory (its first config file's stem)


def load_stream(path: str | Path) -> Stream:
    """Reads one stream directory (the files it has so far).

    Raises:
        ReportError: a file is there but is not what ``ftforget stream`` writes (named in the message).
    """
    path = Path(path)
    settings = yaml.safe_load((path / STREAM_FILE).read_text()) or {}
    tasks = [f"{i + 1}-{t['name']}" for i, t in enumerate(settings.get("tasks") or [])]
    matrix = _read_json(path / MATRIX_FILE)
    if matrix is not None and isinstance(matrix.get("tasks"), list) and matrix["tasks"]:
        tasks = [str(t) for t in matrix["tasks"]]
    curve = read_measurements(path, FORGETTING_FILE)
    first = read_measurements(path / tasks[0]) if tasks else []
    k = int(first[0]["k"]) if first else (int(curve[0]["k"]) if curve else None)
    return Stream(
        path=path,
        settings=settings,
        tasks=tasks,
        matrix=matrix,
        metrics=_read_json(path / METRICS_FILE),
        hot_swap=_read_json(path / HOT_SWAP_FILE),
        curve=curve,
        label=_label(path, tasks),
        k=k,
    )


def stream_names(streams: list[Stream]) -> list[str]:
    """Each stream's short name: ``<method>/seed<seed>`` (its last two directories), the whole path where
    two streams share it."""
    short = ["/".join(s.path.parts[-2:]) for s in streams]
    return [name if short.count(name) == 1 else str(s.path) for name, s in zip(short, streams, strict=True)]


@dataclass
class StreamRow:
    """One row of the stream table: fractions in [0, 1] (BWT and transfer may be negative), None where the
    stream's files do not have the value. ``<metric>_ci_lo/hi``: the 95% bootstrap interval of
    ``stream_metrics.json`` (``ci95``); ``probe_start``/``probe_end``: the probe's first and last
    measurement over the stream (its top-1 at k ``probe_k``, at cumulative steps ``probe_start_step`` and
    ``probe_end_step``)."""

    method: str
    stream: str
    seed: int | None
    tasks: int
    tasks_done: int
    complete: bool
    average_accuracy: float | None = None
    average_accuracy_ci_lo: float | None = None
    average_accuracy_ci_hi: float | None = None
    average_forgetting: float | None = None
    average_forgetting_ci_lo: float | None = None
    average_forgetting_ci_hi: float | None = None
    backward_transfer: float | None = None
    backward_transfer_ci_lo: float | None = None
    backward_transfer_ci_hi: float | None = None
    single_task_transfer: float | None = None
    single_task_transfer_ci_lo: float | None = None
    single_task_transfer_ci_hi: float | None = None
    hot_swap_oracle: float | None = None
    hot_swap_routed: float | None = None
    routing_accuracy: float | None = None
    probe_k: int | None = None
    probe_start: float | None = None
    probe_start_step: int | None = None
    probe_end: float | None = None
    probe_end_step: int | None = None
    path: str = ""


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def stream_row(stream: Stream, name: str) -> StreamRow:
    """The row of one stream: the metrics as ``stream_metrics.json`` holds them (only once the stream is
    complete), the hot-swap averages of ``hot_swap.json``, the probe's first and last line."""
    row = StreamRow(
        stream.label,
        name,
        stream.seed,
        len(stream.tasks),
        stream.done,
        stream.complete,
        path=str(stream.path),
    )
    if stream.complete:
        metrics = stream.metrics or {}
        ci = metrics.get("ci95") or {}
        for key in METRICS:
            setattr(row, key, _number(metrics.get(key)))
            interval = ci.get(key)
            if isinstance(interval, list) and len(interval) == 2:
                setattr(row, f"{key}_ci_lo", _number(interval[0]))
                setattr(row, f"{key}_ci_hi", _number(interval[1]))
        if stream.hot_swap is not None:
            row.hot_swap_oracle = _number(stream.hot_swap.get("oracle_average_accuracy"))
            row.hot_swap_routed = _number(stream.hot_swap.get("routed_average_accuracy"))
            row.routing_accuracy = _number(stream.hot_swap.get("routing_accuracy"))
    probe = stream.probe()
    if probe:
        row.probe_k = stream.k
        row.probe_start, row.probe_start_step = float(probe[0]["top1"]), int(probe[0]["step"])
        row.probe_end, row.probe_end_step = float(probe[-1]["top1"]), int(probe[-1]["step"])
    return row


def stream_rows(streams: list[Stream]) -> list[StreamRow]:
    """One :class:`StreamRow` per stream, in the order given."""
    return [stream_row(s, n) for s, n in zip(streams, stream_names(streams), strict=True)]


def _pct(value: float | None) -> str:
    return "—" if value is None or math.isnan(value) else f"{100.0 * value:.2f}"


def _metric_cell(row: StreamRow, key: str) -> str:
    """``50.00 [41.67, 57.64]`` (percent, with the 95% interval where stored), ``—`` where missing."""
    value, lo, hi = getattr(row, key), getattr(row, f"{key}_ci_lo"), getattr(row, f"{key}_ci_hi")
    if value is None or lo is None or hi is None:
        return _pct(value)
    return f"{_pct(value)} [{_pct(lo)}, {_pct(hi)}]"


def streams_table(rows: list[StreamRow]) -> str:
    """The stream table in Markdown: percent with 2 decimals, intervals in brackets; the hot-swap columns
    only when some stream has ``hot_swap.json``."""
    with_swap = any(r.hot_swap_oracle is not None for r in rows)
    header = [
        "method", "stream", "seed", "tasks", *(f"{t} [95% CI]" for t in METRICS.values()),
        *(["hot-swap oracle", "hot-swap routed", "routing acc."] if with_swap else []),
        "probe @start", "probe @end",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        tasks = str(r.tasks) if r.complete else f"{r.tasks_done} of {r.tasks} (incomplete)"
        end = "—" if r.probe_end is None else f"{_pct(r.probe_end)} (step {r.probe_end_step})"
        cells = [
            r.method, f"`{r.stream}`", "—" if r.seed is None else str(r.seed), tasks,
            *(_metric_cell(r, key) for key in METRICS),
            *([_pct(r.hot_swap_oracle), _pct(r.hot_swap_routed), _pct(r.routing_accuracy)] if with_swap else []),
            _pct(r.probe_start), end,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def incomplete_notes(streams: list[Stream]) -> list[str]:
    """One line per stream that has not ended: its directory and how many tasks are done."""
    notes = []
    for stream, name in zip(streams, stream_names(streams), strict=True):
        if stream.complete:
            continue
        missing = "" if stream.metrics is not None else f", no {METRICS_FILE} yet"
        notes.append(
            f"Stream `{name}` ({stream.path}) is incomplete: {stream.done} of {len(stream.tasks)} tasks done"
            f"{missing}; run its `ftforget stream` command again to go on (its metrics are left blank)."
        )
    return notes


def write_stream_csv(rows: list[StreamRow], path: Path) -> None:
    """The table with the exact values (fractions, full precision), empty cells where missing; atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=[f.name for f in fields(StreamRow)])
    writer.writeheader()
    for row in rows:
        writer.writerow(asdict(row))  # floats as repr(): they round-trip exactly
    data = buffer.getvalue().encode()
    atomic_write(path, lambda f: f.write(data))


def read_stream_csv(path: Path) -> list[dict[str, str]]:
    """The rows of :data:`STREAM_CSV`, as strings."""
    with Path(path).open(newline="") as handle:
        return list(csv.DictReader(handle))


def _figure(size: tuple[float, float]) -> tuple[Figure, Axes]:
    fig = Figure(figsize=size, layout="constrained")  # no pyplot: no global state, no GUI backend
    return fig, fig.add_subplot()


def plot_matrix(stream: Stream, title: str = "", ax: Axes | None = None) -> Figure:
    """R[i][j] (%) as a heat map: rows the task just trained, columns the task tested; every measured cell
    annotated with its percentage (one decimal), the cells above the diagonal (and the rows of tasks not
    done yet) left blank."""
    import numpy as np

    T = len(stream.tasks)
    values = np.array([[np.nan if v is None else 100.0 * v for v in row] for row in stream.values()]).reshape(
        T, T
    )
    if ax is None:
        fig, ax = _figure((1.1 * T + 3.0, 0.9 * T + 2.2))
    else:
        fig = ax.figure
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=100.0)
    for i in range(T):
        for j in range(T):
            if not np.isnan(values[i, j]):
                color = "black" if values[i, j] > 60.0 else "white"
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color=color, fontsize="small")
    ax.set_xticks(range(T), stream.tasks, rotation=30, ha="right")
    ax.set_yticks(range(T), stream.tasks)
    ax.set_xlabel("tested on task j")
    ax.set_ylabel("after training task i")
    ax.set_title(title or f"{stream.label}: R[i, j] (%)", fontsize="medium")
    fig.colorbar(image, ax=ax, label="test top-1 (%)", shrink=0.9)
    return fig


def task_starts(stream: Stream) -> list[tuple[int, str]]:
    """``(cumulative step, task name)`` of each task's first probe measurement, in task order."""
    starts: dict[int, tuple[int, str]] = {}
    for record in stream.probe():
        index = int(record.get("task_index", 0))
        step = int(record["step"])
        if index not in starts or step < starts[index][0]:
            starts[index] = (step, str(record.get("task", index + 1)))
    return [starts[i] for i in sorted(starts)]


def plot_stream_probe(streams: list[Stream], names: list[str], ax: Axes | None = None) -> Figure:
    """The pretraining-domain probe (k-NN top-1, %) over the cumulative step, one line per stream; a
    dotted vertical line where each task after the first starts, the tasks' names along the top."""
    if ax is None:
        fig, ax = _figure((9.0, 4.8))
    else:
        fig = ax.figure
    boundaries: dict[int, list[str]] = {}
    for i, (stream, name) in enumerate(zip(streams, names, strict=True)):
        probe = stream.probe()
        if not probe:
            continue
        steps = [int(r["step"]) for r in probe]
        top1 = [100.0 * float(r["top1"]) for r in probe]
        label = f"{stream.label} ({name}, k={stream.k})"
        ax.plot(steps, top1, marker="o", markersize=3, linewidth=1.4, color=f"C{i % 10}", label=label)
        for step, task in task_starts(stream):
            if task not in boundaries.setdefault(step, []):
                boundaries[step].append(task)
    for step, tasks in sorted(boundaries.items()):
        if step > 0:
            ax.axvline(step, color="0.45", linestyle=":", linewidth=1.2, zorder=1.5)
        ax.annotate(
            " / ".join(tasks), (step, 1.0), xycoords=("data", "axes fraction"), xytext=(3, -3),
            textcoords="offset points", ha="left", va="top", fontsize="small", color="0.3",
        )  # fmt: skip
    ax.set_xlabel("cumulative fine-tuning step over the stream (task i's step s at i · steps + s)")
    ax.set_ylabel("pretraining-domain k-NN top-1 (%)")
    ax.set_title("Pretraining-domain probe over the stream (dotted: a task starts)")
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small")
    return fig


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "stream"


@dataclass
class StreamSection:
    """The report's stream part: the Markdown section, the rows, the files written, the notes."""

    markdown: str
    rows: list[StreamRow]
    files: list[Path]
    notes: list[str]
    table: str


def write_stream_section(
    streams: list[Stream], out_dir: Path, sub_runs: list[str] | None = None
) -> StreamSection:
    """Writes :data:`STREAM_CSV`, the heat maps and :data:`STREAM_CURVE_PNG` into ``out_dir`` and returns
    the Markdown section (``## Continual streams``: how to read the table, the table, the figures' names,
    the notes). Stale files of these names from an earlier report are removed. ``sub_runs``: the names of
    the streams' task sub-runs the report kept out of its forgetting table (named in a note)."""
    out_dir = Path(out_dir)
    for old in [*out_dir.glob(f"{MATRIX_PNG_PREFIX}*.png"), out_dir / STREAM_CURVE_PNG, out_dir / STREAM_CSV]:
        old.unlink(missing_ok=True)
    if not streams:
        return StreamSection("", [], [], [], "")
    names = stream_names(streams)
    rows = stream_rows(streams)
    csv_path = out_dir / STREAM_CSV
    write_stream_csv(rows, csv_path)
    files: list[Path] = [csv_path]
    used: set[str] = set()
    for stream, name in zip(streams, names, strict=True):
        if stream.done == 0:
            continue  # nothing to draw; the note says so
        slug = _slug(name)
        while slug in used:
            slug += "_"
        used.add(slug)
        path = out_dir / f"{MATRIX_PNG_PREFIX}{slug}.png"
        fig = plot_matrix(stream, f"{stream.label} — {name}: R[i, j] (%)")
        atomic_write(path, lambda f, fig=fig: fig.savefig(f, format="png", dpi=120))
        files.append(path)
    notes = incomplete_notes(streams)
    if any(s.probe() for s in streams):
        path = out_dir / STREAM_CURVE_PNG
        fig = plot_stream_probe(streams, names)
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
        files.append(path)
    else:
        notes.append(
            f"{STREAM_CURVE_PNG} not written: no stream has a probe measurement yet ({FORGETTING_FILE})."
        )
    if sub_runs:
        shown = ", ".join(f"`{n}`" for n in sub_runs)
        notes.append(
            f"The streams' task sub-runs ({shown}) are ordinary fits, but each starts where the previous task "
            "ended: they are kept out of the forgetting table (give a sub-run's own directory to "
            "`ftforget report` to see its row)."
        )
    table = streams_table(rows)
    ks = sorted({r.probe_k for r in rows if r.probe_k is not None})
    k = f" (k={', '.join(map(str, ks))})" if ks else ""
    intro = (
        "One row per stream directory (`ftforget stream`), all in %: ACC the average accuracy over the tasks "
        "after the last one, forgetting the average drop of each earlier task from its best, BWT the backward "
        "transfer, transfer vs. alone each task against the same task fitted alone from the stream's start "
        f"({METRICS_FILE}, each with its 95% bootstrap interval); hot-swap: every task alone on the untouched "
        f"base, served with its label (oracle) or routed without ({HOT_SWAP_FILE}); probe: the pretraining-domain "
        f"k-NN top-1{k} at the stream's first and last measurement ({FORGETTING_FILE})."
    )
    pictures = [p.name for p in files if p.suffix == ".png"]
    figures = f"Figures: {', '.join(f'`{p}`' for p in pictures)}." if pictures else ""
    parts = ["## Continual streams", intro, table.rstrip("\n"), figures, *notes]
    markdown = "\n\n".join(p for p in parts if p) + "\n"
    return StreamSection(markdown, rows, files, notes, table)


def is_below(path: Path, roots: list[Path]) -> bool:
    """``path`` is one of ``roots`` or inside one of them."""
    path = Path(path).resolve()
    return any(path == r or r in path.parents for r in (Path(root).resolve() for root in roots))
