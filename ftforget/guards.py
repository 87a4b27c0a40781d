"""Honest failures: a non-finite loss or feature stops the run, and a signal is not an exit status of 0.

- :class:`NonFiniteLossGuard` (a callback the CLI adds to every fit) stops a fit at the first batch whose
  loss is NaN or infinite, before its backward pass and optimizer step, so that neither a checkpoint nor a
  measurement is taken of what followed.
- :func:`check_finite` is the probe's refusal of non-finite features.
- :func:`signal_number` tells which signal ended a Lightning stage: ``ftforget`` then exits with
  ``128 + signum``, SIGTERM 143 and SIGINT 130, as a shell reports a process killed by that signal.
"""

from __future__ import annotations

import signal

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException


class NonFiniteError(FloatingPointError):
    """A loss or features that are NaN or infinite; the message names the step or the probe's part."""


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raises :class:`NonFiniteError` naming ``what`` if any element of ``tensor`` is NaN or infinite.

    Args:
        tensor: the values to check.
        what: what they are, for the message (e.g. ``"probe features (bank)"``).

    Raises:
        NonFiniteError: ``tensor`` has a NaN or an infinite value.
    """
    if tensor.numel() == 0:
        return
    finite = torch.isfinite(tensor)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise NonFiniteError(
            f"{what}: {bad} of {tensor.numel()} values are NaN or infinite (did the model diverge? a lower "
            "learning rate may help); no measurement is recorded from them"
        )


class NonFiniteLossGuard(L.Callback):
    """Stops a fit when a training loss is NaN or infinite.

    The check runs before the backward pass: the weights are still those of the last finite step, and
    the forgetting callback measures nothing afterwards. Every rank takes the same decision (a rank with a
    finite loss would otherwise wait forever for the others). The exception's checkpoint is
    ``interrupted-step<N>.ckpt``; ``last.ckpt`` is left as it was
    (:class:`~ftforget.checkpointing.FTForgetCheckpoint`).
    """

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        """Raises :class:`NonFiniteError` naming the step if ``loss`` is not finite on any rank."""
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            finite = bool(trainer.strategy.reduce_boolean_decision(finite, all=True))
        if not finite:
            value = float(loss.detach().float().reshape(-1)[0]) if loss.numel() else float("nan")
            raise NonFiniteError(
                f"non-finite loss ({value}) at step {trainer.global_step}; training stopped before its "
                "optimizer step (lower the learning rate, or use --trainer.gradient_clip_val)"
            )


def signal_number(err: BaseException) -> int | None:
    """The signal that ended a Lightning stage, if one did.

    Lightning raises ``SIGTERMException`` (a ``SystemExit`` with no code) after SIGTERM, and on Ctrl-C
    (SIGINT) runs the callbacks' ``on_exception`` and calls ``sys.exit(1)`` while it handles the
    ``KeyboardInterrupt``.

    Args:
        err: what the stage raised.

    Returns:
        The signal's number, or ``None``.
    """
    if isinstance(err, SIGTERMException):
        return int(signal.SIGTERM)
    if isinstance(err, KeyboardInterrupt) or isinstance(err.__context__, KeyboardInterrupt):
        return int(signal.SIGINT)
    return None
