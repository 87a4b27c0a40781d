"""ftforget's checkpointing: Lightning's ModelCheckpoint, with a crash's checkpoint named for what it is,
``last.ckpt`` refreshed every ``every_n_train_steps`` steps, and ``last.ckpt`` always holding the final
weights of a fit that ended normally."""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ftforget.checkpoint_io import atomic_copy, atomic_symlink


class FTForgetCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose exception checkpoint is ``interrupted-step<N>.ckpt``.

    Lightning's ``ModelCheckpoint.on_exception`` (``save_on_exception=True``) names the checkpoint of a
    crash or Ctrl-C with the *best-model* template (``filename``, e.g. ``best-step13-acc0.2000.ckpt``) and
    the current metrics, so it looks like a model selected on ``val/acc1``. Here it gets its own name.

    ``last.ckpt``:

    - is written every ``every_n_train_steps`` optimizer steps (with ``save_last``), whether or not a
      validation has produced the monitored metric yet; Lightning defers both its step checkpoint and
      ``last.ckpt`` until a validation when the monitored metric is missing, so a fit killed before its
      first validation had none. The best checkpoint on ``monitor`` is chosen at validation, as before.
    - is written at the end of training whenever the last one saved is of an earlier step, or was saved by
      the final step's validation: Lightning writes it only at validation (and at the end only if none was
      written), so a fit whose last validation came before its last step left ``last.ckpt`` behind the
      final weights, and one saved inside a validation resumes its logging one step too low.
    - is left as it was when a fit stops on an exception (a crash, a non-finite loss, Ctrl-C): that state
      may be broken (e.g. Ctrl-C during an optimizer step) and goes to ``interrupted-step<N>.ckpt`` only;
      ``ftforget fit --resume`` goes on from ``last.ckpt``. The one exception is SIGTERM, which Lightning
      turns into an exception between two steps: with finite weights, inside an epoch, its state also
      refreshes ``last.ckpt``, so that a preempted job resumes where it stopped (at an epoch's end the
      previous ``last.ckpt`` stays: see :func:`_mid_epoch`).

    Every file is written through the trainer's CheckpointIO (atomically, with
    :class:`~ftforget.checkpoint_io.AtomicCheckpointIO`); ``save_last="link"`` and its copy fallback
    replace ``last.ckpt`` by a rename too, never by removing or truncating it first.
    """

    #: file name (without ``.ckpt``) of the checkpoint written when a fit stops on an exception
    INTERRUPTED_TEMPLATE = "interrupted-step{step}"

    _validated_at: int | None = None  # step of the last validation (that of the monitored metric)
    _periodic_last_step: int | None = None  # step of the last periodic last.ckpt

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """``last.ckpt`` every ``every_n_train_steps`` steps; a monitored best checkpoint only at a validation.

        Lightning would save a best checkpoint at any such step where the monitored metric exists, with the
        metric of an earlier validation (``best-step12-acc<acc of step 8>``): here that save waits for the
        next validation, as Lightning does itself when no validation has run yet.
        """
        every = self._every_n_train_steps
        if every >= 1 and self.monitor is not None and self._validated_at != trainer.global_step:
            if trainer.global_step % every == 0:  # the monitored metric, if any, is of an earlier step
                self._defer_save_until_validation = True
        else:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (
            not self.save_last
            or every < 1
            or trainer.global_step % every != 0
            or self._should_skip_saving_checkpoint(trainer)  # also: saved at this step already
        ):
            return
        # A periodic last.ckpt is not the step's checkpoint: the validation of this step, if any, still
        # saves the best one (Lightning skips a step whose checkpoint it has saved).
        saved_step = self._last_global_step_saved
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._last_global_step_saved = saved_step
        self._periodic_last_step = trainer.global_step

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's checkpoints of a validation, and those deferred to it; remembers its step.

        Lightning saves a deferred checkpoint here only when it does not save at the end of the training
        epoch, where it no longer looks at the deferral: the best checkpoint of a step was lost then.
        """
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking:
            return
        self._validated_at = trainer.global_step
        if self._defer_save_until_validation and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
            self._defer_save_until_validation = False

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Saves ``interrupted-step<N>.ckpt`` when a fit fails; ``last.ckpt`` only after SIGTERM (see the
        class)."""
        if not self._should_save_on_exception(trainer):
            return
        monitor_candidates = self._monitor_candidates(trainer)
        # No braces left in the name: Lightning's template formatting leaves it as it is.
        name = self.INTERRUPTED_TEMPLATE.format(step=trainer.global_step)
        filepath = self.format_checkpoint_name(metrics=monitor_candidates, filename=name)
        self._save_checkpoint(trainer, filepath)
        if isinstance(exception, SIGTERMException) and _mid_epoch(trainer) and finite_parameters(pl_module):
            self._save_last_checkpoint(trainer, monitor_candidates)
        rank_zero_info(f"{type(exception).__name__} at step {trainer.global_step}: saved {filepath}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Writes ``last.ckpt`` of the final step unless it holds that step already, saved after the step.

        One saved by the validation of the final step is written again: Lightning saves a validation's
        checkpoint before it counts the step as logged, and a fit continued from it (``--resume`` with a
        higher ``max_steps``) would log every step one too low, over the last logged one.
        """
        saved = (self._last_global_step_saved, self._periodic_last_step)
        if self.save_last and (trainer.global_step not in saved or self._validated_at == trainer.global_step):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)

    @staticmethod
    def _link_checkpoint(trainer: L.Trainer, filepath: str, linkpath: str) -> None:
        """``save_last="link"``: ``last.ckpt`` becomes a link to (or, where links fail, a copy of) the
        step's checkpoint by a rename; Lightning's removes the old ``last.ckpt`` first."""
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            try:
                atomic_symlink(os.path.relpath(filepath, os.path.dirname(linkpath)), linkpath)
            except OSError:
                atomic_copy(filepath, linkpath)
        trainer.strategy.barrier()


def _mid_epoch(trainer: L.Trainer) -> bool:
    """Whether an epoch is under way: Lightning raises SIGTERM's exception between two batches, or after the
    epoch-end hooks once the epoch counts as completed. Resumed from the latter, Lightning takes the next
    epoch's batches as done (the finished epoch's count is kept) and skips them: a SIGTERM there keeps the
    previous ``last.ckpt``, from which the resume is exact."""
    progress = trainer.fit_loop.epoch_progress.current
    return progress.ready > progress.completed


def finite_parameters(module: torch.nn.Module) -> bool:
    """Whether every floating-point parameter of ``module`` is finite."""
    return all(bool(torch.isfinite(p).all()) for p in module.parameters() if p.is_floating_point())
