"""Exact reuse of a frozen prefix: the probe images' tokens after the blocks that never train, kept.

Linear probing, top-k fine-tuning and Block Expansion leave the first ``m`` blocks of the ViT (and its
patch and position embeddings) untouched, so the probe images' tokens after block ``m`` are the same at
every measurement. :class:`PrefixReuse` computes them once, at the first measurement, keeps them in
memory within a budget (``prefix_cache_gb``), and later measurements run only the rest of the network:
blocks ``m..``, the final norm and the pooling. For top-3 of ViT-B/16 that is 3 of 12 blocks. Where every
block is frozen (a linear probe) the feature itself is kept (one vector per image, not the tokens), keyed
by the whole network's weights.

The features are bit-identical to a full forward pass, because the same operations run on the same
batches in the same order (timm's ``forward_features`` is ``patch_embed``, ``_pos_embed``, ``patch_drop``,
``norm_pre``, the blocks, ``norm``; then ``forward_head``: pooling, ``fc_norm``, ``head_drop``, ``head``),
and this is not taken on trust:

- a model opts in by declaring ``frozen_prefix_depth`` (:func:`ftforget.inference.frozen_prefix_depth`);
  full fine-tuning and LoRA declare none (0) and never use it;
- the kept tokens are keyed by everything they depend on: a hash of the prefix's weights and structure
  (recomputed at every measurement: if the prefix did change, the tokens are recomputed), the probe's
  data and transform (``ProbeData.cache_key()`` and the subset/shard chain of the dataset), the part
  (bank or queries), this rank's shard, the depth and the extraction settings (dtypes, batch size, device);
- when the tokens are computed, the first batch is also passed through ``model.features`` and must match
  bit for bit, or the reuse is turned off for that model with a log line;
- the backbone must be a timm ``VisionTransformer`` with its own ``forward`` and ``forward_features``.

Tokens that do not fit the budget are not kept: that part is then measured with full forward passes,
said once in the log.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import Dataset

from ftforget.data.probe import IndexedDataset
from ftforget.forgetting.cache import forward_state, hash_tensors
from ftforget.forgetting.collectives import dist_info, shard_range
from ftforget.forgetting.config import KNNConfig, to_dtype
from ftforget.forgetting.features import ShardFeatures, collect_features, shard_extractor, sharded_loader
from ftforget.inference import autocast_context, frozen_prefix_depth, require_probed

log = logging.getLogger(__name__)

GIB = 1 << 30
#: default memory budget for kept tokens, per process (ViT-B/16 at 224 px: 0.58 MiB per image in float32)
DEFAULT_PREFIX_CACHE_GB = 4.0


def supports_prefix(module: nn.Module) -> bool:
    """Whether ``module`` is a timm ViT whose forward this module replicates (its own subclasses may not)."""
    cls = type(module)
    return (
        isinstance(module, VisionTransformer)
        and cls.forward is VisionTransformer.forward
        and cls.forward_features is VisionTransformer.forward_features
        and isinstance(module.blocks, nn.Sequential)
    )


def prefix_forward(vit: VisionTransformer, x: torch.Tensor, depth: int) -> torch.Tensor:
    """The tokens after the first ``depth`` blocks: timm's ``forward_features`` up to block ``depth``."""
    x = vit.patch_embed(x)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    for block in vit.blocks[:depth]:
        x = block(x)
    return x


def keeps_features(vit: VisionTransformer, depth: int) -> bool:
    """Whether every block is in the frozen prefix (a linear probe): then the feature itself is kept, not
    the 197 tokens per image, and the fingerprint covers the whole network (final norm and head too)."""
    return depth == len(vit.blocks)


def rest_forward(vit: VisionTransformer, tokens: torch.Tensor, depth: int) -> torch.Tensor:
    """The feature from the tokens after block ``depth``: the remaining blocks, ``norm``, ``forward_head``."""
    x = tokens
    for block in vit.blocks[depth:]:
        x = block(x)
    return vit.forward_head(vit.norm(x))


