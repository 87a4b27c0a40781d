"""Every backbone family (DINO, DINOv2 with and without registers, MAE, CLIP, supervised, DeiT): its feature,
its original checkpoint format, every method's invariants on a tiny instance, exact ViT-B trainable counts on
the meta device, and its config add-on composed with every method config and dataset add-on."""

from __future__ import annotations

import copy
import functools
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from timm.models import get_pretrained_cfg
from torch import nn

from ftforget.adapters.lora import lora_modules
from ftforget.backbone_families import BY_KEY, FAMILIES, Family
from ftforget.backbones import CheckpointError, build_backbone, preprocessing
from ftforget.methods import BlockExpansion, FullFineTuning, LinearProbing, LoRA, TopKFineTuning
from tests.test_datasets import no_md5  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]
ADD_ONS = sorted((ROOT / "configs" / "backbones").glob("*.yaml"))
KEYS = [f.key for f in FAMILIES]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread; on a busy machine two threads' contention makes each op ~10x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_kwargs(family: Family, depth: int = 3) -> dict:
    return {**family.tiny, "depth": depth}


def randomised_state(family: Family, seed: int) -> dict[str, torch.Tensor]:
    """A tiny model's weights drawn like trained ones (LayerScale gammas, tokens and norms far from init),
    quantised to multiples of 2**-10 so that sums and differences of them are exact in float32."""
    torch.manual_seed(seed)
    model = build_backbone(family.timm_name, **tiny_kwargs(family))
    return {k: (torch.randn_like(v) * 0.3 * 1024).round() / 1024 for k, v in model.state_dict().items()}


def tiny_with(family: Family, state: dict[str, torch.Tensor]) -> nn.Module:
    model = build_backbone(family.timm_name, **tiny_kwargs(family))
    model.load_state_dict(state)
    return model.eval()


def images(family: Family, n: int = 2, seed: int = 0) -> torch.Tensor:
    side = family.tiny["img_size"]
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ structure and feature
def test_every_family_has_its_add_on_and_timm_knows_its_name():
    assert {p.stem for p in ADD_ONS} == set(KEYS)
    for family in FAMILIES:
        text = (ROOT / "configs" / "backbones" / f"{family.key}.yaml").read_text()
        assert f"backbone: {family.timm_name}\n" in text
        assert get_pretrained_cfg(family.timm_name) is not None, family.timm_name


