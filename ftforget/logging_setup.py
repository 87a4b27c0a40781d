"""The console of the ``ftforget`` commands: ftforget's INFO lines on rank 0, above the progress bars.

:func:`setup_console` runs once at the start of :func:`ftforget.commands.main`:

* ftforget's loggers (``ftforget.*``) print at INFO on global rank 0 (Python's default shows WARNING and
  above only, so the pixel cache's and the feature cache's lines never appeared);
* they and Lightning's own lines (``rank_zero_info``, e.g. the forgetting callback's) go through
  ``tqdm.write``, which clears the progress bars, prints the line and redraws them, so lines and bars
  no longer collide;
* known-irrelevant noise is silenced at its source (:func:`silence_known_noise`).
"""

from __future__ import annotations

import logging
import re
import sys
import warnings
from typing import TextIO

from tqdm import tqdm

#: the message of torch's deprecation of ``LeafSpec``, which Lightning 2.6's ``_pytree`` still uses on every
#: fit and test; nothing ftforget (or a user) can change
LEAFSPEC_WARNING = "`isinstance(treespec, LeafSpec)` is deprecated"
#: Lightning prints this advertisement with ``rank_zero_info`` whenever no LitLogger is configured
#: (``_LoggerConnector.configure_logger`` in Lightning 2.6 has no setting or env var to turn it off)
LIGHTNING_TIP_PREFIX = "💡 Tip:"
#: the logger ``rank_zero_info``/``rank_zero_warn`` write to
LIGHTNING_RANK_ZERO_LOGGER = "lightning.pytorch.utilities.rank_zero"
#: the loggers whose handlers this module installs
CONSOLE_LOGGERS = ("ftforget", "lightning.pytorch", "lightning.fabric")


class TqdmHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write``: progress bars are cleared, then redrawn.

    Args:
        stream: where lines go; None: ``sys.stderr`` as it is at each line (it may be replaced later).
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._follow_stderr = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if self._follow_stderr else self.stream
            tqdm.write(self.format(record), file=stream)
            stream.flush()
        except Exception:  # logging must never raise (logging.Handler's contract)
            self.handleError(record)


class RankZeroFilter(logging.Filter):
    """INFO and below on global rank 0 only, warnings on every rank (the rank is read at emit time)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        from ftforget.progress import global_rank

        return global_rank() == 0


class DropLightningTips(logging.Filter):
    """Drops Lightning's ``💡 Tip: ...`` advertisements."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(LIGHTNING_TIP_PREFIX)


class _LevelPrefixFormatter(logging.Formatter):
    """INFO and below as the bare message (as Lightning prints its own), warnings with their level."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno <= logging.INFO else f"{record.levelname}: {message}"


def silence_known_noise() -> None:
    """Silences known-irrelevant noise at its source: torch's LeafSpec deprecation warning raised in
    Lightning's ``_pytree`` (twice per fit: in fit and in test), Lightning's litlogger tip, and its advice to
    prepend ``srun`` wherever a machine has SLURM installed (a fit on a login node or a workstation is meant
    to run there; ``ftforget sweep --slurm`` writes the ``srun`` line where it belongs).

    Only these exact messages from these exact places are dropped; every other warning still shows.
    """
    warnings.filterwarnings(
        "ignore",
        message=re.escape(LEAFSPEC_WARNING),
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    warnings.filterwarnings(
        "ignore",
        message=r"The `srun` command is available on your system but is not used",
        module=r"lightning\.fabric\.plugins\.environments\.slurm",
    )
    rank_zero_log = logging.getLogger(LIGHTNING_RANK_ZERO_LOGGER)
    if not any(isinstance(f, DropLightningTips) for f in rank_zero_log.filters):
        rank_zero_log.addFilter(DropLightningTips())


def setup_console(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Sets up the console of an ``ftforget`` command; calling it again changes nothing more.

    ftforget's loggers print at ``level`` on rank 0 (warnings on every rank); Lightning's loggers keep
    their level and rank rules.
    Both write through :class:`TqdmHandler` to ``stream`` (default ``sys.stderr``), replacing the plain
    stream handlers Lightning installs on import. A process whose root logger has handlers (an
    application that configured logging itself) keeps them: ftforget's records then propagate to it.

    Args:
        level: the level of the ``ftforget`` loggers.
        stream: where lines go (default ``sys.stderr``).
    """
    silence_known_noise()
    formatter = _LevelPrefixFormatter("%(message)s")
    root_configured = logging.getLogger().hasHandlers()
    for name in CONSOLE_LOGGERS:
        logger = logging.getLogger(name)
        if any(isinstance(h, TqdmHandler) for h in logger.handlers):
            continue
        if name == "ftforget":
            logger.setLevel(level)
            if root_configured:
                continue  # the application's handlers print it
        elif root_configured or not logger.handlers:
            continue  # Lightning propagates to the root logger's handlers: leave them alone
        handler = TqdmHandler(stream)
        handler.setFormatter(formatter)
        if name == "ftforget":
            handler.addFilter(RankZeroFilter())
        for old in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(old)  # Lightning's plain handler: replaced, not doubled
        logger.addHandler(handler)
        logger.propagate = False
