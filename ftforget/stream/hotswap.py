"""The one-base-many-tasks alternative to a stream: every task fine-tuned alone from the stream's start
weights (its "delta" on the pretrained base), served by a router that sees no task label.

Task ``j``'s reference is the fit of task ``j`` from the start weights with the stream's method and
settings (task 1's is the stream's own first sub-run, which already starts there). Two accuracies per task:

- **oracle**: task ``j``'s test split served by task ``j``'s reference (the task label given): the
  ``ref[j]`` of :func:`ftforget.stream.metrics.single_task_transfer`;
- **routed**: every test image of every task routed by :class:`ftforget.tasks.routing.NearestMeanRouter`
  on the base's features (class means of each task's validation split, unaugmented), then served by the
  chosen task's reference; correct only if the task and the class are both right.

The pretraining domain is not forgotten at all: the base is kept, each task's model is a separate copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftforget.backbones import build_backbone
from ftforget.inference import eval_mode
from ftforget.methods.registry import load_method
from ftforget.runs import CHECKPOINT_DIR, LAST
from ftforget.stream.carry import run_data_module
from ftforget.tasks.routing import NearestMeanRouter, stream_accuracy


@torch.no_grad()
def _apply(model: nn.Module, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
    outputs, labels = [], []
    with eval_mode(model):
        for batch in loader:
            outputs.append(model(batch[0]))
            labels.append(batch[1])
    return torch.cat(outputs), torch.cat(labels)


def hot_swap_results(start: Path, reference_dirs: Sequence[Path], names: Sequence[str]) -> dict[str, Any]:
    """Routing accuracy, and the oracle and routed accuracy of every task (counts and fractions).

    Args:
        start: the stream's start weights (the base).
        reference_dirs: each task's reference sub-run, in task order.
        names: the tasks' names.
    """
    models = [load_method(Path(d) / CHECKPOINT_DIR / LAST) for d in reference_dirs]
    hp = models[0].hparams
    base = build_backbone(hp.backbone, checkpoint=start, **(hp.backbone_kwargs or {}))
    datas = [run_data_module(Path(d)) for d in reference_dirs]
    for data in datas:
        data.setup("test")
    means_x, means_y = zip(*(_apply(base, data.val_dataloader()) for data in datas), strict=True)
    router = NearestMeanRouter.fit(list(means_x), list(means_y), list(names))
    features, labels, domains, predictions = [], [], [], []
    for t, data in enumerate(datas):
        f, y = _apply(base, data.test_dataloader())
        features.append(f)
        labels.append(y)
        domains.append(torch.full_like(y, t))
        predictions.append(torch.stack([_apply(m, data.test_dataloader())[0].argmax(1) for m in models], 1))
    domain, label, prediction = torch.cat(domains), torch.cat(labels), torch.cat(predictions)
    choice = router.route(torch.cat(features))
    routed = stream_accuracy(choice, domain, prediction, label, list(names))
    oracle = stream_accuracy(domain, domain, prediction, label, list(names))
    return {
        "tasks": list(names),
        "routing_accuracy": float((choice == domain).float().mean()),
        "oracle": [oracle.per_domain[n] for n in names],
        "routed": [routed.per_domain[n] for n in names],
        "oracle_average_accuracy": sum(oracle.per_domain.values()) / len(names),
        "routed_average_accuracy": sum(routed.per_domain.values()) / len(names),
        "routed_correct": routed.correct,
        "total": routed.total,
    }
