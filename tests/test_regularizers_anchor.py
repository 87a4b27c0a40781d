"""L2-SP and distillation toward a fixed anchor (``anchor_weights``): another network's weights, as a
stream's pretrained start, instead of the run's own step-0 backbone."""

from __future__ import annotations

import pytest
import torch

from ftforget.adapters.lora import LoRALinear
from ftforget.backbones import CheckpointError, build_backbone
from ftforget.methods import BlockExpansion, FullFineTuning, LoRA, TopKFineTuning
from ftforget.methods.registry import load_method
from ftforget.methods.schedule import paper_recipe
from tests.helpers import RandomImages, quiet_trainer
from tests.tiny import ARCH, TINY, TINY_ARGS


def _weights(tmp_path, seed: int, name: str, **kwargs) -> str:
    torch.manual_seed(seed)
    path = tmp_path / f"{name}.pth"
    torch.save(build_backbone(ARCH, **{**TINY, **kwargs}).state_dict(), path)
    return str(path)


def _make(cls, start: str, **kwargs):
    torch.manual_seed(0)
    args = {**paper_recipe(lr=0.5, warmup_steps=0), **TINY_ARGS}
    return cls(num_classes=5, checkpoint=start, **args, **kwargs)


def test_full_l2sp_to_an_anchor_is_the_distance_to_those_weights_and_its_gradient(tmp_path) -> None:
    start, anchor = _weights(tmp_path, 0, "start"), _weights(tmp_path, 1, "anchor")
    lam = 0.25
    model = _make(FullFineTuning, start, l2sp_weight=lam, anchor_weights=anchor)
    target = torch.load(anchor, weights_only=True)
    params = dict(model.backbone.named_parameters())
    assert set(model.l2sp_anchors.names) == set(params)
    for name in params:  # the anchor is the file's weights, not the start's
        assert torch.equal(model.l2sp_anchors.anchor(name), target[name])
    by_hand = sum(float((params[n].detach().double() - target[n].double()).pow(2).sum()) for n in params)
    term = model.training_step((torch.randn(2, 3, 32, 32), torch.tensor([0, 1])), 0)  # logs nothing here
    assert term is not None
    from ftforget.methods.regularizers import l2sp_distance

    penalty = l2sp_distance(model.anchored_weights(), model.l2sp_anchors)
    assert float(penalty) == pytest.approx(by_hand, rel=1e-6)
    model.zero_grad()
    (lam * penalty).backward()
    for name, p in params.items():
        assert torch.allclose(p.grad, 2 * lam * (p.detach() - target[name]), atol=1e-6), name


@pytest.mark.parametrize(("cls", "kwargs"), [(FullFineTuning, {}), (TopKFineTuning, {"k": 2})])
def test_an_anchor_equal_to_the_start_trains_bit_identically_to_the_step0_anchor(
    cls, kwargs, tmp_path
) -> None:
    start = _weights(tmp_path, 0, "start")
    plain = _make(cls, start, l2sp_weight=0.5, **kwargs)
    anchored = _make(cls, start, l2sp_weight=0.5, anchor_weights=start, **kwargs)
    for model in (plain, anchored):
        quiet_trainer(tmp_path, max_steps=3).fit(model, RandomImages())
    for key, value in plain.state_dict().items():
        assert torch.equal(value, anchored.state_dict()[key]), key