def prefix_fingerprint(vit: VisionTransformer, depth: int) -> str:
    """SHA-256 of what the tokens after block ``depth`` depend on besides the images: the weights and
    buffers of the embeddings, ``norm_pre`` and the first ``depth`` blocks (bit-exact), their structure
    (``repr``), their :func:`~ftforget.forgetting.cache.forward_state` and the token layout flags. With
    every block in the prefix, of the whole network (what is kept is then the feature itself,
    :func:`keeps_features`)."""
    digest = hashlib.sha256()
    own = ("patch_embed.", "cls_token", "reg_token", "pos_embed", "norm_pre.")
    blocks = tuple(f"blocks.{i}." for i in range(depth))
    whole = keeps_features(vit, depth)
    state = sorted(vit.state_dict().items())
    hash_tensors(digest, ((name, t) for name, t in state if whole or name.startswith(own + blocks)))
    flags = [
        getattr(vit, name, None)
        for name in ("num_prefix_tokens", "no_embed_class", "dynamic_img_size", "cls_token", "reg_token")
    ]
    modules = [vit.patch_embed, vit.pos_drop, vit.patch_drop, vit.norm_pre, *vit.blocks[:depth]]
    modules += [vit] if whole else []
    structure = [repr(m) for m in modules] + [forward_state(m) for m in modules]
    structure += [vit.global_pool] if whole else []
    digest.update(json.dumps([depth, [f is not None if isinstance(f, torch.Tensor) else repr(f) for f in flags],
                              structure]).encode())  # fmt: skip
    return digest.hexdigest()


def dataset_identity(dataset: Dataset) -> tuple[str, Dataset]:
    """A hash of the chain of dataset wrappers (their types and subset indices) and the innermost dataset.

    With the probe's ``cache_key()`` (data and transform) it identifies the images; without one, the
    innermost dataset object itself must be the same.
    """
    digest = hashlib.sha256()
    inner: Any = dataset
    while True:
        digest.update(type(inner).__qualname__.encode())
        indices = getattr(inner, "indices", None)
        if indices is not None:
            digest.update(np.asarray(indices, dtype=np.int64).tobytes())
        child = getattr(inner, "dataset", None)
        if not isinstance(child, Dataset):
            return digest.hexdigest(), inner
        inner = child


@dataclass
class _Entry:
    fingerprint: str
    tokens: torch.Tensor  # (n, tokens, width) on the CPU, as the prefix computed them
    labels: torch.Tensor
    indices: torch.Tensor
    inner: Dataset | None  # the innermost dataset, where the probe has no cache key


