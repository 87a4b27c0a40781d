"""``ftforget report``: the paper-style table and figures from run directories.

- :mod:`~ftforget.report.runs`: finding runs, reading their event files, measurement file and config;
- :mod:`~ftforget.report.groups`: runs that repeat a configuration with other seeds, one row each;
- :mod:`~ftforget.report.table`: one row per run or seed group, mean ± sample std (Markdown and CSV);
- :mod:`~ftforget.report.figures`: forgetting curves and the stability-plasticity plane;
- :mod:`~ftforget.report.write`: :func:`write_report`, everything above into one directory;
- :mod:`~ftforget.report.tensorboard`: each run's HParams, custom-scalars layout and card, and the
  report's figures, as TensorBoard event files;
- :mod:`~ftforget.report.html`: the report as one self-contained HTML page (``ftforget report --html``).
- :mod:`~ftforget.report.streams`: stream directories (``ftforget stream``): the stream metrics table, a
  heat map of the accuracy matrix per stream, the pretraining-domain probe over the stream.
"""

from ftforget.report.figures import plot_forgetting_curves, plot_stability_plasticity, save_figures
from ftforget.report.groups import IGNORED_KEYS, RunGroup, group_runs
from ftforget.report.runs import ReportError, Run, find_runs, load_run, load_runs
from ftforget.report.table import (
    Row,
    build_table,
    read_csv,
    summarize,
    summarize_group,
    to_markdown,
    write_csv,
)
from ftforget.report.write import Report, write_report

__all__ = [
    "IGNORED_KEYS",
    "Report",
    "ReportError",
    "Row",
    "Run",
    "RunGroup",
    "build_table",
    "find_runs",
    "group_runs",
    "load_run",
    "load_runs",
    "plot_forgetting_curves",
    "plot_stability_plasticity",
    "read_csv",
    "save_figures",
    "summarize",
    "summarize_group",
    "to_markdown",
    "write_csv",
    "write_report",
]