def test_lora_l2sp_to_an_anchor_pulls_the_adapted_weights(tmp_path) -> None:
    start, anchor = _weights(tmp_path, 0, "start"), _weights(tmp_path, 1, "anchor")
    model = _make(LoRA, start, r=2, l2sp_weight=1.0, anchor_weights=anchor)
    with torch.no_grad():  # a nonzero update, so that W + scale B A differs from W
        for module in model.backbone.modules():
            if isinstance(module, LoRALinear):
                for b in module.lora_B.values():
                    b.normal_()
    from ftforget.methods.regularizers import l2sp_distance

    penalty = l2sp_distance(model.anchored_weights(), model.l2sp_anchors)
    target = torch.load(anchor, weights_only=True)
    names = [f"{p}.weight" for p, m in model.backbone.named_modules() if isinstance(m, LoRALinear)]
    assert sorted(model.l2sp_anchors.names) == sorted(names) and len(names) == TINY["depth"]
    model.merge()  # the merged weights are what the layers compute with
    merged = {
        f"{p}.weight": m.base.weight for p, m in model.backbone.named_modules() if isinstance(m, LoRALinear)
    }
    by_hand = sum(float((merged[n].double() - target[n].double()).pow(2).sum()) for n in names)
    model.unmerge()
    assert float(penalty) == pytest.approx(by_hand, rel=1e-5)
    penalty.backward()
    trainable = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
    frozen = [p for p in model.backbone.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_distillation_to_an_anchor_targets_the_anchor_network(tmp_path) -> None:
    start, anchor = _weights(tmp_path, 0, "start"), _weights(tmp_path, 1, "anchor")
    model = _make(LoRA, start, r=2, distill_weight=1.0, anchor_weights=anchor)
    x = torch.randn(3, 3, 32, 32)
    network = build_backbone(ARCH, checkpoint=anchor, **TINY).eval()
    with torch.no_grad():
        expected = network(x)
    assert torch.equal(model.frozen_features(x), expected)  # not the start's (adapters off) features
    assert not torch.equal(expected, model.backbone(x))
    trainable, total = model.parameter_counts()
    assert total == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("distill_teacher.")
    )


def test_block_expansion_distills_to_a_shallower_anchor_and_its_checkpoint_reloads(tmp_path) -> None:
    # A stream of Block Expansion: the task starts from a 5-block carried backbone, the anchor (the
    # pretrained start) has 4 blocks.
    start = _weights(tmp_path, 0, "carried", depth=5)
    anchor = _weights(tmp_path, 1, "anchor")
    torch.manual_seed(0)
    args = {**paper_recipe(lr=0.5, warmup_steps=0), "backbone": ARCH, "backbone_kwargs": {**TINY, "depth": 5}}
    model = BlockExpansion(
        num_classes=5, checkpoint=start, positions=[4], distill_weight=1.0, anchor_weights=anchor, **args
    )
    assert len(model.distill_teacher.blocks) == 4 and len(model.backbone.blocks) == 6
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = build_backbone(ARCH, checkpoint=anchor, **TINY).eval()(x)
    assert torch.equal(model.frozen_features(x), expected)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(model, RandomImages())
    ckpt = tmp_path / "be.ckpt"
    trainer.save_checkpoint(ckpt)
    (tmp_path / "anchor.pth").unlink()  # a checkpoint holds the teacher: the file is not read again
    loaded = load_method(ckpt)
    assert len(loaded.distill_teacher.blocks) == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_anchor_refusals_name_the_option(tmp_path) -> None:
    start, anchor = _weights(tmp_path, 0, "start"), _weights(tmp_path, 1, "anchor")
    with pytest.raises(ValueError, match="anchor_weights is the anchor of L2-SP and distillation"):
        _make(FullFineTuning, start, anchor_weights=anchor)
    with pytest.raises(
        FileNotFoundError, match="anchor_weights: backbone weights file '.*nowhere.pth' does not exist"
    ):
        _make(FullFineTuning, start, l2sp_weight=1.0, anchor_weights=str(tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match="Block Expansion trains new blocks, which have no counterpart"):
        _make(BlockExpansion, start, positions=[1], l2sp_weight=1.0, anchor_weights=anchor)
    other = _weights(tmp_path, 1, "wide", embed_dim=48)
    with pytest.raises(
        CheckpointError, match="anchor_weights: checkpoint .*wide.pth' does not match the backbone"
    ):
        _make(FullFineTuning, start, l2sp_weight=1.0, anchor_weights=other)


def test_the_table_label_names_a_fixed_anchor(tmp_path) -> None:
    assert FullFineTuning.describe({"l2sp_weight": 0.1}) == "full fine-tuning + L2-SP 0.1"
    assert FullFineTuning.describe({"l2sp_weight": 0.1, "anchor_weights": "x.pth"}) == (
        "full fine-tuning + L2-SP 0.1 to anchor"
    )
