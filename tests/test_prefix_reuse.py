"""Exact reuse of a frozen prefix (ftforget.forgetting.prefix): bit-identical features, never a stale token."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from ftforget.forgetting import ForgettingCallback, KNNConfig
from ftforget.forgetting.features import extract_features, shard_features
from ftforget.forgetting.prefix import PrefixReuse, prefix_forward, rest_forward
from ftforget.inference import frozen_prefix_depth, measurement_mode
from ftforget.methods import BlockExpansion, FullFineTuning, LinearProbing, LoRA, TopKFineTuning
from ftforget.methods.schedule import paper_recipe
from tests.forgetting_helpers import SyntheticProbe, TinyData, class_images, make_trainer, read_jsonl
from tests.tiny import TINY_ARGS

CPU = torch.device("cpu")
CONFIG = KNNConfig(k=[3], batch_size=4, num_workers=0)  # 10 images: batches of 4, 4 and 2

# (method, its arguments, the expected frozen prefix depth of the 4-block tiny ViT)
METHODS = [
    (LinearProbing, {}, 4),
    (TopKFineTuning, {"k": 1}, 3),
    (TopKFineTuning, {"k": 3}, 1),
    (BlockExpansion, {"positions": [0]}, 1),
    (BlockExpansion, {"positions": [1, 3]}, 2),
    (BlockExpansion, {"p": 1}, 4),  # after the last block: the copy is block 4 of 5
]


def tiny(cls: type, **kwargs: Any) -> Any:
    torch.manual_seed(0)
    return cls(num_classes=5, **TINY_ARGS, **kwargs)


def images(n: int = 10, seed: int = 3) -> TensorDataset:
    return TensorDataset(*class_images(n, 5, seed=seed))


def train_a_little(model: Any) -> None:
    """Moves every trainable weight (a new block included, which is the identity at init)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def full(model: Any, dataset: TensorDataset) -> torch.Tensor:
    return extract_features(model.features, dataset, CONFIG.batch_size, 0, CPU, autocast_dtype=None).features


def count_calls(modules: list[torch.nn.Module]) -> list[int]:
    calls = [0]
    for m in modules:
        m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize(("cls", "kwargs", "depth"), METHODS)
def test_features_after_the_kept_prefix_are_bit_identical(cls: type, kwargs: dict, depth: int) -> None:
    model = tiny(cls, **kwargs)
    assert frozen_prefix_depth(model) == depth
    dataset, reuse = images(), PrefixReuse()
    # Counted from the start: a hook is forward state, one added later would (rightly) change the key.
    prefix_calls = count_calls([model.backbone.patch_embed, *model.backbone.blocks[:depth]])
    with measurement_mode(model), reuse.active(model, "data"):
        step0, cached = shard_features("bank", dataset, model.features, CONFIG, CPU)
    assert not cached and reuse.counts == {"filled": 1, "reused": 0, "full": 0}
    with measurement_mode(model):
        assert torch.equal(step0.features, full(model, dataset))
    train_a_little(model)
    prefix_calls[0] = 0
    with measurement_mode(model), reuse.active(model, "data"):
        later, _ = shard_features("bank", dataset, model.features, CONFIG, CPU)
    assert prefix_calls == [0] and reuse.counts["reused"] == 1  # only the rest of the network ran
    with measurement_mode(model):
        expected = full(model, dataset)
    # training changed the features (a linear probe's head only: not those) ...
    assert torch.equal(expected, step0.features) == (depth == len(model.backbone.blocks))
    assert torch.equal(later.features, expected)  # ... and the reuse computes exactly the new ones
    assert torch.equal(later.indices, torch.arange(10)) and torch.equal(later.labels, torch.arange(10) % 5)


@pytest.mark.parametrize(("cls", "kwargs"), [(FullFineTuning, {}), (LoRA, {"r": 2})])
def test_methods_that_change_their_first_block_never_use_kept_tokens(cls: type, kwargs: dict) -> None:
    model = tiny(cls, **kwargs)
    assert frozen_prefix_depth(model) == 0
    reuse, dataset = PrefixReuse(), images()
    for _ in range(2):
        embed_calls = count_calls([model.backbone.patch_embed])
        with measurement_mode(model), reuse.active(model, "data"):
            shard_features("bank", dataset, model.features, CONFIG, CPU)
        assert embed_calls == [1 * 3]  # three batches, each through the whole network
        train_a_little(model)
    assert reuse.counts == {"filled": 0, "reused": 0, "full": 0} and reuse.used_bytes == 0


def test_what_is_kept_is_the_tokens_after_the_prefix_or_the_feature_of_a_frozen_network() -> None:
    """10 images of the tiny ViT (16 patch tokens + CLS, width 32, float32)."""
    for cls, kwargs, kept in [(TopKFineTuning, {"k": 1}, 10 * 17 * 32 * 4), (LinearProbing, {}, 10 * 32 * 4)]:
        model, reuse = tiny(cls, **kwargs), PrefixReuse()
        with measurement_mode(model), reuse.active(model, "data"):
            shard_features("bank", images(), model.features, CONFIG, CPU)
        assert reuse.used_bytes == kept
    with torch.no_grad():  # the linear probe's feature is keyed by the whole network, the final norm too
        model.backbone.norm.weight[0] += 1e-3
    with measurement_mode(model), reuse.active(model, "data"):
        got, _ = shard_features("bank", images(), model.features, CONFIG, CPU)
        assert torch.equal(got.features, full(model, images()))
    assert reuse.counts == {"filled": 2, "reused": 0, "full": 0}


