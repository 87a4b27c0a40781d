"""Fault injection on the caches: they are keyed by what they depend on, and a damaged entry is recomputed.

- Two ImageNet trees with the same file names but other pixels share no pixel-cache or feature-cache
  entry (the key holds every chosen file's size and modification time, or its bytes' hash).
- The same weights with another feature function (LoRA ``alpha``, dropout) share no feature-cache entry.
- A feature-cache shard of random bytes, truncated, or of other keys or shapes, and a pixel cache with
  garbage JSON or a ``.u8`` of the wrong size are ignored with a warning naming the file, and rebuilt.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ftforget.data.imagenet import ImageNetProbe
from ftforget.data.pixel_cache import PixelCacheDataset
from ftforget.forgetting import KNNConfig, evaluate_probe
from ftforget.forgetting.cache import FeatureCache, feature_fingerprint, state_fingerprint
from ftforget.forgetting.evaluate import ProbeMeasurement
from ftforget.forgetting.features import extract_features
from ftforget.inference import measurement_mode
from ftforget.methods import FullFineTuning, LinearProbing, LoRA, TopKFineTuning
from tests.forgetting_helpers import tiny_model
from tests.helpers import warnings_of
from tests.test_imagenet_probe import WNIDS, tiny_probe

COLOURS = [(220, 30, 30), (30, 220, 30), (30, 30, 220)]
CONFIG = KNNConfig(k=[1], batch_size=4, num_workers=0)


def write_colour(path: Path, colour: tuple[int, int, int], seed: int) -> None:
    """A JPEG of one colour with a little noise (so no two files are byte-identical)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-8, 8, size=(40, 48, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")


def colour_tree(root: Path, val_shift: int, n_train: int = 3, n_val: int = 2) -> Path:
    """:func:`tests.test_imagenet_probe.make_tree`'s file names; class ``c`` is colour ``c`` in train and
    colour ``c + val_shift`` in val: shift 0 gives k=1 top-1 1.0, shift 1 gives 0.0."""
    for c, wnid in enumerate(WNIDS):
        for i in range(n_train):
            write_colour(root / "train" / wnid / f"{wnid}_{i}.JPEG", COLOURS[c], seed=100 * c + i)
        for i in range(n_val):
            colour = COLOURS[(c + val_shift) % len(COLOURS)]
            write_colour(
                root / "val" / wnid / f"ILSVRC2012_val_{c}{i}.JPEG", colour, seed=10_000 + 100 * c + i
            )
    return root


def run_probe(model: torch.nn.Module, probe: ImageNetProbe, cache: FeatureCache | None) -> ProbeMeasurement:
    with measurement_mode(model):
        fingerprint = feature_fingerprint(model)
        return evaluate_probe(model.features, probe, CONFIG, torch.device("cpu"), fingerprint, cache)


# --------------------------------------------------------------------------- same names, other pixels
def test_same_names_other_pixels_share_no_cache_entry(tmp_path: Path) -> None:
    """The user's report: copy B (same names, other pixels) got copy A's 1.0 from the caches."""
    a, b = colour_tree(tmp_path / "a", val_shift=0), colour_tree(tmp_path / "b", val_shift=1)
    pixels, cache = str(tmp_path / "pixels"), FeatureCache(tmp_path / "features")
    model = tiny_model()
    probe_a, probe_b = tiny_probe(a, pixel_cache_dir=pixels), tiny_probe(b, pixel_cache_dir=pixels)
    assert [p[len(str(a)) :] for p, _ in probe_a._bank] == [p[len(str(b)) :] for p, _ in probe_b._bank]
    assert probe_a.cache_key() != probe_b.cache_key()

    first_a = run_probe(model, probe_a, cache)
    first_b = run_probe(model, tiny_probe(b, pixel_cache_dir=pixels), cache)
    assert (first_a.top1[1], first_b.top1[1]) == (1.0, 0.0)
    assert not first_a.cached and not first_b.cached
    again_a = run_probe(model, tiny_probe(a, pixel_cache_dir=pixels), cache)
    again_b = run_probe(model, tiny_probe(b, pixel_cache_dir=pixels), cache)
    assert again_a.cached and again_b.cached and (again_a.top1[1], again_b.top1[1]) == (1.0, 0.0)
    assert len(list(Path(pixels).glob("*.json"))) == 4  # bank and queries of each tree
    assert run_probe(model, tiny_probe(b), None).top1[1] == 0.0  # the uncached truth


def test_cache_identity_options(tmp_path: Path) -> None:
    """``stat``: size and mtime; ``size``: size alone (copies that lose times share); ``content``: bytes."""
    a, b = colour_tree(tmp_path / "a", val_shift=0), colour_tree(tmp_path / "b", val_shift=0)
    for root in (a, b):  # same names, same bytes, other times
        for path in root.rglob("*.JPEG"):
            os.utime(path, ns=(1_000_000_000, 1_000_000_000 if root == a else 2_000_000_000))
    key = {
        how: [tiny_probe(r, cache_identity=how).cache_key() for r in (a, b)]
        for how in ("stat", "size", "content")
    }
    assert key["stat"][0] != key["stat"][1]
    assert key["size"][0] == key["size"][1] and key["content"][0] == key["content"][1]
    assert len({key["stat"][0], key["size"][0], key["content"][0]}) == 3
    assert tiny_probe(a).cache_key() == key["stat"][0]  # the default
    # Same name, size and time but other bytes: only the content hash tells them apart.
    first = a / "val" / WNIDS[0] / "ILSVRC2012_val_00.JPEG"
    data = bytearray(first.read_bytes())
    data[-3] ^= 0xFF
    first.write_bytes(bytes(data))
    os.utime(first, ns=(1_000_000_000, 1_000_000_000))
    assert tiny_probe(a, cache_identity="stat").cache_key() == key["stat"][0]
    assert tiny_probe(a, cache_identity="content").cache_key() != key["content"][0]
    with pytest.raises(ValueError, match="cache_identity must be one of stat, size, content, got 'mtime'"):
        ImageNetProbe(root=str(a), cache_identity="mtime")


# ------------------------------------------------------------------------ same weights, other function
def lora_pair(**other: object) -> tuple[LoRA, LoRA]:
    """Two LoRA models with identical weights (non-zero B, so the scale matters), the second built with
    ``other`` settings."""
    a = tiny_model(LoRA, r=4, alpha=4.0)
    for layer in a.lora_layers:
        for p in layer.lora_B.values():
            torch.nn.init.normal_(p, std=0.5)
    b = tiny_model(LoRA, **{"r": 4, "alpha": 4.0, **other})
    b.load_state_dict(a.state_dict())
    assert state_fingerprint(a.feature_module) == state_fingerprint(b.feature_module)
    return a, b


def test_lora_alpha_changes_the_feature_cache_entry(tmp_path: Path) -> None:
    root = colour_tree(tmp_path / "tree", val_shift=0)
    a, b = lora_pair(alpha=16.0)
    assert feature_fingerprint(a) != feature_fingerprint(b)
    cache = FeatureCache(tmp_path / "features")
    assert not run_probe(a, tiny_probe(root), cache).cached
    assert not run_probe(b, tiny_probe(root), cache).cached  # before: a's features, reused
    assert len([d for d in (tmp_path / "features").iterdir() if d.is_dir()]) == 2
    assert run_probe(b, tiny_probe(root), cache).cached
    feats = []
    for model in (a, b):
        with measurement_mode(model):
            feats.append(
                extract_features(model.features, tiny_probe(root).bank_dataset(), 4, 0, torch.device("cpu"))
            )
    assert not torch.allclose(feats[0].features, feats[1].features)


def test_what_enters_the_feature_signature() -> None:
    a, b = lora_pair(dropout=0.1)  # dropout is off in eval mode, but it is a setting of the function
    assert feature_fingerprint(a) != feature_fingerprint(b)
    # Same function, same weights: full, top-k and linear share the step-0 entry; the head is left out.
    full, topk, linear = (
        tiny_model(FullFineTuning),
        tiny_model(TopKFineTuning, k=1),
        tiny_model(LinearProbing),
    )
    assert feature_fingerprint(full) == feature_fingerprint(topk) == feature_fingerprint(linear)

    class Declared(FullFineTuning):
        def feature_signature(self) -> str:
            return "temperature=2"

    assert feature_fingerprint(tiny_model(Declared)) != feature_fingerprint(full)


# ------------------------------------------------------------------------------------ damaged entries
@pytest.mark.parametrize(
    "damage",
    ["random_bytes", "truncated", "wrong_keys", "wrong_shapes", "not_a_dict", "empty"],
)
def test_damaged_feature_shard_is_recomputed(tmp_path: Path, damage: str) -> None:
    root = colour_tree(tmp_path / "tree", val_shift=0)
    model, cache = tiny_model(), FeatureCache(tmp_path / "features")
    truth = run_probe(model, tiny_probe(root), None)
    run_probe(model, tiny_probe(root), cache)
    shard = next((tmp_path / "features").rglob("bank-rank0-of-1.pt"))
    if damage == "random_bytes":
        shard.write_bytes(np.random.default_rng(0).bytes(4096))
    elif damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:200])
    elif damage == "wrong_keys":
        torch.save({"feats": torch.zeros(9, 4)}, shard)
    elif damage == "wrong_shapes":
        torch.save({"features": torch.zeros(9), "labels": torch.zeros(9), "indices": torch.arange(3)}, shard)
    elif damage == "not_a_dict":
        torch.save([1, 2, 3], shard)
    else:
        shard.write_bytes(b"")
    with warnings_of("ftforget.forgetting.cache") as warned:
        again = run_probe(model, tiny_probe(root), cache)
    assert not again.cached and (again.top1, again.top5) == (truth.top1, truth.top5)
    assert len(warned) == 1 and str(shard) in warned[0] and "recomputed" in warned[0]
    with warnings_of("ftforget.forgetting.cache") as warned:
        assert run_probe(model, tiny_probe(root), cache).cached  # rewritten
    assert warned == []


