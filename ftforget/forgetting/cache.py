"""Exact shortcuts: fingerprints of what defines the probe feature, and an on-disk feature cache.

Features are a deterministic function of the feature function (its weights *and* everything else that
changes what it computes), the probe data and the extraction settings, so features keyed by all of them can
be reused across runs (the step-0 features of a pretrained backbone are the same for every method and seed
that starts from it). Every rank caches its own shard: no file holds the whole bank.

What the fingerprint covers (:func:`feature_fingerprint`):

- the weights: the state dict of the model's ``feature_module`` (names, dtypes, shapes, raw bytes);
- the rest of the feature function, :func:`feature_signature`: the model's own ``feature_signature()``
  when it defines one, else the class that defines ``features`` and the structure of the feature module,
  ``repr(feature_module)``: every layer's type and settings, e.g. a LoRA layer's ``r`` and ``alpha`` (its
  scale is no weight) and dropout rates. Optimizer, schedule and head settings appear in neither, so the
  pretrained backbone's step-0 features stay shared by full, top-k and linear fine-tuning;
- the state that changes what the feature module computes but is neither a weight nor in ``repr``,
  :func:`forward_state`: every submodule's scalar settings (a LoRA layer's ``scale``, ``enabled`` and
  ``merged`` flags), its forward hooks and its non-persistent buffers. A skipped block (Block Expansion's
  ``expansion_skipped``) leaves the module tree, so its weights and ``repr`` already tell.

An unreadable cache file (random bytes, truncated, other keys or shapes) is ignored with a warning naming
it, then recomputed and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ftforget.forgetting.features import ShardFeatures
from ftforget.inference import require_probed

log = logging.getLogger(__name__)

#: bump when the cached content's meaning changes (2: the key includes the feature signature; 3: and the
#: forward state)
CACHE_VERSION = 3
#: the attribute values :func:`forward_state` reads as settings (and tuples of them)
_SETTING_TYPES = (type(None), bool, int, float, str, Enum)


def hash_tensors(digest: Any, named: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Feeds each ``(name, tensor)`` into ``digest``: name, dtype, shape and raw bytes, bit-exact."""
    for name, tensor in named:
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Viewing as bytes hashes bf16 (no NumPy dtype) and -0.0 vs 0.0 exactly as stored.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and raw bytes), bit-exact."""
    digest = hashlib.sha256()
    hash_tensors(digest, sorted(module.state_dict().items()))
    return digest.hexdigest()


def _is_setting(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_is_setting(v) for v in value)
    return isinstance(value, _SETTING_TYPES)


def _hook_names(hooks: dict[int, Any]) -> list[str]:
    return [
        f"{getattr(h, '__module__', '')}.{getattr(h, '__qualname__', type(h).__qualname__)}"
        for h in hooks.values()
    ]


def forward_state(module: nn.Module) -> str:
    """SHA-256 of what, besides its state dict, decides what ``module`` computes at inference.

    For every submodule, in order: its name and class, its settings (public attributes whose value is None,
    a bool, int, float, str, enum or a tuple of them: a LoRA layer's ``scale``, ``enabled`` and ``merged``,
    attention's ``fused_attn``, dropout rates), the qualified names of its forward hooks and pre-hooks,
    and its non-persistent buffers (bit-exact). The train/eval flag is left out (features are measured in
    eval mode), and so are containers (metadata such as timm's ``pretrained_cfg``). A hook is known by its
    name only: one whose effect depends on state of its own needs a ``feature_signature()`` saying it.
    """
    digest = hashlib.sha256()
    persistent = set(module.state_dict())
    for name, sub in module.named_modules():
        settings = {
            key: value
            for key, value in sorted(vars(sub).items())
            if not key.startswith("_") and key != "training" and _is_setting(value)
        }
        hooks = [_hook_names(sub._forward_pre_hooks), _hook_names(sub._forward_hooks)]
        digest.update(f"{name}|{type(sub).__qualname__}|{settings!r}|{hooks!r}\n".encode())
    buffers = ((name, t) for name, t in module.named_buffers() if name not in persistent)
    hash_tensors(digest, buffers)
    return digest.hexdigest()


def feature_signature(model: nn.Module) -> str:
    """What, besides its weights, defines the feature function ``model.features``.

    A model may declare it with a ``feature_signature() -> str`` method (optional, beside the
    :class:`~ftforget.inference.ProbedModel` contract): e.g. a method whose ``features`` reads a setting
    that no layer shows. Otherwise it is the qualified name of the class that defines ``features`` and
    ``repr(feature_module)``, which names every layer with its settings (a LoRA layer's ``r`` and
    ``alpha``, dropout rates, norm epsilons); training-only settings (optimizer, schedule, head) are not
    in it, so methods that compute the same function from the same weights share cache entries.
    """
    probed = require_probed(model, "the feature signature")
    declared = getattr(model, "feature_signature", None)
    if callable(declared):
        return f"declared:{type(model).__module__}.{type(model).__qualname__}:{declared()}"
    features = getattr(type(model), "features", None)
    owner = getattr(features, "__qualname__", type(model).__qualname__)
    module = getattr(features, "__module__", type(model).__module__)
    return f"features:{module}.{owner}\n{probed.feature_module!r}"


def feature_fingerprint(model: nn.Module) -> str:
    """Fingerprint of the probe feature ``model.features``: its weights and :func:`feature_signature`.

    The model declares those weights as its ``feature_module`` (:class:`ftforget.inference.ProbedModel`):
    for the ftforget methods the backbone, so that a linear probe's changing head does not defeat reuse.
    Two models with the same weights but another feature function (LoRA adapters with another ``alpha``,
    another ``scale`` or switched off) get different fingerprints (:func:`forward_state`).
    """
    module = require_probed(model, "the feature fingerprint").feature_module
    signature = hashlib.sha256(feature_signature(model).encode()).hexdigest()
    parts = (state_fingerprint(module), signature, forward_state(module))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def cache_key(probe_key: str, fingerprint: str, settings: dict[str, object]) -> str:
    """The cache entry of ``probe_key`` data, ``fingerprint`` weights and extraction ``settings``."""
    payload = json.dumps(
        {"version": CACHE_VERSION, "probe": probe_key, "weights": fingerprint, "settings": settings},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _read_shard(path: Path) -> ShardFeatures:
    """The shard stored in ``path``, checked: ``features`` (2-D, floating), ``labels`` and ``indices``
    (1-D, integer), all of the same length.

    Raises:
        Exception: whatever ``torch.load`` raises on a damaged file; ValueError on other content.
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not {"features", "labels", "indices"} <= set(data):
        raise ValueError("not a feature shard (expected a dict with features, labels and indices)")
    features, labels, indices = data["features"], data["labels"], data["indices"]
    if not all(isinstance(t, torch.Tensor) for t in (features, labels, indices)):
        raise ValueError("features, labels and indices must be tensors")
    if features.ndim != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a 2-D float tensor, got {features.dtype} {tuple(features.shape)}")
    for name, t in (("labels", labels), ("indices", indices)):
        if t.ndim != 1 or t.is_floating_point() or t.is_complex() or len(t) != len(features):
            raise ValueError(
                f"{name} must be a 1-D integer tensor of {len(features)} entries, got {t.dtype} {tuple(t.shape)}"
            )
    return ShardFeatures(features, labels, indices)


class FeatureCache:
    """Per-rank feature shards under ``<root>/<key>/<part>-rank<r>-of-<w>.pt``.

    Args:
        root: cache directory (created on first write).
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(f"feature cache_dir {str(self.root)!r} exists and is not a directory")

    def path(self, key: str, part: str, rank: int, world_size: int) -> Path:
        return self.root / key / f"{part}-rank{rank}-of-{world_size}.pt"

    def load(
        self, key: str, part: str, rank: int, world_size: int, device: torch.device
    ) -> ShardFeatures | None:
        """The cached shard, or None if absent or unreadable (then it is recomputed and rewritten)."""
        path = self.path(key, part, rank, world_size)
        if not path.is_file():
            return None
        try:
            shard = _read_shard(path)
        except Exception as err:  # torch.load raises many types for a damaged file (UnpicklingError, ...)
            log.warning("ignoring unreadable feature cache file %s (it is recomputed): %s", path, err)
            return None
        return shard.to(device)

    def save(self, key: str, part: str, rank: int, world_size: int, shard: ShardFeatures) -> None:
        """Writes atomically (temporary file, then rename), so a killed run never leaves half a file."""
        path = self.path(key, part, rank, world_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        cpu = shard.to(torch.device("cpu"))
        torch.save({"features": cpu.features, "labels": cpu.labels, "indices": cpu.indices}, tmp)
        os.replace(tmp, path)
