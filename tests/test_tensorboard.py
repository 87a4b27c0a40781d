"""TensorBoard summaries of runs (HParams, custom-scalars layout, text card), the report's event file and
its HTML page: what the files hold, read back with TensorBoard's own reader and compared with the
report's CSV exactly (float32, as TensorBoard stores scalars)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import metadata as hp_metadata

from ftforget.commands import main as cli_main
from ftforget.report import find_runs, read_csv, to_markdown, write_report
from ftforget.report.html import markdown_to_html, table_cells
from ftforget.report.tensorboard import (
    FINAL_METRICS,
    HPARAMS,
    REPORT_SUFFIX,
    SUMMARY_SUFFIX,
    write_run_summaries,
)
from ftforget.runs import append_test_result, write_knob_points
from tests.test_report import FULL, LORA, PARAMS, TEST_ACC, write_run


def read_summary(run_dir: Path) -> EventAccumulator:
    (file,) = run_dir.glob(f"events.out.tfevents.*{SUMMARY_SUFFIX}")
    acc = EventAccumulator(str(file), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def session_hparams(acc: EventAccumulator) -> dict[str, object]:
    content = acc.SummaryMetadata(hp_metadata.SESSION_START_INFO_TAG).plugin_data.content
    info = hp_metadata.parse_session_start_info_plugin_data(content)
    values = {}
    for name, value in sorted(info.hparams.items()):  # "01 method", "02 method_args", ...
        kind = value.WhichOneof("kind")
        values[name.split(" ", 1)[1]] = getattr(value, kind)
    return values


def f32(text: str) -> float:
    return float(np.float32(float(text)))


def test_run_summary_holds_the_report_row(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "runs", "lora", LORA, config={"seed_everything": 3})
    write_run_summaries(run_dir)
    assert cli_main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "out")]) == 0
    (row,) = read_csv(tmp_path / "out" / "forgetting_table.csv")
    acc = read_summary(run_dir)
    # the HParams settings: the method, its own arguments, the seed, the exact parameter count
    hparams = session_hparams(acc)
    assert list(hparams) == list(HPARAMS)
    assert hparams["method"] == "LoRA r=4" == row["method"]
    assert hparams["method_args"] == "alpha=None, r=4"
    assert (hparams["seed"], hparams["trainable_params"]) == (3.0, float(PARAMS))
    # the final metrics: the report's values, at the run's last probe step (300)
    metrics = {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"] if tag.startswith("final/")}
    assert {tag: [e.step for e in events] for tag, events in metrics.items()} == {
        tag: [300] for tag in FINAL_METRICS if tag not in ("final/new_task_val_acc1", "final/probe_share")
    }  # the fixture logs no val/acc1 and no probe cost; steps_to_drop_10 is step 10 (0.98 -> 0.70)
    for tag, column in FINAL_METRICS.items():
        if tag in metrics:
            assert metrics[tag][0].value == f32(row[column]), tag
    assert metrics["final/new_task_test_acc1"][0].value == f32(str(TEST_ACC))
    assert metrics["final/steps_to_drop_10"][0].value == 10.0
    # the HParams columns are the same in every run: the experiment lists them all
    experiment = hp_metadata.parse_experiment_plugin_data(
        acc.SummaryMetadata(hp_metadata.EXPERIMENT_TAG).plugin_data.content
    )
    assert [m.name.tag for m in experiment.metric_infos] == list(FINAL_METRICS)
    assert [h.display_name for h in experiment.hparam_infos] == list(HPARAMS)
    types = {h.display_name: api_pb2.DataType.Name(h.type) for h in experiment.hparam_infos}
    assert {k for k, v in types.items() if v == "DATA_TYPE_FLOAT64"} == {
        "lr",
        "seed",
        "trainable_params",
        "max_steps",
    }
    assert {k for k, v in types.items() if v == "DATA_TYPE_STRING"} == set(HPARAMS) - {
        "lr",
        "seed",
        "trainable_params",
        "max_steps",
    }


def test_layout_is_the_same_for_every_run_and_the_card_shows_its_numbers(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "runs", "full", FULL)
    write_run_summaries(run_dir)
    acc = read_summary(run_dir)
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    trade_off = ["^forgetting/knn_top1$", "^val/acc1$", "^forgetting/new_task_val_acc1$"]
    assert charts == {
        "probe k-NN top-1 (old task) and new-task val top-1": trade_off,
        "loss terms": ["^train/loss"],
        "learning rate": ["^lr-"],
    }  # the same in every run: TensorBoard merges them into one chart each
    card = acc.Tensors("ftforget/run/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "**full fine-tuning** (`FullFineTuning`)" in card
    assert f"trainable parameters: {PARAMS:,}" in card
    assert "| full fine-tuning | 213,893 | 92.22 | 98.15 | 70.00 | 77.04 |" in card


def test_a_test_of_the_run_updates_its_metrics_in_one_file(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "runs", "full", FULL, test_acc=None)
    first = write_run_summaries(run_dir)
    assert "final/new_task_test_acc1" not in read_summary(run_dir).Tags()["scalars"]
    append_test_result(
        run_dir, {"checkpoint": "best.ckpt", "requested": "best", "step": 300, "test/acc1": 0.5}
    )
    second = write_run_summaries(run_dir)
    assert not first.exists() and second.exists() and first.name < second.name
    acc = read_summary(run_dir)  # the only summary file: the old one was replaced
    assert [(e.step, e.value) for e in acc.Scalars("final/new_task_test_acc1")] == [(300, 0.5)]
    assert find_runs([tmp_path / "runs"]) == [run_dir]  # still one run


def test_report_event_file_holds_the_figures_and_is_not_a_run(tmp_path: Path) -> None:
    write_run(tmp_path / "runs", "full", FULL)
    write_run(tmp_path / "runs", "lora", LORA)
    out = tmp_path / "runs" / "report"
    write_report([tmp_path / "runs"], out)
    report = write_report([tmp_path / "runs"], out)  # again: one event file remains, runs unchanged
    (events,) = out.glob(f"events.out.tfevents.*{REPORT_SUFFIX}")
    assert events in report.files and len(report.rows) == 2
    assert out not in find_runs([tmp_path / "runs"])
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == ["report/forgetting_curves", "report/stability_plasticity"]
    image = acc.Images("report/forgetting_curves")[0]
    assert image.encoded_image_string == (out / "forgetting_curves.png").read_bytes()
    text = acc.Tensors("report/tables/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == (out / "forgetting_table.md").read_text()


def test_html_page_is_self_contained_and_its_table_is_the_markdown_table(tmp_path: Path) -> None:
    write_run(tmp_path / "runs", "full", FULL)
    write_run(tmp_path / "runs", "lora", LORA)
    out = tmp_path / "out"
    assert cli_main(["report", str(tmp_path / "runs"), "--output", str(out), "--html"]) == 0
    page = (out / "report.html").read_text()
    # nothing to fetch: images are data: URIs, no script or stylesheet file, no absolute URL
    assert re.findall(r'src="([^"]{0,20})', page) == ["data:image/png;base6"] * 2
    assert "http://" not in page and "https://" not in page and "<link" not in page
    first = page.split("<table>", 2)[1]
    rows = re.findall(r"<tr>(.*?)</tr>", first, flags=re.S)
    cells = [re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row) for row in rows]
    table = to_markdown(write_report([tmp_path / "runs"], tmp_path / "again").rows).splitlines()
    assert cells == [table_cells(table[0]), *(table_cells(line) for line in table[2:])]
    for run in ("full/version_0", "lora/version_0"):
        assert f'href="../runs/{run}/"' in page


def test_markdown_to_html_renders_what_the_report_writes() -> None:
    html = markdown_to_html("### Knob\n\n| a | b |\n|---|---|\n| 1 | `x` <y> |\ntext *z*\n\nnext")
    assert html == (
        '<h4>Knob</h4>\n<table>\n<thead><tr><th scope="col">a</th><th scope="col">b</th></tr></thead>\n'
        "<tbody>\n<tr><td>1</td><td><code>x</code> &lt;y&gt;</td></tr>\n</tbody>\n</table>\n\n"
        "<p>text <em>z</em></p>\n<p>next</p>\n"
    )


def card_of(run_dir: Path) -> str:
    return read_summary(run_dir).Tensors("ftforget/run/text_summary")[0].tensor_proto.string_val[0].decode()


def test_the_card_shows_the_knob_once_measured(tmp_path: Path) -> None:
    run_dir = write_run(tmp_path / "runs", "full", FULL)
    write_run_summaries(run_dir)
    assert "Stability-plasticity knob" not in card_of(run_dir)
    points = [{"alpha": a, "top1": t, "new_task_test_acc1": 0.5} for a, t in ((0.0, 0.98), (1.0, 0.77))]
    write_knob_points(run_dir, points)
    write_run_summaries(run_dir)  # as ftforget knob does
    assert card_of(run_dir).endswith(
        "| a | new-task test | probe top-1 |\n|---|---|---|\n| 0.0 | 50.00 | 98.00 |\n| 1.0 | 50.00 | 77.00 |\n"
    )
