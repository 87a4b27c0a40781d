"""Anti-forgetting baselines composed with the methods: L2-SP, feature distillation, LP-FT."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from ftforget.backbones import build_backbone
from ftforget.methods import BlockExpansion, FullFineTuning, LinearProbing, LoRA, TopKFineTuning
from ftforget.methods.regularizers import l2sp_penalty
from ftforget.methods.schedule import paper_recipe
from tests.helpers import RandomImages, quiet_trainer
from tests.tiny import ARCH, TINY, TINY_ARGS

ADAPTING = [
    (FullFineTuning, {}),
    (TopKFineTuning, {"k": 2}),
    (LoRA, {"r": 2}),
    (BlockExpansion, {"positions": [1, 3]}),
]
IDS = [c.__name__ for c, _ in ADAPTING]


def _make(cls, **kwargs):
    torch.manual_seed(0)
    return cls(num_classes=5, **paper_recipe(lr=0.5, warmup_steps=0), **TINY_ARGS, **kwargs)


def _pretrained(x):
    torch.manual_seed(0)
    with torch.no_grad():
        return build_backbone(ARCH, **TINY).eval()(x)


class Snapshots(L.Callback):
    """The model's state dict before each optimizer step of ``steps``."""

    def __init__(self, steps):
        self.steps, self.states = set(steps), {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            self.states[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.parametrize(("cls", "kwargs"), ADAPTING, ids=IDS)
def test_zero_weights_train_bit_identically_to_the_plain_method(cls, kwargs, tmp_path):
    plain = _make(cls, **kwargs)
    zero = _make(cls, l2sp_weight=0.0, distill_weight=0.0, lp_steps=0, **kwargs)
    assert list(zero.state_dict()) == list(plain.state_dict())  # no anchor, no teacher
    for model in (plain, zero):
        quiet_trainer(tmp_path, max_steps=3).fit(model, RandomImages())
    for key, value in plain.state_dict().items():
        assert torch.equal(value, zero.state_dict()[key]), key


@pytest.mark.parametrize(("cls", "kwargs"), ADAPTING, ids=IDS)
def test_l2sp_gradient_is_two_lambda_times_the_distance(cls, kwargs):
    lam = 0.3
    model = _make(cls, l2sp_weight=lam, **kwargs)
    trainable = {n: p for n, p in model.backbone.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in trainable.items()}
    with torch.no_grad():  # move the trainable parameters away from their step-0 values
        for p in trainable.values():
            p.add_(torch.randn_like(p))
    (lam * l2sp_penalty(model.backbone, model.l2sp_anchors)).backward()
    for name, p in trainable.items():
        torch.testing.assert_close(p.grad, 2 * lam * (p.detach() - start[name]), rtol=1e-6, atol=0)
    assert model.head.weight.grad is None  # the head has no pretrained value to pull toward
    assert set(model.l2sp_anchors.names) == set(trainable)


@pytest.mark.parametrize(("cls", "kwargs"), ADAPTING, ids=IDS)
def test_distillation_targets_the_pretrained_features_throughout(cls, kwargs, tmp_path):
    model = _make(cls, distill_weight=1.0, **kwargs)
    quiet_trainer(tmp_path, max_steps=3).fit(model, RandomImages())
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert torch.equal(model.frozen_features(x), _pretrained(x))
    assert model.training and all(m.training for m in model.backbone.modules())  # modes restored
    with torch.no_grad():
        assert not torch.equal(model.eval().features(x), _pretrained(x))  # while the method's moved
    trainable, total = model.parameter_counts()
    assert (trainable, total) == _make(cls, **kwargs).parameter_counts()  # a teacher is not counted


@pytest.mark.parametrize(("cls", "kwargs"), [(LoRA, {"r": 2}), (BlockExpansion, {"positions": [1, 3]})])
def test_distillation_needs_no_second_backbone_for_lora_and_block_expansion(cls, kwargs):
    plain, distilled = _make(cls, **kwargs), _make(cls, distill_weight=1.0, **kwargs)

    def storage(model):
        tensors = [*model.parameters(), *model.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors), len({t.data_ptr() for t in tensors})

    assert storage(distilled) == storage(plain)
    assert not hasattr(distilled, "distill_teacher")
    x = torch.randn(2, 3, 32, 32)
    distilled.train()
    assert torch.equal(distilled.frozen_features(x), _pretrained(x))


def test_full_fine_tuning_distillation_keeps_one_frozen_copy():
    model = _make(FullFineTuning, distill_weight=1.0)
    teacher = model.distill_teacher
    assert not any(p.requires_grad for p in teacher.parameters())
    backbone_numel = sum(p.numel() for p in model.backbone.parameters())
    assert sum(p.numel() for p in teacher.parameters()) == backbone_numel
    assert {p.data_ptr() for p in teacher.parameters()}.isdisjoint(
        p.data_ptr() for p in model.backbone.parameters()
    )


def test_each_term_is_logged_and_the_loss_is_their_sum(tmp_path):
    model = _make(LoRA, r=2, l2sp_weight=0.5, distill_weight=2.0)
    trainer = quiet_trainer(tmp_path, max_steps=2)
    trainer.fit(model, RandomImages())
    m = trainer.callback_metrics
    assert {"train/loss_ce", "train/loss_l2sp", "train/loss_distill"} <= set(m)
    assert float(m["train/loss_l2sp"]) > 0 and float(m["train/loss_distill"]) > 0
    total = m["train/loss_ce"] + m["train/loss_l2sp"] + m["train/loss_distill"]
    torch.testing.assert_close(m["train/loss"], total)


def test_bad_weights_and_a_frozen_backbone_are_named(tmp_path):
    with pytest.raises(ValueError, match="model.init_args.l2sp_weight must be a finite number >= 0"):
        _make(LoRA, l2sp_weight=-1.0)
    with pytest.raises(ValueError, match="model.init_args.distill_weight"):
        _make(LoRA, distill_weight=float("inf"))
    with pytest.raises(ValueError, match="model.init_args.lp_steps must be >= 0"):
        _make(LoRA, lp_steps=-2)
    with pytest.raises(ValueError, match="model.init_args.distill_weight: LinearProbing trains no backbone"):
        _make(LinearProbing, distill_weight=1.0)


def test_lp_ft_second_stage_starts_from_the_linear_probe_run_head(tmp_path):
    probe = _make(LinearProbing)
    trainer = quiet_trainer(tmp_path, max_steps=3)
    trainer.fit(probe, RandomImages())
    ckpt = tmp_path / "probe.ckpt"
    trainer.save_checkpoint(ckpt)
    model = _make(FullFineTuning, head_from=str(ckpt))
    assert torch.equal(model.head.weight, probe.head.weight) and torch.equal(model.head.bias, probe.head.bias)
    snaps = Snapshots([0])
    quiet_trainer(tmp_path, max_steps=1, callbacks=[snaps]).fit(model, RandomImages())
    assert torch.equal(snaps.states[0]["head.weight"], probe.head.weight)
    # a checkpoint of the LP-FT run does not point at the probe any more: it holds the head itself
    with pytest.raises(ValueError, match="model.init_args.head_from: the head in .* is \\(5, 32\\)"):
        LoRA(num_classes=7, head_from=str(ckpt), **TINY_ARGS)
    with pytest.raises(FileNotFoundError, match="head_from"):
        _make(LoRA, head_from=str(tmp_path / "missing.ckpt"))


@pytest.mark.parametrize(("cls", "kwargs"), [(FullFineTuning, {}), (LoRA, {"r": 2})])
def test_lp_ft_in_one_run_is_a_linear_probe_then_the_method(cls, kwargs, tmp_path):
    lp_steps, steps = 3, 5
    staged, snaps = _make(cls, lp_steps=lp_steps, **kwargs), Snapshots(range(steps))
    start = {k: v.clone() for k, v in staged.state_dict().items()}
    quiet_trainer(tmp_path, max_steps=steps, callbacks=[snaps]).fit(staged, RandomImages())
    probe, probe_snaps = _make(LinearProbing), Snapshots([lp_steps])
    quiet_trainer(tmp_path, max_steps=steps, callbacks=[probe_snaps]).fit(probe, RandomImages())
    at_switch = snaps.states[lp_steps]
    for key, value in at_switch.items():  # the backbone did not move during the probe stage
        if not key.startswith("head."):
            assert torch.equal(value, start[key]), key
    for key in ("head.weight", "head.bias"):  # and the head is exactly the linear probe's after as many steps
        assert torch.equal(at_switch[key], probe_snaps.states[lp_steps][key])
    moved = [
        k for k in start if not k.startswith("head.") and not torch.equal(staged.state_dict()[k], start[k])
    ]
    assert moved, "the method did not train after the probe stage"
