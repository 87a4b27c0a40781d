"""The pre-decoded probe cache gives exactly the JPEG path's pixels, and so exactly its accuracy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ftforget.data.pixel_cache import PixelCacheDataset
from ftforget.forgetting import KNNConfig, evaluate_probe
from ftforget.inference import measurement_mode
from tests.forgetting_helpers import tiny_model
from tests.test_imagenet_probe import make_tree, tiny_probe


def test_cache_pixels_are_identical_to_the_jpeg_path(tmp_path: Path) -> None:
    make_tree(tmp_path / "imagenet", n_train=3, n_val=2)
    jpeg = tiny_probe(tmp_path / "imagenet")
    cached = tiny_probe(tmp_path / "imagenet", pixel_cache_dir=str(tmp_path / "pixels"))
    for part in ("bank_dataset", "query_dataset"):
        a, b = getattr(jpeg, part)(), getattr(cached, part)()
        assert len(a) == len(b) > 0
        for i in range(len(a)):
            (xa, ya, ia), (xb, yb, ib) = a[i], b[i]
            assert torch.equal(xa, xb) and ya == yb and ia == ib == i
    files = sorted(p.name for p in (tmp_path / "pixels").iterdir())
    key = jpeg.cache_key()
    assert files == [f"{key}-bank.json", f"{key}-bank.u8", f"{key}-queries.json", f"{key}-queries.u8"]
    # 9 bank images of 32 x 32 x 3 bytes, nothing else
    assert (tmp_path / "pixels" / f"{key}-bank.u8").stat().st_size == 9 * 32 * 32 * 3


def test_cache_gives_the_same_accuracy_and_is_reused(tmp_path: Path) -> None:
    make_tree(tmp_path / "imagenet", n_train=4, n_val=3)
    model = tiny_model()
    config = KNNConfig(k=[1, 3], batch_size=4, num_workers=0)
    results = []
    for cache in (None, str(tmp_path / "pixels"), str(tmp_path / "pixels")):
        probe = tiny_probe(tmp_path / "imagenet", pixel_cache_dir=cache)
        with measurement_mode(model):
            r = evaluate_probe(model.features, probe, config, torch.device("cpu"))
        results.append((r.top1, r.top5))
    assert results[0] == results[1] == results[2]


def test_truncated_cache_is_reported(tmp_path: Path) -> None:
    make_tree(tmp_path / "imagenet", n_train=2, n_val=1)
    probe = tiny_probe(tmp_path / "imagenet", pixel_cache_dir=str(tmp_path / "pixels"))
    probe.bank_dataset()
    data = next((tmp_path / "pixels").glob("*-bank.u8"))
    data.write_bytes(data.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"bank.u8' has \d+ bytes, expected"):
        PixelCacheDataset(data.with_suffix(""))
    with pytest.raises(FileNotFoundError, match="pixel cache"):
        PixelCacheDataset(tmp_path / "pixels" / "nothing")
