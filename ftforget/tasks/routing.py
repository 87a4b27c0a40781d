"""Routing without a task label: pick the task of each image from the base's features, and score it.

With the adapter switched off the base computes its pretrained function exactly, so nothing is forgotten;
what remains is knowing which task an image belongs to. Two routers decide it from the base's features
alone: :class:`KNNRouter` takes the weighted k-NN vote (the forgetting probe's classifier) of every
task's training images, labelled by task; :class:`NearestMeanRouter` keeps the mean (of the
L2-normalised base features) of every class of every task's training images and sends an image to the
task that owns the class mean nearest to it (largest cosine similarity).

A stream of images from several domains is then scored three ways by :func:`evaluate_stream`, each
image's answer counting as correct only if it comes from the right task *and* names the right class:

- **routed**: each image served by the task the router picked;
- **oracle**: each image served by its own domain's task (the router's upper bound);
- **fine-tuned**: the single fine-tuned model, which serves every domain with its own (changed)
  features, given the domain for free: what forgetting costs, without routing's errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ftforget.forgetting.knn import knn_predict


class NearestMeanRouter:
    """Routes each feature to the task owning the nearest class mean (cosine similarity).

    Args:
        means: ``(M, D)`` class means, L2-normalised.
        owners: ``(M,)`` the task index of each mean.
        task_names: the tasks, by index.
    """

    def __init__(self, means: torch.Tensor, owners: torch.Tensor, task_names: Sequence[str]) -> None:
        if means.ndim != 2 or owners.shape != (means.shape[0],):
            raise ValueError(f"means {tuple(means.shape)} and owners {tuple(owners.shape)} do not match")
        self.means, self.owners, self.task_names = means, owners.long(), list(task_names)

    @classmethod
    def fit(
        cls, features: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], task_names: Sequence[str]
    ) -> NearestMeanRouter:
        """One mean per (task, class): ``features[t]`` are the base features of task ``t``'s training
        images, ``labels[t]`` their classes."""
        if not len(features) == len(labels) == len(task_names) or len(features) < 2:
            raise ValueError("a router needs features and labels of at least two tasks, one list entry each")
        means, owners = [], []
        for t, (x, y) in enumerate(zip(features, labels, strict=True)):
            x = F.normalize(x.float(), dim=1)
            for c in y.unique(sorted=True).tolist():
                means.append(x[y == c].mean(0))
                owners.append(t)
        return cls(F.normalize(torch.stack(means), dim=1), torch.tensor(owners), task_names)

    def route(self, features: torch.Tensor) -> torch.Tensor:
        """``(N,)`` task indices for ``(N, D)`` base features."""
        sims = F.normalize(features.float(), dim=1) @ self.means.T
        return self.owners[sims.argmax(1)]


class KNNRouter:
    """Routes each feature by DINO's weighted k-NN vote over the base features of every task's training
    images, each labelled with its task (the forgetting probe's classifier, with tasks for classes).

    Args:
        bank: ``(N, D)`` base features of the tasks' training images (normalised here).
        owners: ``(N,)`` the task index of each.
        task_names: the tasks, by index.
        k: neighbours that vote.
        temperature: each neighbour votes ``exp(sim / T)``.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        owners: torch.Tensor,
        task_names: Sequence[str],
        k: int = 20,
        temperature: float = 0.07,
    ) -> None:
        if bank.ndim != 2 or owners.shape != (bank.shape[0],) or len(task_names) < 2:
            raise ValueError(
                f"bank {tuple(bank.shape)} and owners {tuple(owners.shape)} of >= 2 tasks do not match"
            )
        self.bank, self.owners, self.task_names = bank.float(), owners.long(), list(task_names)
        self.k, self.temperature = k, temperature

    @classmethod
    def fit(
        cls,
        features: Sequence[torch.Tensor],
        task_names: Sequence[str],
        k: int = 20,
        temperature: float = 0.07,
    ) -> KNNRouter:
        """``features[t]``: the base features of task ``t``'s training images."""
        if len(features) != len(task_names):
            raise ValueError("give one feature tensor per task")
        owners = torch.cat([torch.full((len(x),), t, dtype=torch.long) for t, x in enumerate(features)])
        return cls(torch.cat(list(features)), owners, task_names, k, temperature)

    def route(self, features: torch.Tensor) -> torch.Tensor:
        """``(N,)`` task indices for ``(N, D)`` base features."""
        votes = knn_predict(
            features.float(), self.bank, self.owners, len(self.task_names), [self.k], self.temperature
        )
        return votes[self.k][:, 0]


@dataclass
class StreamAccuracy:
    """Accuracy on a mixed stream: overall and per domain, with the exact counts behind them."""

    overall: float
    per_domain: dict[str, float]
    correct: int
    total: int


def stream_accuracy(
    choice: torch.Tensor,
    domains: torch.Tensor,
    predictions: torch.Tensor,
    labels: torch.Tensor,
    domain_names: Sequence[str],
) -> StreamAccuracy:
    """Accuracy when image ``i`` is served by task ``choice[i]``.

    Args:
        choice: ``(N,)`` the task serving each image.
        domains: ``(N,)`` the true domain (task) of each image.
        predictions: ``(N, T)`` the class each task's classifier predicts for each image.
        labels: ``(N,)`` the true class within the image's domain.
        domain_names: the tasks, by index.

    An answer is correct when the serving task is the image's domain and its prediction is the label.
    """
    served = predictions.gather(1, choice.long()[:, None]).squeeze(1)
    correct = (choice == domains) & (served == labels)
    per_domain = {
        name: int(correct[domains == t].sum()) / int((domains == t).sum())
        if (domains == t).any()
        else float("nan")
        for t, name in enumerate(domain_names)
    }
    return StreamAccuracy(
        int(correct.sum()) / len(correct), per_domain, int(correct.sum()), int(len(correct))
    )


@dataclass
class RoutingEvaluation:
    """Routing accuracy and the three stream accuracies (see the module docstring)."""

    routing_accuracy: float
    routed: StreamAccuracy
    oracle: StreamAccuracy
    fine_tuned: StreamAccuracy | None

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_stream(
    routes: torch.Tensor,
    domains: torch.Tensor,
    labels: torch.Tensor,
    predictions: torch.Tensor,
    domain_names: Sequence[str],
    fine_tuned_predictions: torch.Tensor | None = None,
) -> RoutingEvaluation:
    """Scores a routed stream against the oracle router and (optionally) the single fine-tuned model.

    Args:
        routes: ``(N,)`` the router's task per image.
        domains: ``(N,)`` the true task per image.
        labels: ``(N,)`` the true class within its task.
        predictions: ``(N, T)`` each task's prediction for each image (task ``t`` served by its own model).
        domain_names: the tasks, by index.
        fine_tuned_predictions: ``(N, T)`` the fine-tuned model's prediction for each image in each task's
            label space (scored with the true domain).
    """
    routed = stream_accuracy(routes, domains, predictions, labels, domain_names)
    oracle = stream_accuracy(domains, domains, predictions, labels, domain_names)
    fine_tuned = (
        stream_accuracy(domains, domains, fine_tuned_predictions, labels, domain_names)
        if fine_tuned_predictions is not None
        else None
    )
    return RoutingEvaluation(int((routes == domains).sum()) / len(routes), routed, oracle, fine_tuned)
