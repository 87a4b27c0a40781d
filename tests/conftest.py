"""Shared fixtures: tiny ViTs of the real timm architecture and tiny in-memory data."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

torch.set_num_threads(min(2, os.cpu_count() or 1))

#: a ViT of timm's real architecture, small enough for CPU tests
TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8}
TINY_ARGS = {"backbone": "vit_base_patch16_224", "backbone_kwargs": TINY}


@pytest.fixture
def tiny_args() -> dict:
    return {"backbone": "vit_base_patch16_224", "backbone_kwargs": dict(TINY)}


class RandomImages(L.LightningDataModule):
    """A fixed random classification task, for tests that need a Trainer but no real data."""

    def __init__(self, n: int = 24, num_classes: int = 5, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        self.num_classes, self.batch_size = num_classes, batch_size
        self.probe = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


@pytest.fixture
def random_images() -> RandomImages:
    return RandomImages()


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A CPU trainer that writes nothing but what a test asks for."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)
