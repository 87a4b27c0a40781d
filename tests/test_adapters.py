"""LoRA and Block Expansion surgery in plain PyTorch: identity at init, exact merge maths, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from ftforget.adapters import (
    LoRALinear,
    apply_lora,
    expand,
    lora_disabled,
    lora_merged,
    lora_modules,
    merge_lora,
    paper_positions,
    unmerge_lora,
)
from ftforget.backbones import build_backbone
from tests.tiny import TINY


def _tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_backbone("vit_base_patch16_224", **{**TINY, **kw}).eval()


def _randomize_lora(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model):
            for p in [*m.lora_A.values(), *m.lora_B.values()]:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("r", [1, 4, 8])
@pytest.mark.parametrize("targets", [("q", "v"), ("q", "k", "v"), ("v",), ("q", "v", "proj", "fc1", "fc2")])
def test_lora_is_identity_at_init(r, targets):
    base = _tiny()
    adapted = copy.deepcopy(base)
    mods = apply_lora(adapted, r=r, targets=targets)
    assert len(mods) == TINY["depth"] * (
        any(t in "qkv" for t in targets) + sum(t in ("proj", "fc1", "fc2") for t in targets)
    )
    assert torch.equal(base(X), adapted(X))


def test_lora_qv_parameter_shapes_and_scale():
    model = _tiny()
    mods = apply_lora(model, r=4, alpha=8, targets=["q", "v"])
    qkv = mods[0]
    assert isinstance(qkv, LoRALinear) and qkv.slices == {"q": (0, 32), "v": (64, 96)}
    assert qkv.scale == 2.0
    assert {k: tuple(v.shape) for k, v in qkv.lora_A.items()} == {"q": (4, 32), "v": (4, 32)}
    assert {k: tuple(v.shape) for k, v in qkv.lora_B.items()} == {"q": (32, 4), "v": (32, 4)}
    assert not qkv.base.weight.requires_grad


def test_lora_forward_equals_explicit_weight_update():
    """The fused-qkv adapter computes exactly x W'^T + b with W' = W + scale * [B_q A_q; 0; B_v A_v]."""
    model = _tiny()
    layer = apply_lora(model, r=3, alpha=6, targets=["q", "v"])[0]
    _randomize_lora(model)
    x = torch.randn(5, 32, dtype=torch.float64)
    layer64 = copy.deepcopy(layer).double()
    w = layer64.base.weight.detach().clone()
    w[0:32] += 2.0 * layer64.lora_B["q"] @ layer64.lora_A["q"]
    w[64:96] += 2.0 * layer64.lora_B["v"] @ layer64.lora_A["v"]
    expected = x @ w.T + layer64.base.bias
    assert torch.allclose(layer64(x), expected, atol=1e-12, rtol=0)


def test_merge_unmerge_roundtrip_is_exact_and_k_rows_untouched():
    model = _tiny()
    apply_lora(model, r=4, targets=["q", "v"])
    _randomize_lora(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unmerged_out = model(X)
    merge_lora(model)
    merge_lora(model)  # idempotent
    for block in model.blocks:
        w, w0 = (
            block.attn.qkv.base.weight,
            before[f"blocks.{list(model.blocks).index(block)}.attn.qkv.base.weight"],
        )
        assert torch.equal(w[32:64], w0[32:64])  # k rows
        assert not torch.equal(w[0:32], w0[0:32]) and not torch.equal(w[64:96], w0[64:96])
    merged_out = model(X)
    assert torch.allclose(merged_out, unmerged_out, atol=1e-5, rtol=0)
    unmerge_lora(model)
    unmerge_lora(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model(X), unmerged_out)


def test_lora_merged_context_restores_and_disabled_context_gives_the_pretrained_function():
    base = _tiny()
    model = copy.deepcopy(base)
    apply_lora(model, r=2, targets=["q", "k", "v", "fc2"])
    _randomize_lora(model)
    adapted_out = model(X)
    assert not torch.allclose(adapted_out, base(X))
    with lora_disabled(model):
        assert torch.equal(model(X), base(X))
        with lora_merged(model):  # how a measurement runs a LoRA model: a disabled adapter merges nothing
            assert torch.equal(model(X), base(X))
            assert not any(m.merged for m in lora_modules(model))
    with lora_merged(model):
        assert torch.allclose(model(X), adapted_out, atol=1e-5, rtol=0)
        with lora_disabled(model):
            assert torch.equal(model(X), base(X))
        assert all(m.merged for m in lora_modules(model))
    assert torch.equal(model(X), adapted_out)


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"r": 0}, "r=0"), ({"r": 2, "targets": ["q", "w"]}, "unknown LoRA targets")]
)
def test_lora_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_lora(_tiny(), **kwargs)


def test_paper_positions_known_answers():
    assert paper_positions(12, 1) == [11]
    assert paper_positions(12, 2) == [5, 11]
    assert paper_positions(12, 3) == [3, 7, 11]
    assert paper_positions(12, 4) == [2, 5, 8, 11]
    assert paper_positions(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="p=5 must be >= 1 and divide the backbone depth 12"):
        paper_positions(12, 5)


@pytest.mark.parametrize("positions", [[3], [1, 3], [0, 1, 2, 3], [0], [2]])
def test_block_expansion_is_identity_at_init(positions):
    base = _tiny()
    expanded = copy.deepcopy(base)
    new = expand(expanded, positions)
    assert len(expanded.blocks) == TINY["depth"] + len(positions)
    # new block i sits right after the original block it copies
    assert new == [p + 1 + j for j, p in enumerate(sorted(positions))]
    for i in new:
        blk = expanded.blocks[i]
        for layer in (blk.attn.proj, blk.mlp.fc2):
            assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0
        src = expanded.blocks[i - 1]
        assert (
            torch.equal(blk.attn.qkv.weight, src.attn.qkv.weight)
            and blk.attn.qkv.weight is not src.attn.qkv.weight
        )
    assert torch.equal(base(X), expanded(X))


@pytest.mark.parametrize("positions", [[], [4], [-1], [1, 1]])
def test_block_expansion_bad_positions(positions):
    with pytest.raises(ValueError, match="position"):
        expand(_tiny(), positions)
