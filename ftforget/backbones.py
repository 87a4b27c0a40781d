"""The backbone factory: a headless timm Vision Transformer, optionally with local weights.

Every method and the forgetting probe use the same backbone feature: the CLS token after the final
LayerNorm (DINO's definition for k-NN evaluation). A timm ViT built with ``num_classes=0`` and
``global_pool="token"`` returns exactly that from ``model(x)``; :mod:`ftforget.backbone_families` says what
that is for each supported family (DINO, DINOv2 with and without registers, MAE, CLIP, supervised, DeiT)
and converts their original checkpoint formats. :func:`preprocessing` gives the input size, mean/std and
eval transform of timm's pretrained config, which training and the probe use.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ftforget.backbone_families import from_original_format

DEFAULT_BACKBONE = "vit_base_patch16_224.dino"
log = logging.getLogger(__name__)

# Keys a checkpoint may nest its state dict under, tried in this order.
_NESTING_KEYS = ("state_dict", "model", "teacher", "student", "module")
# Prefixes that wrappers add in front of the ViT's own key names.
_PREFIXES = ("module.", "backbone.", "encoder.", "vit.", "model.")


class CheckpointError(RuntimeError):
    """A local checkpoint could not be loaded into the backbone."""


#: set while a Lightning checkpoint (resume, test) will overwrite every weight: nothing is loaded
_RESTORED_LATER: ContextVar[bool] = ContextVar("ftforget_weights_restored_later", default=False)


@contextmanager
def weights_restored_later() -> Iterator[None]:
    """Inside, :func:`build_backbone` loads no weights file and downloads nothing: a Lightning checkpoint
    restores every weight afterwards (``ftforget fit --resume``, ``ftforget test``), so the original
    weights file may be gone and the machine offline."""
    token = _RESTORED_LATER.set(True)
    try:
        yield
    finally:
        _RESTORED_LATER.reset(token)


def restored_later() -> bool:
    """Whether :func:`weights_restored_later` is in effect."""
    return _RESTORED_LATER.get()


def _hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether a TCP connection to the Hugging Face Hub opens within ``timeout`` seconds.

    Checked before a pretrained download: offline, huggingface_hub retries for about a minute before it
    gives up, while a compute node without internet fails here at once (DNS) or after ``timeout``.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    try:
        socket.create_connection((_hub_host(), 443), timeout=timeout).close()
    except OSError:
        return False
    return True


@contextmanager
def _hub_offline() -> Iterator[None]:
    """huggingface_hub reads only its local cache inside (its offline switch, read at call time)."""
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def build_backbone(
    name: str = DEFAULT_BACKBONE,
    checkpoint: str | Path | None = None,
    pretrained: bool = False,
    **timm_overrides: Any,
) -> VisionTransformer:
    """Builds a headless timm ViT whose ``forward`` returns the CLS token after the final norm.

    Args:
        name: timm model name, e.g. ``vit_base_patch16_224.dino``.
        checkpoint: local weights (timm/DINO ``.pth``/``.pt``/``.bin``/``.safetensors``, a Hugging
            Face ``facebook/dino-vitb16`` state dict, or a DINOv2, MAE or OpenAI CLIP checkpoint in its
            original format). Loaded strictly (a position embedding of another image size is resampled
            to the model's grid, as timm does for its own weights); takes precedence over ``pretrained``.
        pretrained: download timm's weights for ``name`` (needs internet access).
        **timm_overrides: keyword arguments for ``timm.create_model``, e.g. ``depth=2, embed_dim=32,
            img_size=32, patch_size=8`` for a tiny test model of the same architecture.

    Returns:
        The backbone, in train mode, with every parameter requiring grad.

    Raises:
        ValueError: an override that would change what the backbone returns.
        CheckpointError: the checkpoint is missing, unreadable or does not match the architecture.
    """
    for forbidden in ("num_classes", "global_pool"):
        if forbidden in timm_overrides:
            raise ValueError(
                f"backbone_kwargs may not set {forbidden!r}: the backbone is always headless and its "
                "feature is the CLS token after the final norm; the methods add their own head."
            )
    if _RESTORED_LATER.get():
        checkpoint, pretrained = None, False  # a Lightning checkpoint brings every weight
    download = pretrained and checkpoint is None
    try:
        with nullcontext() if not download or hub_reachable() else _hub_offline():
            model = timm.create_model(
                name, pretrained=download, num_classes=0, global_pool="token", **timm_overrides
            )
    except RuntimeError as err:
        if "Unknown model" in str(err):
            raise ValueError(f"backbone={name!r} is not a timm model name ({err})") from err
        raise
    except OSError as err:  # huggingface_hub: not in the local cache, and offline
        raise CheckpointError(
            f"model.init_args.pretrained=true: the weights of {name!r} are not in the local Hugging Face "
            f"cache and the hub ({_hub_host()}) cannot be reached from this machine; download them where "
            "there is internet and pass --model.init_args.checkpoint /path/to/weights "
            "--model.init_args.pretrained false"
        ) from err
    if not isinstance(model, VisionTransformer):
        raise ValueError(
            f"backbone={name!r} is a {type(model).__name__}; ftforget needs a timm VisionTransformer"
        )
    if checkpoint is not None:
        load_backbone_weights(model, checkpoint)
    return model


def load_backbone_weights(model: VisionTransformer, path: str | Path) -> None:
    """Loads a local checkpoint into ``model`` strictly, whatever wrapper format it comes in.

    Raises:
        CheckpointError: naming the file, with the missing, unexpected and mis-shaped keys.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {str(path)!r} does not exist")
    raw = _read_file(path)
    state = resample_pos_embed(normalize_state_dict(raw), model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = [f"checkpoint {str(path)!r} does not match the backbone:"]
        for title, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:20]) + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
                parts.append(f"  {title} ({len(keys)}): {shown}")
        raise CheckpointError("\n".join(parts))
    model.load_state_dict(state, strict=True)


