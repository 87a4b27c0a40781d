"""The backbone factory: headless ViT, CLS feature, local checkpoints in every format users have."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from ftforget.backbones import CheckpointError, build_backbone, to_hf_vit_state_dict
from tests.tiny import TINY


def _tiny(seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build_backbone("vit_base_patch16_224", **{**TINY, **kw})


def _same_params(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_feature_is_cls_token_after_final_norm():
    model = _tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)  # (B, 1 + patches, D), after the final norm
    assert tokens.shape == (3, 17, 32)
    assert torch.equal(model(x), tokens[:, 0])
    # the final norm really is applied: recompute it from the pre-norm tokens
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    h = model.blocks(model.norm_pre(model.patch_drop(h)))
    assert torch.allclose(model(x), model.norm(h)[:, 0], atol=0, rtol=0)


@pytest.mark.parametrize("bad", [{"num_classes": 10}, {"global_pool": "avg"}])
def test_overrides_that_change_the_feature_are_rejected(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        build_backbone("vit_base_patch16_224", **TINY, **bad)


def test_unknown_model_name_is_named():
    with pytest.raises(ValueError, match="vit_nonexistent_model"):
        build_backbone("vit_nonexistent_model")


def _formats(state):
    yield "timm", state
    yield "state_dict", {"state_dict": state}
    yield "dino-plain", dict(state)
    dino_head = {"head.mlp.0.weight": torch.randn(4, 32), "head.last_layer.weight_g": torch.randn(4, 1)}
    yield "dino-teacher", {"teacher": {**{f"backbone.{k}": v for k, v in state.items()}, **dino_head}}
    yield "dino-student-ddp", {"student": {f"module.backbone.{k}": v for k, v in state.items()}}
    yield "ddp", {"model": {f"module.{k}": v for k, v in state.items()}}
    yield "timm-with-classifier", {**state, "head.weight": torch.randn(7, 32), "head.bias": torch.randn(7)}
    yield "hf", to_hf_vit_state_dict(state)
    yield "hf-with-prefix", {f"vit.{k}": v for k, v in to_hf_vit_state_dict(state).items()}


@pytest.mark.parametrize("fmt", [name for name, _ in _formats({})])
def test_checkpoint_formats_load_bit_identically(tmp_path, fmt):
    source = _tiny(seed=1)
    payload = dict(_formats(source.state_dict()))[fmt]
    path = tmp_path / "weights.pth"
    torch.save(payload, path)
    loaded = build_backbone("vit_base_patch16_224", checkpoint=path, **TINY)
    assert _same_params(source, loaded)
    assert not _same_params(_tiny(seed=2), loaded)


def test_safetensors_checkpoint(tmp_path):
    source = _tiny(seed=3)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = build_backbone("vit_base_patch16_224", checkpoint=str(path), **TINY)
    assert _same_params(source, loaded)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(source.eval()(x), loaded.eval()(x))


def test_missing_and_unexpected_keys_are_listed_with_the_file(tmp_path):
    state = _tiny().state_dict()
    del state["blocks.1.attn.qkv.weight"]
    state["blocks.9.extra"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        build_backbone("vit_base_patch16_224", checkpoint=path, **TINY)
    msg = str(info.value)
    assert str(path) in msg and "blocks.1.attn.qkv.weight" in msg and "blocks.9.extra" in msg
    assert "missing keys (1)" in msg and "unexpected keys (1)" in msg


def test_shape_mismatch_is_reported(tmp_path):
    path = tmp_path / "smaller_patches.pth"
    torch.save(_tiny(patch_size=4, img_size=16).state_dict(), path)
    expected = (
        r"smaller_patches.pth.*\n  shape mismatches \(1\): "
        r"patch_embed.proj.weight: checkpoint \(32, 3, 4, 4\) vs model \(32, 3, 8, 8\)"
    )
    with pytest.raises(CheckpointError, match=expected):
        build_backbone("vit_base_patch16_224", checkpoint=path, **TINY)


def test_position_embedding_of_another_image_size_is_resampled_as_timm_does(tmp_path, caplog):
    from timm.layers import resample_abs_pos_embed

    source = _tiny(seed=5, img_size=64)  # an 8 x 8 grid of patches; the model has 4 x 4
    path = tmp_path / "larger_images.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level("INFO", logger="ftforget.backbones"):
        loaded = build_backbone("vit_base_patch16_224", checkpoint=path, **TINY)
    assert "resampled from a 8x8 to a 4x4 patch grid" in caplog.text
    expected = resample_abs_pos_embed(source.pos_embed.detach(), new_size=(4, 4), num_prefix_tokens=1)
    assert torch.equal(loaded.pos_embed.detach(), expected)
    assert torch.equal(loaded.pos_embed[:, 0], source.pos_embed[:, 0])  # the CLS position is kept
    assert torch.equal(loaded.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.pth.*does not exist"):
        build_backbone("vit_base_patch16_224", checkpoint=tmp_path / "nowhere.pth", **TINY)
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pth.*could not be read"):
        build_backbone("vit_base_patch16_224", checkpoint=bad, **TINY)


def _to_transformers5_layout(state):
    """transformers >= 5 saves ViTModel as layers.N.attention.{q,k,v,o}_proj and layers.N.mlp.fc1/fc2."""
    out = {}
    for key, value in to_hf_vit_state_dict(state).items():
        key = key.replace("encoder.layer.", "layers.")
        for old, new in (
            ("attention.attention.query", "attention.q_proj"),
            ("attention.attention.key", "attention.k_proj"),
            ("attention.attention.value", "attention.v_proj"),
            ("attention.output.dense", "attention.o_proj"),
            ("intermediate.dense", "mlp.fc1"),
            ("output.dense", "mlp.fc2"),
        ):
            key = key.replace(old, new)
        out[key] = value
    return out


def test_transformers5_layout_loads(tmp_path):
    source = _tiny(seed=4)
    path = tmp_path / "model.pth"
    torch.save(
        {**_to_transformers5_layout(source.state_dict()), "pooler.dense.weight": torch.zeros(2, 2)}, path
    )
    assert _same_params(source, build_backbone("vit_base_patch16_224", checkpoint=path, **TINY))


def test_incomplete_hf_qkv_is_reported(tmp_path):
    hf = to_hf_vit_state_dict(_tiny().state_dict())
    del hf["encoder.layer.0.attention.attention.key.weight"]
    path = tmp_path / "hf_broken.bin"
    torch.save(hf, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): blocks.0.attn.qkv.weight"):
        build_backbone("vit_base_patch16_224", checkpoint=path, **TINY)


def test_real_transformers_vitmodel_gives_the_same_features(tmp_path):
    """Against the real Hugging Face implementation, where it is installed (pip install '.[bench]')."""
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=128,
        image_size=32, patch_size=8, layer_norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(std=0.2)
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf.state_dict(), path)
    ours = build_backbone("vit_base_patch16_224", checkpoint=path, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state[:, 0]
    assert torch.allclose(ours(x), expected, atol=1e-5, rtol=0)
