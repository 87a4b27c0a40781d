"""The ``ftforget`` commands: Lightning's stages and ftforget's own, each a thin layer over the library.

``ftforget fit|validate|test|predict`` run the LightningCLI (:mod:`ftforget.cli`); ``ftforget measure``,
``report`` and ``demo`` are the modules of this package. Each command parses its arguments, calls
library functions and prints; this package is the only one that knows every other.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ftforget.backbones import CheckpointError
from ftforget.guards import NonFiniteError, signal_number
from ftforget.logging_setup import setup_console
from ftforget.sweep import SweepError

#: command -> (module in this package with ``main(argv) -> int``, one-line description)
COMMANDS: dict[str, tuple[str, str]] = {
    "measure": ("measure", "k-NN forgetting probe of a pretrained backbone or of any checkpoint"),
    "report": ("report", "paper-style table (Markdown, CSV) and figures from run directories"),
    "knob": ("knob", "a run's network moved back toward its start, W0 + a (W1 - W0), measured at several a"),
    "sweep": ("sweep", "configs x seeds: fit, test the selected checkpoint, report; resumable; SLURM arrays"),
    "fidelity": (
        "fidelity",
        "full probe against a subset probe on checkpoints: rank correlation, differences",
    ),
    "demo": ("demo", "the whole experiment in miniature on scikit-learn's digits, on a CPU, in minutes"),
    "export": ("export", "what a run's method changed relative to its base, as one safetensors file"),
    "attach": ("attach", "put an exported task onto a base backbone (checked by SHA-256), as a checkpoint"),
}

#: errors that mean bad input: their message names the option or file, a traceback would only hide it
#: (``FTFORGET_DEBUG=1`` shows it anyway)
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, TypeError, CheckpointError, SweepError)


def user_error(err: BaseException) -> BaseException:
    """The error to show: jsonargparse wraps what a class raised while it was built (e.g. "Does not validate
    against any of the Union subtypes ..."); the first of ftforget's own errors in the chain says it best."""
    chain, seen = [], err
    while seen is not None and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    ours = [e for e in chain if type(e).__module__.startswith("ftforget.")]
    wrapped = [e for e in chain[1:] if isinstance(e, USER_ERRORS)] if "Does not validate" in str(err) else []
    return (ours or wrapped or [err])[0]


def write_summaries(cli: Any) -> None:
    """After a fit or a test of a run, rank 0 rewrites the run's TensorBoard summaries (HParams settings and
    final metrics, custom-scalars layout, text card: :mod:`ftforget.report.tensorboard`). A run that
    cannot be summarised keeps its training results; a warning says why."""
    from ftforget.report import ReportError
    from ftforget.report.runs import EVENT_GLOB
    from ftforget.report.tensorboard import write_run_summaries

    trainer = getattr(cli, "trainer", None)
    if cli.subcommand not in ("fit", "test") or trainer is None or not trainer.is_global_zero:
        return
    # Not trainer.log_dir: under DDP that is a collective, and only rank 0 is here.
    run_dir = getattr(cli, "owned_run_dir", None)
    if run_dir is None or not any(Path(run_dir).glob(EVENT_GLOB)):
        return  # no TensorBoard logger: nothing to add to
    try:
        write_run_summaries(run_dir)
    except (ReportError, OSError) as err:
        logging.getLogger(__name__).warning(
            "ftforget: TensorBoard summaries of %s not written: %s", run_dir, err
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ftforget`` console script; returns the exit status."""
    setup_console()  # ftforget's INFO lines on rank 0, through tqdm.write; known noise silenced
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help"):
        extra = "\n".join(f"  {name:<9} {doc}" for name, (_, doc) in COMMANDS.items())
        sys.stdout.write(f"ftforget commands beside Lightning's fit/validate/test/predict:\n{extra}\n\n")
    try:
        if args and args[0] in COMMANDS:
            return importlib.import_module(f"{__name__}.{COMMANDS[args[0]][0]}").main(args[1:])
        from ftforget.cli import run_lightning

        write_summaries(run_lightning(args))
        return 0
    except SystemExit as err:  # Lightning after SIGTERM or Ctrl-C: 128 + signum (143, 130), not 0 or 1
        if signal_number(err) is None:
            raise
        return 128 + signal_number(err)  # type: ignore[operator]
    except (*USER_ERRORS, NonFiniteError) as err:
        if os.environ.get("FTFORGET_DEBUG"):
            raise
        name = args[0] if args else "ftforget"
        message = " ".join(str(user_error(err)).split())  # one line, whatever the exception's layout
        sys.stderr.write(f"ftforget {name}: error: {message} (FTFORGET_DEBUG=1 shows the traceback)\n")
        return 1 if isinstance(err, NonFiniteError) else 2  # 1: the run failed; 2: bad input