@pytest.mark.parametrize("damage", ["garbage_json", "wrong_json", "short_u8", "other_labels"])
def test_damaged_pixel_cache_is_rebuilt(tmp_path: Path, damage: str) -> None:
    root = colour_tree(tmp_path / "tree", val_shift=0)
    pixels = tmp_path / "pixels"
    model = tiny_model()
    truth = run_probe(model, tiny_probe(root), None)
    run_probe(model, tiny_probe(root, pixel_cache_dir=str(pixels)), None)
    meta = next(pixels.glob("*-bank.json"))
    data = meta.with_suffix(".u8")
    if damage == "garbage_json":
        meta.write_bytes(np.random.default_rng(0).bytes(300))
    elif damage == "wrong_json":
        meta.write_text('{"n": 9, "labels": "abc"}')
    elif damage == "short_u8":
        data.write_bytes(data.read_bytes()[:-10])
    else:
        meta.write_text('{"n": 9, "size": 32, "labels": [2, 2, 2, 1, 1, 1, 0, 0, 0]}')
    culprit = data if damage == "short_u8" else meta
    if damage != "other_labels":
        with pytest.raises(ValueError, match=str(culprit)):
            PixelCacheDataset(meta.with_suffix(""))
    with warnings_of("ftforget.data.pixel_cache") as warned:
        again = run_probe(model, tiny_probe(root, pixel_cache_dir=str(pixels)), None)
    assert (again.top1, again.top5) == (truth.top1, truth.top5)
    assert len(warned) == 1 and str(culprit) in warned[0]
    assert PixelCacheDataset(meta.with_suffix("")).labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]  # rebuilt
