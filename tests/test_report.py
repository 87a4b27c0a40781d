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
from ftforget.report import (
    build_table,
    load_run,
    load_runs,
    plot_forgetting_curves,
    plot_stability_plasticity,
    read_csv,
    write_report,
)

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
    test_acc: float | None = TEST_ACC,
    config: dict | None = None,
) -> Path:
    """A run directory as ``ftforget fit`` + ``test`` with the forgetting callback leaves it."""
    logger = TensorBoardLogger(save_dir=str(root), name=name, default_hp_metric=False)
    run_dir = Path(logger.log_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": model, **(config or {})}))
    curve = curve or {}
    last = max(curve, default=10)
    if events:
        logger.log_metrics({"params/trainable": PARAMS, "params/total": 2 * PARAMS}, step=0)
        logger.log_metrics({"train/loss": 1.5}, step=1)
        for step, top1 in curve.items():
            drop = curve[0] - top1  # float64, as the callback computes it
            metrics = {"forgetting/knn_top1": top1, "forgetting/drop_abs": drop}
            logger.log_metrics({**metrics, "forgetting/drop_rel": drop / curve[0]}, step=step)
        if test_acc is not None:
            logger.log_metrics({"test/acc1": test_acc}, step=last)
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
    assert [p.name for p in report.files[:4]] == [
        "forgetting_table.md", "forgetting_table.csv", "forgetting_curves.png", "stability_plasticity.png"
    ]  # fmt: skip
    (events,) = report.files[4:]  # the figures for TensorBoard (tests/test_tensorboard.py)
    assert events.name.startswith("events.out.tfevents.") and events.name.endswith(".ftforget-report")
    for png in report.files[2:4]:
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
    markdown = write_report([tmp_path], tmp_path / "o").markdown
    assert "| LoRA r=4 | — | — (not tested) | 98.15 | 70.00 | 77.04 |" in markdown


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


# A 3-seed group whose numbers are exact in float32 and whose means and sample stds are exact in binary:
# seed -> (curve, new-task test accuracy).
SEEDS = {
    0: ({0: 0.875, 10: 0.625, 100: 0.5}, 0.5),
    1: ({0: 0.875, 10: 0.6875, 100: 0.625}, 0.75),
    2: ({0: 0.875, 10: 0.75, 100: 0.75}, 1.0),
}


def seed_config(seed: int, name: str, lr: float = 0.1) -> dict:
    """What differs between repeats in a LightningCLI config.yaml: the seed and the per-run paths."""
    return {
        "seed_everything": seed,
        "ckpt_path": f"/ckpts/{name}-{seed}.ckpt" if seed else None,
        "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": lr, "momentum": 0.9}},
        "trainer": {
            "max_steps": 100,
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": f"/runs/seed{seed}", "name": f"{name}_s{seed}", "version": seed},
            },
        },
    }


def write_seed_group(root: Path, name: str = "full", model: dict = FULL, lr: float = 0.1) -> list[Path]:
    return [
        write_run(root / f"s{seed}", name, model, curve, test_acc=test, config=seed_config(seed, name, lr))
        for seed, (curve, test) in SEEDS.items()
    ]


def test_seed_group_is_one_row_with_mean_and_sample_std(tmp_path: Path) -> None:
    dirs = write_seed_group(tmp_path / "runs")
    report = write_report([tmp_path / "runs"], tmp_path / "out")
    (row,) = report.rows
    # Hand-computed: test acc 0.5, 0.75, 1.0 -> 0.75 ± 0.25; probe @end 0.5, 0.625, 0.75 -> 0.625 ± 0.125;
    # mean (test + end) / 2 = 0.5, 0.6875, 0.875 -> 0.6875 ± 0.1875; drop 0.375, 0.25, 0.125 -> 0.25 ± 0.125.
    assert (row.method, row.n, row.tested, row.seeds) == ("full fine-tuning", 3, 3, "0;1;2")
    assert (row.new_task_test_acc1, row.new_task_test_acc1_std) == (0.75, 0.25)
    assert (row.probe_acc_step0, row.probe_acc_step0_std) == (0.875, 0.0)
    assert (row.probe_acc_step10, row.probe_acc_step10_std) == (0.6875, 0.0625)
    assert (row.probe_acc_end, row.probe_acc_end_std) == (0.625, 0.125)
    assert (row.drop_abs, row.drop_abs_std) == (0.25, 0.125)
    assert (row.mean, row.mean_std) == (0.6875, 0.1875)
    assert row.drop_rel == pytest.approx(2 / 7) and row.drop_rel_std == pytest.approx(1 / 7)
    lines = report.markdown.splitlines()
    assert lines[0].startswith("| method | n | trainable params | new-task test acc | probe @0 |")
    assert lines[2] == (
        "| full fine-tuning | 3 | 213,893 | 75.00 ± 25.00 | 87.50 ± 0.00 | 68.75 ± 6.25 | 62.50 ± 12.50 "
        "| 25.00 ± 12.50 | 28.57 ± 14.29 | 68.75 ± 18.75 |"
    )
    (csv_row,) = read_csv(tmp_path / "out" / "forgetting_table.csv")
    assert csv_row["run"] == ";".join(str(d) for d in dirs)
    assert (csv_row["n"], csv_row["seeds"]) == ("3", "0;1;2")
    assert (float(csv_row["new_task_test_acc1"]), float(csv_row["new_task_test_acc1_std"])) == (0.75, 0.25)
    assert (float(csv_row["mean"]), float(csv_row["mean_std"])) == (0.6875, 0.1875)
    assert (float(csv_row["probe_acc_end"]), float(csv_row["probe_acc_end_std"])) == (0.625, 0.125)


