"""The README's research workflow on the digits miniature: fit, crash, resume, test best and last, report,
reuse of the run's config. One experiment is one run directory and one report row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from ftforget.commands import main
from ftforget.data.digits import DigitsDataModule
from ftforget.methods.base import FineTuningModule
from ftforget.methods.registry import load_method
from ftforget.report import load_run, read_csv

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo"
STEPS = 16  # two epochs of 8 steps (537 training images, batch 64): validation and checkpoints at 8 and 16


def fit_args(tmp_path: Path, backbone: Path) -> list[str]:
    return [
        "--config", str(DEMO / "full.yaml"), "--config", str(DEMO / "common.yaml"),
        "--model.init_args.checkpoint", str(backbone),
        "--trainer.max_steps", str(STEPS), "--trainer.check_val_every_n_epoch", "1",
        f"--trainer.callbacks.eval_at_steps={json.dumps([0, 1, 2, 5, 10, STEPS])}",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip


def accuracy_on_test_split(ckpt: Path) -> float:
    """New-task test top-1 of a checkpoint, computed here by hand."""
    model = load_method(ckpt)
    data = DigitsDataModule()
    data.setup()
    x, y = data.dataset("test").tensors  # type: ignore[attr-defined]
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


@pytest.mark.slow
def test_fit_crash_resume_test_report(tmp_path: Path, backbone: Path, monkeypatch, capsys) -> None:
    # 1. A fit that crashes at step 10 (after the checkpoints of step 8).
    def crash(self, outputs, batch, batch_idx) -> None:
        if self.trainer.global_step == 10:
            raise RuntimeError("simulated crash at step 10")

    monkeypatch.setattr(FineTuningModule, "on_train_batch_end", crash, raising=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", *fit_args(tmp_path, backbone)])
    monkeypatch.undo()
    run = tmp_path / "runs" / "full" / "version_0"
    assert (run / "checkpoints" / "last.ckpt").is_file()

    # 2. Resume the run: the same directory, to the last step.
    assert main(["fit", "--resume", str(run)]) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "full").iterdir()) == ["version_0"]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == STEPS
    steps = [r["step"] for r in map(json.loads, (run / "forgetting.jsonl").read_text().splitlines())]
    assert steps == [0, 1, 2, 5, 10, STEPS]  # continuous: each step once, step 0 kept from the first fit

    # 3. Test last, then best (the default), into the same run.
    assert main(["test", "--run", str(run), "--ckpt_path", "last"]) == 0
    tested_last = load_run(run).scalars["test/acc1"][STEPS]
    assert tested_last == pytest.approx(accuracy_on_test_split(last), abs=0)  # float32 of the same fraction
    assert main(["test", "--run", str(run)]) == 0
    best_name = next(p for p in (run / "checkpoints").glob("best-*.ckpt"))
    best_step = torch.load(best_name, weights_only=True)["global_step"]
    assert load_run(run).scalars["test/acc1"][best_step] == pytest.approx(
        accuracy_on_test_split(best_name), abs=0
    )
    assert sorted(p.name for p in (tmp_path / "runs" / "full").iterdir()) == ["version_0"]

    # 3b. A later measurement of the run's last checkpoint with the run's probe: recorded in the run, and
    # equal to what the callback measured at that step.
    argv = ["measure", "--run", str(run), "--probe", "DigitsProbe", "--knn.k", "20", "--knn.batch_size", "1024",
            "--knn.num_workers", "0"]  # fmt: skip
    assert main(argv) == 0
    (measured,) = [json.loads(x) for x in (run / "measure_results.jsonl").read_text().splitlines()]
    final = json.loads((run / "forgetting.jsonl").read_text().splitlines()[-1])
    assert (measured["step"], measured["checkpoint"]) == (STEPS, "last.ckpt")
    assert measured["results"] == [{"k": 20, "top1": final["top1"], "top5": final["top5"]}]
    assert load_run(run).scalars["measure/digits-old/knn_top1_k20"] == {STEPS: pytest.approx(final["top1"])}

    # 4. The report: one row, with the new-task test accuracy (of best, the checkpoint selected on validation,
    # although last was tested too, at a later step), the mean and the probe columns.
    capsys.readouterr()
    assert main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "report")]) == 0
    rows = read_csv(tmp_path / "report" / "forgetting_table.csv")
    assert len(rows) == 1
    (row,) = rows
    for column in ("new_task_test_acc1", "mean", "probe_acc_step0", "probe_acc_step10", "probe_acc_end"):
        assert row[column] not in ("", "None"), column
    assert float(row["new_task_test_acc1"]) == load_run(run).scalars["test/acc1"][best_step]

    # 5. The run's config reproduces it: the same weights source, a new run directory.
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"]["checkpoint"] == str(backbone)
    assert config["model"]["init_args"]["pretrained"] is False
    assert config.get("ckpt_path") is None
    assert main(["fit", "--config", str(run / "config.yaml"), "--trainer.max_steps", "1",
                 "--trainer.callbacks.eval_at_steps=[0, 1]"]) == 0  # fmt: skip
    again = tmp_path / "runs" / "full" / "version_1"
    first = json.loads((run / "forgetting.jsonl").read_text().splitlines()[0])
    second = json.loads((again / "forgetting.jsonl").read_text().splitlines()[0])
    assert (second["step"], second["top1"], second["top5"]) == (0, first["top1"], first["top5"])


@pytest.mark.slow
def test_checkpoints_load_where_the_weights_file_is_gone(tmp_path: Path, backbone: Path) -> None:
    assert main(["fit", *fit_args(tmp_path, backbone)]) == 0
    backbone.unlink()
    run = tmp_path / "runs" / "full" / "version_0"
    assert main(["test", "--run", str(run), "--ckpt_path", "last"]) == 0


def test_best_and_last_fail_with_the_runs_checkpoints(tmp_path: Path, capsys) -> None:
    run = tmp_path / "runs" / "x" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n")
    (run / "checkpoints" / "interrupted-step3.ckpt").write_bytes(b"")
    for which in ("best", "last"):
        assert main(["test", "--run", str(run), "--ckpt_path", which]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert f"has no {which} checkpoint" in line and "interrupted-step3.ckpt" in line
    assert main(["test", "--config", str(DEMO / "full.yaml"), "--ckpt_path", "last"]) == 2
    assert "which run?" in capsys.readouterr().err
    assert main(["test", "--run", str(tmp_path / "nowhere")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["fit", "--resume", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    assert main(["measure", "--run", str(tmp_path), "--probe", "DigitsProbe"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"--run '{tmp_path}' is not a run directory" in line
    assert main(["measure", "--ckpt_path", "best", "--probe", "DigitsProbe"]) == 2
    assert "which run? give --run RUN_DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_a_checkpoint_of_another_method_is_refused(tmp_path: Path, backbone: Path, capsys) -> None:
    assert main(["fit", *fit_args(tmp_path, backbone), "--trainer.max_steps", "8"]) == 0  # one epoch
    ckpt = tmp_path / "runs" / "full" / "version_0" / "checkpoints" / "last.ckpt"
    code = main(["test", "--config", str(DEMO / "lora.yaml"), "--config", str(DEMO / "common.yaml"),
                 "--ckpt_path", str(ckpt)])  # fmt: skip
    assert code == 2
    assert "was saved by FullFineTuning" in capsys.readouterr().err


def test_offline_pretrained_download_fails_fast_naming_the_option(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    import ftforget.backbones as backbones

    monkeypatch.setattr(backbones, "hub_reachable", lambda timeout=5.0: False)
    monkeypatch.chdir(tmp_path)
    code = main(["fit", "--config", str(ROOT / "configs" / "lora.yaml"), "--trainer.accelerator", "cpu"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--model.init_args.checkpoint" in line and "--model.init_args.pretrained false" in line
    assert not (tmp_path / "runs").exists()
