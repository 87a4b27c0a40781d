"""The five LightningModules: exact parameter counts, identity at init, which parameters train."""

from __future__ import annotations

import copy

import lightning as L
import peft
import pytest
import torch

from ftforget.methods import (
    SSF,
    AdaptFormer,
    BitFit,
    BlockExpansion,
    FullFineTuning,
    LinearProbing,
    LoRA,
    PeftMethod,
    TopKFineTuning,
    VisualPromptTuning,
    warmup_cosine,
)
from ftforget.methods.schedule import paper_recipe
from tests.helpers import quiet_trainer
from tests.tiny import TINY, TINY_ARGS

# PAPER.md, "true trainable" column: DINO ViT-B/16 with a 100-class head.
PAPER_COUNTS = [
    (FullFineTuning, {}, 85_875_556),
    (TopKFineTuning, {"k": 3}, 21_340_516),
    (TopKFineTuning, {"k": 3, "train_final_norm": True}, 21_340_516 + 1_536),
    (LinearProbing, {}, 76_900),
    (LoRA, {"r": 4}, 224_356),
    (LoRA, {"r": 8}, 371_812),
    (LoRA, {"r": 16}, 666_724),
    (BlockExpansion, {"p": 1}, 7_164_772),
    (BlockExpansion, {"positions": [10]}, 7_164_772),
    (BlockExpansion, {"p": 2}, 14_252_644),
    (BlockExpansion, {"p": 3}, 21_340_516),
    (BlockExpansion, {"p": 4}, 28_428_388),
]


@pytest.mark.parametrize(("cls", "kwargs", "expected"), PAPER_COUNTS)
def test_trainable_counts_equal_the_paper_for_vit_b16(cls, kwargs, expected):
    with torch.device("meta"):  # the real ViT-B/16 shapes without allocating them
        module = cls(num_classes=100, backbone="vit_base_patch16_224.dino", **kwargs)
    trainable, _ = module.parameter_counts()
    assert trainable == expected


METHODS = [
    (FullFineTuning, {}),
    (TopKFineTuning, {"k": 2}),
    (TopKFineTuning, {"k": 1, "train_final_norm": True}),
    (LinearProbing, {}),
    (LoRA, {"r": 2}),
    (LoRA, {"r": 4, "alpha": 8, "targets": ["q", "k", "v", "proj", "fc1", "fc2"]}),
    (BlockExpansion, {"p": 2}),
    (BlockExpansion, {"positions": [0, 3]}),
]
# Issue 20: PEFT's methods on the fused qkv (and fc2 for IA3's feed-forward scaling, every linear for
# LoRA), and the vision PEFT classics. Each config builds a small adapter of the tiny ViT.
PEFT_CONFIGS = {
    "lora": lambda: peft.LoraConfig(r=2, lora_alpha=4, target_modules=["qkv", "attn.proj", "fc1", "fc2"]),
    "dora": lambda: peft.LoraConfig(r=2, target_modules=["qkv"], use_dora=True),
    "loha": lambda: peft.LoHaConfig(r=2, target_modules=["qkv"]),
    "lokr": lambda: peft.LoKrConfig(r=2, target_modules=["qkv"]),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["qkv"]),
    "boft": lambda: peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=["qkv"]),
    "ia3": lambda: peft.IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"]),
    "vera": lambda: peft.VeraConfig(r=16, target_modules=["qkv"]),
    # total_step: the max_steps of the trainability test
    "adalora": lambda: peft.AdaLoraConfig(init_r=4, target_r=2, total_step=4, target_modules=["qkv"]),
}
IDENTITY_METHODS = [
    *METHODS,
    *[(PeftMethod, {"peft_config": make}) for make in PEFT_CONFIGS.values()],
    (BitFit, {}),
    (SSF, {}),
    (AdaptFormer, {"bottleneck": 4}),
]
# VPT is no identity at initialisation (the prompts are attended to); PiSSA only up to rounding
METHODS = [
    *IDENTITY_METHODS,
    (
        PeftMethod,
        {"peft_config": lambda: peft.LoraConfig(r=2, target_modules=["qkv"], init_lora_weights="pissa")},
    ),
    (VisualPromptTuning, {"num_prompts": 3, "deep": True}),
    (VisualPromptTuning, {"num_prompts": 3, "deep": False}),
]


def _id(cls, kwargs) -> str:
    if cls is PeftMethod:
        config = kwargs["peft_config"]()
        extra = "-dora" if getattr(config, "use_dora", False) else ""
        init = getattr(config, "init_lora_weights", True)
        return f"Peft-{type(config).__name__}{extra}" + (f"-{init}" if isinstance(init, str) else "")
    return f"{cls.__name__}-{'-'.join(f'{k}{v}' for k, v in kwargs.items())}"


IDS = [_id(c, kw) for c, kw in METHODS]
IDENTITY_IDS = [_id(c, kw) for c, kw in IDENTITY_METHODS]


