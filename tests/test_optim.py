"""Optimiser and schedule: the paper's recipe by default, any torch class from the CLI, exact learning rates."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from ftforget.backbones import build_backbone
from ftforget.cli import run_lightning
from ftforget.commands import main
from ftforget.methods import FullFineTuning, LoRA, warmup_cosine
from ftforget.methods.schedule import (
    DEFAULT_LR_SCHEDULER,
    DEFAULT_OPTIMIZER,
    WarmupCosine,
    build_lr_scheduler,
    build_optimizer,
    paper_recipe,
)
from tests.test_cli import CONFIGS, ROOT, tiny_overrides
from tests.tiny import TINY_ARGS

# The official recipe per table row (PAPER.md), as the configs held it before the optimiser moved to
# --optimizer/--lr_scheduler: (peak lr, warmup steps) of SGD momentum 0.9, weight decay 0, 10,000 steps.
PAPER_LR_WARMUP = {
    "full": (0.005, 500),
    "top3": (0.005, 500),
    "linear": (0.005, 100),
    "lora_r4": (0.05, 500),
    "lora": (0.005, 500),
    "lora_r16": (0.05, 500),
    "block_expansion_p1": (0.05, 500),
    "block_expansion_p2": (0.05, 500),
    "block_expansion": (0.05, 500),
    "block_expansion_p4": (0.05, 500),
}
DEMO = ROOT / "configs" / "demo"


def test_every_paper_config_has_its_recipe():
    assert {p.stem for p in CONFIGS} == set(PAPER_LR_WARMUP)


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_paper_configs_give_the_papers_learning_rate_at_every_step(config, tmp_path):
    """All 10,000 steps of every row: lr * warmup_cosine(step, warmup, 10,000), bit for bit."""
    lr, warmup = PAPER_LR_WARMUP[config.stem]
    args = tiny_overrides(tmp_path)
    for option in (
        "--trainer.max_steps",
        "--trainer.val_check_interval",
        "--lr_scheduler.init_args.warmup_steps",
    ):
        i = args.index(option)
        del args[i : i + 2]  # the configs' own steps and warmup
    cli = run_lightning(["--config", str(config), *args], run=False)
    model, trainer = cli.model, cli.trainer
    assert trainer.max_steps == 10_000
    model.trainer = trainer
    config_dict = model.configure_optimizers()
    optimizer, scheduler = config_dict["optimizer"], config_dict["lr_scheduler"]["scheduler"]
    assert config_dict["lr_scheduler"]["interval"] == "step"
    assert type(optimizer) is torch.optim.SGD and type(scheduler) is WarmupCosine
    [group] = optimizer.param_groups
    assert (group["momentum"], group["weight_decay"], group["nesterov"], group["dampening"]) == (
        0.9,
        0.0,
        False,
        0,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    lrs = []
    for _ in range(10_001):
        lrs.append(group["lr"])
        optimizer.step()  # no gradients: nothing changes but the step count the scheduler checks
        scheduler.step()
    assert lrs == [lr * warmup_cosine(step, warmup, 10_000) for step in range(10_001)]
    assert lrs[warmup] == lr and lrs[10_000] == 0.0


def test_frozen_parameters_never_enter_the_optimizer():
    module = LoRA(num_classes=5, r=2, **TINY_ARGS)
    trainable = [p for p in module.parameters() if p.requires_grad]
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert trainable and frozen

    class FakeTrainer:
        estimated_stepping_batches = 7

    module.trainer = FakeTrainer()  # type: ignore[assignment]
    optimizer = module.configure_optimizers()["optimizer"]
    assert [id(p) for g in optimizer.param_groups for p in g["params"]] == [id(p) for p in trainable]


def test_module_default_is_the_single_default_recipe():
    module = FullFineTuning(num_classes=5, **TINY_ARGS)
    assert module.hparams.optimizer == DEFAULT_OPTIMIZER
    assert module.hparams.lr_scheduler == DEFAULT_LR_SCHEDULER
    assert DEFAULT_OPTIMIZER == {
        "class_path": "torch.optim.SGD",
        "init_args": {"lr": 0.005, "momentum": 0.9, "weight_decay": 0.0},
    }
    assert DEFAULT_LR_SCHEDULER == {
        "class_path": "ftforget.methods.schedule.WarmupCosine",
        "init_args": {"warmup_steps": 500, "total_steps": None, "min_lr_ratio": 0.0},
    }
    module.hparams.optimizer["init_args"]["lr"] = 1.0  # the hyperparameters hold a copy
    assert DEFAULT_OPTIMIZER["init_args"]["lr"] == 0.005


def test_paper_recipe_overrides_only_lr_and_warmup():
    recipe = paper_recipe(lr=0.05, warmup_steps=0)
    assert recipe["optimizer"] == {
        "class_path": "torch.optim.SGD",
        "init_args": {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0},
    }
    assert recipe["lr_scheduler"]["init_args"] == {
        "warmup_steps": 0,
        "total_steps": None,
        "min_lr_ratio": 0.0,
    }
    assert paper_recipe() == {"optimizer": DEFAULT_OPTIMIZER, "lr_scheduler": DEFAULT_LR_SCHEDULER}


def test_warmup_cosine_scheduler_equals_the_formula_at_every_step():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.3)
    scheduler = WarmupCosine(optimizer, warmup_steps=5, total_steps=20, min_lr_ratio=0.1)
    lrs = []
    for _ in range(25):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == [0.3 * warmup_cosine(s, 5, 20, 0.1) for s in range(25)]
    assert lrs[0] == 0.0 and lrs[5] == 0.3 and lrs[20:] == [0.3 * 0.1] * 5


def test_total_steps_none_is_the_trainers_step_count():
    optimizer = build_optimizer(None, [torch.nn.Parameter(torch.zeros(1))])
    scheduler = build_lr_scheduler(None, optimizer, total_steps=1234)
    assert (scheduler.warmup_steps, scheduler.total_steps, scheduler.min_lr_ratio) == (500, 1234, 0.0)
    given = {"class_path": "ftforget.methods.schedule.WarmupCosine", "init_args": {"total_steps": 99}}
    assert build_lr_scheduler(given, optimizer, total_steps=1234).total_steps == 99
    onecycle = {"class_path": "torch.optim.lr_scheduler.OneCycleLR", "init_args": {"max_lr": 0.1}}
    assert build_lr_scheduler(onecycle, optimizer, total_steps=1234).total_steps == 1234


def test_fused_is_left_to_torch_off_cuda():
    params = [torch.nn.Parameter(torch.zeros(2))]
    assert build_optimizer(None, params).param_groups[0]["fused"] is None
    adamw = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}}
    assert build_optimizer(adamw, params).param_groups[0]["fused"] is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_on_cuda_unless_the_spec_says_otherwise():
    params = [torch.nn.Parameter(torch.zeros(2, device="cuda"))]
    assert build_optimizer(None, params).param_groups[0]["fused"] is True
    adamw = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.001}}
    assert build_optimizer(adamw, params).param_groups[0]["fused"] is True
    unfused = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "fused": False}}
    assert build_optimizer(unfused, params).param_groups[0]["fused"] is False
    foreach = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "foreach": True}}
    assert not build_optimizer(foreach, params).param_groups[0]["fused"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"optimizer": {"class_path": "torch.optim.NoSuchOptimizer"}},
            "optimizer: 'torch.optim.NoSuchOptimizer'",
        ),
        ({"optimizer": {"class_path": "torch.nn.Linear"}}, "not an importable subclass of Optimizer"),
        ({"optimizer": {"lr": 0.1}}, "optimizer must be a dict with 'class_path'"),
        (
            {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.1, "betas": [0.9, 0.9]}}},
            r"optimizer: SGD\(lr=0.1, betas=\[0.9, 0.9\]\) failed: .*betas",
        ),
        ({"lr_scheduler": {"class_path": "torch.optim.SGD"}}, "lr_scheduler: 'torch.optim.SGD' is not"),
        (paper_recipe(warmup_steps=-5), "lr_scheduler.warmup_steps must be >= 0, got -5"),
    ],
)
def test_bad_optimizer_or_scheduler_fails_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FullFineTuning(num_classes=5, **TINY_ARGS, **kwargs)


def test_bad_optimizer_name_on_the_command_line_is_named(capsys):
    with pytest.raises(SystemExit) as info:
        main(
            ["fit", "--config", str(ROOT / "configs/lora.yaml"), "--optimizer", "torch.optim.NoSuchOptimizer"]
        )
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert 'Parser key "optimizer"' in err and "torch.optim.NoSuchOptimizer" in err


def test_bad_optimizer_argument_on_the_command_line_is_named(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs/lora.yaml"), "--optimizer.betas", "[0.9, 0.99]"])
    assert info.value.code != 0
    assert "betas" in capsys.readouterr().err


def test_switching_the_optimizer_class_drops_the_arguments_it_does_not_take(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs/lora_r4.yaml"), "--optimizer", "torch.optim.AdamW",
              "--lr_scheduler", "torch.optim.lr_scheduler.ConstantLR", "--print_config"])  # fmt: skip
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    optimizer, scheduler = printed["optimizer"], printed["lr_scheduler"]
    assert optimizer["class_path"] == "torch.optim.AdamW"
    # lr_r4's lr and the recipe's weight_decay carry over; SGD's momentum is dropped, AdamW's betas appear
    assert (optimizer["init_args"]["lr"], optimizer["init_args"]["weight_decay"]) == (0.05, 0.0)
    assert "momentum" not in optimizer["init_args"] and optimizer["init_args"]["betas"] == [0.9, 0.999]
    assert scheduler["class_path"] == "torch.optim.lr_scheduler.ConstantLR"
    assert "warmup_steps" not in scheduler["init_args"]


def test_demo_fit_with_adamw_from_the_command_line(tmp_path):
    """`ftforget fit` with the demo configs and --optimizer torch.optim.AdamW --optimizer.lr 0.001 trains
    with AdamW at lr 0.001 (through the demo's warmup) over the trainable parameters, and saves that."""
    common = yaml.safe_load((DEMO / "common.yaml").read_text())["model"]["init_args"]
    weights = tmp_path / "pretrained.pth"
    torch.save(build_backbone(common["backbone"], **common["backbone_kwargs"]).state_dict(), weights)
    steps, lr_log, ckpt = 3, tmp_path / "lr.jsonl", tmp_path / "final.ckpt"
    cli = run_lightning(
        ["fit", "--config", str(DEMO / "lora.yaml"), "--config", str(DEMO / "common.yaml"),
         "--model.init_args.checkpoint", str(weights),
         "--optimizer", "torch.optim.AdamW", "--optimizer.lr", "0.001",
         "--trainer.max_steps", str(steps), "--trainer.callbacks.eval_at_steps=[0]",
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
         "--trainer.callbacks+=tests.helpers.LrRecorder", "--trainer.callbacks.path", str(lr_log)]
    )  # fmt: skip
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == steps
    [optimizer] = trainer.optimizers
    assert type(optimizer) is torch.optim.AdamW
    [group] = optimizer.param_groups
    assert (group["initial_lr"], group["weight_decay"], tuple(group["betas"])) == (0.001, 0.0, (0.9, 0.999))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert [id(p) for p in group["params"]] == [id(p) for p in trainable]
    assert all(len(optimizer.state[p]) for p in trainable)  # every trainable parameter took AdamW steps
    # the demo's warmup (20 steps) scales AdamW's peak lr step by step, exactly
    logged = [json.loads(line) for line in lr_log.read_text().splitlines()]
    assert logged == [{"step": s, "lr": 0.001 * warmup_cosine(s, 20, steps)} for s in range(steps)]

    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["hyper_parameters"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert saved["hyper_parameters"]["optimizer"]["init_args"]["lr"] == 0.001
    assert saved["hyper_parameters"]["optimizer"]["init_args"]["betas"] == [0.9, 0.999]  # plain YAML data
    [state] = saved["optimizer_states"]
    assert {"exp_avg", "exp_avg_sq"} <= set(state["state"][0]) and state["param_groups"][0][
        "initial_lr"
    ] == 0.001
    loaded = LoRA.load_from_checkpoint(ckpt)
    assert loaded.hparams.optimizer == model.hparams.optimizer
    assert loaded.hparams.lr_scheduler["init_args"]["warmup_steps"] == 20
