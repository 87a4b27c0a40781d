"""The stability-plasticity knob W(a) = W0 + a (W1 - W0): exact ends for all five methods, LoRA's scale."""

from __future__ import annotations

import pytest
import torch

from ftforget.backbones import build_backbone
from ftforget.methods import BlockExpansion, FullFineTuning, LinearProbing, LoRA, TopKFineTuning
from ftforget.methods.knob import knob_model
from ftforget.methods.schedule import paper_recipe
from tests.helpers import RandomImages, quiet_trainer
from tests.tiny import ARCH, TINY, TINY_ARGS

METHODS = [
    (FullFineTuning, {}),
    (TopKFineTuning, {"k": 2}),
    (LinearProbing, {}),
    (LoRA, {"r": 2}),
    (BlockExpansion, {"positions": [0, 2]}),
]
IDS = [c.__name__ for c, _ in METHODS]


def _make(cls, **kwargs):
    torch.manual_seed(0)
    return cls(num_classes=5, **paper_recipe(lr=0.5, warmup_steps=0), **TINY_ARGS, **kwargs)


def _trained(cls, kwargs, tmp_path, steps=3):
    model = _make(cls, **kwargs)
    quiet_trainer(tmp_path, max_steps=steps).fit(model, RandomImages())
    return model.eval()


def _features(model, x):
    with torch.no_grad(), model.inference_context():
        return model.features(x)


@pytest.mark.parametrize(("cls", "kwargs"), METHODS, ids=IDS)
def test_knob_ends_are_the_pretrained_and_the_fine_tuned_model(cls, kwargs, tmp_path):
    end = _trained(cls, kwargs, tmp_path)
    start = _make(cls, **kwargs)
    torch.manual_seed(0)
    pretrained = build_backbone(ARCH, **TINY).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        reference = pretrained(x)
    zero, one = knob_model(end, start, 0.0), knob_model(end, start, 1.0)
    assert torch.equal(_features(zero, x), reference)
    assert torch.equal(_features(one, x), _features(end, x))
    assert torch.equal(one(x), end(x))
    # The fine-tuned head is kept at every a, and the knob leaves the fine-tuned model itself alone.
    assert torch.equal(zero.head.weight, end.head.weight)
    assert torch.equal(_features(end, x), _features(knob_model(end, start, 1.0), x))
    if cls is not LinearProbing:
        assert not torch.equal(_features(end, x), reference), "the fit did not move the features"
        half = _features(knob_model(end, start, 0.5), x)
        assert not torch.equal(half, reference) and not torch.equal(half, _features(end, x))


def test_full_fine_tuning_knob_is_the_weight_interpolation(tmp_path):
    end = _trained(FullFineTuning, {}, tmp_path)
    start = _make(FullFineTuning)
    mid = knob_model(end, start, 0.3)
    w0, w1, w = (m.backbone.blocks[1].mlp.fc1.weight for m in (start, end, mid))
    assert torch.equal(w, torch.lerp(w0, w1, 0.3))
    assert torch.allclose(w, w0 + 0.3 * (w1 - w0), atol=1e-7)


def test_lora_knob_scales_the_adapter(tmp_path):
    end = _trained(LoRA, {"r": 2}, tmp_path)
    start = _make(LoRA, r=2)
    x = torch.randn(4, 3, 32, 32)
    a = 0.4
    knobbed = knob_model(end, start, a)
    scaled = _make(LoRA, r=2)
    scaled.load_state_dict(end.state_dict())
    with torch.no_grad():  # the adapter update scale * B @ A times a, written as B times a
        for name, param in scaled.named_parameters():
            if "lora_B" in name:
                param.mul_(a)
    assert torch.allclose(_features(knobbed, x), _features(scaled.eval(), x), atol=1e-6)
    # and it is the effective weight W0 + a (W1 - W0) of the merged qkv
    merged = {}
    for model in (start, end, knobbed):
        with model.merged():
            merged[id(model)] = model.backbone.blocks[0].attn.qkv.base.weight.clone()
    w0, w1, wa = merged[id(start)], merged[id(end)], merged[id(knobbed)]
    assert torch.allclose(wa, w0 + a * (w1 - w0), atol=1e-6)


def test_knob_refuses_a_start_of_other_weights(tmp_path):
    end = _trained(LoRA, {"r": 2}, tmp_path)
    torch.manual_seed(1)
    other = LoRA(num_classes=5, r=2, **TINY_ARGS)
    with pytest.raises(ValueError, match="frozen weights differ"):
        knob_model(end, other, 0.5)
    with pytest.raises(ValueError, match="same method"):
        knob_model(end, _make(FullFineTuning), 0.5)
    with pytest.raises(ValueError, match="finite"):
        knob_model(end, _make(LoRA, r=2), float("nan"))
