"""``ftforget report RUN_DIR ... [--output DIR]``: write the table and figures, print the table and paths."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ftforget.report.figures import save_figures
from ftforget.report.runs import ReportError, Run, load_runs
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftforget report",
        description=(
            "Paper-style table (Markdown, CSV) and figures from run directories: Lightning version "
            "directories with TensorBoard event files and the forgetting callback's forgetting.jsonl, "
            "found recursively."
        ),
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run directory or a parent of many")
    parser.add_argument(
        "--output",
        "-o",
        type=Path,
        default=None,
        help="where to write the report (default: FIRST_RUN_DIR/report)",
    )
    return parser


def main(argv: list[str]) -> int:
    """Runs ``ftforget report``; returns the exit status (1 when runs or measurements are missing)."""
    args = _parser().parse_args(argv)
    out = args.output if args.output is not None else Path(args.run_dirs[0]) / "report"
    try:
        report = write_report(args.run_dirs, out)
    except ReportError as err:
        sys.stderr.write(f"ftforget report: {err}\n")
        return 1
    sys.stdout.write(report.markdown + "\n")
    for path in report.files:
        sys.stdout.write(f"wrote {path}\n")
    if report.skipped:
        names = "\n".join(f"  {path}" for path in report.skipped)
        sys.stderr.write(
            f"ftforget report: {len(report.skipped)} run(s) left out, they have no forgetting measurements "
            f"(no 'forgetting/knn_top1' in the event files and no forgetting.jsonl):\n{names}\n"
        )
        return 1
    return 0
