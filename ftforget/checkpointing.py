"""ftforget's checkpointing: Lightning's ModelCheckpoint, with a crash's checkpoint named for what it is and
``last.ckpt`` always holding the final weights."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info


class FTForgetCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose exception checkpoint is ``interrupted-step<N>.ckpt``.

    Lightning's ``ModelCheckpoint.on_exception`` (``save_on_exception=True``) names the checkpoint of a
    crash or Ctrl-C with the *best-model* template (``filename``, e.g. ``best-step13-acc0.2000.ckpt``) and
    the current metrics, so it looks like a model selected on ``val/acc1``. Here it gets its own name.

    ``last.ckpt`` is written at the end of training whenever the last one saved is of an earlier step:
    Lightning writes it only at validation (and at the end only if none was written), so a fit whose last
    validation came before its last step left ``last.ckpt`` behind the final weights, and ``ftforget test
    --ckpt_path last`` or a sweep's test would have evaluated an older model.
    """

    #: file name (without ``.ckpt``) of the checkpoint written when a fit stops on an exception
    INTERRUPTED_TEMPLATE = "interrupted-step{step}"

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        """Saves ``interrupted-step<N>.ckpt`` (and ``last.ckpt`` with ``save_last``) when a fit fails."""
        if not self._should_save_on_exception(trainer):
            return
        monitor_candidates = self._monitor_candidates(trainer)
        # No braces left in the name: Lightning's template formatting leaves it as it is.
        name = self.INTERRUPTED_TEMPLATE.format(step=trainer.global_step)
        filepath = self.format_checkpoint_name(metrics=monitor_candidates, filename=name)
        self._save_checkpoint(trainer, filepath)
        self._save_last_checkpoint(trainer, monitor_candidates)
        rank_zero_info(f"{type(exception).__name__} at step {trainer.global_step}: saved {filepath}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
