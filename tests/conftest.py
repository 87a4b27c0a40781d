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