def resample_pos_embed(state: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """The checkpoint's position embedding resampled to the model's patch grid, as timm does for its own
    pretrained weights (bicubic, antialiased): e.g. DINOv2's 518 px (37 x 37) weights for a 224 px model.

    Only a square grid of the same width is resampled; any other difference stays for the strict load to
    report.
    """
    old, new = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if (
        old is None
        or new is None
        or old.shape == new.shape
        or old.ndim != 3
        or old.shape[-1] != new.shape[-1]
    ):
        return state
    prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    side = math.isqrt(max(old.shape[1] - prefix, 0))
    if side * side != old.shape[1] - prefix or side == 0:
        return state
    from timm.layers import resample_abs_pos_embed

    grid = tuple(model.patch_embed.grid_size)
    resampled = resample_abs_pos_embed(old, new_size=grid, old_size=(side, side), num_prefix_tokens=prefix)
    log.info(
        f"checkpoint position embedding resampled from a {side}x{side} to a {grid[0]}x{grid[1]} patch grid"
    )
    return {**state, "pos_embed": resampled}


def _read_file(path: Path) -> Mapping[str, Any]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        if _is_torchscript(path):  # OpenAI's CLIP releases are TorchScript archives
            return torch.jit.load(str(path), map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types for a corrupt file
        raise CheckpointError(f"checkpoint file {str(path)!r} could not be read: {err}") from err


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip whose records include ``<name>/constants.pkl`` or ``<name>/code/``."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in archive.namelist())


def normalize_state_dict(raw: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Unwraps a checkpoint into timm ViT key names.

    Handles nesting under ``state_dict``/``model``/``teacher``/``student``, the ``module.``,
    ``backbone.`` (DINO), ``encoder.`` and ``vit.`` prefixes, Hugging Face ``ViTModel`` key names, and
    the original DINOv2, MAE and OpenAI CLIP formats (:func:`~ftforget.backbone_families.from_original_format`).
    Keys outside the backbone of a wrapped checkpoint (DINO's projection head, a classifier head, MAE's
    decoder, CLIP's text tower and image projection) are dropped; everything else is kept so that a strict
    load reports it.
    """
    state: Mapping[str, Any] = raw
    for key in _NESTING_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if any(k.startswith(("embeddings.", "vit.embeddings.")) for k in tensors):
        return _from_hf_vit(tensors)
    for prefix in _PREFIXES:
        if tensors and any(k.startswith(prefix) for k in tensors):
            # A wrapper: what sits under the prefix is the backbone, the rest (e.g. DINO's projection
            # head under "head.") belongs to the wrapper.
            tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    tensors = from_original_format(tensors)
    # A classifier head is not part of a headless backbone.
    return {k: v for k, v in tensors.items() if not k.startswith("head.")}


# Hugging Face ViTModel block keys -> timm Block keys. The hub's facebook/dino-vitb16 files use the
# transformers 4 layout ("encoder.layer.N..."); transformers 5 saves "layers.N..." with q/k/v/o_proj.
_HF_BLOCK = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)\.(weight|bias)$")
_HF_BLOCK_MAP = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_HF_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _from_hf_vit(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps Hugging Face ``ViTModel`` keys (``facebook/dino-vitb16``) to timm's, fusing q, k, v."""
    prefix = next((p for p in ("vit.", "") if any(k.startswith(p + "embeddings.") for k in tensors)), "")
    hf = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in hf.items():
        m = _HF_BLOCK.match(key)
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
        elif key.startswith(("pooler.", "classifier.")):
            continue  # HF's pooler and classifier are heads, not part of the backbone
        elif m and m.group(2) in _HF_QKV:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[_HF_QKV[m.group(2)]] = value
        elif m and m.group(2) in _HF_BLOCK_MAP:
            out[f"blocks.{m.group(1)}.{_HF_BLOCK_MAP[m.group(2)]}.{m.group(3)}"] = value
        else:
            out[key] = value  # reported as unexpected by the strict load
    for (idx, param), parts in qkv.items():
        if set(parts) == {"q", "k", "v"}:
            out[f"blocks.{idx}.attn.qkv.{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
        else:  # an incomplete q/k/v triple is reported by name
            out.update({f"hf.layer.{idx}.attention.{n}.{param}": v for n, v in parts.items()})
    return out


def to_hf_vit_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm ViT keys to Hugging Face ``ViTModel`` keys in the hub's (transformers 4) layout."""
    inverse = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.output.dense"}
    inverse |= {"mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "cls_token":
            out["embeddings.cls_token"] = value
        elif key == "pos_embed":
            out["embeddings.position_embeddings"] = value
        elif key.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("norm."):
            out["layernorm." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("blocks."):
            _, idx, rest = key.split(".", 2)
            sub, _, param = rest.rpartition(".")
            if sub == "attn.qkv":
                for name, chunk in zip(("query", "key", "value"), value.chunk(3, 0), strict=True):
                    out[f"encoder.layer.{idx}.attention.attention.{name}.{param}"] = chunk
            else:
                out[f"encoder.layer.{idx}.{inverse[sub]}.{param}"] = value
    return out


def feature_dim(model: VisionTransformer) -> int:
    """The width of the backbone feature (the CLS token)."""
    return int(model.num_features)


def input_size(model: nn.Module) -> int | None:
    """The square input side a timm ViT was built for (``patch_embed.img_size``), None if it has none."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    return int(size[0]) if size is not None else None


def preprocessing(model: nn.Module) -> dict[str, Any]:
    """What timm's pretrained config of ``model`` prescribes for its inputs.

    Returns:
        ``input_size`` (the square side the model was built for: :func:`input_size`, which follows an
        ``img_size`` override), ``mean`` and ``std`` (3-tuples), ``crop_pct`` and ``interpolation`` (timm's
        eval transform: resize to ``input_size / crop_pct``, center crop). Empty if the model has no
        pretrained config (not a timm model).
    """
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg or cfg.get("mean") is None:
        return {}
    return {
        "input_size": input_size(model),
        "mean": tuple(float(v) for v in cfg["mean"]),
        "std": tuple(float(v) for v in cfg["std"]),
        "crop_pct": float(cfg.get("crop_pct") or 0.875),
        "interpolation": str(cfg.get("interpolation") or "bicubic"),
    }
