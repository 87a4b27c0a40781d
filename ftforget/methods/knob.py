"""The stability-plasticity knob: a fine-tuned network moved back toward its starting point, after training.

For every backbone weight, ``W(a) = W0 + a (W1 - W0)``, where ``W0`` is the model at step 0 and ``W1`` the
fine-tuned one; the fine-tuned head is kept. ``a = 1`` is the fine-tuned model, ``a = 0`` the pretrained
backbone under the new head, and values in between trade new-task accuracy for retained old-domain
accuracy. What that means per method:

- full and top-k fine-tuning: WiSE-FT's weight-space ensemble (Wortsman et al., 2022) of the backbone;
- LoRA: the adapters' scale times ``a`` (the update ``scale * B @ A`` is all that changed);
- Block Expansion: the new blocks opened partially (their zero-initialised output projections, and the rest
  of each copy, interpolated toward their initial values; at ``a = 0`` they are identities again);
- linear probing: nothing moves (its backbone is frozen), every ``a`` is the same model.

``ftforget knob`` (:mod:`ftforget.commands.knob`) measures a run at a list of ``a``.
"""

from __future__ import annotations

import copy
import math

from ftforget.methods.base import FineTuningModule


def knob_model(end: FineTuningModule, start: FineTuningModule, a: float) -> FineTuningModule:
    """A copy of ``end`` (the fine-tuned method) with backbone weights ``W0 + a (W1 - W0)``, in eval mode.

    Args:
        end: the fine-tuned model (e.g. :func:`~ftforget.methods.registry.load_method` of a checkpoint).
        start: the same method at step 0 (built from the run's configuration).
        a: the knob; 0 and 1 are exact (``torch.lerp``), values outside [0, 1] extrapolate.

    Raises:
        ValueError: ``a`` is not finite, or ``start`` is another method or was built from other weights.
    """
    if not math.isfinite(a):
        raise ValueError(f"knob a must be a finite number, got {a}")
    if type(start) is not type(end):
        raise ValueError(
            f"the step-0 model is a {type(start).__name__}, the checkpoint a {type(end).__name__}: both must be "
            "the same method"
        )
    model = copy.deepcopy(end)
    model.apply_knob(start, a)
    return model.eval()
