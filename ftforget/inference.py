"""Running a model for measurement, without Lightning: the contract a model offers, one context, one loop.

Everything that measures a network's features (the forgetting probe during training, ``ftforget
measure`` after it, the linear probe's feature cache) goes through this module, so that all of them
run the network the same way:

- :class:`ProbedModel`: what a model declares for measurement: ``features(x)`` (the probe's feature),
  ``feature_module`` (the sub-network whose weights define that feature, for fingerprints and caches)
  and ``inference_context()`` (how to run it for inference, e.g. LoRA merged);
- :func:`measurement_mode`: eval mode, ``no_grad`` and the inference context inside; train flags and
  every random state restored exactly on exit, so a measurement leaves no trace on training;
- :func:`autocast_context` and :func:`iterate_features`: the extraction loop;
- :func:`frozen_prefix_depth`: how many leading blocks of the feature module a model promises never to
  change (optional ``frozen_prefix_depth`` attribute), so that the probe may compute their output once
  (:mod:`ftforget.forgetting.prefix`).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

FeatureFn = Callable[[torch.Tensor], torch.Tensor]


@runtime_checkable
class ProbedModel(Protocol):
    """What a model declares so that its features can be measured.

    Every ftforget method implements it (:class:`ftforget.methods.FineTuningModule`); a bare backbone
    gets it from :class:`BackboneModel`.
    """

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature the probe measures (ftforget: the CLS token after the final norm)."""
        ...

    @property
    def feature_module(self) -> nn.Module:
        """The sub-network whose weights alone define :meth:`features` (hashed for caches and reuse)."""
        ...

    def inference_context(self) -> AbstractContextManager:
        """A context in which :meth:`features` runs for inference (e.g. LoRA adapters merged)."""
        ...


class BackboneModel(nn.Module):
    """A bare backbone offered as a :class:`ProbedModel` (``ftforget measure --backbone``).

    Args:
        backbone: a headless network whose output is the feature.
    """

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    @property
    def feature_module(self) -> nn.Module:
        return self.backbone

    def inference_context(self) -> AbstractContextManager:
        return nullcontext()


def frozen_prefix_depth(model: object) -> int:
    """How many leading transformer blocks of ``model.feature_module`` never change during training.

    Optional beside the :class:`ProbedModel` contract: a model declares it as a ``frozen_prefix_depth``
    attribute or property (an int >= 0), promising that its patch embedding, position embedding, class
    token and the first ``frozen_prefix_depth`` blocks keep their weights, and that ``features(x)`` is
    ``feature_module(x)`` in :func:`measurement_mode`. Absent means 0: nothing may be reused. The probe
    does not take the promise on trust: it also checks the prefix's weights before every reuse.
    """
    depth = getattr(model, "frozen_prefix_depth", 0)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"{type(model).__name__}.frozen_prefix_depth must be an int >= 0, got {depth!r}")
    return depth


def require_probed(model: object, what: str) -> ProbedModel:
    """``model`` if it implements :class:`ProbedModel`, else a ``TypeError`` naming ``what`` needs it."""
    if not isinstance(model, ProbedModel):
        raise TypeError(
            f"{what} needs a model with features(x), feature_module and inference_context() (every "
            f"ftforget method has them), got {type(model).__name__}"
        )
    return model


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Every submodule in eval mode (no dropout, no drop-path) inside; each one's own train/eval flag restored
    on exit (a deliberately frozen submodule stays in eval mode)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def measurement_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, ``no_grad`` and the model's :meth:`~ProbedModel.inference_context` inside; the exact
    prior state restored on exit.

    Restored on exit: every submodule's own train/eval flag (a deliberately frozen submodule stays in
    eval mode) and the python, NumPy, torch CPU and CUDA random states, which data loaders and dropout
    would otherwise advance: the training trajectory is the same as without the measurement.
    """
    probed = require_probed(model, "measurement_mode")
    cuda_rng = torch.cuda.is_available() and torch.cuda.is_initialized()
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if cuda_rng else None
    try:
        with eval_mode(model), torch.no_grad(), probed.inference_context():
            yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast on CUDA when a dtype is given; nothing on CPU (fp32 there, as training)."""
    if device.type == "cuda" and dtype is not None:
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def iterate_features(
    feature_fn: FeatureFn,
    batches: Iterable[Any],
    device: torch.device,
    forward_context: Callable[[], AbstractContextManager] = nullcontext,
) -> Iterator[tuple[torch.Tensor, Any]]:
    """The one extraction loop: ``(features, rest of the batch)`` for every batch ``(images, *rest)``.

    The caller sets the mode (:func:`measurement_mode`); this loop moves images to ``device`` and runs
    ``feature_fn`` under ``forward_context()`` (autocast, or a trainer's precision context).
    """
    for batch in batches:
        images, *rest = batch
        with forward_context():
            out = feature_fn(images.to(device, non_blocking=True))
        yield out, rest
