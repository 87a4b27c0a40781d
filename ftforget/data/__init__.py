"""Data modules: the new tasks (CIFAR-100, CIFAR-10, DTD, Food-101, Flowers-102, any image folder), probes
for forgetting, the embedded demo."""

from ftforget.data.base import FineTuneDataModule
from ftforget.data.cifar import CIFAR100DataModule
from ftforget.data.image_folder import ImageFolderDataModule
from ftforget.data.new_task import NewTaskDataModule
from ftforget.data.probe import IndexedDataset, ProbeData
from ftforget.data.torchvision_sets import (
    CIFAR10DataModule,
    DTDDataModule,
    Flowers102DataModule,
    Food101DataModule,
    TorchvisionDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DTDDataModule",
    "FineTuneDataModule",
    "Flowers102DataModule",
    "Food101DataModule",
    "ImageFolderDataModule",
    "IndexedDataset",
    "NewTaskDataModule",
    "ProbeData",
    "TorchvisionDataModule",
]
