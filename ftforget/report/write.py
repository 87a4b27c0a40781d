"""Writing a report: the table (Markdown, CSV) and the figures of a set of runs into one directory."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ftforget.report.figures import save_figures
from ftforget.report.runs import Run, load_runs
from ftforget.report.table import Row, build_table, to_markdown, write_csv


@dataclass
class Report:
    """What :func:`write_report` produced.

    Attributes:
        rows: the table, one row per run with measurements.
        markdown: the table as Markdown.
        files: the Markdown, CSV and PNG files written.
        skipped: runs left out because they have no forgetting measurement.
    """

    rows: list[Row]
    markdown: str
    files: list[Path]
    skipped: list[Path] = field(default_factory=list)


def write_report(run_dirs: list[str | Path], out_dir: str | Path) -> Report:
    """Reads every run at or below ``run_dirs`` and writes ``forgetting_table.{md,csv}`` and the figures.

    Runs without forgetting measurements are left out of the table and listed in ``Report.skipped``.

    Raises:
        ReportError: a path does not exist or holds no run, or no run has measurements.
    """
    runs = load_runs(list(run_dirs))
    measured: list[Run] = [run for run in runs if run.has_measurements()]
    skipped = [run.path for run in runs if not run.has_measurements()]
    if not measured:
        build_table(runs)  # raises, naming every run without measurements
    rows = build_table(measured)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(rows)
    md_path, csv_path = out / "forgetting_table.md", out / "forgetting_table.csv"
    md_path.write_text(markdown)
    write_csv(rows, csv_path)
    figures = save_figures(measured, rows, out)
    return Report(rows, markdown, [md_path, csv_path, *figures], skipped)
