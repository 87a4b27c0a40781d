"""The pretrained ViT families ftforget fine-tunes, what feature each exposes, and their original weight formats.

Every family is a timm ``VisionTransformer`` built headless (``num_classes=0``) with ``global_pool="token"``,
so the backbone feature is always the CLS token after the final norm; what that means per family:

- DINO, DeiT, supervised (AugReg) and MAE ViTs: the CLS token after the last block's output LayerNorm
  (MAE: the pretraining encoder's ``norm``, as MAE's own linear probe with ``--cls_token``; DeiT: the
  class token, not the distillation token, which plain DeiT has none of).
- DINOv2: the CLS token after the final norm (``x_norm_clstoken``, DINOv2's k-NN feature). With registers
  the token sequence is ``[CLS, 4 registers, patches]``; only position 0 is read, so registers never enter
  the feature.
- CLIP: the CLS token after ``ln_post`` (768-d for ViT-B/16), *before* the image projection to the 512-d
  joint embedding, as the CLIP paper's linear probes. CLIP is pre-norm: ``ln_pre`` (timm's ``norm_pre``)
  runs on the tokens before the first block.

Local checkpoints in a family's original format are converted here to timm key names (a pure rename, plus
DINOv2's register layout); the strict load in :mod:`ftforget.backbones` then names any key that is still
missing, unexpected or mis-shaped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class Family:
    """A pretrained backbone family: its config add-on, timm name, and feature.

    Args:
        key: name of its config add-on, ``configs/backbones/<key>.yaml``.
        title: how the README names it.
        timm_name: the timm model name with its pretrained tag; timm's pretrained config of this name gives
            the input size, mean/std and eval transform.
        feature: what the backbone returns (see the module docstring).
        original_format: the non-timm checkpoint format that also loads, if any.
        tiny: ``backbone_kwargs`` of a small test model of the same architecture; the family's structural
            flags (LayerScale, registers, pre-norm, QuickGELU) come from ``timm_name`` unchanged.
    """

    key: str
    title: str
    timm_name: str
    feature: str
    original_format: str = ""
    tiny: dict[str, Any] = field(default_factory=dict)


_TINY16 = {"depth": 12, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8}
_TINY14 = {"depth": 12, "embed_dim": 32, "num_heads": 2, "img_size": 28, "patch_size": 7}
_CLS = "CLS after the final LayerNorm"
_DINOV2 = "DINOv2 hub `.pth` (`mask_token`, `ls1.gamma`)"
_DINOV2_REG = "DINOv2 hub `.pth` (`register_tokens`, CLS position folded into `cls_token`)"

FAMILIES: tuple[Family, ...] = (
    Family("dino_vitb16", "DINO ViT-B/16", "vit_base_patch16_224.dino", _CLS,
           "DINO `.pth` (teacher/student), Hugging Face `facebook/dino-vitb16`", _TINY16),
    Family("dinov2_vits14", "DINOv2 ViT-S/14", "vit_small_patch14_dinov2.lvd142m", _CLS, _DINOV2, _TINY14),
    Family("dinov2_vitb14", "DINOv2 ViT-B/14", "vit_base_patch14_dinov2.lvd142m", _CLS, _DINOV2, _TINY14),
    Family("dinov2_vits14_reg", "DINOv2 ViT-S/14 + 4 registers", "vit_small_patch14_reg4_dinov2.lvd142m",
           _CLS + " (registers excluded)", _DINOV2_REG, _TINY14),
    Family("dinov2_vitb14_reg", "DINOv2 ViT-B/14 + 4 registers", "vit_base_patch14_reg4_dinov2.lvd142m",
           _CLS + " (registers excluded)", _DINOV2_REG, _TINY14),
    Family("mae_vitb16", "MAE ViT-B/16", "vit_base_patch16_224.mae", "CLS after the encoder's final norm",
           'MAE `{"model": ...}` (decoder and `mask_token` dropped)', _TINY16),
    Family("clip_vitb16", "CLIP ViT-B/16 (OpenAI, QuickGELU, pre-norm)",
           "vit_base_patch16_clip_quickgelu_224.openai", "CLS after `ln_post`, before the image projection",
           "OpenAI CLIP state dict or TorchScript `.pt` (`visual.*`; text tower dropped)", _TINY16),
    Family("sup_in21k_vitb16", "Supervised ViT-B/16, ImageNet-21k", "vit_base_patch16_224.augreg_in21k",
           _CLS, "", _TINY16),
    Family("sup_in21k_in1k_vitb16", "Supervised ViT-B/16, ImageNet-21k then 1k",
           "vit_base_patch16_224.augreg2_in21k_ft_in1k", _CLS, "", _TINY16),
    Family("sup_in1k_vitb16", "Supervised ViT-B/16, ImageNet-1k", "vit_base_patch16_224.augreg_in1k",
           _CLS, "", _TINY16),
    Family("deit_b16", "DeiT-B/16", "deit_base_patch16_224.fb_in1k", _CLS, 'DeiT `{"model": ...}`', _TINY16),
    Family("deit_s16", "DeiT-S/16", "deit_small_patch16_224.fb_in1k", _CLS, 'DeiT `{"model": ...}`', _TINY16),
)  # fmt: skip

#: family key -> family
BY_KEY = {f.key: f for f in FAMILIES}


def from_original_format(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Converts an OpenAI CLIP, MAE (pretraining, with decoder) or DINOv2 state dict to timm key names.

    Any other state dict is returned unchanged. Detection: CLIP by ``class_embedding``, MAE by its
    ``decoder_*`` keys, DINOv2 by ``mask_token`` without a decoder.
    """
    if "visual.class_embedding" in state or "class_embedding" in state:
        return _from_openai_clip(state)
    if any(k.startswith("decoder_") for k in state):
        return {k: v for k, v in state.items() if not k.startswith("decoder_") and k != "mask_token"}
    if "mask_token" in state:
        return _from_dinov2(state)
    return state


