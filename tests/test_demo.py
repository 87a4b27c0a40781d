"""``ftforget demo``: its configs, the cached pretraining, and one end-to-end run in miniature."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ftforget import demo
from ftforget.backbones import build_backbone
from ftforget.commands import demo as demo_command
from ftforget.commands import main as cli_main
from ftforget.forgetting.config import eval_steps_until
from ftforget.report import read_csv
from tests.tiny import MINI

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "demo"


def tiny_settings(**changes: object) -> demo.PretrainSettings:
    base = demo.PretrainSettings("vit_base_patch16_224", MINI, [0, 1, 2], 16, 0, steps=2, batch_size=8)
    return dataclasses.replace(base, **changes)


def test_eval_steps_are_log_spaced_and_end_at_the_last_step() -> None:
    assert eval_steps_until(300) == [0, 1, 2, 5, 10, 20, 50, 100, 200, 300]
    assert eval_steps_until(12) == [0, 1, 2, 5, 10, 12]
    assert eval_steps_until(1) == [0, 1]


@pytest.mark.parametrize("method", demo.METHODS)
def test_every_demo_config_parses_with_the_shared_one(
    method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli_main(
            [
                "fit",
                "--config",
                str(CONFIG_DIR / f"{method}.yaml"),
                "--config",
                str(CONFIG_DIR / "common.yaml"),
            ]
            + ["--print_config"]
        )
    assert info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"].startswith("ftforget.methods.")
    assert config["model"]["init_args"]["backbone_kwargs"]["embed_dim"] == 64
    assert config["data"]["class_path"] == "ftforget.data.digits.DigitsDataModule"
    # Set explicitly: nothing of the default CIFAR-100 data module is carried over.
    assert (config["data"]["init_args"]["image_size"], config["data"]["init_args"]["batch_size"]) == (32, 64)
    assert config["trainer"]["logger"]["init_args"]["name"] == method
    (callback,) = config["trainer"]["callbacks"]
    assert callback["class_path"] == "ftforget.forgetting.ForgettingCallback"
    # The YAML's measurement steps are the ones the demo computes for the YAML's step count.
    assert callback["init_args"]["eval_at_steps"] == eval_steps_until(config["trainer"]["max_steps"])


def test_pretrain_settings_come_from_the_shared_config() -> None:
    args = demo_command._parser().parse_args(["--pretrain-steps", "7", "--seed", "3"])
    settings = demo.pretrain_settings(CONFIG_DIR, args)
    common = yaml.safe_load((CONFIG_DIR / "common.yaml").read_text())
    assert settings.backbone_kwargs == common["model"]["init_args"]["backbone_kwargs"]
    assert settings.old_digits == common["data"]["init_args"]["old_digits"]
    assert (settings.steps, settings.seed, settings.image_size) == (7, 3, 32)


def test_pretraining_is_cached_by_its_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = demo.pretrained_backbone(tiny_settings(), tmp_path)
    assert path.is_file() and path.with_suffix(".json").is_file()
    state = torch.load(path, weights_only=True)
    # A timm-format state dict that the backbone factory loads strictly.
    loaded = build_backbone("vit_base_patch16_224", checkpoint=path, **MINI).state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    def no_pretraining(settings: demo.PretrainSettings) -> None:
        raise AssertionError("the cached backbone should have been reused")

    monkeypatch.setattr(demo, "pretrain", no_pretraining)
    assert demo.pretrained_backbone(tiny_settings(), tmp_path) == path
    for changed in (tiny_settings(steps=3), tiny_settings(seed=1), tiny_settings(old_digits=[0, 1])):
        assert changed.key() != tiny_settings().key()


def test_pretraining_asked_for_at_once_runs_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Array tasks (and the ranks of one task) that start together: one pretrains, the others wait and reuse."""
    import threading

    calls: list[int] = []

    def slow_pretraining(settings: demo.PretrainSettings) -> tuple[dict, float]:
        calls.append(threading.get_ident())
        time.sleep(0.5)  # long enough for every other caller to arrive while it runs
        return {"w": torch.arange(4.0)}, 1.0

    monkeypatch.setattr(demo, "pretrain", slow_pretraining)
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda: paths.append(demo.pretrained_backbone(tiny_settings(), tmp_path)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(calls) == 1 and len(paths) == 3 and len(set(paths)) == 1
    assert torch.equal(torch.load(paths[0], weights_only=True)["w"], torch.arange(4.0))
    assert json.loads(paths[0].with_suffix(".json").read_text())["bank_acc1"] == 1.0


def test_pretraining_is_deterministic_and_trains() -> None:
    settings = tiny_settings(steps=3)
    first, _ = demo.pretrain(settings)
    second, _ = demo.pretrain(settings)
    assert all(torch.equal(first[k], second[k]) for k in first)
    torch.manual_seed(
        settings.seed
    )  # pretrain() seeds, then builds the backbone: these are its initial weights
    initial = build_backbone(settings.backbone, **settings.backbone_kwargs).state_dict()
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], initial["blocks.0.attn.qkv.weight"])


