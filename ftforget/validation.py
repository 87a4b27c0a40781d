"""Every fit validates at its last training step, so that its best checkpoint exists and its validation curve
ends at ``max_steps``.

Lightning validates on its schedule only (every ``check_val_every_n_epoch`` epochs, or ``val_check_interval``
batches), not because training ends: a 30-step fit of the demo (8 steps an epoch, validation every 5 epochs)
never validated, so it had no best checkpoint on ``val/acc1`` and ``ftforget test --ckpt_path best`` refused.
:class:`LastStepValidation` adds the validation of the last step where the schedule has none. That
validation leaves no trace on training: the random states are put back as they were before it (creating the
validation loader's iterator draws from torch's global generator), before any checkpoint of that step saves
them, so a resumed or continued fit draws exactly what it would have drawn without it.
"""

from __future__ import annotations

from typing import Any

import lightning as L

from ftforget.methods.base import restore_rng_states, save_rng_states


def is_last_step(trainer: L.Trainer) -> bool:
    """Whether the optimizer step just taken ends the fit: ``max_steps`` reached, or the last batch of the last
    epoch (``max_epochs``)."""
    if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
        return True
    max_epochs = trainer.max_epochs
    last_epoch = max_epochs is not None and max_epochs >= 0 and trainer.current_epoch + 1 >= max_epochs
    # Lightning's own end of an epoch: its batches all seen, or limit_train_batches of them (private API).
    return last_epoch and trainer.fit_loop.epoch_loop._num_ready_batches_reached()


class LastStepValidation(L.Callback):
    """Validates at the last training step when Lightning's schedule does not (the CLI adds it to every fit).

    Lightning's decision (``_should_check_val_fx`` of the training epoch loop, a private method of
    lightning < 2.7) is wrapped, not replaced: a scheduled validation runs as before, untouched.
    """

    def __init__(self) -> None:
        self._states: dict[str, Any] | None = None  # the random states of before an added validation

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loop = trainer.fit_loop.epoch_loop
        if stage != "fit" or getattr(loop._should_check_val_fx, "adds_last_step", False):
            return
        scheduled = loop._should_check_val_fx

        def should_check(data_fetcher: Any) -> bool:
            if scheduled(data_fetcher):
                return True
            if not (trainer.enable_validation and not trainer.sanity_checking and is_last_step(trainer)):
                return False
            if not loop.restarting:  # a restart goes on with Lightning's restored states
                self._states = save_rng_states()
            return True

        should_check.adds_last_step = True  # type: ignore[attr-defined]
        loop._should_check_val_fx = should_check

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Puts back the random states of before an added validation (checkpoint callbacks run after this
        one: Lightning calls them last)."""
        if self._states is not None:
            restore_rng_states(self._states)
            self._states = None