def test_a_changed_prefix_is_recomputed_not_reused(caplog) -> None:
    """A wrong declaration (the prefix did change) costs a recomputation, never a stale feature."""
    model, dataset, reuse = tiny(TopKFineTuning, k=1), images(), PrefixReuse()
    with measurement_mode(model), reuse.active(model, "data"):
        shard_features("queries", dataset, model.features, CONFIG, CPU)
    with torch.no_grad():
        model.backbone.blocks[0].mlp.fc1.weight[0, 0] += 1e-3  # a frozen block moves after all
    with caplog.at_level(logging.INFO), measurement_mode(model), reuse.active(model, "data"):
        again, _ = shard_features("queries", dataset, model.features, CONFIG, CPU)
    with measurement_mode(model):
        assert torch.equal(again.features, full(model, dataset))
    assert reuse.counts == {"filled": 2, "reused": 0, "full": 0}
    assert "the first 3 blocks changed" in caplog.text


def test_other_images_get_their_own_tokens() -> None:
    """Two subset draws of the same size from one probe never share kept tokens."""
    model, reuse = tiny(TopKFineTuning, k=1), PrefixReuse()
    base = images(20)
    draws = [Subset(base, list(range(0, 20, 2))), Subset(base, list(range(1, 20, 2)))]
    with measurement_mode(model):
        expected = [full(model, d) for d in draws]
        for _ in range(2):
            for draw, want in zip(draws, expected, strict=True):
                with reuse.active(model, "data"):
                    got, _ = shard_features("bank", draw, model.features, CONFIG, CPU)
                assert torch.equal(got.features, want)
    assert reuse.counts == {"filled": 2, "reused": 2, "full": 0}
    # Without a probe cache key the innermost dataset must be the very same object.
    with measurement_mode(model), reuse.active(model):
        shard_features("bank", draws[0], model.features, CONFIG, CPU)
        shard_features("bank", Subset(base, list(range(0, 20, 2))), model.features, CONFIG, CPU)
        assert reuse.counts == {"filled": 3, "reused": 3, "full": 0}
        shard_features("bank", Subset(images(20), list(range(0, 20, 2))), model.features, CONFIG, CPU)
    assert reuse.counts == {"filled": 4, "reused": 3, "full": 0}


def test_over_budget_measures_with_full_forward_passes_and_says_so(caplog) -> None:
    model, dataset = tiny(TopKFineTuning, k=3), images()
    reuse = PrefixReuse(budget_gb=1e-6)  # 1 KiB: not even one image's tokens (17 x 32 float32)
    with caplog.at_level(logging.INFO), measurement_mode(model):
        expected = full(model, dataset)
        for _ in range(2):
            with reuse.active(model, "data"):
                got, _ = shard_features("bank", dataset, model.features, CONFIG, CPU)
            assert torch.equal(got.features, expected)
    assert reuse.counts == {"filled": 0, "reused": 0, "full": 2} and reuse.used_bytes == 0
    lines = [r.getMessage() for r in caplog.records if "prefix_cache_gb" in r.getMessage()]
    assert lines == ["prefix reuse: the bank tokens need 0.00 GiB, beyond prefix_cache_gb=1e-06 (0.00 GiB "
                     "already kept): full forward passes for the bank at every measurement"]  # fmt: skip
    with pytest.raises(ValueError, match="prefix_cache_gb must be >= 0"):
        PrefixReuse(-1)


def test_a_features_function_that_differs_turns_the_reuse_off(caplog) -> None:
    model, dataset, reuse = tiny(TopKFineTuning, k=1), images(), PrefixReuse()
    model.features = lambda x: model.backbone(x) * 2  # no longer the backbone's own output
    with caplog.at_level(logging.INFO), measurement_mode(model), reuse.active(model, "data"):
        got, _ = shard_features("bank", dataset, model.features, CONFIG, CPU)
        assert torch.equal(got.features, full(model, dataset))
    assert reuse.counts["full"] == 1 and reuse.used_bytes == 0
    assert "not bit-identical to its full forward pass" in caplog.text


def test_prefix_then_rest_is_the_backbone_at_every_split() -> None:
    vit = tiny(FullFineTuning).backbone.eval()
    x = class_images(3, 5, seed=0)[0]
    with torch.no_grad():
        reference = vit(x)
        for depth in range(len(vit.blocks) + 1):
            assert torch.equal(rest_forward(vit, prefix_forward(vit, x, depth), depth), reference)


def test_the_callback_reuses_the_prefix_and_measures_the_same(tmp_path: Path) -> None:
    def fit(root: Path, budget: float) -> tuple[list[dict], ForgettingCallback]:
        callback = ForgettingCallback(
            eval_at_steps=[0, 1, 2],
            knn=KNNConfig(k=[3], batch_size=16, num_workers=0),
            prefix_cache_gb=budget,
        )
        model = tiny(TopKFineTuning, k=1, **paper_recipe(lr=0.05, warmup_steps=0))
        make_trainer(root, 2, [callback]).fit(model, datamodule=TinyData(probe=SyntheticProbe()))
        return read_jsonl(root / "run" / "version_0" / "forgetting.jsonl"), callback

    reused, callback = fit(tmp_path / "reuse", 4.0)
    plain, off = fit(tmp_path / "plain", 0.0)
    assert callback.prefix.counts == {"filled": 2, "reused": 4, "full": 0}  # bank and queries
    assert off.prefix.counts == {"filled": 0, "reused": 0, "full": 0}
    keys = ("step", "top1", "top5", "drop_abs", "new_task_val_acc1")
    assert [[r[k] for k in keys] for r in reused] == [[r[k] for k in keys] for r in plain]
    assert [r["step"] for r in reused] == [0, 1, 2]
    assert len({r["top1"] for r in reused} | {r["new_task_val_acc1"] for r in reused}) > 2  # it trains
