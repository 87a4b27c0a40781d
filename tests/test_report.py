"""``ftforget report``: runs are found recursively and the table equals what the runs logged, exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ftforget.commands import main as cli_main
from ftforget.report import build_table, load_run, load_runs, plot_forgetting_curves, read_csv, write_report

# Not representable in float32: the event file holds a rounded value, and the report must show that one.
CURVE = {
    0: 0.9814814814814815,
    1: 0.9814814814814815,
    10: 0.7,
    50: 0.5518518518518518,
    300: 0.7703703703703704,
}
TEST_ACC = 0.9222222222222223
PARAMS = 213_893


def write_run(
    root: Path,
    name: str,
    model: dict,
    curve: dict[int, float] | None = CURVE,
    events: bool = True,
    jsonl: bool = True,
) -> Path:
    """A run directory as ``ftforget fit`` + ``test`` with the forgetting callback leaves it."""
    logger = TensorBoardLogger(save_dir=str(root), name=name, default_hp_metric=False)
    run_dir = Path(logger.log_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": model}))
    curve = curve or {}
    last = max(curve, default=10)
    if events:
        logger.log_metrics({"params/trainable": PARAMS, "params/total": 2 * PARAMS}, step=0)
        logger.log_metrics({"train/loss": 1.5}, step=1)
        for step, top1 in curve.items():
            drop = curve[0] - top1  # float64, as the callback computes it
            metrics = {"forgetting/knn_top1": top1, "forgetting/drop_abs": drop}
            logger.log_metrics({**metrics, "forgetting/drop_rel": drop / curve[0]}, step=step)
        logger.log_metrics({"test/acc1": TEST_ACC}, step=last)
        logger.finalize("success")
    if jsonl and curve:
        lines = [
            {"step": s, "k": k, "probe": "digits-old", "top1": v, "top5": 1.0, "drop_abs": curve[0] - v}
            for s, v in curve.items()
            for k in (20, 10)
        ]
        (run_dir / "forgetting.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_dir


FULL = {"class_path": "ftforget.methods.FullFineTuning", "init_args": {"lr": 0.1}}
LORA = {"class_path": "ftforget.methods.LoRA", "init_args": {"r": 4, "alpha": None}}
LINEAR = {"class_path": "ftforget.methods.LinearProbing", "init_args": {}}


def event_scalars(run_dir: Path, tag: str) -> dict[int, float]:
    """The tag's values as TensorBoard itself reads them back."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_table_equals_the_event_file_values(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "runs", "full", FULL)
    code = cli_main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "out")])
    assert code == 0
    (row,) = read_csv(tmp_path / "out" / "forgetting_table.csv")
    top1 = event_scalars(run_dir, "forgetting/knn_top1")
    assert float(row["probe_acc_step0"]) == top1[0]
    assert float(row["probe_acc_step10"]) == top1[10]
    assert float(row["probe_acc_end"]) == top1[300]
    assert int(row["end_step"]) == 300
    assert float(row["drop_abs"]) == event_scalars(run_dir, "forgetting/drop_abs")[300]
    assert float(row["drop_rel"]) == event_scalars(run_dir, "forgetting/drop_rel")[300]
    test = event_scalars(run_dir, "test/acc1")[300]
    assert float(row["new_task_test_acc1"]) == test
    assert float(row["mean"]) == (test + top1[300]) / 2
    assert int(row["trainable_params"]) == PARAMS
    assert (row["method"], row["probe"], row["k"]) == ("full fine-tuning", "digits-old", "20")
    # The event file holds float32: the report shows the logged value, not the original float64.
    assert top1[300] == float(np.float32(CURVE[300])) != CURVE[300]


