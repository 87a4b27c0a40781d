"""``ftforget report RUN_DIR ... [--output DIR]``: write the table and figures, print the table and paths."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ftforget.report import ReportError, write_report
from ftforget.report.html import HTML_FILE, write_html

#: how to give a run its new-task test accuracy (``ftforget test`` on the run's best checkpoint)
TEST_HINT = "ftforget test --run {run} --ckpt_path best"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftforget report",
        description=(
            "Paper-style table (Markdown, CSV) and figures from run directories: Lightning version "
            "directories with TensorBoard event files and the forgetting callback's forgetting.jsonl, "
            "found recursively; stream directories (ftforget stream) found there get a section of their "
            "own: the stream metrics table, a heat map of the accuracy matrix per stream and the "
            "pretraining-domain probe over the stream."
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
    parser.add_argument(
        "--html",
        action="store_true",
        help=f"also write {HTML_FILE}: the report as one self-contained page (figures embedded, sortable "
        "tables, links to the runs), for a browser, offline",
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
    if report.markdown:
        sys.stdout.write(report.markdown + "\n")
    if report.statistics:
        sys.stdout.write("\n" + report.statistics.strip() + "\n\n")
    if report.knob_table:
        sys.stdout.write("Stability-plasticity knob (ftforget knob):\n\n" + report.knob_table + "\n")
    if report.streams:
        sys.stdout.write(report.streams + "\n")
    files = list(report.files)
    if args.html:
        files.append(write_html(report.document, report.rows, report.files, out))
    for path in files:
        sys.stdout.write(f"wrote {path}\n")
    for label, run in report.untested:
        sys.stdout.write(f"hint: {label}: not tested on the new task; run {TEST_HINT.format(run=run)}\n")
    if report.skipped:
        names = "\n".join(f"  {path}" for path in report.skipped)
        sys.stderr.write(
            f"ftforget report: {len(report.skipped)} run(s) left out, they have no forgetting measurements "
            f"(no 'forgetting/knn_top1' in the event files and no forgetting.jsonl):\n{names}\n"
        )
        return 1
    return 0