def test_seeds_that_start_from_different_bases_are_named(tmp_path: Path) -> None:
    write_seed_group(tmp_path / "runs")  # one base: every seed's step-0 probe is 0.875
    assert not any(n.startswith("Warning") for n in write_report([tmp_path / "runs"], tmp_path / "o").notes)
    other = {**SEEDS[1][0], 0: 0.5}  # seed 1 started from another backbone
    dirs = [write_run(tmp_path / "mixed" / f"s{seed}", "full", FULL, other if seed == 1 else curve,
                      test_acc=test, config=seed_config(seed, "full", 0.1))
            for seed, (curve, test) in SEEDS.items()]  # fmt: skip
    report = write_report([tmp_path / "mixed"], tmp_path / "out")
    (row,) = report.rows
    assert row.n == 3
    (warning,) = [n for n in report.notes if n.startswith("Warning")]
    assert warning.startswith(
        "Warning: the runs of 'full fine-tuning' start from different step-0 probe accuracies ("
    )
    for run_dir, value in zip(dirs, ("87.50", "50.00", "87.50"), strict=True):
        assert f"{run_dir} ({value})" in warning
    assert warning in report.markdown
    assert warning in (tmp_path / "out" / "forgetting_table.md").read_text()


def test_seed_group_curve_is_the_mean_with_a_std_band(tmp_path: Path) -> None:
    write_seed_group(tmp_path)
    ax = plot_forgetting_curves(load_runs([tmp_path])).axes[0]
    line = ax.get_lines()[0]
    assert list(line.get_xdata()) == [0, 10, 100]
    assert list(line.get_ydata()) == [87.5, 68.75, 62.5]
    (band,) = ax.collections  # fill_between over the steps with a nonzero std
    lower, upper = band.get_paths()[0].vertices[:, 1].min(), band.get_paths()[0].vertices[:, 1].max()
    assert (lower, upper) == (62.5 - 12.5, 68.75 + 6.25)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["full fine-tuning"]


def test_only_the_seed_differs_collapses_other_settings_stay_apart(tmp_path: Path) -> None:
    write_seed_group(tmp_path / "a")
    write_seed_group(tmp_path / "b", lr=0.01)  # another lr: another row
    lora8 = {"class_path": "ftforget.methods.LoRA", "init_args": {"r": 8, "alpha": None}}
    write_run(tmp_path / "c", "lora", LORA, config=seed_config(0, "lora"))
    write_run(tmp_path / "c", "lora", lora8, config=seed_config(1, "lora"))  # another r: another row
    rows = build_table(load_runs([tmp_path]))
    assert [(row.method, row.n) for row in rows] == [
        ("full fine-tuning (lr=0.01)", 3), ("full fine-tuning (lr=0.1)", 3), ("LoRA r=4", 1), ("LoRA r=8", 1)
    ]  # fmt: skip
    markdown = write_report([tmp_path], tmp_path / "out").markdown
    # A single run keeps one value, without ±, in a table that has groups.
    assert (
        "| LoRA r=4 | 1 | 213,893 | 92.22 | 98.15 | 70.00 | 77.04 (step 300) | 21.11 | 21.51 | 84.63 |"
        in markdown
    )


def test_repeats_with_the_same_seed_stay_apart(tmp_path: Path) -> None:
    write_run(tmp_path, "full", FULL, config=seed_config(0, "full"))
    write_run(tmp_path, "full", FULL, config=seed_config(0, "full"))
    assert [(row.method, row.n) for row in build_table(load_runs([tmp_path]))] == [
        ("full fine-tuning (full/version_0)", 1), ("full fine-tuning (full/version_1)", 1)
    ]  # fmt: skip