def test_markdown_rows_and_order(tmp_path: Path) -> None:
    write_run(tmp_path, "lora", LORA)
    write_run(tmp_path, "linear", LINEAR, curve={0: 0.75, 10: 0.75, 300: 0.75})
    write_run(tmp_path, "full", FULL)
    report = write_report([tmp_path], tmp_path / "report")
    lines = report.markdown.splitlines()
    assert lines[0] == (
        "| method | trainable params | new-task test acc | probe @0 | probe @10 | probe @300 | drop (points) "
        "| drop (relative %) | mean |"
    )
    assert [line.split(" | ")[0] for line in lines[2:]] == [
        "| full fine-tuning",
        "| linear probe",
        "| LoRA r=4",
    ]
    assert lines[3] == "| linear probe | 213,893 | 92.22 | 75.00 | 75.00 | 75.00 | 0.00 | 0.00 | 83.61 |"
    assert (
        lines[2] == "| full fine-tuning | 213,893 | 92.22 | 98.15 | 70.00 | 77.04 | 21.11 | 21.51 | 84.63 |"
    )
    assert [p.name for p in report.files] == [
        "forgetting_table.md", "forgetting_table.csv", "forgetting_curves.png", "stability_plasticity.png"
    ]  # fmt: skip
    for png in report.files[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_are_found_recursively_and_once(tmp_path: Path) -> None:
    a = write_run(tmp_path / "sweep" / "a", "full", FULL)
    b = write_run(tmp_path / "sweep" / "b", "lora", LORA, events=False)
    (a / "checkpoints").mkdir()
    (a / "checkpoints" / "last.ckpt").write_bytes(b"")
    runs = load_runs([tmp_path / "sweep", a])
    assert [run.path for run in runs] == [a, b]


def test_large_parameter_counts_are_exact_only_from_hparams(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path, "full", FULL)
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="full", version=0)
    # ViT-B/16 with a 100-class head: float32 rounds it to 85,875,552
    logger.log_metrics({"params/trainable": 85_875_556}, step=1)
    logger.finalize("success")  # flushed now, not whenever the writer is garbage-collected
    (row,) = build_table([load_run(run_dir)])
    assert (row.trainable_params, row.params_exact) == (85_875_552, False)
    assert "| full fine-tuning | ≈85,875,552 |" in write_report([run_dir], tmp_path / "a").markdown
    (run_dir / "hparams.yaml").write_text("lr: 0.1\nparams/trainable: 85875556\n")
    (row,) = build_table([load_run(run_dir)])
    assert (row.trainable_params, row.params_exact) == (85_875_556, True)
    assert "| full fine-tuning | 85,875,556 |" in write_report([run_dir], tmp_path / "b").markdown


def test_repeated_runs_of_a_method_are_told_apart(tmp_path: Path) -> None:
    write_run(tmp_path, "full", FULL)
    write_run(tmp_path, "full", FULL)  # version_1
    write_run(tmp_path, "lora", LORA)
    runs = load_runs([tmp_path])
    assert [row.method for row in build_table(runs)] == [
        "full fine-tuning (full/version_0)", "full fine-tuning (full/version_1)", "LoRA r=4"
    ]  # fmt: skip
    legend = [t.get_text() for t in plot_forgetting_curves(runs).axes[0].get_legend().get_texts()]
    assert legend == [row.method for row in build_table(runs)]


def test_measurement_file_alone_gives_the_curve(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path, "lora", LORA, events=False))
    assert run.probe_curve() == CURVE  # the first k (20), full float64 precision of the JSON
    (row,) = build_table([run])
    assert row.drop_abs == CURVE[0] - CURVE[300]
    assert (row.new_task_test_acc1, row.mean, row.trainable_params) == (None, None, None)
    assert "| LoRA r=4 | — | — | 98.15 | 70.00 | 77.04 |" in write_report([tmp_path], tmp_path / "o").markdown


def test_curve_figure_plots_the_logged_values(tmp_path: Path) -> None:
    run = load_run(write_run(tmp_path, "full", FULL))
    ax = plot_forgetting_curves([run]).axes[0]
    (line,) = ax.get_lines()[:1]
    assert list(line.get_xdata()) == list(CURVE)
    assert list(line.get_ydata()) == [100.0 * float(np.float32(v)) for v in CURVE.values()]
    assert ax.get_xscale() == "symlog"


def test_empty_directory_fails_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "nothing").mkdir()
    assert cli_main(["report", str(tmp_path / "nothing")]) == 1
    err = capsys.readouterr().err
    assert f"no runs found in {str(tmp_path / 'nothing')!r}" in err
    assert not (tmp_path / "nothing" / "report").exists()


def test_missing_directory_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["report", str(tmp_path / "absent")]) == 1
    assert f"{str(tmp_path / 'absent')!r} does not exist" in capsys.readouterr().err


def test_run_without_measurements_fails_naming_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bare = write_run(tmp_path, "full", FULL, curve=None)
    assert cli_main(["report", str(tmp_path), "-o", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "has no forgetting measurements" in err or "have no forgetting measurements" in err
    assert str(bare) in err
    assert not (tmp_path / "out").exists()


def test_runs_without_measurements_are_left_out_and_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path, "full", FULL)
    bare = write_run(tmp_path, "lora", LORA, curve=None)
    assert cli_main(["report", str(tmp_path), "-o", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert "| full fine-tuning |" in out and "LoRA" not in out
    assert str(bare) in err and "left out" in err
    assert [r["method"] for r in read_csv(tmp_path / "out" / "forgetting_table.csv")] == ["full fine-tuning"]
