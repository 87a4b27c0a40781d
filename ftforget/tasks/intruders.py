"""Intruder dimensions of a fine-tuned method, layer by layer (:mod:`ftforget.adapters.intruders`).

The weights analysed are the 2-D weights of the *base* network: those the method's surgery keeps frozen
(:func:`~ftforget.tasks.delta.base_key_map`: LoRA's and PEFT's wrapped layers, which hold ``W + dW`` once
the adapters are merged) and, for full and top-k fine-tuning, the weights they train in place. Each is taken
as the method runs for inference (adapters merged, :meth:`inference_context`) and compared with the same
weight of the run's step-0 model (``ftforget knob``'s start); weights that did not move are skipped.
Adapters' own tensors and Block Expansion's new blocks are not weights of the base and are not analysed.
:func:`~ftforget.adapters.intruders.reduce_intruders` is the post-hoc knob on one weight.
"""

from __future__ import annotations

import torch

from ftforget.adapters.intruders import Intruders, find_intruders
from ftforget.methods import FullFineTuning, TopKFineTuning
from ftforget.methods.base import FineTuningModule
from ftforget.tasks.delta import BACKBONE, base_key_map, task_tensors


def base_weights(model: FineTuningModule) -> dict[str, torch.Tensor]:
    """``base key -> weight`` of every 2-D float base weight of ``model``, adapters merged (CPU copies)."""
    keys = dict(base_key_map(model))
    if isinstance(model, FullFineTuning | TopKFineTuning):  # no surgery: what trains is the base's own
        keys.update({k: k[len(BACKBONE) :] for k in task_tensors(model) if k.startswith(BACKBONE)})
    with torch.no_grad(), model.inference_context():
        state = model.state_dict()
        return {
            base: state[key].detach().cpu().clone()
            for key, base in keys.items()
            if state[key].dim() == 2 and state[key].is_floating_point()
        }


def layer_intruders(
    end: FineTuningModule, start: FineTuningModule, top_k: int = 10, epsilon: float = 0.5
) -> dict[str, Intruders]:
    """``base weight name -> intruders`` for every base weight that ``end`` moved away from ``start``."""
    w1, w0 = base_weights(end), base_weights(start)
    return {
        k: find_intruders(w0[k], w1[k], top_k, epsilon)
        for k in w1
        if k in w0 and not torch.equal(w0[k], w1[k])
    }
