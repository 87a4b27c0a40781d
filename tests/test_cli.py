"""The ftforget command line: every config parses, every method fits, checkpoints load and resume, bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ftforget.backbones import build_backbone
from ftforget.cli import run_lightning
from ftforget.commands import main
from ftforget.methods import LoRA, warmup_cosine
from tests.helpers import tiny_trainer_options

ROOT = Path(__file__).resolve().parents[1]
# one config per method and table row; configs/forgetting.yaml is an add-on (a second --config) and
# configs/defaults.yaml the shared recipe every run starts from
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.stem not in ("forgetting", "defaults"))
# 12 blocks so that every shipped config (p=1..4, positions [10]) applies as written
TINY12 = '{"depth": 12, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8}'


def tiny_overrides(tmp_path: Path, steps: int = 2) -> list[str]:
    options = {
        "model.init_args.backbone": "vit_base_patch16_224",
        "model.init_args.pretrained": "false",
        "model.init_args.backbone_kwargs": TINY12,
        "lr_scheduler.init_args.warmup_steps": "1",
        "data": "ftforget.data.digits.DigitsDataModule",
        # jsonargparse carries init_args that the new data class also has over from the default class
        "data.init_args.batch_size": "16",
        "data.init_args.num_workers": "0",
        "data.init_args.image_size": "32",
        **tiny_trainer_options(tmp_path, steps),
    }
    return [item for key, value in options.items() for item in (f"--{key}", value)]


def test_configs_exist_for_every_table_row():
    names = {p.stem for p in CONFIGS}
    assert {"full", "top3", "linear", "lora_r4", "lora", "lora_r16"} <= names
    assert {"block_expansion_p1", "block_expansion_p2", "block_expansion", "block_expansion_p4"} <= names


@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(config), "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("ftforget.methods.")
    assert printed["data"]["class_path"] == "ftforget.data.CIFAR100DataModule"
    assert printed["trainer"]["max_steps"] == 10_000
    assert printed["data"]["init_args"]["batch_size"] == 128
    # the shared recipe comes from configs/defaults.yaml, the run's name from the method's file
    init_args, logger = printed["model"]["init_args"], printed["trainer"]["logger"]["init_args"]
    assert (init_args["backbone"], init_args["pretrained"]) == ("vit_base_patch16_224.dino", True)
    assert logger["save_dir"] == "runs" and logger["name"].startswith(config.stem.split("_")[0])


def test_defaults_alone_are_the_papers_full_fine_tuning(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--print_config"])
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "ftforget.methods.FullFineTuning"
    assert printed["model"]["init_args"]["pretrained"] is True
    optimizer, trainer = printed["optimizer"], printed["trainer"]
    assert optimizer["class_path"] == "torch.optim.SGD"
    assert (optimizer["init_args"]["lr"], optimizer["init_args"]["momentum"]) == (0.005, 0.9)
    assert printed["lr_scheduler"]["init_args"]["warmup_steps"] == 500
    assert (trainer["max_steps"], trainer["logger"]["init_args"]["name"]) == (10_000, "ftforget")


def test_forgetting_addon_parses_with_a_method_config(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs/lora.yaml"), "--config", str(ROOT / "configs/forgetting.yaml"),
              "--print_config"])  # fmt: skip
    assert info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"] == "ftforget.methods.LoRA"
    assert printed["data"]["init_args"]["probe"]["class_path"] == "ftforget.data.imagenet.ImageNetProbe"
    [callback] = printed["trainer"]["callbacks"]
    assert callback["class_path"] == "ftforget.forgetting.ForgettingCallback"
    assert callback["init_args"]["knn"]["k"] == [20, 10, 100, 200]


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_short_fit_of_every_config_with_overrides_only(config, tmp_path):
    cli = run_lightning(["fit", "--config", str(config), *tiny_overrides(tmp_path)])
    assert cli.trainer.global_step == 2
    run_dir = Path(cli.trainer.log_dir)
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert "val/acc1" in cli.trainer.callback_metrics


def test_fit_prints_the_trainable_count(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        run_lightning(
            ["fit", "--config", str(ROOT / "configs/lora_r4.yaml"), *tiny_overrides(tmp_path, steps=1)]
        )
    # 12 blocks x 2 (q, v) x 2 x 32 x r=4 + head 32 x 5 + 5
    assert "LoRA: 6,309 trainable parameters" in caplog.text


def test_checkpoint_loads_back_and_test_reproduces_outputs(tmp_path):
    weights = tmp_path / "pretrained.pth"
    torch.save(build_backbone("vit_base_patch16_224", **json.loads(TINY12)).state_dict(), weights)
    cli = run_lightning(
        ["fit", "--config", str(ROOT / "configs/lora.yaml"), *tiny_overrides(tmp_path, steps=3),
         "--model.init_args.checkpoint", str(weights)]
    )  # fmt: skip
    run_dir = Path(cli.trainer.log_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    trained = cli.model.eval()
    assert trained.hparams.checkpoint == str(weights)  # the live run keeps its provenance
    weights.unlink()  # the state dict holds every weight: loading needs neither this file nor a download
    loaded = LoRA.load_from_checkpoint(last).eval()
    assert (loaded.hparams.checkpoint, loaded.hparams.pretrained) == (None, False)
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(trained(x), loaded(x))
    assert all(
        torch.equal(a, b)
        for a, b in zip(trained.state_dict().values(), loaded.state_dict().values(), strict=True)
    )

    tested = run_lightning(["test", "--config", str(run_dir / "config.yaml"), "--ckpt_path", str(last)])
    dm = tested.datamodule
    correct = total = 0
    with torch.no_grad():
        for images, labels in dm.test_dataloader():
            correct += int((loaded(images).argmax(1) == labels).sum())
            total += len(labels)
    assert tested.trainer.callback_metrics["test/acc1"].item() == pytest.approx(correct / total, abs=1e-7)


def test_resume_continues_step_count_and_schedule(tmp_path):
    steps, stop = 6, 3
    common = [*tiny_overrides(tmp_path, steps=steps), "--lr_scheduler.init_args.warmup_steps", "2"]

    def fit(lr_log: Path, *extra: str):
        record = ["--trainer.callbacks+=tests.helpers.LrRecorder", "--trainer.callbacks.path", str(lr_log)]
        return run_lightning(["fit", "--config", str(ROOT / "configs/full.yaml"), *common, *record, *extra])

    straight, interrupted, resumed = (tmp_path / f"{n}.jsonl" for n in ("straight", "interrupted", "resumed"))
    ckpt = tmp_path / "crash.ckpt"
    fit(straight)
    fit(interrupted, "--trainer.callbacks+=tests.helpers.StopAfter", "--trainer.callbacks.step", str(stop),
        "--trainer.callbacks.path", str(ckpt))  # fmt: skip
    cli = fit(resumed, "--ckpt_path", str(ckpt))
    assert cli.trainer.global_step == steps
    read = lambda p: [json.loads(line) for line in p.read_text().splitlines()]  # noqa: E731
    expected = [{"step": s, "lr": 0.005 * warmup_cosine(s, 2, steps)} for s in range(steps)]
    assert read(straight) == expected
    assert read(interrupted) == expected[:stop]
    assert read(resumed) == expected[stop:]


def test_unknown_method_argument_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "configs/lora.yaml"), "--model.init_args.rank", "4"])
    assert info.value.code != 0
    assert "rank" in capsys.readouterr().err


def test_missing_dataset_fails_before_training_naming_the_path(tmp_path, capsys):
    missing = tmp_path / "no_cifar_here"
    args = tiny_overrides(tmp_path)
    args[args.index("--data") + 1] = "ftforget.data.CIFAR100DataModule"
    code = main(
        ["fit", "--config", str(ROOT / "configs/linear.yaml"), *args, "--data.init_args.root", str(missing)]
    )
    assert code == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("ftforget fit: error:")]
    assert "no_cifar_here" in line and "--data.download true" in line
    assert "Traceback" not in err
    # Nothing was written: no run directory, no checkpoint.
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*"))


def test_wrong_backbone_checkpoint_is_named(tmp_path, capsys):
    wrong = tmp_path / "wrong_model.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 64)}, wrong)
    argv = ["fit", "--config", str(ROOT / "configs/full.yaml"), *tiny_overrides(tmp_path)]
    assert main([*argv, "--model.init_args.checkpoint", str(wrong)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.search(r"wrong_model.pth' does not match the backbone", line)


@pytest.mark.slow
def test_two_process_cpu_ddp_keeps_trainable_weights_identical(tmp_path):
    out = tmp_path / "weights"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "ftforget",
        "fit",
        "--config",
        str(ROOT / "configs/block_expansion.yaml"),
        *tiny_overrides(tmp_path, steps=3),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--trainer.callbacks+=tests.helpers.DumpTrainable",
        "--trainer.callbacks.out_dir",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(out / f"rank{r}.pt") for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [3, 3]
    a, b = ranks[0]["state"], ranks[1]["state"]
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "trainable parameters" in proc.stdout + proc.stderr


def test_extra_commands_report_bad_input_without_a_traceback(tmp_path, capsys):
    assert main(["measure", "--ckpt_path", str(tmp_path / "nope.ckpt"), "--probe.root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ftforget measure: error: ") and "nope.ckpt" in err and "Traceback" not in err
