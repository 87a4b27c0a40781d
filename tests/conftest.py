"""Shared fixtures: tiny ViTs of the real timm architecture and tiny in-memory data."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import RandomImages
from tests.tiny import ARCH, TINY

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_args() -> dict:
    return {"backbone": ARCH, "backbone_kwargs": dict(TINY)}


@pytest.fixture
def random_images() -> RandomImages:
    return RandomImages()


@pytest.fixture
def backbone(tmp_path):
    """A randomly initialised backbone of the demo's architecture, saved as a timm-format ``.pth``."""
    from pathlib import Path

    import yaml

    from ftforget.backbones import build_backbone

    common = Path(__file__).resolve().parent.parent / "configs" / "demo" / "common.yaml"
    kwargs = yaml.safe_load(common.read_text())["model"]["init_args"]["backbone_kwargs"]
    torch.manual_seed(0)
    path = tmp_path / "backbone.pth"
    torch.save(build_backbone("vit_base_patch16_224", **kwargs).state_dict(), path)
    return path