def _make(cls, seed=0, **kwargs):
    if callable(kwargs.get("peft_config")):  # a fresh PEFT config per model (PEFT mutates them)
        kwargs = {**kwargs, "peft_config": kwargs["peft_config"]()}
    torch.manual_seed(seed)
    return cls(num_classes=5, **paper_recipe(lr=0.05, warmup_steps=0), **TINY_ARGS, **kwargs)


@pytest.mark.parametrize(("cls", "kwargs"), IDENTITY_METHODS, ids=IDENTITY_IDS)
def test_identity_at_initialisation(cls, kwargs):
    """Same seed, same backbone and head: the adapted module computes exactly the plain one's function."""
    plain, adapted = _make(FullFineTuning).eval(), _make(cls, **kwargs).eval()
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(plain.features(x), adapted.features(x))
    assert torch.equal(plain(x), adapted(x))


def _intended_trainable(module) -> set[str]:
    """Which parameters each method should train, spelled out independently of ``set_trainable``."""
    names = {n for n, _ in module.named_parameters()}
    head = {n for n in names if n.startswith("head.")}
    depth = TINY["depth"]
    if isinstance(module, FullFineTuning):
        return names
    if isinstance(module, LinearProbing):
        return head
    if isinstance(module, TopKFineTuning):
        k = module.hparams.k
        blocks = {n for n in names if n.startswith("backbone.blocks.") and int(n.split(".")[2]) >= depth - k}
        norm = (
            {n for n in names if n.startswith("backbone.norm.")} if module.hparams.train_final_norm else set()
        )
        return blocks | head | norm
    if isinstance(module, LoRA):
        return {n for n in names if ".lora_A." in n or ".lora_B." in n} | head
    if isinstance(module, BlockExpansion):
        new = set(module.new_block_indices)
        return {n for n in names if n.startswith("backbone.blocks.") and int(n.split(".")[2]) in new} | head
    if isinstance(module, BitFit):
        return {n for n in names if n.startswith("backbone.") and n.endswith(".bias")} | head
    if isinstance(module, PeftMethod | SSF | AdaptFormer | VisualPromptTuning):
        # exactly the parameters the surgery added: those of no plain backbone, once the wrappers' own
        # path segments (PEFT's base_layer, SSF's op, AdaptFormer's moved norm and mlp, VPT's block) are read away
        plain = {n for n, _ in FullFineTuning(num_classes=5, **TINY_ARGS).named_parameters()}
        wrapper = {
            ".base_layer.": ".",
            ".op.": ".",
            ".mlp.mlp.": ".mlp.",
            ".mlp.norm.": ".norm2.",
            ".block.": ".",
        }

        def original(name: str) -> str:
            for segment, plain_segment in wrapper.items():
                name = name.replace(segment, plain_segment)
            return name

        # (AdaLoRA's ranknum is a constant that PEFT stores as a frozen parameter)
        return {n for n in names if original(n) not in plain and ".ranknum." not in n} | head
    raise AssertionError(type(module))


class GradientRecorder(L.Callback):
    def __init__(self) -> None:
        self.nonzero: set[str] = set()
        self.frozen_with_grad: set[str] = set()

    def on_after_backward(self, trainer, pl_module) -> None:
        for name, p in pl_module.named_parameters():
            if p.grad is not None and not p.requires_grad:
                self.frozen_with_grad.add(name)
            if p.grad is not None and torch.count_nonzero(p.grad) > 0:
                self.nonzero.add(name)


@pytest.mark.parametrize(("cls", "kwargs"), METHODS, ids=IDS)
def test_only_intended_parameters_train(cls, kwargs, random_images, tmp_path):
    module = _make(cls, **kwargs)
    intended = _intended_trainable(module)
    assert {n for n, p in module.named_parameters() if p.requires_grad} == intended
    before = copy.deepcopy(module.state_dict())
    recorder = GradientRecorder()
    quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0, callbacks=[recorder]).fit(module, random_images)
    after = module.state_dict()
    params = dict(module.named_parameters())
    for name in params:
        changed = not torch.equal(before[name], after[name])
        if name in intended:
            assert name in recorder.nonzero, f"{name} never received a gradient"
            assert changed, f"trainable {name} did not change"
        else:
            assert not changed, f"frozen {name} changed"
    assert not recorder.frozen_with_grad
    # buffers (none in a ViT) and non-parameter state are untouched too
    assert all(torch.equal(before[k], after[k]) for k in before if k not in params)