def test_untested_run_is_marked_and_a_hint_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_run(tmp_path / "runs", "full", FULL)
    untested = write_run(tmp_path / "runs", "lora", LORA, test_acc=None)
    assert cli_main(["report", str(tmp_path / "runs"), "-o", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert (
        "| LoRA r=4 | 213,893 | — (not tested) | 98.15 | 70.00 | 77.04 | 21.11 | 21.51 | — (not tested) |"
        in out
    )
    hints = [line for line in out.splitlines() if line.startswith("hint:")]
    assert hints == [
        f"hint: LoRA r=4: not tested on the new task; run ftforget test --run {untested} --ckpt_path best"
    ]
    (row,) = [r for r in read_csv(tmp_path / "out" / "forgetting_table.csv") if r["method"] == "LoRA r=4"]
    assert (row["new_task_test_acc1"], row["mean"], row["tested"]) == ("", "", "0")
    # Some runs of a seed group tested: the mean of those, and how many they are.
    dirs = write_seed_group(tmp_path / "group")
    (dirs[0] / "forgetting.jsonl").rename(dirs[0] / "keep")
    for event in dirs[0].glob("events.out.tfevents.*"):
        event.unlink()
    (dirs[0] / "keep").rename(dirs[0] / "forgetting.jsonl")  # seed 0: measured, not tested
    report = write_report([tmp_path / "group"], tmp_path / "out2")
    # test acc 0.75, 1.0 -> 0.875 ± 0.25 / sqrt(2); mean (0.75 + 0.625) / 2, (1.0 + 0.75) / 2 -> 0.78125 ± ...
    assert "| full fine-tuning | 3 | — | 87.50 ± 17.68 (2 of 3 tested) | 87.50 ± 0.00 |" in report.markdown
    assert "| 78.12 ± 13.26 (2 of 3 tested) |" in report.markdown
    assert report.untested == [("full fine-tuning", dirs[0])]


def test_no_test_accuracy_no_plane_and_the_reason(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_run(tmp_path / "runs", "full", FULL, test_acc=None)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "stability_plasticity.png").write_bytes(b"stale")
    assert cli_main(["report", str(tmp_path / "runs"), "-o", str(out_dir)]) == 0
    out = capsys.readouterr().out
    reason = (
        "stability_plasticity.png not written: no run has a new-task test accuracy (test/acc1) or knob points "
        "(ftforget knob)."
    )
    assert out.count(reason) == 1
    assert reason in (out_dir / "forgetting_table.md").read_text()
    assert not (out_dir / "stability_plasticity.png").exists()
    assert (out_dir / "forgetting_curves.png").is_file()
    assert "wrote " + str(out_dir / "stability_plasticity.png") not in out


def test_ten_rows_keep_both_legends_outside_the_axes(tmp_path: Path) -> None:
    for r in range(1, 11):
        curve = {0: 0.9, 10: 0.9 - r / 100, 100: 0.9 - r / 50}
        write_run(tmp_path, f"lora{r}", {"class_path": "ftforget.methods.LoRA", "init_args": {"r": r}}, curve)
    runs = load_runs([tmp_path])
    rows = build_table(runs)
    for fig in (plot_forgetting_curves(runs), plot_stability_plasticity(rows)):
        fig.draw_without_rendering()
        ax = fig.axes[0]
        legend = ax.get_legend()
        assert [t.get_text() for t in legend.get_texts()] == [f"LoRA r={r}" for r in range(1, 11)]
        assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1  # anchored right of the axes
        assert legend.get_window_extent().x0 >= ax.get_window_extent().x1
        assert legend.get_window_extent().x1 <= fig.bbox.x1  # and inside the figure
        # Each row its own colour.
        assert len({tuple(h.get_color()) if not isinstance(h.get_color(), str) else h.get_color()
                    for h in legend.legend_handles}) == 10  # fmt: skip
    ax = plot_forgetting_curves(runs).axes[0]
    references = [a for a in ax.artists if a is not ax.get_legend()]
    assert [t.get_text() for t in references[0].get_texts()] == [
        "step 0 (pretrained): 90.00%", "10 iterations (the paper's early point)"
    ]  # fmt: skip
    low, high = ax.get_ylim()  # fitted to the data (70 .. 90 %), not 0-100
    assert 68.0 < low < 70.0 and 90.0 < high < 92.0
