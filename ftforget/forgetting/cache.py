"""Exact shortcuts: fingerprints of the weights that define the probe feature, and an on-disk feature cache.

Features are a deterministic function of the feature weights, the probe data and the extraction settings,
so features keyed by all three can be reused across runs (the step-0 features of a pretrained backbone are
the same for every method and seed that starts from it). Every rank caches its own shard: no file holds
the whole bank.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from torch import nn

from ftforget.forgetting.features import ShardFeatures
from ftforget.inference import require_probed

log = logging.getLogger(__name__)

#: bump when the cached content's meaning changes
CACHE_VERSION = 1


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and raw bytes), bit-exact."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # Viewing as bytes hashes bf16 (no NumPy dtype) and -0.0 vs 0.0 exactly as stored.
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def feature_fingerprint(model: nn.Module) -> str:
    """Fingerprint of every weight the probe feature ``model.features`` depends on.

    The model declares those weights as its ``feature_module`` (:class:`ftforget.inference.ProbedModel`):
    for the ftforget methods the backbone, so that a linear probe's changing head does not defeat reuse.
    """
    return state_fingerprint(require_probed(model, "the feature fingerprint").feature_module)


def cache_key(probe_key: str, fingerprint: str, settings: dict[str, object]) -> str:
    """The cache entry of ``probe_key`` data, ``fingerprint`` weights and extraction ``settings``."""
    payload = json.dumps(
        {"version": CACHE_VERSION, "probe": probe_key, "weights": fingerprint, "settings": settings},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


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
            data = torch.load(path, map_location="cpu", weights_only=True)
            shard = ShardFeatures(data["features"], data["labels"], data["indices"])
        except (OSError, RuntimeError, KeyError, EOFError) as err:
            log.warning("ignoring unreadable feature cache file %s: %s", path, err)
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