def test_lora_training_leaves_k_rows_of_merged_qkv_at_the_pretrained_values(random_images, tmp_path):
    module = _make(LoRA, r=2)
    original = [b.attn.qkv.base.weight.detach().clone() for b in module.backbone.blocks]
    quiet_trainer(tmp_path, max_steps=4, limit_val_batches=0).fit(module, random_images)
    x = torch.randn(2, 3, 32, 32)
    module.eval()
    unmerged = module(x)
    with module.merged():
        for block, w0 in zip(module.backbone.blocks, original, strict=True):
            w = block.attn.qkv.base.weight
            assert torch.equal(w[32:64], w0[32:64])
            assert not torch.equal(w[:32], w0[:32]) and not torch.equal(w[64:], w0[64:])
        assert torch.allclose(module(x), unmerged, atol=1e-5, rtol=0)
    with module.adapter_disabled():
        pretrained = _make(FullFineTuning).eval()
        assert torch.equal(module.features(x), pretrained.features(x))


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (TopKFineTuning, {"k": 0}, "k=0"),
        (TopKFineTuning, {"k": 5}, "k=5 must be between 1 and the backbone depth 4"),
        (BlockExpansion, {"p": 3}, "p=3 must be >= 1 and divide the backbone depth 4"),
        (BlockExpansion, {}, "exactly one of p and positions"),
        (BlockExpansion, {"p": 2, "positions": [1]}, "exactly one of p and positions"),
        (BlockExpansion, {"positions": [7]}, r"positions \[7\]"),
        (LoRA, {"r": 0}, "r=0"),
        (LoRA, {"targets": ["q", "query"]}, "unknown LoRA targets"),
        (FullFineTuning, {"num_classes": 1}, "num_classes"),
        (FullFineTuning, paper_recipe(lr=-1.0), r"optimizer: SGD\(lr=-1.0, .*Invalid learning rate"),
        (FullFineTuning, paper_recipe(warmup_steps=-1), "lr_scheduler.warmup_steps must be >= 0, got -1"),
    ],
)
def test_bad_arguments_fail_at_construction(cls, kwargs, match):
    args = {"num_classes": 5, **TINY_ARGS, **kwargs}
    with pytest.raises(ValueError, match=match):
        cls(**args)


def test_missing_backbone_checkpoint_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.checkpoint.*nothing.pth"):
        FullFineTuning(num_classes=5, checkpoint=str(tmp_path / "nothing.pth"), **TINY_ARGS)


def test_warmup_cosine_known_values():
    assert warmup_cosine(0, 500, 10_000) == 0.0
    assert warmup_cosine(250, 500, 10_000) == 0.5
    assert warmup_cosine(500, 500, 10_000) == 1.0
    assert warmup_cosine(5250, 500, 10_000) == pytest.approx(0.5, abs=1e-12)
    assert warmup_cosine(10_000, 500, 10_000) == 0.0
    assert warmup_cosine(0, 0, 100) == 1.0
    # PAPER.md: ten steps of a 500-step warmup apply 0.09 x the base learning rate in total
    assert sum(warmup_cosine(s, 500, 10_000) for s in range(10)) == pytest.approx(0.09, abs=1e-12)


def test_schedule_is_stepped_per_iteration(random_images, tmp_path):
    torch.manual_seed(0)
    module = FullFineTuning(num_classes=5, **paper_recipe(lr=0.05, warmup_steps=2), **TINY_ARGS)
    lrs = []

    class LrRecorder(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    quiet_trainer(tmp_path, max_steps=6, limit_val_batches=0, callbacks=[LrRecorder()]).fit(
        module, random_images
    )
    assert lrs == pytest.approx([0.05 * warmup_cosine(s, 2, 6) for s in range(6)], abs=1e-15)


def test_linear_probe_feature_cache_trains_the_same_head(tmp_path):
    """With a deterministic training transform the cache changes speed, not the result."""
    from ftforget.data.digits import DigitsDataModule

    heads = []
    for cache in (False, True):
        torch.manual_seed(0)
        recipe = paper_recipe(lr=0.05, warmup_steps=0)
        module = LinearProbing(num_classes=5, **recipe, cache_features=cache, **TINY_ARGS)
        data = DigitsDataModule(batch_size=32, max_shift=0)  # no augmentation: the cache is exact
        torch.manual_seed(1)
        quiet_trainer(tmp_path, max_steps=20, limit_val_batches=0).fit(module, data)
        heads.append(module.head.weight.detach().clone())
        if cache:
            x, _ = next(iter(data.train_dataloader()))
            assert x.shape == (32, 32)  # the train loader now yields features
    assert torch.allclose(heads[0], heads[1], atol=1e-6, rtol=0)
    assert not torch.equal(heads[0], LinearProbing(num_classes=5, **TINY_ARGS).head.weight)


def test_feature_cache_needs_an_ftforget_data_module(random_images, tmp_path):
    module = LinearProbing(num_classes=5, cache_features=True, **TINY_ARGS)
    with pytest.raises(ValueError, match="cache_features=true needs a data module"):
        quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, random_images)


def test_vit_attention_uses_the_fused_sdpa_kernel():
    module = _make(FullFineTuning)
    assert all(block.attn.fused_attn for block in module.backbone.blocks)