class PrefixReuse:
    """Keeps the probe images' tokens after a model's frozen prefix and runs only the rest later.

    Used by :class:`~ftforget.forgetting.callback.ForgettingCallback` around each measurement::

        with prefix_reuse.active(model, probe.cache_key()):
            evaluate_probe(model.features, probe, ...)

    Args:
        budget_gb: GiB of tokens kept per process (0 turns the reuse off). Tokens live in CPU memory;
            a part (bank or queries) whose tokens do not fit is measured with full forward passes.

    Attributes:
        counts: how many shards were computed while filling (``filled``), served from kept tokens
            (``reused``), and measured with full forward passes although the model declares a frozen
            prefix (``full``: over budget, or the bit-identity check failed).
    """

    def __init__(self, budget_gb: float = DEFAULT_PREFIX_CACHE_GB) -> None:
        if not budget_gb >= 0:
            raise ValueError(f"prefix_cache_gb must be >= 0, got {budget_gb}")
        self.budget_gb = float(budget_gb)
        self._entries: dict[str, _Entry] = {}
        self._refused: set[str] = set()
        self._said: set[str] = set()
        self.counts = {"filled": 0, "reused": 0, "full": 0}

    @property
    def used_bytes(self) -> int:
        """Bytes of tokens kept now."""
        return sum(e.tokens.numel() * e.tokens.element_size() for e in self._entries.values())

    def clear(self) -> None:
        """Drops every kept token."""
        self._entries.clear()

    def _say(self, key: str, message: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            log.info(message, *args)

    def active(self, model: nn.Module, data_key: str = "") -> Any:
        """A context in which :func:`~ftforget.forgetting.features.shard_features` reuses ``model``'s
        frozen prefix; nothing happens where the model declares none (full fine-tuning, LoRA), the budget
        is 0, or its feature module is not a plain timm ViT (said once).

        Args:
            model: a :class:`~ftforget.inference.ProbedModel`, in measurement mode inside the context.
            data_key: the probe's ``cache_key()`` (its data and transform), or "".
        """
        depth = frozen_prefix_depth(model)
        if depth == 0 or self.budget_gb == 0:
            return nullcontext()
        vit = require_probed(model, "prefix reuse").feature_module
        if not supports_prefix(vit) or depth > len(vit.blocks):  # type: ignore[arg-type]
            self._say(
                f"unsupported:{type(vit).__qualname__}",
                "prefix reuse: %s is not a plain timm VisionTransformer with >= %d blocks; full forward passes",
                type(vit).__qualname__,
                depth,
            )
            return nullcontext()
        return self._bound(model, vit, depth, data_key)  # type: ignore[arg-type]

    @contextmanager
    def _bound(self, model: nn.Module, vit: VisionTransformer, depth: int, data_key: str) -> Iterator[None]:
        fingerprint: list[str] = []  # computed at the first shard, once per measurement

        def extract(
            part: str, dataset: Dataset, config: KNNConfig, device: torch.device
        ) -> ShardFeatures | None:
            if not fingerprint:
                fingerprint.append(prefix_fingerprint(vit, depth))
            return self._extract(model, vit, depth, data_key, fingerprint[0], part, dataset, config, device)

        with shard_extractor(extract):
            yield

    def _slot(
        self, part: str, dataset: Dataset, data_key: str, depth: int, settings: dict
    ) -> tuple[str, Dataset]:
        chain, inner = dataset_identity(dataset)
        rank, world = dist_info()
        rows = shard_range(len(dataset), rank, world)  # type: ignore[arg-type]
        slot = json.dumps(
            [part, data_key, chain, len(dataset), rank, world, rows.start, rows.stop, depth, settings],  # type: ignore[arg-type]
            sort_keys=True,
        )
        return slot, inner

    def _extract(
        self,
        model: nn.Module,
        vit: VisionTransformer,
        depth: int,
        data_key: str,
        fingerprint: str,
        part: str,
        dataset: Dataset,
        config: KNNConfig,
        device: torch.device,
    ) -> ShardFeatures | None:
        """This rank's shard of ``dataset`` from kept tokens, or computed while keeping them; None (the
        plain extraction) where the shard is empty or the reuse was refused for it."""
        slot, inner = self._slot(part, dataset, data_key, depth, config.extraction_settings(device))
        if slot in self._refused:
            self.counts["full"] += 1
            return None
        entry = self._entries.get(slot)
        if entry is not None and (data_key or entry.inner is inner):
            if entry.fingerprint == fingerprint:
                self.counts["reused"] += 1
                return self._rest(entry, vit, depth, config, device, part)
            self._say(
                f"changed:{slot}", "prefix reuse: the first %d blocks changed; recomputing the tokens", depth
            )
        self._entries.pop(slot, None)
        return self._fill(slot, inner if not data_key else None, model, vit, depth, fingerprint, part,
                          dataset, config, device)  # fmt: skip

    def _rest(
        self,
        entry: _Entry,
        vit: VisionTransformer,
        depth: int,
        config: KNNConfig,
        device: torch.device,
        part: str,
    ) -> ShardFeatures:
        """Features from kept tokens, in the batches the full extraction would use."""
        context = autocast_context(device, to_dtype(config.autocast_dtype))
        n, step = len(entry.tokens), config.batch_size

        def outputs() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
            for start in range(0, n, step):
                tokens = entry.tokens[start : start + step].to(device, non_blocking=True)
                if keeps_features(vit, depth):
                    yield tokens, entry.labels[start : start + step], entry.indices[start : start + step]
                    continue
                with context:
                    out = rest_forward(vit, tokens, depth)
                yield out, entry.labels[start : start + step], entry.indices[start : start + step]

        storage = to_dtype(config.bank_dtype)
        return collect_features(outputs(), n, device, storage, f"probe features ({part}, blocks {depth}+)")  # type: ignore[arg-type]

    def _fill(
        self,
        slot: str,
        inner: Dataset | None,
        model: nn.Module,
        vit: VisionTransformer,
        depth: int,
        fingerprint: str,
        part: str,
        dataset: Dataset,
        config: KNNConfig,
        device: torch.device,
    ) -> ShardFeatures | None:
        """Extracts the shard through the prefix and the rest, keeping the tokens if they fit the budget."""
        loader = sharded_loader(IndexedDataset(dataset), config.batch_size, config.num_workers, device)
        n = len(loader.dataset)  # type: ignore[arg-type]
        if n == 0:
            return None
        autocast_dtype = to_dtype(config.autocast_dtype)
        probed = require_probed(model, "prefix reuse")
        whole = keeps_features(vit, depth)
        kept: dict[str, torch.Tensor] = {}

        def outputs() -> Iterator[tuple[torch.Tensor, Any, Any]]:
            pos = 0
            for batch, (images, targets, idx) in enumerate(loader):
                images = images.to(device, non_blocking=True)
                with autocast_context(device, autocast_dtype):
                    tokens = prefix_forward(vit, images, depth)
                    out = rest_forward(vit, tokens, depth)
                    if batch == 0:
                        if not torch.equal(out, probed.features(images)):
                            raise _NotIdentical
                        self._reserve(kept, slot, part, n, out if whole else tokens)
                if kept:
                    kept["tokens"][pos : pos + len(tokens)] = out if whole else tokens
                    kept["labels"][pos : pos + len(tokens)] = torch.as_tensor(targets)
                    kept["indices"][pos : pos + len(tokens)] = torch.as_tensor(idx)
                pos += len(tokens)
                yield out, targets, idx

        storage = to_dtype(config.bank_dtype)
        try:
            shard = collect_features(outputs(), n, device, storage, f"probe features ({part})")  # type: ignore[arg-type]
        except _NotIdentical:
            self._refused.add(slot)
            self.counts["full"] += 1
            self._say(
                f"refused:{slot}",
                "prefix reuse: %s's features after the first %d blocks are not bit-identical to its full "
                "forward pass; full forward passes for the %s",
                type(model).__name__,
                depth,
                part,
            )
            return None
        if kept:
            self._entries[slot] = _Entry(fingerprint, kept["tokens"], kept["labels"], kept["indices"], inner)
            self.counts["filled"] += 1
        else:  # over budget: the next measurements take the plain extraction directly
            self._refused.add(slot)
            self.counts["full"] += 1
        return shard

    def _reserve(
        self, kept: dict[str, torch.Tensor], slot: str, part: str, n: int, tokens: torch.Tensor
    ) -> None:
        """Allocates the kept tokens of an ``n``-image shard in ``kept`` if they fit the budget, else says so."""
        need = n * tokens[0].numel() * tokens.element_size()
        used = self.used_bytes
        if used + need > self.budget_gb * GIB:
            self._say(
                f"budget:{slot}",
                "prefix reuse: the %s tokens need %.2f GiB, beyond prefix_cache_gb=%g (%.2f GiB already "
                "kept): full forward passes for the %s at every measurement",
                part,
                need / GIB,
                self.budget_gb,
                used / GIB,
                part,
            )
            return
        kept["tokens"] = torch.empty((n, *tokens.shape[1:]), dtype=tokens.dtype)
        kept["labels"] = torch.empty(n, dtype=torch.long)
        kept["indices"] = torch.empty(n, dtype=torch.long)


class _NotIdentical(Exception):
    """The first batch's features through prefix and rest differ from ``model.features``."""
