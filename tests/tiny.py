"""The tiny ViTs every test builds: timm's real ViT-B/16 code, shrunk so that CPU tests take seconds."""

from __future__ import annotations

#: the architecture (timm name) that the tiny configurations shrink
ARCH = "vit_base_patch16_224"
#: the default tiny ViT: four blocks, enough for top-k and Block Expansion positions
TINY = {"depth": 4, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8}
#: two blocks, for the forgetting tests that run many fits and measurements
SHALLOW = {**TINY, "depth": 2}
#: one block at 16 px, for the demo's pretraining tests
MINI = {"depth": 1, "embed_dim": 16, "num_heads": 2, "img_size": 16, "patch_size": 8}

TINY_ARGS = {"backbone": ARCH, "backbone_kwargs": TINY}
SHALLOW_ARGS = {"backbone": ARCH, "backbone_kwargs": SHALLOW}