_CLIP_RENAMES = (
    ("transformer.resblocks.", "blocks."),
    (".attn.in_proj_weight", ".attn.qkv.weight"),
    (".attn.in_proj_bias", ".attn.qkv.bias"),
    (".attn.out_proj.", ".attn.proj."),
    (".ln_1.", ".norm1."),
    (".ln_2.", ".norm2."),
    (".mlp.c_fc.", ".mlp.fc1."),
    (".mlp.c_proj.", ".mlp.fc2."),
)
_CLIP_TOP = {"conv1.weight": "patch_embed.proj.weight", "ln_pre.weight": "norm_pre.weight",
             "ln_pre.bias": "norm_pre.bias", "ln_post.weight": "norm.weight", "ln_post.bias": "norm.bias"}  # fmt: skip


def _from_openai_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (``clip.load(...).state_dict()`` or its ``visual`` tower alone) to timm's CLIP ViT.

    The text tower is dropped, and so is ``proj`` (the image projection is a head: the feature is taken
    before it).
    """
    prefix = "visual." if "visual.class_embedding" in state else ""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        if key == "proj":
            continue
        if key == "class_embedding":
            out["cls_token"] = value.reshape(1, 1, -1)
        elif key == "positional_embedding":
            out["pos_embed"] = value.unsqueeze(0)
        elif key in _CLIP_TOP:
            out[_CLIP_TOP[key]] = value
        else:
            for old, new in _CLIP_RENAMES:
                key = key.replace(old, new)
            out[key] = value
    return out


def _from_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2's hub format to timm's: ``mask_token`` dropped; with registers, timm's layout.

    DINOv2 adds ``pos_embed[:, 0]`` to the CLS token and gives the registers no position; timm's register
    models (``no_embed_class``) hold that sum as ``cls_token`` and only the patch positions in ``pos_embed``.
    """
    out = {k: v for k, v in state.items() if k != "mask_token"}
    if "register_tokens" in out:
        pos = out.pop("pos_embed")
        out["reg_token"] = out.pop("register_tokens")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
    return out
