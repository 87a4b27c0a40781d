"""Issue 20's methods: exact counts against closed forms, PEFT's LoRA against ftforget's, merge, disable, knob,
VPT's prompt bookkeeping, checkpoints and configs. The shared invariants (identity at init, which parameters
train and change) are in test_methods.py."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning as L
import peft
import pytest
import torch
import torch.nn.functional as F
import yaml

from ftforget.adapters.intruders import find_intruders, reduce_intruders
from ftforget.adapters.peft_layers import peft_merged, tuner_layers
from ftforget.commands import main
from ftforget.methods import (
    SSF,
    AdaptFormer,
    BitFit,
    FullFineTuning,
    LoRA,
    PeftMethod,
    VisualPromptTuning,
)
from ftforget.methods.knob import knob_model
from ftforget.methods.peft_method import build_config, config_spec
from ftforget.methods.registry import load_method, method_label
from ftforget.sweep import PEFT_CONFIGS, preset
from ftforget.tasks.delta import state_hash
from ftforget.tasks.exported import attach_task, make_task
from ftforget.tasks.intruders import layer_intruders
from ftforget.tasks.multitask import MultiTaskModel
from ftforget.tasks.peft_format import HEAD_FILE, export_peft, load_peft
from tests.helpers import quiet_trainer
from tests.test_methods import PEFT_CONFIGS as PEFT_TEST_CONFIGS
from tests.test_methods import _id, _make
from tests.tiny import TINY_ARGS

ROOT = Path(__file__).resolve().parents[1]
PEFT_DIR = ROOT / "configs" / "peft"

# ViT-B/16 (embed 768, MLP 3072, 12 blocks), a 100-class head: closed forms of each shipped config.
D, H, N, HEAD = 768, 3072, 12, 768 * 100 + 100
QKV = 3 * D
CLOSED_FORMS = {
    "lora_qkv": N * 8 * (D + QKV),  # one A (r x D) and one B (3D x r) per qkv
    "lora_all": N * 2 * ((D + QKV) + (D + D) + (D + H) + (H + D)),  # r=2 on qkv, proj, fc1, fc2
    "dora": N * (8 * (D + QKV) + QKV),  # LoRA plus one magnitude per output row
    "pissa": N * 8 * (D + QKV),
    "loha": N * 2 * 4 * (D + QKV),  # two rank-4 pairs
    "lokr": N * (8 * 8 + 64 * (QKV // 8 + D // 8)),  # w1 8x8, w2 = (288 x 64)(64 x 96)
    "oft": N * (D // 64) * (64 * 63 // 2),  # skew-symmetric blocks of 64 on the input
    "boft": N * ((D // 32) * 32 * 32 + QKV),  # one butterfly factor of 32-blocks, a scale per output
    "ia3": N * (QKV + H),  # qkv's output rows, fc2's input columns
    "vera": N * (256 + QKV),  # lambda_d (r) and lambda_b (out); A and B are shared, frozen
    "adalora": N * 12 * (D + QKV + 1),  # A, B and the singular values E at the initial rank 12
    "bitfit": N * (D + QKV + D + D + H + D)
    + D
    + D,  # per block norm1, qkv, proj, norm2, fc1, fc2; patch, norm
    "ssf": N * 2 * (D + QKV + D + D + H + D) + 2 * D + 2 * D,  # the same ops, a scale and a shift each
    "adaptformer": N * (2 * D * 16 + 16 + D),  # down (with bias) and up (with bias), bottleneck 16
    "vpt_deep": N * 32 * D,
    "vpt_shallow": 50 * D,
}


def _shipped_model_args(name: str) -> tuple[type, dict]:
    model = yaml.safe_load((PEFT_DIR / f"{name}.yaml").read_text())["model"]
    cls = {c.__name__: c for c in (PeftMethod, BitFit, SSF, AdaptFormer, VisualPromptTuning)}[
        model["class_path"].rsplit(".", 1)[-1]
    ]
    return cls, dict(model.get("init_args") or {})


def test_every_shipped_peft_config_has_a_closed_form_and_is_in_the_preset():
    assert sorted(CLOSED_FORMS) == sorted(PEFT_CONFIGS) == sorted(p.stem for p in PEFT_DIR.glob("*.yaml"))
    runs = preset("peft")
    assert [r[0].stem for r in runs[-len(PEFT_CONFIGS) :]] == list(PEFT_CONFIGS)
    assert [r[0] for r in runs[: -len(PEFT_CONFIGS)]] == [r[0] for r in preset("paper")]


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_trainable_counts_of_the_shipped_configs_for_vit_b16(name):
    cls, init_args = _shipped_model_args(name)
    # BOFT builds its butterfly permutations with .item(), which the meta device cannot; PiSSA needs an SVD
    # of real weights. Those two are built for real (random weights, no download).
    device = "cpu" if name in ("boft", "pissa") else "meta"
    with torch.device(device):
        module = cls(num_classes=100, backbone="vit_base_patch16_224.dino", **init_args)
    trainable, _ = module.parameter_counts()
    assert trainable == CLOSED_FORMS[name] + HEAD


def test_lora_budgets_equal_the_papers_lora_r8():
    """PEFT's r=8 on all of qkv and r=2 on every linear cost exactly the paper's r=8 on q and v."""
    with torch.device("meta"):
        paper = LoRA(r=8, num_classes=100, backbone="vit_base_patch16_224.dino").parameter_counts()[0]
    assert paper == CLOSED_FORMS["lora_qkv"] + HEAD == CLOSED_FORMS["lora_all"] + HEAD == 371_812


# ------------------------------------------------------------------ PEFT's LoRA against ftforget's
def _pair(peft_targets, own_targets, r=2, alpha=4.0):
    """The same backbone and head, adapted by PEFT and by ftforget, with PEFT's A copied into ftforget's."""
    torch.manual_seed(0)
    ours = LoRA(r=r, alpha=alpha, targets=own_targets, num_classes=5, **TINY_ARGS)
    torch.manual_seed(0)
    theirs = PeftMethod(
        peft_config=peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=peft_targets),
        num_classes=5,
        **TINY_ARGS,
    )
    assert torch.equal(ours.head.weight, theirs.head.weight)
    return ours, theirs


def _train(module, steps, lr=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    module.train()
    for _ in range(steps):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 5, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(module(x), y).backward()
        opt.step()
    return module.eval()


def test_peft_lora_on_plain_linears_equals_ftforgets_lora_after_identical_steps():
    """On ``proj``, ``fc1`` and ``fc2`` both are ``W x + scale * B A x`` with one (A, B) per layer: the
    same A, B = 0 and the same steps give the same network (up to the order of float operations)."""
    ours, theirs = _pair(["attn.proj", "fc1", "fc2"], ["proj", "fc1", "fc2"])
    layers = dict(theirs.backbone.named_modules())
    for name, module in ours.backbone.named_modules():
        if hasattr(module, "lora_A"):
            (key,) = module.lora_A.keys()
            with torch.no_grad():
                module.lora_A[key].copy_(layers[name].lora_A["default"].weight)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(ours.eval().features(x), theirs.eval().features(x))  # identities at init
    _train(ours, 6), _train(theirs, 6)
    diff = (ours.features(x) - theirs.features(x)).abs().max().item()
    assert diff <= 1e-5
    assert not torch.equal(ours.features(x), FullFineTuning(num_classes=5, **TINY_ARGS).eval().features(x))


def test_peft_lora_on_qkv_agrees_on_q_and_v_and_must_differ_on_k():
    """PEFT adapts the whole fused qkv with one A; ftforget's paper LoRA has its own A for q and for v and
    leaves k alone. With A_q = A_v = PEFT's A, the first SGD step (from B = 0, where only B has a gradient)
    gives PEFT's B exactly ftforget's B_q and B_v in the q and v rows, and a non-zero k block that ftforget
    cannot have: from then on the networks differ."""
    ours, theirs = _pair(["qkv"], ["q", "v"])
    dim = TINY_ARGS["backbone_kwargs"]["embed_dim"]
    for block, peft_block in zip(ours.backbone.blocks, theirs.backbone.blocks, strict=True):
        with torch.no_grad():
            for key in ("q", "v"):
                block.attn.qkv.lora_A[key].copy_(peft_block.attn.qkv.lora_A["default"].weight)
    _train(ours, 1, lr=0.5), _train(theirs, 1, lr=0.5)
    for block, peft_block in zip(ours.backbone.blocks, theirs.backbone.blocks, strict=True):
        b = peft_block.attn.qkv.lora_B["default"].weight
        torch.testing.assert_close(b[:dim], block.attn.qkv.lora_B["q"], atol=1e-6, rtol=0)
        torch.testing.assert_close(b[2 * dim :], block.attn.qkv.lora_B["v"], atol=1e-6, rtol=0)
        assert b[dim : 2 * dim].abs().max() > 1e-4  # the k rows moved
    x = torch.randn(4, 3, 32, 32)
    assert (ours.features(x) - theirs.features(x)).abs().max() > 1e-4
    # merged, PEFT's k rows of the qkv weight changed; ftforget's did not
    with torch.no_grad(), peft_merged(theirs.backbone), ours.merged():
        for block, peft_block in zip(ours.backbone.blocks, theirs.backbone.blocks, strict=True):
            base = block.attn.qkv.base.weight
            assert not torch.equal(peft_block.attn.qkv.base_layer.weight[dim : 2 * dim], base[dim : 2 * dim])


# --------------------------------------------------------------------------- merge, disable, knob
def _trained_peft(config, steps=3):
    torch.manual_seed(0)
    return _train(PeftMethod(peft_config=config, num_classes=5, **TINY_ARGS), steps)


MERGEABLE = {
    "lora": lambda: peft.LoraConfig(r=2, target_modules=["qkv", "fc1"]),
    "dora": lambda: peft.LoraConfig(r=2, target_modules=["qkv"], use_dora=True),
    "loha": lambda: peft.LoHaConfig(r=2, target_modules=["qkv"]),
    "oft": lambda: peft.OFTConfig(r=0, oft_block_size=8, target_modules=["qkv"]),
    "ia3": lambda: peft.IA3Config(target_modules=["qkv", "fc2"], feedforward_modules=["fc2"]),
    "vera": lambda: peft.VeraConfig(r=16, target_modules=["qkv"]),
}


@pytest.mark.parametrize("name", sorted(MERGEABLE))
def test_inference_merges_and_restores_the_base_bit_for_bit(name):
    module = _trained_peft(MERGEABLE[name]())
    x = torch.randn(4, 3, 32, 32)
    unmerged = module.features(x)
    before = copy.deepcopy(module.state_dict())
    with torch.no_grad(), module.inference_context():
        assert all(layer.merged for layer in tuner_layers(module.backbone))
        merged = module.features(x)
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=0)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(layer.merged for layer in tuner_layers(module.backbone))
    assert torch.equal(module.features(x), unmerged)


def test_adapters_off_is_the_pretrained_network_and_leaves_training_flags():
    module = _trained_peft(MERGEABLE["dora"]())
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(0)
    pretrained = FullFineTuning(num_classes=5, **TINY_ARGS).eval()
    with torch.no_grad(), module.pretrained_context():
        assert torch.equal(module.features(x), pretrained.features(x))
    assert {n: p.requires_grad for n, p in module.named_parameters()} == flags
    assert not torch.equal(module.features(x), pretrained.features(x))


def test_pissa_has_no_pretrained_context():
    """PiSSA moves the principal part of W into the adapter: adapters off is not the pretrained network."""
    torch.manual_seed(0)
    config = peft.LoraConfig(r=2, target_modules=["qkv"], init_lora_weights="pissa")
    module = PeftMethod(peft_config=config, num_classes=5, **TINY_ARGS)
    assert module.pretrained_context() is None


@pytest.mark.parametrize("name", ["lora", "dora", "ia3", "vera"])
def test_knob_is_exact_at_both_ends_and_scales_lora_linearly(name):
    start = _trained_peft(MERGEABLE[name](), steps=0)
    end = _trained_peft(MERGEABLE[name]())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(knob_model(end, start, 1.0).features(x), end.features(x))
        assert torch.equal(knob_model(end, start, 0.0).features(x), start.eval().features(x))
    if name == "lora":  # the update scale * B A, times a: the merged weight moves linearly in a
        half = knob_model(end, start, 0.5)
        layer_end, layer_half = end.backbone.blocks[0].attn.qkv, half.backbone.blocks[0].attn.qkv
        delta_end = layer_end.get_delta_weight("default")
        torch.testing.assert_close(layer_half.get_delta_weight("default"), 0.5 * delta_end, atol=1e-7, rtol=0)


# ---------------------------------------------------------------------------- the vision classics
def test_vpt_shallow_is_the_frozen_vit_on_the_sequence_with_prompts_after_cls():
    """A known answer: the prompts go after the CLS token, through every original block, and are dropped
    before the final norm; the feature is the CLS token."""
    torch.manual_seed(0)
    vpt = VisualPromptTuning(num_prompts=3, deep=False, num_classes=5, **TINY_ARGS).eval()
    torch.manual_seed(0)
    plain = FullFineTuning(num_classes=5, **TINY_ARGS).eval().backbone
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = plain._pos_embed(plain.patch_embed(x))
        prompts = vpt.prompts[0].unsqueeze(0).expand(2, -1, -1)
        seq = torch.cat([tokens[:, :1], prompts, tokens[:, 1:]], dim=1)
        for block in plain.blocks:
            seq = block(seq)
        expected = plain.norm(torch.cat([seq[:, :1], seq[:, 4:]], dim=1))[:, 0]
        torch.testing.assert_close(vpt.features(x), expected, atol=0, rtol=0)
        # the prompts matter: other prompts, another feature
        vpt.prompts[0].add_(1.0)
        assert not torch.equal(vpt.features(x), expected)


def test_vpt_deep_replaces_the_prompts_at_every_block():
    torch.manual_seed(0)
    vpt = VisualPromptTuning(num_prompts=2, deep=True, num_classes=5, **TINY_ARGS).eval()
    seen = []
    for block in vpt.backbone.blocks:
        block.block.register_forward_hook(lambda m, args, out: seen.append(args[0][:, 1:3].detach().clone()))
    with torch.no_grad():
        vpt.features(torch.randn(2, 3, 32, 32))
    assert len(seen) == len(vpt.prompts) == TINY_ARGS["backbone_kwargs"]["depth"]
    for tokens, prompts in zip(seen, vpt.prompts, strict=True):  # each block reads its own prompts
        assert torch.equal(tokens, prompts.unsqueeze(0).expand(2, -1, -1))


def test_adaptformer_and_ssf_and_bitfit_change_only_what_they_declare():
    torch.manual_seed(0)
    adapt = AdaptFormer(bottleneck=4, num_classes=5, **TINY_ARGS)
    assert all(isinstance(b.norm2, torch.nn.Identity) for b in adapt.backbone.blocks)
    assert all(torch.count_nonzero(a.up.weight) == 0 for a in adapt.adapters)
    with adapt.adapter_disabled():
        assert all(a.scale == 0.0 for a in adapt.adapters)
    assert all(a.scale == 0.1 for a in adapt.adapters)
    ssf = SSF(num_classes=5, **TINY_ARGS)
    assert len(ssf.ssf_layers) == 2 + 6 * TINY_ARGS["backbone_kwargs"]["depth"]


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (AdaptFormer, {"bottleneck": 0}, "bottleneck must be >= 1"),
        (VisualPromptTuning, {"num_prompts": 0}, "num_prompts must be >= 1"),
        (PeftMethod, {"peft_config": {"class_path": "peft.NoSuchConfig"}}, "not a config class of peft"),
        (PeftMethod, {"peft_config": {"class_path": "os.path"}}, "not a config class of peft"),
        (
            PeftMethod,
            {"peft_config": {"class_path": "peft.LoraConfig", "init_args": {"rank": 8}}},
            r"\['rank'\]",
        ),
        (PeftMethod, {"peft_config": peft.LoraConfig(target_modules=["nothing"])}, "nothing"),
        (PeftMethod, {"peft_config": peft.LoraConfig(target_modules=["qkv"], bias="all")}, "BitFit"),
        (PeftMethod, {"peft_config": peft.PromptTuningConfig(num_virtual_tokens=4)}, "VisualPromptTuning"),
    ],
)
def test_bad_arguments_fail_at_construction(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(num_classes=5, **TINY_ARGS, **kwargs)


# --------------------------------------------------------------------------- labels, checkpoints, CLI
def test_the_config_is_stored_as_plain_values_and_rebuilds_the_same():
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["qkv", "fc1"], use_dora=True)
    spec = config_spec(config)
    assert spec == {
        "class_path": "peft.LoraConfig",
        "init_args": {"r": 4, "lora_alpha": 16, "target_modules": ["fc1", "qkv"], "use_dora": True},
    }
    assert config_spec(build_config(spec)) == spec


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("lora_qkv", "PEFT LoRA r=8 (qkv)"),
        ("lora_all", "PEFT LoRA r=2 (attn.proj,fc1,fc2,qkv)"),
        ("dora", "PEFT DoRA r=8 (qkv)"),
        ("pissa", "PEFT LoRA (pissa init) r=8 (qkv)"),
        ("adalora", "PEFT AdaLoRA init_r=12 target_r=8 (qkv)"),
        ("oft", "PEFT OFT oft_block_size=64 (qkv)"),
        ("bitfit", "BitFit"),
        ("adaptformer", "AdaptFormer b=16"),
        ("vpt_deep", "VPT-deep 32 prompts"),
        ("vpt_shallow", "VPT-shallow 50 prompts"),
    ],
)
def test_report_labels_name_the_method_and_its_key_settings(name, label):
    model = yaml.safe_load((PEFT_DIR / f"{name}.yaml").read_text())["model"]
    assert method_label(model["class_path"], model.get("init_args") or {}) == label


def test_a_checkpoint_rebuilds_the_peft_method(tmp_path, random_images):
    torch.manual_seed(0)
    module = PeftMethod(
        peft_config=peft.LoraConfig(r=2, target_modules=["qkv"], use_dora=True), num_classes=5, **TINY_ARGS
    )
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, random_images)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    loaded = load_method(tmp_path / "m.ckpt")
    assert isinstance(loaded, PeftMethod)
    x = torch.randn(3, 3, 32, 32)
    assert torch.equal(loaded.features(x), module.eval().features(x))
    assert loaded.hparams.peft_config == config_spec(module.peft_tuner.peft_config["default"])


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_every_shipped_peft_config_parses(name, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(PEFT_DIR / f"{name}.yaml"), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("ftforget.methods.")
    assert printed["trainer"]["logger"]["init_args"]["name"] == f"peft_{name}"
    if printed["model"]["class_path"] == "ftforget.methods.PeftMethod":
        assert printed["model"]["init_args"]["peft_config"]["class_path"].startswith("peft.")


def test_an_unknown_peft_option_fails_at_parsing(capsys):
    with pytest.raises(SystemExit) as info:
        main(
            [
                "fit",
                "--config",
                str(PEFT_DIR / "lora_qkv.yaml"),
                "--model.init_args.peft_config.init_args.rank",
                "4",
            ]
        )
    assert info.value.code == 2
    assert "rank" in capsys.readouterr().err


# ------------------------------------------------------------------------ export, attach, PEFT's format
NEW_METHODS = [
    *[(PeftMethod, {"peft_config": make}) for make in PEFT_TEST_CONFIGS.values()],
    (BitFit, {}),
    (SSF, {}),
    (AdaptFormer, {"bottleneck": 4}),
    (VisualPromptTuning, {"num_prompts": 3, "deep": True}),
    (VisualPromptTuning, {"num_prompts": 3, "deep": False}),
]


def _perturbed(cls, kwargs):
    """A method whose every trainable tensor moved away from its init (as after training), in eval mode."""
    module = _make(cls, **kwargs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn(p.shape, generator=g))
    return module.eval()


def _base_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # _make's seed: the same base weights
    return FullFineTuning(num_classes=5, **TINY_ARGS).backbone.state_dict()


@pytest.mark.parametrize(("cls", "kwargs"), NEW_METHODS, ids=[_id(c, kw) for c, kw in NEW_METHODS])
def test_export_then_attach_is_bit_identical(cls, kwargs):
    """ftforget's task file: the trainable tensors only; attached onto the base it computes the same logits
    (PEFT's base_layer, SSF's op, AdaptFormer's moved norm and VPT's block wrappers mapped back onto the
    base; VeRA's projections and AdaLoRA's rank numbers rebuilt by construction)."""
    module = _perturbed(cls, kwargs)
    base = _base_state()
    task = make_task(module, state_hash(base))
    assert set(task.tensors) == {n for n, p in module.named_parameters() if p.requires_grad}
    attached = attach_task(task, base)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(attached(x), module(x))


@pytest.mark.parametrize("name", sorted(PEFT_TEST_CONFIGS))
def test_peft_format_loads_with_peft_from_pretrained_bit_identical(name, tmp_path):
    module = _perturbed(PeftMethod, {"peft_config": PEFT_TEST_CONFIGS[name]})
    export_peft(module, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", HEAD_FILE} <= {
        p.name for p in (tmp_path / "adapter").iterdir()
    }
    torch.manual_seed(0)
    base = FullFineTuning(num_classes=5, **TINY_ARGS).backbone  # a plain timm model with the base weights
    peft_model, head = load_peft(tmp_path / "adapter", base)
    assert isinstance(peft_model, peft.PeftModel)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(head(peft_model(x)), module(x))


def test_peft_format_refuses_what_is_no_peft_adapter_of_the_original_weights(tmp_path):
    with pytest.raises(ValueError, match="not a PeftMethod"):
        export_peft(_make(BitFit), tmp_path / "a")
    pissa = _make(
        PeftMethod,
        peft_config=lambda: peft.LoraConfig(r=2, target_modules=["qkv"], init_lora_weights="pissa"),
    )
    with pytest.raises(ValueError, match="PiSSA"):
        export_peft(pissa, tmp_path / "b")


@pytest.mark.parametrize("name", PEFT_CONFIGS)
def test_every_demo_peft_config_parses_with_the_demos_common_settings(name, capsys):
    demo = ROOT / "configs" / "demo"
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(demo / "peft" / f"{name}.yaml"), "--config", str(demo / "common.yaml"), "--print_config"])  # fmt: skip
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"]["backbone_kwargs"]["depth"] == 4
    own = yaml.safe_load((demo / "peft" / f"{name}.yaml").read_text())
    assert printed["optimizer"]["init_args"]["lr"] == own["optimizer"]["init_args"]["lr"]  # 0.1 unless noted
    assert printed["trainer"]["max_steps"] == 500


# ------------------------------------------------------------------------------- intruder dimensions
def test_intruders_known_answer():
    """W0 = diag(6, 5, 4, 3, 2, 1); W1 adds 20 u e1^T with u = (e5 + e6) / sqrt 2: a new direction with the
    largest singular value, whose cosine with every singular vector of W0 (the standard basis) is between
    0.5 and 0.75: an intruder at epsilon 0.75, not at 0.5. Removing it leaves W1's other singular values."""
    n = 6
    w0 = torch.diag(torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    u = torch.zeros(n, dtype=torch.float64)
    u[4] = u[5] = 2**-0.5  # half in e5, half in e6: cosine 1/sqrt(2) with each
    v = torch.zeros(n, dtype=torch.float64)
    v[0] = 1.0
    w1 = w0 + 20.0 * torch.outer(u, v)
    strict = find_intruders(w0, w1, top_k=1, epsilon=0.5)
    loose = find_intruders(w0, w1, top_k=1, epsilon=0.75)
    assert strict.count == 0 and loose.indices == [0]
    # W0's singular vectors are the standard basis: the similarity is the largest entry of W1's top vector
    top = torch.linalg.svd(w1)[0][:, 0]
    assert loose.similarity[0] == pytest.approx(float(top.abs().max()), abs=1e-12)
    assert 0.5 < loose.similarity[0] < 0.75
    assert torch.equal(reduce_intruders(w0, w1, 1.0, top_k=1, epsilon=0.75), w1)
    removed = reduce_intruders(w0, w1, 0.0, top_k=1, epsilon=0.75)
    s1 = torch.linalg.svdvals(w1)
    torch.testing.assert_close(torch.linalg.svdvals(removed)[: n - 1], s1[1:], atol=1e-10, rtol=0)
    assert find_intruders(w0, w0).count == 0  # a weight is no intruder of itself


def test_layer_intruders_of_lora_cover_exactly_the_adapted_weights():
    start = _trained_peft(peft.LoraConfig(r=2, target_modules=["qkv"]), steps=0)
    end = _trained_peft(peft.LoraConfig(r=2, target_modules=["qkv"]), steps=3)
    found = layer_intruders(end, start, top_k=4, epsilon=0.5)
    depth = TINY_ARGS["backbone_kwargs"]["depth"]
    assert sorted(found) == [f"blocks.{i}.attn.qkv.weight" for i in range(depth)]  # the base's names
    assert all(len(f.similarity) == 4 for f in found.values())


SWITCHED = NEW_METHODS[:2] + NEW_METHODS[-5:]


@pytest.mark.parametrize(("cls", "kwargs"), SWITCHED, ids=[_id(c, kw) for c, kw in SWITCHED])
def test_the_multitask_model_switches_to_a_new_method_and_back_exactly(cls, kwargs):
    module = _perturbed(cls, kwargs)
    torch.manual_seed(0)
    base = FullFineTuning(num_classes=5, **TINY_ARGS).backbone.eval()
    reference = copy.deepcopy(base)
    multi = MultiTaskModel(base)
    multi.add_task("new", make_task(module, state_hash(base.state_dict())))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(multi(x, "new"), module(x))
        assert torch.equal(multi.features(x, None), reference(x))


def test_adalora_needs_its_total_step_to_be_the_fits_and_adds_its_orthogonality_penalty(
    tmp_path, random_images
):
    config = peft.AdaLoraConfig(init_r=4, target_r=2, total_step=5, target_modules=["qkv"])
    torch.manual_seed(0)
    module = PeftMethod(peft_config=config, num_classes=5, **TINY_ARGS)
    with pytest.raises(ValueError, match=r"total_step \(5\) must equal trainer.max_steps \(3\)"):
        quiet_trainer(tmp_path, max_steps=3, limit_val_batches=0).fit(module, random_images)
    logged = {}

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            logged.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    quiet_trainer(tmp_path, max_steps=5, limit_val_batches=0, callbacks=[Record()]).fit(module, random_images)
    assert logged["train/loss_orth"] > 0
    assert logged["train/loss"] == pytest.approx(
        logged["train/loss_ce"] + logged["train/loss_orth"], rel=1e-6
    )


@pytest.mark.parametrize("init", [False, "pissa"])
def test_adapters_that_do_not_start_at_zero_have_no_pretrained_context_and_a_lerp_knob(init):
    """A random (``false``) or PiSSA init is no identity: adapters off is not step 0, and the knob moves the
    adapter tensors themselves (a = 0 is the step-0 network exactly, scaling would not give it)."""
    make = lambda: peft.LoraConfig(r=2, target_modules=["qkv"], init_lora_weights=init)  # noqa: E731
    start, end = _trained_peft(make(), steps=0), _trained_peft(make(), steps=3)
    assert not end.starts_as_identity and end.pretrained_context() is None
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(knob_model(end, start, 0.0).features(x), start.eval().features(x))
        assert torch.equal(knob_model(end, start, 1.0).features(x), end.features(x))


def test_export_command_writes_peft_format_from_a_checkpoint(tmp_path, random_images, capsys):
    torch.manual_seed(0)
    module = PeftMethod(peft_config=peft.LoraConfig(r=2, target_modules=["qkv"]), num_classes=5, **TINY_ARGS)
    trainer = quiet_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, random_images)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    out = tmp_path / "adapter"
    assert (
        main(["export", "--ckpt_path", str(tmp_path / "m.ckpt"), "--format", "peft", "--output", str(out)])
        == 0
    )
    torch.manual_seed(0)
    peft_model, head = load_peft(out, FullFineTuning(num_classes=5, **TINY_ARGS).backbone)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(head(peft_model(x)), module.eval()(x))
    torch.manual_seed(0)
    bitfit = BitFit(num_classes=5, **TINY_ARGS)
    quiet_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(bitfit, random_images)
    bitfit.trainer.save_checkpoint(tmp_path / "b.ckpt")
    capsys.readouterr()
    assert (
        main(
            [
                "export",
                "--ckpt_path",
                str(tmp_path / "b.ckpt"),
                "--format",
                "peft",
                "--output",
                str(tmp_path / "b"),
            ]
        )
        == 2
    )
    assert "not a PeftMethod" in capsys.readouterr().err
