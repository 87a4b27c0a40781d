"""Data modules: CIFAR-100 for fine-tuning, probes for forgetting, the embedded demo."""

from ftforget.data.base import FineTuneDataModule
from ftforget.data.cifar import CIFAR100DataModule
from ftforget.data.probe import IndexedDataset, ProbeData

__all__ = ["CIFAR100DataModule", "FineTuneDataModule", "IndexedDataset", "ProbeData"]
