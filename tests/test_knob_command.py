"""``ftforget knob`` on the digits miniature: its ends reproduce the run's own measurements, its points go
into the run and the report draws them; its errors name the option."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from ftforget.backbones import build_backbone
from ftforget.commands import main
from ftforget.report import write_report
from ftforget.runs import KNOB_FILE, read_test_results

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo"
STEPS = 8


def _fit(tmp_path: Path, method: str, backbone: Path, *extra: str) -> Path:
    args = [
        "fit", "--config", str(DEMO / f"{method}.yaml"), "--config", str(DEMO / "common.yaml"),
        "--model.init_args.checkpoint", str(backbone), "--trainer.max_steps", str(STEPS),
        "--trainer.check_val_every_n_epoch", "1", f"--trainer.callbacks.eval_at_steps={json.dumps([0, STEPS])}",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return tmp_path / "runs" / method / "version_0"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_knob_ends_reproduce_the_run_and_the_report_draws_them(tmp_path, backbone, capsys):
    run = _fit(tmp_path, "full", backbone)
    assert main(["test", "--run", str(run), "--ckpt_path", "last", "--verbose", "false"]) == 0
    capsys.readouterr()
    assert main(["knob", "--run", str(run), "--alphas", "[1, 0.5]"]) == 0
    out = capsys.readouterr().out
    points = _records(run / KNOB_FILE)
    assert [p["alpha"] for p in points] == [0.0, 0.5, 1.0]  # a = 0 always, in order
    measured = {r["step"]: r for r in _records(run / "forgetting.jsonl")}
    zero, one = points[0], points[-1]
    assert zero["top1"] == measured[0]["top1"]  # the pretrained backbone, bit for bit
    assert one["top1"] == measured[STEPS]["top1"]  # the fine-tuned model
    assert one["new_task_val_acc1"] == measured[STEPS]["new_task_val_acc1"]
    (test,) = read_test_results(run)
    assert one["new_task_test_acc1"] == pytest.approx(test["test/acc1"], abs=1e-6)
    assert zero["drop_abs"] == 0.0 and zero["drop_abs_ci"] == [0.0, 0.0]
    assert one["drop_abs"] == pytest.approx(measured[0]["top1"] - measured[STEPS]["top1"])
    assert {p["checkpoint"] for p in points} == {"last.ckpt"} and {p["step"] for p in points} == {STEPS}
    assert f"wrote {run / KNOB_FILE}" in out and "warning" not in out
    assert f"{100 * one['top1']:.2f}%" in out

    report = write_report([tmp_path / "runs"], tmp_path / "report")
    assert [p.alpha for p in report.knob["full fine-tuning"]] == [0.0, 0.5, 1.0]
    assert "| full fine-tuning | 0.5 |" in report.knob_table
    names = {p.name for p in report.files}
    assert {"stability_plasticity.png", "knob_points.csv"} <= names
    assert "Stability-plasticity knob" in (tmp_path / "report" / "forgetting_table.md").read_text()


@pytest.mark.slow
def test_knob_needs_the_starting_weights_and_checks_them(tmp_path, backbone, capsys):
    run = _fit(tmp_path, "lora", backbone)
    moved = tmp_path / "elsewhere.pth"
    shutil.move(backbone, moved)
    capsys.readouterr()
    assert main(["knob", "--run", str(run), "--alphas", "[1]"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--checkpoint FILE" in err and str(backbone) in err
    torch.manual_seed(1)
    other = tmp_path / "other.pth"
    torch.save(build_backbone("vit_base_patch16_224", **_demo_kwargs()).state_dict(), other)
    assert main(["knob", "--run", str(run), "--alphas", "[1]", "--checkpoint", str(other)]) == 2
    assert "frozen weights differ" in capsys.readouterr().err
    assert not (run / KNOB_FILE).exists()  # nothing written by a failed knob
    assert main(["knob", "--run", str(run), "--alphas", "[1]", "--checkpoint", str(moved)]) == 0
    assert [p["alpha"] for p in _records(run / KNOB_FILE)] == [0.0, 1.0]
    assert main(["knob", "--run", str(tmp_path), "--alphas", "[1]"]) == 2
    assert "--run" in capsys.readouterr().err
    assert main(["knob", "--run", str(run), "--alphas", "[nan]", "--checkpoint", str(moved)]) == 2
    assert "alphas" in capsys.readouterr().err


def _demo_kwargs() -> dict:
    import yaml

    return yaml.safe_load((DEMO / "common.yaml").read_text())["model"]["init_args"]["backbone_kwargs"]


@pytest.mark.slow
def test_knob_measures_the_subset_probe_the_run_measured(tmp_path, backbone):
    subset = {"bank_per_class": 20, "queries_per_class": 10, "draws": 2, "seed": 0}
    run = _fit(tmp_path, "lora", backbone, f"--trainer.callbacks.subset={json.dumps(subset)}")
    measured = {r["step"]: r for r in _records(run / "forgetting.jsonl")}
    assert measured[0]["subset"] == subset and measured[0]["num_queries"] == 2 * 5 * 10
    assert main(["knob", "--run", str(run), "--alphas", "[1]"]) == 0
    zero, one = _records(run / KNOB_FILE)
    assert zero["subset"] == subset and zero["num_queries"] == measured[0]["num_queries"]
    assert (zero["top1"], one["top1"]) == (measured[0]["top1"], measured[STEPS]["top1"])
    # ftforget measure on the same subset reproduces the run's last measurement too
    args = [f"--subset.{key}={value}" for key, value in subset.items()]
    assert main(["measure", "--run", str(run), "--probe", "DigitsProbe", "--knn.k", "20", "--knn.batch_size", "1024",
                 "--knn.num_workers", "0", *args, "--output", str(tmp_path / "m.json")]) == 0  # fmt: skip
    (result,) = json.loads((tmp_path / "m.json").read_text())["results"]
    assert result["top1"] == measured[STEPS]["top1"]
