"""CIFAR-100, the paper's new task: torchvision's python format, a held-out validation split so that model
selection never sees test (:class:`~ftforget.data.new_task.NewTaskDataModule` does the work)."""

from __future__ import annotations

from typing import Any, Literal

from ftforget.data.new_task import (
    NORMALIZATION_CHOICES,
    NORMALIZATIONS,
    eval_transform,
    holdout_split,
    train_transform,
)
from ftforget.data.torchvision_sets import TorchvisionDataModule

__all__ = ["CIFAR100DataModule", "NORMALIZATIONS", "eval_transform", "holdout_split", "train_transform"]


class CIFAR100DataModule(TorchvisionDataModule):
    """CIFAR-100 (``root/cifar-100-python/``) for fine-tuning, plus an optional forgetting probe; 5,000 of
    the 50,000 training images are held out as val by default (the test split is only used by
    ``ftforget test``).

    Args:
        root: folder that holds (or will receive) ``cifar-100-python/``.
        normalization: ``imagenet`` (mean/std of the DINO backbone's pretraining), ``half`` (0.5/0.5,
            what the official code used for CIFAR while its ImageNet probe used ImageNet's) or ``backbone``
            (timm's pretrained mean/std of ``backbone``, what a backbone add-on selects).
        **kwargs: the other arguments of :class:`~ftforget.data.new_task.NewTaskDataModule` (``download``,
            ``batch_size``, ``num_workers``, ``val_size``, ``split_seed``, ``image_size``, ``crop_scale``,
            ``backbone``, ``probe``).
    """

    name = "cifar100"

    def __init__(
        self,
        root: str = "data/cifar100",
        normalization: Literal["imagenet", "half", "backbone"] = "imagenet",
        **kwargs: Any,
    ) -> None:
        if normalization not in NORMALIZATION_CHOICES:
            raise ValueError(
                f"data.normalization={normalization!r}: choose from {sorted(NORMALIZATION_CHOICES)}"
            )
        super().__init__(root=root, normalization=normalization, **kwargs)
