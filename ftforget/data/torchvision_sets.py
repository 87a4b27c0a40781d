"""CIFAR-100 (:mod:`ftforget.data.cifar`), CIFAR-10, DTD, Food-101 and Flowers-102 through torchvision's dataset classes, as new tasks.

One data module per dataset, all the same code (:class:`TorchvisionDataModule`, on
:class:`~ftforget.data.new_task.NewTaskDataModule`): an entry of :data:`TORCHVISION_SETS` says which
torchvision class reads it, its folder and files, its class count and which splits it stores. DTD and
Flowers-102 have their own validation split; CIFAR and Food-101 hold one out of their training set.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2 as T

from ftforget.data.new_task import NewTaskDataModule


@dataclass(frozen=True)
class TorchvisionSet:
    """How to read one dataset with torchvision.

    Args:
        title: the dataset's name in messages.
        cls: the torchvision dataset class.
        num_classes: its class count.
        expected: the folder and files it reads under ``root``.
        splits: split -> the keyword arguments of ``cls`` that select it (``train``, ``test``, optional
            ``val``; no ``val``: one is held out of ``train``).
    """

    title: str
    cls: type[datasets.VisionDataset]
    num_classes: int
    expected: str
    splits: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


#: name -> how torchvision reads it
TORCHVISION_SETS: dict[str, TorchvisionSet] = {
    "cifar100": TorchvisionSet(
        "CIFAR-100",
        datasets.CIFAR100,
        100,
        "'cifar-100-python/' with files 'train', 'test' and 'meta'",
        {"train": {"train": True}, "test": {"train": False}},
    ),
    "cifar10": TorchvisionSet(
        "CIFAR-10",
        datasets.CIFAR10,
        10,
        "'cifar-10-batches-py/' with data_batch_1..5, test_batch and batches.meta",
        {"train": {"train": True}, "test": {"train": False}},
    ),
    "dtd": TorchvisionSet(
        "DTD",
        datasets.DTD,
        47,
        "'dtd/dtd/images/<class>/*.jpg' and 'dtd/dtd/labels/{train,val,test}1.txt'",
        {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
    ),
    "food101": TorchvisionSet(
        "Food-101",
        datasets.Food101,
        101,
        "'food-101/images/<class>/*.jpg' and 'food-101/meta/{train,test}.json'",
        {"train": {"split": "train"}, "test": {"split": "test"}},
    ),
    "flowers102": TorchvisionSet(
        "Flowers-102",
        datasets.Flowers102,
        102,
        "'flowers-102/jpg/image_XXXXX.jpg', 'flowers-102/imagelabels.mat' and 'flowers-102/setid.mat'",
        {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
    ),
}


class TorchvisionDataModule(NewTaskDataModule):
    """A dataset of :data:`TORCHVISION_SETS` (``name``); the arguments are
    :class:`~ftforget.data.new_task.NewTaskDataModule`'s."""

    #: the key of :data:`TORCHVISION_SETS` this module reads
    name: ClassVar[str]
    downloadable = True

    @property
    def spec(self) -> TorchvisionSet:
        return TORCHVISION_SETS[self.name]

    @property
    def title(self) -> str:  # type: ignore[override]
        return self.spec.title

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return self.spec.num_classes

    def expected_files(self) -> str:
        return self.spec.expected

    def load_split(self, split: str, transform: T.Compose) -> Dataset | None:
        kwargs = self.spec.splits.get(split)
        if kwargs is None:
            return None
        return self.spec.cls(str(self.root), transform=transform, download=False, **kwargs)

    def download_data(self) -> None:
        for kwargs in self.spec.splits.values():
            self.spec.cls(str(self.root), download=True, **kwargs)


class CIFAR10DataModule(TorchvisionDataModule):
    """CIFAR-10 (torchvision's python format under ``root``); 5,000 of the 50,000 training images held out
    as val by default."""

    name = "cifar10"


class DTDDataModule(TorchvisionDataModule):
    """The Describable Textures Dataset (47 classes), partition 1: its own train, val and test splits."""

    name = "dtd"


class Food101DataModule(TorchvisionDataModule):
    """Food-101 (101 classes, 75,750 training and 25,250 test images); val held out of train."""

    name = "food101"


class Flowers102DataModule(TorchvisionDataModule):
    """Oxford Flowers-102 (102 classes): its own train, val and test splits (reading it needs scipy)."""

    name = "flowers102"