@pytest.mark.parametrize("key", KEYS)
def test_tiny_instance_keeps_the_familys_structure_and_feature(key):
    family = BY_KEY[key]
    model = tiny_with(family, randomised_state(family, 0))
    dinov2, registers, clip = key.startswith("dinov2"), key.endswith("_reg"), key.startswith("clip")
    assert isinstance(model.blocks[0].ls1, LayerScale) == dinov2
    assert model.num_prefix_tokens == (5 if registers else 1) and model.no_embed_class == registers
    assert isinstance(model.norm_pre, nn.LayerNorm) == clip
    assert (model.patch_embed.proj.bias is None) == clip
    assert type(model.blocks[0].mlp.act).__name__ == ("QuickGELU" if clip else "GELU")
    x = images(family)
    tokens = model.forward_features(x)  # after the final norm: [CLS, registers..., patches]
    n_patches = (family.tiny["img_size"] // family.tiny["patch_size"]) ** 2
    assert tokens.shape[1] == model.num_prefix_tokens + n_patches
    # the feature is position 0, the CLS token, after the final norm: no register enters it
    assert torch.equal(model(x), tokens[:, 0])
    h = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    assert torch.equal(model(x), model.norm(model.blocks(h))[:, 0])
    assert preprocessing(model)["input_size"] == family.tiny["img_size"]


def test_preprocessing_follows_timms_pretrained_config():
    with torch.device("meta"):
        clip = build_backbone(BY_KEY["clip_vitb16"].timm_name)
        dinov2 = build_backbone(BY_KEY["dinov2_vitb14_reg"].timm_name)
        sup = build_backbone(BY_KEY["sup_in21k_vitb16"].timm_name)
        dinov2_224 = build_backbone(BY_KEY["dinov2_vitb14"].timm_name, img_size=224)
    assert preprocessing(clip) == {
        "input_size": 224, "mean": (0.48145466, 0.4578275, 0.40821073),
        "std": (0.26862954, 0.26130258, 0.27577711), "crop_pct": 0.9, "interpolation": "bicubic",
    }  # fmt: skip
    assert preprocessing(dinov2)["input_size"] == 518 and preprocessing(dinov2)["mean"] == (
        0.485,
        0.456,
        0.406,
    )
    assert preprocessing(sup)["mean"] == (0.5, 0.5, 0.5) == preprocessing(sup)["std"]
    assert preprocessing(dinov2_224)["input_size"] == 224  # an img_size override is the input size


# ------------------------------------------------------------------ original checkpoint formats
def to_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's DINOv2 keys back to the hub format; with registers, the CLS position is split out again."""
    out = {**state, "mask_token": torch.zeros(1, state["cls_token"].shape[-1])}
    if "reg_token" in state:
        cls_pos = (torch.randn(1, 1, state["cls_token"].shape[-1]) * 1024).round() / 4096
        out["register_tokens"] = out.pop("reg_token")
        out["cls_token"] = state["cls_token"] - cls_pos  # exact: multiples of 2**-12 of moderate size
        out["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    return out


def dinov2_tokens(original: dict[str, torch.Tensor], model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """DINOv2's own ``prepare_tokens_with_masks``: CLS, + positions, then registers after CLS."""
    patches = model.patch_embed(x)
    t = torch.cat([original["cls_token"].expand(len(x), -1, -1), patches], dim=1) + original["pos_embed"]
    if "register_tokens" in original:
        t = torch.cat([t[:, :1], original["register_tokens"].expand(len(x), -1, -1), t[:, 1:]], dim=1)
    return t


def to_openai_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's CLIP keys to OpenAI's ``visual.*`` layout, plus a text tower and the image projection."""
    renames = [("blocks.", "transformer.resblocks."), (".attn.qkv.", ".attn.in_proj_"),
               (".attn.proj.", ".attn.out_proj."), (".norm1.", ".ln_1."), (".norm2.", ".ln_2."),
               (".mlp.fc1.", ".mlp.c_fc."), (".mlp.fc2.", ".mlp.c_proj.")]  # fmt: skip
    top = {"patch_embed.proj.weight": "conv1.weight", "norm_pre.weight": "ln_pre.weight",
           "norm_pre.bias": "ln_pre.bias", "norm.weight": "ln_post.weight", "norm.bias": "ln_post.bias"}  # fmt: skip
    width = state["cls_token"].shape[-1]
    out = {"visual.proj": torch.randn(width, 16), "text_projection": torch.randn(width, 16),
           "token_embedding.weight": torch.randn(50, width), "positional_embedding": torch.randn(7, width),
           "transformer.resblocks.0.attn.in_proj_weight": torch.randn(3 * width, width),
           "ln_final.weight": torch.ones(width), "logit_scale": torch.tensor(4.6)}  # fmt: skip
    for key, value in state.items():
        if key == "cls_token":
            out["visual.class_embedding"] = value.reshape(-1)
        elif key == "pos_embed":
            out["visual.positional_embedding"] = value[0]
        elif key in top:
            out["visual." + top[key]] = value
        else:
            for old, new in renames:
                key = key.replace(old, new)
            out["visual." + key] = value
    return out


def clip_reference(v: dict[str, torch.Tensor], x: torch.Tensor, heads: int, depth: int) -> torch.Tensor:
    """OpenAI CLIP's ``VisionTransformer.forward`` up to ``ln_post(x[:, 0])``, written from its source with
    ``nn.MultiheadAttention``'s functional form and QuickGELU: independent of timm."""
    width = v["class_embedding"].shape[0]
    patch = v["conv1.weight"].shape[-1]
    ln = lambda t, name: F.layer_norm(t, (width,), v[f"{name}.weight"], v[f"{name}.bias"], eps=1e-5)  # noqa: E731
    t = F.conv2d(x, v["conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    t = torch.cat([v["class_embedding"].expand(len(x), 1, -1), t], dim=1) + v["positional_embedding"]
    t = ln(t, "ln_pre").transpose(0, 1)  # (tokens, batch, width), as CLIP's transformer
    for i in range(depth):
        p = f"transformer.resblocks.{i}"
        h = ln(t, f"{p}.ln_1")
        attn, _ = F.multi_head_attention_forward(
            h, h, h, width, heads, v[f"{p}.attn.in_proj_weight"], v[f"{p}.attn.in_proj_bias"], None, None,
            False, 0.0, v[f"{p}.attn.out_proj.weight"], v[f"{p}.attn.out_proj.bias"], need_weights=False,
        )  # fmt: skip
        t = t + attn
        h = F.linear(ln(t, f"{p}.ln_2"), v[f"{p}.mlp.c_fc.weight"], v[f"{p}.mlp.c_fc.bias"])
        t = t + F.linear(h * torch.sigmoid(1.702 * h), v[f"{p}.mlp.c_proj.weight"], v[f"{p}.mlp.c_proj.bias"])
    return ln(t.transpose(0, 1)[:, 0], "ln_post")


def to_mae(state: dict[str, torch.Tensor]) -> dict:
    """MAE's pretraining checkpoint: ``{"model": encoder + mask_token + decoder}``."""
    width = state["cls_token"].shape[-1]
    decoder = {"mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.randn(16, width),
               "decoder_pos_embed": torch.zeros(1, 17, 16), "decoder_blocks.0.norm1.weight": torch.ones(16),
               "decoder_norm.weight": torch.ones(16), "decoder_pred.weight": torch.randn(192, 16)}  # fmt: skip
    return {"model": {**state, **decoder}, "optimizer": {}, "epoch": 799}


FORMATS = {
    "dinov2_vits14": to_dinov2,
    "dinov2_vitb14_reg": to_dinov2,
    "mae_vitb16": to_mae,
    "clip_vitb16": to_openai_clip,
    "clip_visual_only": lambda s: {
        k[len("visual.") :]: v for k, v in to_openai_clip(s).items() if k.startswith("visual.")
    },
}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_original_format_loads_bit_identically(fmt, tmp_path):
    family = BY_KEY["clip_vitb16" if fmt.startswith("clip") else fmt]
    state = randomised_state(family, 1)
    original = FORMATS[fmt](state)
    path = tmp_path / "original.pth"
    torch.save(original, path)
    loaded = build_backbone(family.timm_name, checkpoint=path, **tiny_kwargs(family)).eval()
    source = tiny_with(family, state)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
    x = images(family)
    assert torch.equal(loaded(x), source(x))
    if fmt.startswith("dinov2"):  # the same tokens as DINOv2's own code builds from the hub weights
        assert torch.equal(loaded._pos_embed(loaded.patch_embed(x)), dinov2_tokens(original, loaded, x))
    if fmt == "clip_vitb16":  # and the same feature as OpenAI's forward, up to float rounding
        visual = {k[len("visual.") :]: v for k, v in original.items() if k.startswith("visual.")}
        expected = clip_reference(visual, x, heads=2, depth=3)
        assert torch.allclose(loaded(x), expected, atol=1e-5, rtol=0)


def test_openai_clip_torchscript_archive_loads(tmp_path):
    family = BY_KEY["clip_vitb16"]
    state = randomised_state(family, 2)

    class Holder(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    root = Holder()
    for key, value in to_openai_clip(state).items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if name not in module._modules:
                module.add_module(name, Holder())
            module = module._modules[name]
        module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
    path = tmp_path / "ViT-B-16.pt"
    torch.jit.script(root).save(str(path))
    loaded = build_backbone(family.timm_name, checkpoint=path, **tiny_kwargs(family)).eval()
    x = images(family)
    assert torch.equal(loaded(x), tiny_with(family, state)(x))


@pytest.mark.parametrize(
    ("key", "convert", "drop", "named"),
    [
        ("dinov2_vitb14_reg", to_dinov2, "blocks.1.ls2.gamma", "blocks.1.ls2.gamma"),
        ("clip_vitb16", to_openai_clip, "visual.transformer.resblocks.0.attn.in_proj_bias",
         "blocks.0.attn.qkv.bias"),
        ("mae_vitb16", to_mae, "norm.bias", "norm.bias"),
    ],
)  # fmt: skip
def test_original_format_errors_name_the_timm_keys(key, convert, drop, named, tmp_path):
    family = BY_KEY[key]
    original = convert(randomised_state(family, 3))
    (original["model"] if "model" in original else original).pop(drop)
    path = tmp_path / "broken.pth"
    torch.save(original, path)
    with pytest.raises(CheckpointError, match=rf"broken.pth.*\n  missing keys \(1\): {re.escape(named)}$"):
        build_backbone(family.timm_name, checkpoint=path, **tiny_kwargs(family))


# ------------------------------------------------------------------ every method on every family
def _methods(family: Family, checkpoint: Path) -> list[nn.Module]:
    common = {"num_classes": 4, "backbone": family.timm_name, "backbone_kwargs": tiny_kwargs(family),
              "checkpoint": str(checkpoint)}  # fmt: skip
    return [
        FullFineTuning(**common),
        TopKFineTuning(k=2, **common),
        LinearProbing(**common),
        LoRA(r=4, targets=["q", "v"], **common),
        BlockExpansion(positions=[0, 2], **common),
    ]


@pytest.mark.parametrize("key", KEYS)
def test_every_method_keeps_its_invariants_on_the_family(key, tmp_path):
    family = BY_KEY[key]
    path = tmp_path / "pretrained.pth"
    torch.save(randomised_state(family, 4), path)
    x, y = images(family, n=4, seed=1), torch.tensor([0, 1, 2, 3])
    pretrained = tiny_with(family, torch.load(path))
    for module in _methods(family, path):
        module.eval()  # no dropout: the steps are deterministic
        name = type(module).__name__
        if isinstance(module, (LoRA, BlockExpansion)):  # identity at initialisation
            assert torch.equal(module.features(x), pretrained(x)), name
        before = copy.deepcopy(module.state_dict())
        trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.5)
        for _ in range(
            3
        ):  # zero-initialised LoRA B / Block Expansion projections: A and the rest move from step 2
            optimizer.zero_grad()
            F.cross_entropy(module(x), y).backward()
            optimizer.step()
        after = module.state_dict()
        changed = {n for n, p in module.named_parameters() if not torch.equal(before[n], after[n])}
        assert changed == trainable, (name, sorted(trainable ^ changed))
        frozen = [n for n in after if n not in trainable]
        assert all(torch.equal(before[n], after[n]) for n in frozen), name
        if isinstance(module, LoRA):
            unmerged = module.features(x)
            with module.merged():
                assert torch.allclose(module.features(x), unmerged, atol=1e-5, rtol=0), name
            assert all(torch.equal(before[n], module.state_dict()[n]) for n in frozen), name
            assert len(list(lora_modules(module))) == 3  # one per block, on the fused qkv


# ------------------------------------------------------------------ exact ViT-B trainable counts
def closed_form(family: Family, method: str, classes: int = 100) -> int:
    """Trainable parameters of a ViT-B family from its architecture alone (width 768, 12 blocks, MLP 4x)."""
    cfg = get_pretrained_cfg(family.timm_name)
    d, depth, patch = 768, 12, int(re.search(r"patch(\d+)", family.timm_name).group(1))
    key = family.key
    layer_scale, registers, clip = key.startswith("dinov2"), key.endswith("_reg"), key.startswith("clip")
    block = 12 * d * d + 13 * d + (2 * d if layer_scale else 0)  # qkv, proj, fc1, fc2 (+ biases), 2 norms
    grid = (cfg.input_size[-1] // patch) ** 2
    embed = d * 3 * patch * patch + (0 if clip else d) + d + (grid + (0 if registers else 1)) * d
    embed += (4 * d if registers else 0) + (2 * d if clip else 0)  # register tokens; CLIP's ln_pre
    head = d * classes + classes
    return {
        "full": embed + depth * block + 2 * d + head,
        "top3": 3 * block + head,
        "linear": head,
        "lora_r8": depth * 2 * 8 * (d + d) + head,  # r x (in + out) for each of q and v
        "block_expansion_p3": 3 * block + head,
    }[method]


VIT_B = [f.key for f in FAMILIES if "base" in f.timm_name]
BUILD = {
    "full": lambda **kw: FullFineTuning(**kw),
    "top3": lambda **kw: TopKFineTuning(k=3, **kw),
    "linear": lambda **kw: LinearProbing(**kw),
    "lora_r8": lambda **kw: LoRA(r=8, **kw),
    "block_expansion_p3": lambda **kw: BlockExpansion(p=3, **kw),
}


@pytest.mark.parametrize("key", VIT_B)
def test_vit_b_trainable_counts_are_exact_on_the_meta_device(key):
    family = BY_KEY[key]
    for method, build in BUILD.items():
        with torch.device("meta"):
            module = build(num_classes=100, backbone=family.timm_name)
        assert module.parameter_counts()[0] == closed_form(family, method), (key, method)
    assert closed_form(BY_KEY["dino_vitb16"], "lora_r8") == 371_812  # the paper's count
    assert closed_form(BY_KEY["dino_vitb16"], "full") == 85_875_556


# ------------------------------------------------------------------ config add-ons: the matrix and fits
METHOD_CONFIGS = sorted(
    p for p in (ROOT / "configs").glob("*.yaml") if p.stem not in ("forgetting", "defaults")
)
DATA_ADD_ONS = sorted((ROOT / "configs" / "data").glob("*.yaml"))


@pytest.fixture(scope="module")
def parser():
    """The ``ftforget fit`` parser, built once: parsing a combination instantiates nothing."""
    from ftforget.cli import FTForgetCLI
    from ftforget.data.base import FineTuneDataModule
    from ftforget.methods.base import FineTuningModule
    from ftforget.resources import defaults_config

    class Built(Exception):
        pass

    class ParserOnly(FTForgetCLI):
        def parse_arguments(self, parser, args):
            raise Built(parser)

    with pytest.raises(Built) as info:
        ParserOnly(FineTuningModule, FineTuneDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   parser_kwargs={"default_config_files": [str(defaults_config())]}, args=[], run=False,
                   auto_configure_optimizers=False)  # fmt: skip
    return info.value.args[0]


@functools.cache
def _alone(parser, path: Path):
    return parser.parse_args(["--config", str(path)])


def _check_composed(parser, method: Path, data: Path, backbone: Path) -> None:
    cfg = parser.parse_args(["--config", str(method), "--config", str(data), "--config", str(backbone)])
    method_cfg, data_cfg = _alone(parser, method), _alone(parser, data)
    family = BY_KEY[backbone.stem]
    assert cfg.model.class_path == method_cfg.model.class_path
    assert cfg.model.init_args.backbone == cfg.data.init_args.backbone == family.timm_name  # linked
    assert (
        cfg.data.class_path == data_cfg.data.class_path
        and cfg.data.init_args.root == data_cfg.data.init_args.root
    )
    assert (cfg.data.init_args.image_size, cfg.data.init_args.normalization) == (None, "backbone")
    for arg, value in vars(method_cfg.model.init_args).items():  # the method's own settings survive
        if arg != "backbone":
            assert getattr(cfg.model.init_args, arg) == value, (method.stem, arg)


def test_every_backbone_add_on_composes_with_a_method_and_a_dataset(parser):
    for i, backbone in enumerate(ADD_ONS):
        _check_composed(
            parser, METHOD_CONFIGS[i % len(METHOD_CONFIGS)], DATA_ADD_ONS[i % len(DATA_ADD_ONS)], backbone
        )


@pytest.mark.slow
def test_config_matrix_covers_every_pair(parser):
    """Every (method config, backbone add-on) pair, with the dataset add-on rotating so that every (dataset,
    backbone) and every (method, dataset) pair occurs too: method configs set only model and optimizer
    keys, dataset add-ons only data keys, backbone add-ons model.init_args.backbone and the data's
    image_size/normalization, so every interaction between two files is a pair parsed here."""
    seen = set()
    for m, method in enumerate(METHOD_CONFIGS):
        for b, backbone in enumerate(ADD_ONS):
            data = DATA_ADD_ONS[(m + b) % len(DATA_ADD_ONS)]
            _check_composed(parser, method, data, backbone)
            seen |= {("md", method.stem, data.stem), ("db", data.stem, backbone.stem)}
    assert len(seen) == len(METHOD_CONFIGS) * len(DATA_ADD_ONS) + len(DATA_ADD_ONS) * len(ADD_ONS)


#: (family, method config, dataset add-on) of the 2-step fits: every family once, every method, 3 fast
FITS = [
    ("dinov2_vitb14_reg", "block_expansion", "imagefolder"),
    ("clip_vitb16", "lora", "imagefolder"),
    ("mae_vitb16", "top3", "cifar10"),
    *[
        (key, ("full", "linear", "lora", "top3", "block_expansion")[i % 5], "imagefolder")
        for i, key in enumerate(
            k for k in KEYS if k not in ("dinov2_vitb14_reg", "clip_vitb16", "mae_vitb16")
        )
    ],
]


@pytest.mark.parametrize(
    ("key", "method", "data"),
    [pytest.param(*fit, marks=[pytest.mark.slow] if i >= 3 else []) for i, fit in enumerate(FITS)],
    ids=[f"{k}-{m}" for k, m, _ in FITS],
)
@pytest.mark.usefixtures("no_md5")
def test_two_step_fit_of_a_tiny_family(key, method, data, tmp_path, caplog):
    from ftforget.cli import run_lightning
    from tests.helpers import tiny_trainer_options
    from tests.test_datasets import SETS

    family = BY_KEY[key]
    root = tmp_path / data
    SETS[data][1](root)
    options = {
        "model.init_args.pretrained": "false",
        "model.init_args.backbone_kwargs": json.dumps(tiny_kwargs(family)),
        "lr_scheduler.init_args.warmup_steps": "1",
        "data.init_args.root": str(root),
        "data.init_args.batch_size": "4",
        "data.init_args.num_workers": "0",
        "data.init_args.val_size": "5",
        **tiny_trainer_options(tmp_path, 2),
    }
    configs = [ROOT / "configs" / f"{method}.yaml", ROOT / "configs" / "data" / f"{data}.yaml"]
    configs.append(ROOT / "configs" / "backbones" / f"{key}.yaml")
    argv = ["fit", *[a for c in configs for a in ("--config", str(c))]]
    with caplog.at_level(logging.INFO):
        cli = run_lightning(argv + [a for k, v in options.items() for a in (f"--{k}", v)])
    assert cli.trainer.global_step == 2 and "val/acc1" in cli.trainer.callback_metrics
    trainable, total = cli.model.parameter_counts()
    assert f": {trainable:,} trainable parameters of {total:,} " in caplog.text
    assert f"on backbone {family.timm_name}" in caplog.text
    assert cli.datamodule.input_side() == family.tiny["img_size"]  # image_size null: the built model's
    mean, std = get_pretrained_cfg(family.timm_name).mean, get_pretrained_cfg(family.timm_name).std
    assert cli.datamodule.normalization_stats() == (tuple(mean), tuple(std))


# ------------------------------------------------------------------ the README's tables and command
def _stats_name(mean, std) -> str:
    named = {(0.485, 0.456, 0.406): "ImageNet", (0.48145466, 0.4578275, 0.40821073): "CLIP (OpenAI)"}
    if tuple(mean) == tuple(std) == (0.5, 0.5, 0.5):
        return "0.5 / 0.5"
    return named[tuple(mean)]


def family_row(family: Family) -> str:
    """The README row of a family, from the family table and timm's pretrained config."""
    cfg = get_pretrained_cfg(family.timm_name)
    return (
        f"| `{family.key}.yaml` | {family.title} | `{family.timm_name}` | {cfg.input_size[-1]} | "
        f"{_stats_name(cfg.mean, cfg.std)} | {cfg.interpolation}, crop {cfg.crop_pct} | {family.feature} | "
        f"{family.original_format or '-'} |"
    )


def test_readme_tables_match_the_families_and_timms_configs():
    readme = (ROOT / "README.md").read_text()
    for family in FAMILIES:
        assert family_row(family) in readme, family_row(family)
    for key in VIT_B:
        family = BY_KEY[key]
        cells = " | ".join(f"{closed_form(family, m):,}" for m in BUILD)
        assert f"| {family.title} | {cells} |" in readme, family.title


def test_readme_backbone_command_parses(capsys):
    from ftforget.commands import main
    from tests.test_readme import commands, in_tmp, section

    found = commands(section("Backbones"))
    assert found and all("configs/backbones/" in " ".join(c) for c in found)
    for args in found:
        with pytest.raises(SystemExit) as info:
            main([*in_tmp(args, Path("/nonexistent")), "--print_config"])
        assert info.value.code == 0
        printed = capsys.readouterr().out
        assert "normalization: backbone" in printed and "image_size: null" in printed


# ------------------------------------------------------------------ the probe and the data follow the backbone
@pytest.mark.parametrize("cached", [False, True], ids=["jpeg", "pixel-cache"])
def test_imagenet_probe_normalises_with_the_backbones_stats(tmp_path, cached):
    from PIL import Image

    from ftforget.data.imagenet import ImageNetProbe
    from ftforget.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
    from tests.test_imagenet_probe import WNIDS, make_tree

    root = make_tree(tmp_path / "imagenet", n_train=2, n_val=1)
    with torch.device("meta"):
        stats = preprocessing(build_backbone(BY_KEY["clip_vitb16"].timm_name))
    cache = {"pixel_cache_dir": str(tmp_path / "pixels")} if cached else {}
    probes = {}
    for normalization in ("backbone", "imagenet"):
        probe = ImageNetProbe(root=str(root), normalization=normalization, **cache)
        probe.match_input_size(32)
        probe.match_normalization(stats["mean"], stats["std"])
        probe.setup()
        probes[normalization] = probe
    pixels = Image.open(root / "train" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG").convert("RGB")
    clip = eval_transform(round(32 * 256 / 224), 32, stats["mean"], stats["std"])(pixels)
    imagenet = eval_transform(round(32 * 256 / 224), 32, IMAGENET_MEAN, IMAGENET_STD)(pixels)
    assert not torch.equal(clip, imagenet)
    assert torch.equal(probes["backbone"].bank_dataset()[1][0], clip)
    assert torch.equal(probes["imagenet"].bank_dataset()[1][0], imagenet)  # pinned to ImageNet's
    assert probes["backbone"].cache_key() != probes["imagenet"].cache_key()
    with pytest.raises(RuntimeError, match="before setup"):
        probes["backbone"].match_normalization(IMAGENET_MEAN, IMAGENET_STD)


def test_data_image_size_null_follows_the_model_then_timms_config(tmp_path):
    from ftforget.data import ImageFolderDataModule
    from tests.test_datasets import write_image_folder

    write_image_folder(tmp_path)
    common = {"root": str(tmp_path), "num_workers": 0, "val_size": 2, "image_size": None}
    dm = ImageFolderDataModule(backbone=BY_KEY["dinov2_vits14"].timm_name, **common)
    assert dm.input_side() == 518  # timm's pretrained config
    dm.match_input_size(28)  # what ftforget fit tells it: the built model's
    dm.setup("fit")
    assert dm.input_side() == 28 and dm.dataset("train")[0][0].shape == (3, 28, 28)
    with pytest.raises(ValueError, match="data.image_size=null .*data.backbone='no_such_vit'"):
        ImageFolderDataModule(backbone="no_such_vit", **common).input_side()


def test_forgetting_callback_tells_the_probe_the_backbones_input_and_stats(tmp_path):
    from ftforget.data.imagenet import ImageNetProbe
    from ftforget.forgetting import ForgettingCallback, KNNConfig
    from tests.test_imagenet_probe import make_tree

    family = BY_KEY["clip_vitb16"]
    probe = ImageNetProbe(root=str(make_tree(tmp_path, n_train=2, n_val=1)))
    callback = ForgettingCallback(probe=probe, knn=KNNConfig(k=[1]), new_task_val=False)
    module = LoRA(num_classes=3, backbone=family.timm_name, backbone_kwargs=tiny_kwargs(family))
    callback.check_inputs(None, module, "fit")
    cfg = get_pretrained_cfg(family.timm_name)
    assert (probe.mean, probe.std, probe.crop_size) == (tuple(cfg.mean), tuple(cfg.std), 32)


def test_dinov2_hub_weights_of_another_size_load_with_the_patch_positions_resampled(tmp_path):
    """DINOv2's 518 px weights fine-tuned at 224 px, in miniature: 56 px hub weights into a 28 px model."""
    from timm.layers import resample_abs_pos_embed

    family = BY_KEY["dinov2_vits14_reg"]
    torch.manual_seed(6)
    large = build_backbone(family.timm_name, **{**tiny_kwargs(family), "img_size": 56})
    state = {k: (v * 1024).round() / 1024 for k, v in large.state_dict().items()}
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(to_dinov2(state), path)
    loaded = build_backbone(family.timm_name, checkpoint=path, **tiny_kwargs(family))
    assert torch.equal(loaded.cls_token.detach(), state["cls_token"])  # registers' layout: no CLS position
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=(4, 4), num_prefix_tokens=0)
    assert loaded.pos_embed.shape == (1, 16, 32) and torch.equal(loaded.pos_embed.detach(), expected)


def _keys(path: Path) -> set[str]:
    """The dotted keys a YAML config file sets (lists are leaves)."""
    import yaml

    def walk(node, prefix):
        if isinstance(node, dict):
            return set().union(*(walk(v, f"{prefix}{k}.") for k, v in node.items())) if node else set()
        return {prefix[:-1]}

    return walk(yaml.safe_load(path.read_text()) or {}, "")


def test_the_three_kinds_of_config_set_disjoint_keys():
    """Why the pairs parsed above cover every (method, dataset, backbone) triple: a method config sets no data
    key, a dataset add-on no model key, and a backbone add-on only the backbone's name and the two data keys
    it decides (``image_size``, ``normalization``: it comes last and wins, as the README says)."""
    backbone_keys = {"model.init_args.backbone", "data.init_args.image_size", "data.init_args.normalization"}
    for path in ADD_ONS:
        assert _keys(path) == backbone_keys, path.name
    for path in DATA_ADD_ONS:
        assert all(k.startswith("data.") for k in _keys(path)), path.name
    for path in METHOD_CONFIGS:
        keys = _keys(path)
        assert not any(k.startswith("data.") for k in keys) and "model.init_args.backbone" not in keys, (
            path.name
        )
