"""Writing a report: the table (Markdown, CSV) and the figures of a set of runs into one directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ftforget.files import atomic_write
from ftforget.report.figures import CURVES_PNG, PLANE_PNG, save_figures
from ftforget.report.groups import RunGroup, different_bases, group_runs
from ftforget.report.knob import KNOB_CSV, KnobPoint, knob_curves, knob_markdown, write_knob_csv
from ftforget.report.routing import routing_section
from ftforget.report.runs import ReportError, Run, find_runs, load_run
from ftforget.report.streams import find_streams, is_below, load_stream, write_stream_section
from ftforget.report.table import Row, build_table, statistics_markdown, to_markdown, write_csv
from ftforget.report.tensorboard import write_report_summaries


@dataclass
class Report:
    """What :func:`write_report` produced.

    Attributes:
        rows: the table, one row per run or seed group with measurements.
        markdown: the table as Markdown, followed by the :attr:`notes` (what ``ftforget report`` prints).
        statistics: the curve statistics table (:func:`~ftforget.report.table.statistics_markdown`):
            intervals, normalised AUC, steps to a drop; the Markdown file holds it under the table.
        files: the Markdown, CSV and PNG files written, and the event file holding the figures and tables
            for TensorBoard (``events.out.tfevents.*.ftforget-report``).
        skipped: runs left out because they have no forgetting measurement.
        notes: one line per figure not written, saying why.
        untested: ``(row label, run directory)`` of every run without a new-task test accuracy.
        knob: row label -> its stability-plasticity knob points (``ftforget knob``), rows with any.
        knob_table: those points as Markdown (empty without any); the Markdown file holds it too.
        document: the Markdown file's text (the table, the curve statistics, the knob, the notes, the
            routing section and the continual streams section).
        streams: the "Continual streams" section (:mod:`~ftforget.report.streams`; empty without any
            stream directory): the stream table, the figures' names and the notes.
    """

    rows: list[Row]
    markdown: str
    files: list[Path]
    skipped: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    untested: list[tuple[str, Path]] = field(default_factory=list)
    statistics: str = ""
    knob: dict[str, list[KnobPoint]] = field(default_factory=dict)
    knob_table: str = ""
    document: str = ""
    streams: str = ""


def _untested(groups: list[RunGroup]) -> list[tuple[str, Path]]:
    """``(row label, run directory)`` of each run without a new-task test accuracy, in the table's order."""
    return [(group.label, run.path) for group in groups for run in group.runs if run.test_accuracy() is None]


