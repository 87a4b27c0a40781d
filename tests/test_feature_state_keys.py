"""The feature cache is keyed on the forward state too: what changes the features without changing a weight.

For each such input (a LoRA layer's scale, as ``ftforget knob`` sets it; LoRA adapters switched off; Block
Expansion's new blocks skipped), measured as ``ftforget measure`` and ``ftforget knob`` do (the fingerprint
taken before the measurement's inference context): the unchanged model hits the cache, the change gets a new
key whose features are recomputed (bit-identical to an independent model computing the changed function),
and undoing the change hits the first entry again.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch

from ftforget.commands.measure import measure
from ftforget.data.imagenet import ImageNetProbe
from ftforget.forgetting.cache import FeatureCache, feature_fingerprint, forward_state
from ftforget.forgetting.features import extract_features
from ftforget.inference import measurement_mode
from ftforget.methods import BlockExpansion, FullFineTuning, LoRA
from ftforget.methods.base import FineTuningModule
from tests.forgetting_helpers import tiny_model
from tests.test_faults_caches import CONFIG, colour_tree

CPU = torch.device("cpu")
#: the knob value of the LoRA scale change; ``1.2 / 4`` is the same float, so ``alpha=1.2`` computes it
KNOB = 0.3


def trained_lora(alpha: float = 4.0) -> LoRA:
    """LoRA r=4 with non-zero ``B`` (seeded), so that its scale and its switch change the features."""
    model = tiny_model(LoRA, r=4, alpha=alpha)
    torch.manual_seed(1)
    for layer in model.lora_layers:
        for p in layer.lora_B.values():
            torch.nn.init.normal_(p, std=0.5)
    return model


def opened_expansion() -> BlockExpansion:
    """Block Expansion p=1 whose new block is no identity any more (its zeroed projections set, seeded)."""
    model = tiny_model(BlockExpansion, p=1)
    torch.manual_seed(1)
    new = model.backbone.blocks[model.new_block_indices[0]]
    for layer in (new.attn.proj, new.mlp.fc2):
        torch.nn.init.normal_(layer.weight, std=0.5)
    return model


@contextmanager
def knob(model: LoRA, a: float) -> Iterator[None]:
    """The knob at ``a`` in place (LoRA: every adapter's scale times ``a``), back to 1 after."""
    model.apply_knob(model, a)
    try:
        yield
    finally:
        model.apply_knob(model, 1.0)


def same_weights(cls: type, model: FineTuningModule, **kwargs: object) -> FineTuningModule:
    """A ``cls`` model (seed 0, as ``model``) with ``model``'s backbone tensors, where the names match."""
    other = tiny_model(cls, **kwargs)
    other.load_state_dict(model.state_dict(), strict=cls is type(model))
    return other


#: change -> (the model, the change as a context, a model that computes the changed function from scratch)
CHANGES: dict[str, tuple[Callable[[], FineTuningModule], Callable, Callable]] = {
    "lora_scale": (trained_lora, lambda m: knob(m, KNOB), lambda m: same_weights(LoRA, m, r=4, alpha=1.2)),
    "lora_disabled": (trained_lora, lambda m: m.adapter_disabled(), lambda m: tiny_model(FullFineTuning)),
    "expansion_skipped": (
        opened_expansion,
        lambda m: m.pretrained_context(),
        lambda m: tiny_model(FullFineTuning),
    ),
}


def probe(root: Path) -> ImageNetProbe:
    """The tiny probe of ``root``, with one normalisation whatever the backbone (``measure`` sets up)."""
    return ImageNetProbe(root=str(root), resize_size=37, crop_size=32, normalization="imagenet")


def bank_features(model: FineTuningModule, root: Path) -> torch.Tensor:
    """The probe bank's features of ``model``, extracted without any cache."""
    data = probe(root)
    data.setup()
    bank = data.bank_dataset()
    with measurement_mode(model):
        return extract_features(model.features, bank, 4, 0, CPU).features


def entries(cache_dir: Path) -> dict[str, torch.Tensor]:
    """Every cache entry's bank features, by key."""
    return {
        d.name: torch.load(d / "bank-rank0-of-1.pt", weights_only=True)["features"]
        for d in cache_dir.iterdir()
        if d.is_dir()
    }


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_forward_state_change_is_a_new_key_with_recomputed_features(tmp_path: Path, change: str) -> None:
    build, changed, reference = CHANGES[change]
    root, cache_dir = colour_tree(tmp_path / "tree", val_shift=0), tmp_path / "features"
    model, cache = build(), FeatureCache(cache_dir)
    key = feature_fingerprint(model)
    assert not measure(model, probe(root), CONFIG, CPU, cache=cache).cached
    assert measure(model, probe(root), CONFIG, CPU, cache=cache).cached  # unchanged: a hit
    ((first_key, first),) = entries(cache_dir).items()
    assert torch.equal(first, bank_features(model, root))
    context: AbstractContextManager = changed(model)
    with context:
        assert feature_fingerprint(model) != key
        assert not measure(model, probe(root), CONFIG, CPU, cache=cache).cached  # before: first's
        truth = bank_features(model, root)
    assert feature_fingerprint(model) == key  # the change undone
    after = entries(cache_dir)
    (new_key,) = set(after) - {first_key}
    new = after[new_key]
    assert len(after) == 2 and torch.equal(new, truth)
    assert torch.equal(truth, bank_features(reference(model), root))  # the changed function, from scratch
    assert not torch.allclose(new, first, atol=1e-3)
    assert measure(model, probe(root), CONFIG, CPU, cache=cache).cached  # back to the first entry


def test_forward_state_reads_settings_hooks_and_non_persistent_buffers() -> None:
    """Attribute settings, hooks and non-persistent buffers change it; train flags and containers do not."""
    model = tiny_model()
    vit = model.backbone
    base = forward_state(vit)
    vit.train()
    vit.pretrained_cfg = {**vit.pretrained_cfg, "tag": "other"}  # metadata, not computation
    assert forward_state(vit) == base
    changed = copy.deepcopy(vit)
    changed.blocks[0].attn.fused_attn = not vit.blocks[0].attn.fused_attn
    assert forward_state(changed) != base
    hooked = copy.deepcopy(vit)
    handle = hooked.blocks[1].register_forward_hook(lambda module, args, out: out * 2)
    assert forward_state(hooked) != base
    handle.remove()
    assert forward_state(hooked) == base
    hooked.blocks[1].register_buffer("offset", torch.zeros(3), persistent=False)
    with_buffer = forward_state(hooked)
    assert with_buffer != base
    hooked.blocks[1].offset[0] = 1.0
    assert forward_state(hooked) not in (base, with_buffer)