def test_unknown_method_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo_command.main(["--output", str(tmp_path), "--methods", "full,dino"]) == 2
    assert "no config for ['dino']" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.slow
def test_demo_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    argv = [
        "--output",
        str(out),
        "--steps",
        "3",
        "--pretrain-steps",
        "5",
        "--methods",
        "full,linear,lora,full_l2sp",
    ]
    assert demo_command.main(argv) == 0
    printed = capsys.readouterr().out
    assert "| full fine-tuning |" in printed and "| LoRA r=4 |" in printed
    for name in (
        "forgetting_table.md",
        "forgetting_table.csv",
        "forgetting_curves.png",
        "stability_plasticity.png",
        "knob_points.csv",
    ):
        assert f"report: {out / 'report' / name}" in printed
    rows = {row["method"]: row for row in read_csv(out / "report" / "forgetting_table.csv")}
    assert list(rows) == ["full fine-tuning", "full fine-tuning + L2-SP 0.1", "linear probe", "LoRA r=4"]
    # Every run's knob was measured on its last checkpoint: a = 1 is the run's last probe measurement and
    # test, a = 0 its step-0 probe; the table of knob points is printed.
    assert "Stability-plasticity knob (ftforget knob):" in printed
    knob = {row["row"]: row for row in read_csv(out / "report" / "knob_points.csv") if row["alpha"] == "1.0"}
    for method, row in rows.items():
        assert f"| {method} | 0.25 |" in printed
        assert float(knob[method]["probe_top1"]) == pytest.approx(
            float(row["probe_acc_end"]), abs=1e-7
        )  # float32
        assert float(knob[method]["new_task_test_acc1"]) == pytest.approx(
            float(row["new_task_test_acc1"]), abs=1e-6
        )
        zero = [json.loads(x) for x in (Path(row["run"]) / "knob.jsonl").read_text().splitlines()][0]
        assert zero["alpha"] == 0.0 and zero["top1"] == pytest.approx(float(row["probe_acc_step0"]), abs=1e-7)
    for row in rows.values():
        run_dir = Path(row["run"])
        assert str(run_dir) in printed  # the TensorBoard log directory
        top1 = scalars(run_dir, "forgetting/knn_top1")
        assert sorted(top1) == [0, 1, 2, 3]
        assert float(row["probe_acc_end"]) == top1[3] and float(row["probe_acc_step0"]) == top1[0]
        assert float(row["new_task_test_acc1"]) == scalars(run_dir, "test/acc1")[3]
        assert int(row["trainable_params"]) == scalars(run_dir, "params/trainable")[0]
    # The frozen backbone cannot forget; every method starts from the same pretrained backbone.
    assert float(rows["linear probe"]["drop_abs"]) == 0.0
    assert len({row["probe_acc_step0"] for row in rows.values()}) == 1
    # A second demo reuses the cached backbone.
    assert demo_command.main([*argv[:-1], "linear"]) == 0
    assert "pretrained backbone: reusing" in capsys.readouterr().out
    # ftforget measure on each run's last checkpoint, with the digits probe and the demo's k-NN settings,
    # reproduces the run's own last measurement exactly (the same feature, the same probe, the same k-NN).
    from ftforget.commands import main as ftforget_main

    for method, row in rows.items():
        run_dir = Path(row["run"])
        last_line = [json.loads(x) for x in (run_dir / "forgetting.jsonl").read_text().splitlines()][-1]
        result = tmp_path / f"{method}.json"
        code = ftforget_main([
            "measure", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
            "--probe", "DigitsProbe", "--knn.k", "20", "--knn.batch_size", "1024", "--knn.num_workers", "0",
            "--output", str(result),
        ])  # fmt: skip
        assert code == 0
        (measured,) = json.loads(result.read_text())["results"]
        assert last_line["step"] == 3
        assert (measured["top1"], measured["top5"]) == (last_line["top1"], last_line["top5"]), method
        hits = round(last_line["top1"] * last_line["num_queries"])
        assert (
            f"top-1 {100 * last_line['top1']:.2f}% ({hits}/{last_line['num_queries']})"
            in capsys.readouterr().out
        )
