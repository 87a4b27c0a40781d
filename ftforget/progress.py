"""Progress the user can see: one tqdm helper for long loops, and a training bar that counts steps.

:func:`progress_bar` is what feature extraction, the pixel-cache build and the k-NN show while they run
(images/s or queries/s and an ETA). It draws only on global rank 0, only when stderr is a terminal, never
when ``FTFORGET_PROGRESS=0`` (``FTFORGET_PROGRESS=1`` draws even without a terminal), below Lightning's
bars (``leave=False``, the next free line), and it only counts: results are the same with or without it.

:class:`StepProgressBar` is the CLI's default progress bar: Lightning's TQDM bar whose main bar counts
optimizer steps toward ``trainer.max_steps`` (the epoch is a postfix), since runs are set by steps.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import lightning as L
from lightning.pytorch.callbacks import Callback, ProgressBar, TQDMProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from tqdm import tqdm

#: environment variable: ``0``/``false``/``off`` hides ftforget's progress bars, ``1``/``true``/``on`` shows
#: them even when stderr is not a terminal
PROGRESS_ENV = "FTFORGET_PROGRESS"
_OFF = ("0", "false", "no", "off")
_ON = ("1", "true", "yes", "on")


def global_rank() -> int:
    """This process's global rank: the process group's once initialised, else Lightning's (from the env)."""
    # Imported here: ftforget.forgetting imports this module (features, k-NN), so a top-level import of
    # the package would be circular.
    from ftforget.forgetting.collectives import dist_info

    rank, world = dist_info()
    if world > 1:
        return rank
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def progress_enabled(file: TextIO | None = None) -> bool:
    """Whether ftforget's progress bars draw: rank 0, and stderr (or ``file``) a terminal or forced by env.

    Args:
        file: the stream the bar would write to (default ``sys.stderr``).
    """
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if setting in _OFF or global_rank() != 0:
        return False
    if setting in _ON:
        return True
    stream = sys.stderr if file is None else file
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress_bar(total: int | None, desc: str, unit: str = "img", file: TextIO | None = None) -> tqdm:
    """A tqdm bar for a long loop, drawn only where :func:`progress_enabled` says so.

    Use it as a context manager and call ``update(n)`` with the items just processed. It goes on the next
    free line below Lightning's bars and disappears when done (``leave=False``), and log lines written
    meanwhile go above it (:mod:`ftforget.logging_setup` routes them through ``tqdm.write``).

    Args:
        total: items the loop will process (None: unknown, no ETA).
        desc: what runs, e.g. ``"probe features (bank)"``.
        unit: the item, shown as a rate: ``img`` gives images/s.
        file: the stream (default ``sys.stderr``).
    """
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        leave=False,
        dynamic_ncols=True,
        file=sys.stderr if file is None else file,
        disable=not progress_enabled(file),
        smoothing=0.1,
    )


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar whose main bar counts optimizer steps toward ``trainer.max_steps``.

    ftforget runs are set by steps (``max_steps``; ``max_epochs`` is -1), so per-epoch bars say little and
    Lightning's Rich bar shows ``Epoch 14/-2``. With ``max_steps > 0`` there is one training bar for the
    whole run, ``global_step / max_steps`` with the epoch as a postfix; otherwise this is Lightning's bar.
    Validation and test bars are Lightning's.
    """

    @staticmethod
    def _counts_steps(trainer: L.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def _show_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        bar = self.train_progress_bar
        if not bar.disable:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._counts_steps(trainer):
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step  # a resumed run: the rate counts this run's steps only
            bar.set_description("Training")
            self._show_step(trainer, pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if not self._counts_steps(trainer):
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._counts_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self._should_update(trainer.global_step, self.train_progress_bar.total):
            self._show_step(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._counts_steps(trainer):
            super().on_train_epoch_end(trainer, pl_module)
        else:
            self._show_step(trainer, pl_module)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        metrics = super().get_metrics(trainer, pl_module)
        if self._counts_steps(trainer):
            return {"epoch": trainer.current_epoch, **metrics}
        return metrics


def with_default_progress_bar(callbacks: Any, enable_progress_bar: bool | None) -> list[Callback]:
    """``callbacks`` plus a :class:`StepProgressBar` where Lightning would add its own default bar.

    Lightning adds a default bar when the progress bar is enabled (``enable_progress_bar`` True or unset)
    and no :class:`~lightning.pytorch.callbacks.ProgressBar` is among the callbacks; a user's bar wins, and
    ``enable_progress_bar: false`` gets none (Lightning rejects a bar in the callbacks then).

    Args:
        callbacks: ``trainer.callbacks`` as configured: None, one callback or a list.
        enable_progress_bar: ``trainer.enable_progress_bar`` as configured.
    """
    if callbacks is None:
        callbacks = []
    listed = list(callbacks) if isinstance(callbacks, Iterable) else [callbacks]
    if enable_progress_bar is not False and not any(isinstance(c, ProgressBar) for c in listed):
        listed.append(StepProgressBar())
    return listed