def _find(run_dirs: list[str | Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """The stream directories, the ordinary runs and the streams' task sub-runs at or below ``run_dirs``.

    A run inside a stream directory found here is a sub-run (kept out of the forgetting table); a path that
    holds streams may hold no other run. A sub-run's own directory given as a path is an ordinary run.

    Raises:
        ReportError: a path does not exist, or holds neither a run nor a stream.
    """
    streams = find_streams(run_dirs)
    runs: set[Path] = set()
    for raw in run_dirs:
        try:
            runs |= set(find_runs([raw]))
        except ReportError:
            if not Path(raw).exists() or not any(is_below(s, [Path(raw)]) for s in streams):
                raise
    sub_runs = sorted(r for r in runs if is_below(r, streams))
    return streams, sorted(runs - set(sub_runs)), sub_runs


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> Report:
    """Reads every run at or below ``run_dirs`` and writes ``forgetting_table.{md,csv}`` and the figures.

    Stream directories (``ftforget stream``) among them get a section of their own
    (:func:`~ftforget.report.streams.write_stream_section`: the stream table, heat maps, the probe over
    the stream), and their task sub-runs are kept out of the forgetting table; a report of streams only
    has no forgetting table (``forgetting_table.md`` then holds the stream section).

    Runs that repeat a configuration with other seeds are one row (:mod:`~ftforget.report.groups`). Runs
    without forgetting measurements are left out of the table and listed in ``Report.skipped``; a figure
    with nothing to show is not written (a stale PNG of its name is removed) and a note says why. The
    Markdown file holds the table, then the curve statistics (:attr:`Report.statistics`), then the notes.

    Raises:
        ReportError: a path does not exist or holds no run, or no run has measurements.
    """
    stream_dirs, run_paths, sub_runs = _find(list(run_dirs))
    runs = [load_run(p) for p in run_paths]
    measured: list[Run] = [run for run in runs if run.has_measurements()]
    skipped = [run.path for run in runs if not run.has_measurements()]
    out = Path(out_dir)
    if not measured and not stream_dirs:
        build_table(runs)  # raises, naming every run without measurements
    if not measured:
        return _streams_only(stream_dirs, sub_runs, skipped, out)
    rows = build_table(measured)
    out.mkdir(parents=True, exist_ok=True)
    md_path, csv_path = out / "forgetting_table.md", out / "forgetting_table.csv"
    write_csv(rows, csv_path)
    groups = group_runs(measured)
    knob = knob_curves(groups)
    knob_csv = out / KNOB_CSV
    if knob:
        write_knob_csv(knob, knob_csv)
    else:
        knob_csv.unlink(missing_ok=True)  # no stale points from an earlier report
    figures, notes = save_figures(measured, rows, out, knob)
    notes = [*different_bases(groups), *notes]
    table = to_markdown(rows)
    statistics = statistics_markdown(rows)
    knob_table = knob_markdown(knob) if knob else ""
    knob_md = f"\n### Stability-plasticity knob (ftforget knob)\n\n{knob_table}" if knob else ""
    notes_md = "".join(f"\n{note}\n" for note in notes)
    routing = routing_section(out, [run.path for run in measured])  # one base, many tasks (ftforget demo)
    notes_md += f"\n{routing}" if routing else ""
    markdown = f"{table}\n### Curve statistics\n\n{statistics}{knob_md}{notes_md}"
    section = write_stream_section([load_stream(p) for p in stream_dirs], out, _names(sub_runs))
    markdown += f"\n{section.markdown}" if section.markdown else ""
    md_path.write_text(markdown)
    figures += [p for p in section.files if p.suffix == ".png"]
    events = write_report_summaries(out, figures, markdown)  # the figures in TensorBoard too
    streams_files = [p for p in section.files if p.suffix != ".png"]
    files = [md_path, csv_path, *([knob_csv] if knob else []), *streams_files, *figures, events]
    untested = _untested(groups)
    return Report(
        rows, table + notes_md, files, skipped, notes, untested, statistics, knob, knob_table, markdown,
        section.markdown,
    )  # fmt: skip


def _names(sub_runs: list[Path]) -> list[str]:
    """The sub-runs' directory names, each once, in task order (``1-d45``, ..., then ``ref-2-d67``, ...)."""
    return sorted({p.name for p in sub_runs}, key=lambda n: (n.startswith("ref-"), n))


def _streams_only(stream_dirs: list[Path], sub_runs: list[Path], skipped: list[Path], out: Path) -> Report:
    """The report of stream directories without other measured runs: the stream section alone (the
    forgetting table's CSV and figures of an earlier report in ``out`` are removed: they would be stale)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("forgetting_table.csv", KNOB_CSV, CURVES_PNG, PLANE_PNG):
        (out / name).unlink(missing_ok=True)
    section = write_stream_section([load_stream(p) for p in stream_dirs], out, _names(sub_runs))
    md_path = out / "forgetting_table.md"
    text = section.markdown.encode()
    atomic_write(md_path, lambda f: f.write(text))
    figures = [p for p in section.files if p.suffix == ".png"]
    events = write_report_summaries(out, figures, section.markdown)
    files = [md_path, *[p for p in section.files if p.suffix != ".png"], *figures, events]
    return Report([], "", files, skipped, section.notes, document=section.markdown, streams=section.markdown)
