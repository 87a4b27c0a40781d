"""``ftforget report`` on stream directories: the stream table equals the files, the heat maps and the curve
are images in the Markdown, HTML and TensorBoard report, an incomplete stream is a note, and the streams'
task sub-runs stay out of the forgetting table; one test reports a real ``ftforget stream`` output."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ftforget.commands import main as cli_main
from ftforget.report import ReportError, write_report
from ftforget.report import streams as report_streams
from ftforget.report.html import table_cells
from ftforget.report.streams import STREAM_CSV, STREAM_CURVE_PNG, load_stream, read_stream_csv
from ftforget.report.tensorboard import REPORT_SUFFIX
from tests.test_report import FULL, write_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TASKS = ["d45", "d67", "d89"]
#: correct / total per row of R (row i: tasks 0..i), as accuracy_matrix.json holds them
COUNTS = [([60], [72]), ([41, 66], [72, 70]), ([37, 50, 68], [72, 70, 71])]


def write_stream(
    root: Path,
    method: str = "full",
    seed: int = 0,
    rows: int = 3,
    metrics: bool = True,
    hot_swap: bool = True,
    class_path: str = "ftforget.methods.FullFineTuning",
    steps: int = 10,
) -> Path:
    """A stream directory as ``ftforget stream`` leaves it, with known numbers (``rows`` tasks done)."""
    path = root / method / f"seed{seed}"
    path.mkdir(parents=True)
    tasks = [{"name": n, "config": {"data": {"init_args": {"new_digits": [4 + 2 * i, 5 + 2 * i]}}}}
             for i, n in enumerate(TASKS)]  # fmt: skip
    settings = {"source": "s.yaml", "method": [f"{method}.yaml"], "tasks": tasks, "start": "b.pth",
                "steps": steps, "seed": seed, "checkpoint_every": 5, "common": {}}  # fmt: skip
    (path / "stream.yaml").write_text(yaml.safe_dump(settings))
    names = [f"{i + 1}-{n}" for i, n in enumerate(TASKS)]
    matrix = {"tasks": names, "heads": "task", "rows": [
        {"correct": c, "total": t, "hits": ["x"] * len(c)} for c, t in COUNTS[:rows]]}  # fmt: skip
    (path / "accuracy_matrix.json").write_text(json.dumps(matrix))
    curve, sub = [], []
    for i in range(rows):
        (path / names[i]).mkdir()
        model = {"class_path": class_path, "init_args": {"r": 4, "alpha": None}}
        (path / names[i] / "config.yaml").write_text(
            yaml.safe_dump({"model": model, "seed_everything": seed})
        )
        lines = []
        for s in (0, 1, 5, steps):
            for k in (10, 20):  # the callback's order: 10 first, the headline k of the whole report
                top1 = 0.9 - 0.01 * (i * steps + s) - (0.1 if k == 20 else 0.0) + 0.001 * seed
                lines.append({"step": s, "k": k, "top1": top1, "top5": 1.0})
                curve.append({**lines[-1], "step": i * steps + s, "task_step": s, "task": names[i],
                              "task_index": i, "boundary": i > 0 and s == 0, "stream_drop_abs": 0.0})  # fmt: skip
        (path / names[i] / "forgetting.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        sub.append(names[i])
    curve.sort(key=lambda r: (r["step"], str(r["k"])))  # as ftforget.stream.run writes it
    (path / "stream_forgetting.jsonl").write_text("".join(json.dumps(x) + "\n" for x in curve))
    R = [[c[j] / t[j] if j < len(c) else None for j in range(3)] for c, t in COUNTS]
    if metrics:
        data = {"tasks": names, "R": R, "reference": [R[0][0], 0.9, 0.95],
                "average_accuracy": 0.7123, "average_forgetting": 0.1456, "backward_transfer": -0.1456,
                "forward_transfer": None, "single_task_transfer": -0.0321 if hot_swap else None,
                "ci95": {"average_accuracy": [0.65, 0.77], "average_forgetting": [0.08, 0.21],
                         "backward_transfer": [-0.21, -0.08], "forward_transfer": None,
                         "single_task_transfer": [-0.09, 0.02] if hot_swap else None}}  # fmt: skip
        (path / "stream_metrics.json").write_text(json.dumps(data))
    if hot_swap and metrics:
        swap = {"tasks": names, "routing_accuracy": 0.4702, "oracle": [0.9, 0.9, 0.95], "routed": [0.4, 0.5, 0.3],
                "oracle_average_accuracy": 0.9667, "routed_average_accuracy": 0.4, "routed_correct": 80, "total": 200}  # fmt: skip
        (path / "hot_swap.json").write_text(json.dumps(swap))
    return path


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}"


def table_rows(markdown: str, header: str = "| method | stream |") -> list[dict[str, str]]:
    """The rows of the Markdown table whose header line starts with ``header``, by column title."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    titles = table_cells(lines[start])
    return [dict(zip(titles, table_cells(line), strict=True)) for line in lines[start + 2 : end]]


def expected_cells(path: Path) -> dict[str, str]:
    """The Markdown cells of one complete stream, computed here from its files."""
    m = json.loads((path / "stream_metrics.json").read_text())
    cells = {}
    for key, title in report_streams.METRICS.items():
        lo_hi = m["ci95"][key]
        cells[f"{title} [95% CI]"] = pct(m[key]) + (
            "" if lo_hi is None else f" [{pct(lo_hi[0])}, {pct(lo_hi[1])}]"
        )
    k = json.loads((path / "1-d45" / "forgetting.jsonl").read_text().splitlines()[0])["k"]
    curve = [json.loads(line) for line in (path / "stream_forgetting.jsonl").read_text().splitlines()]
    probe = sorted((r for r in curve if r["k"] == k), key=lambda r: r["step"])
    cells["probe @start"] = pct(probe[0]["top1"])
    cells["probe @end"] = f"{pct(probe[-1]['top1'])} (step {probe[-1]['step']})"
    swap = path / "hot_swap.json"
    if swap.is_file():
        h = json.loads(swap.read_text())
        cells["hot-swap oracle"] = pct(h["oracle_average_accuracy"])
        cells["hot-swap routed"] = pct(h["routed_average_accuracy"])
        cells["routing acc."] = pct(h["routing_accuracy"])
    return cells


def test_stream_file_names_are_those_ftforget_stream_writes() -> None:
    from ftforget.stream import run

    for name in ("STREAM_FILE", "MATRIX_FILE", "FORGETTING_FILE", "METRICS_FILE", "HOT_SWAP_FILE"):
        assert getattr(report_streams, name) == getattr(run, name)


def test_stream_table_equals_the_files(tmp_path: Path) -> None:
    full = write_stream(tmp_path / "runs")
    lora = write_stream(tmp_path / "runs", method="lora", hot_swap=False, class_path="ftforget.methods.LoRA")
    report = write_report([tmp_path / "runs"], tmp_path / "out")
    assert report.rows == [] and report.markdown == ""  # streams only: no forgetting table
    rows = table_rows(report.streams)
    assert [(r["method"], r["stream"], r["seed"], r["tasks"]) for r in rows] == [
        ("full fine-tuning", "`full/seed0`", "0", "3"),
        ("LoRA r=4", "`lora/seed0`", "0", "3"),
    ]
    assert {key: rows[0][key] for key in expected_cells(full)} == expected_cells(full)
    # the lora stream has no hot_swap.json: its hot-swap cells are empty, its transfer is null
    assert {key: rows[1][key] for key in expected_cells(lora)} == expected_cells(lora)
    assert rows[1]["hot-swap oracle"] == "—" and rows[1]["transfer vs. alone [95% CI]"] == "—"
    # the probe is the headline k (10: the first line of the first task's forgetting.jsonl), not k=20
    assert rows[0]["probe @start"] == "90.00" and rows[0]["probe @end"] == "60.00 (step 30)"
    # the CSV holds the exact fractions
    csv_rows = read_stream_csv(tmp_path / "out" / STREAM_CSV)
    metrics = json.loads((full / "stream_metrics.json").read_text())
    assert float(csv_rows[0]["average_forgetting"]) == metrics["average_forgetting"]
    assert float(csv_rows[0]["backward_transfer_ci_lo"]) == metrics["ci95"]["backward_transfer"][0]
    assert float(csv_rows[0]["routing_accuracy"]) == 0.4702 and csv_rows[1]["routing_accuracy"] == ""
    assert csv_rows[0]["probe_k"] == "10" and float(csv_rows[0]["probe_end"]) == 0.9 - 0.01 * 30
    assert (tmp_path / "out" / "forgetting_table.md").read_text() == report.document == report.streams


def test_heat_map_values_are_the_counts(tmp_path: Path) -> None:
    stream = load_stream(write_stream(tmp_path, rows=2, metrics=False))
    assert stream.values() == [[60 / 72, None, None], [41 / 72, 66 / 70, None], [None, None, None]]
    assert (stream.done, stream.complete, stream.k) == (2, False, 10)


def test_figures_are_images_in_markdown_html_and_tensorboard(tmp_path: Path) -> None:
    write_stream(tmp_path / "runs")
    write_stream(tmp_path / "runs", method="lora", hot_swap=False)
    out = tmp_path / "out"
    assert cli_main(["report", str(tmp_path / "runs"), "--output", str(out), "--html"]) == 0
    pngs = ["stream_matrix_full_seed0.png", "stream_matrix_lora_seed0.png", STREAM_CURVE_PNG]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        assert width > 100 and height > 100
    document = (out / "forgetting_table.md").read_text()
    assert "Figures: " + ", ".join(f"`{n}`" for n in pngs) + "." in document
    page = (out / "report.html").read_text()
    for name in pngs:
        assert f"<figcaption>{name}</figcaption>" in page
    assert page.count('src="data:image/png;base64,') == 3
    assert "<td><code>full/seed0</code></td>" in page and "<h3>Continual streams</h3>" in page
    assert "Forgetting table" not in page  # streams only
    (events,) = out.glob(f"events.out.tfevents.*{REPORT_SUFFIX}")
    acc = EventAccumulator(str(events), size_guidance={"images": 0, "tensors": 0})
    acc.Reload()
    assert sorted(acc.Tags()["images"]) == sorted(f"report/{Path(n).stem}" for n in pngs)
    image = acc.Images("report/stream_forgetting")[0]
    assert image.encoded_image_string == (out / STREAM_CURVE_PNG).read_bytes()
    text = acc.Tensors("report/tables/text_summary")[0].tensor_proto.string_val[0].decode()
    assert text == document


def test_incomplete_streams_are_noted_not_a_crash(tmp_path: Path, capsys) -> None:
    write_stream(tmp_path / "runs", rows=1, metrics=False)  # killed during task 2
    empty = write_stream(tmp_path / "runs", method="lora", rows=0, metrics=False)  # killed in task 1
    write_stream(tmp_path / "runs", method="topk", rows=3, metrics=False, hot_swap=True)  # killed in hot swap
    out = tmp_path / "out"
    assert cli_main(["report", str(tmp_path / "runs"), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {r["stream"]: r for r in table_rows(printed)}
    assert rows["`full/seed0`"]["tasks"] == "1 of 3 (incomplete)"
    assert (
        rows["`full/seed0`"]["ACC [95% CI]"] == "—"
        and rows["`full/seed0`"]["probe @end"] == "80.00 (step 10)"
    )
    assert (
        rows["`lora/seed0`"]["tasks"] == "0 of 3 (incomplete)" and rows["`lora/seed0`"]["probe @start"] == "—"
    )
    assert rows["`topk/seed0`"]["tasks"] == "3 of 3 (incomplete)"
    for name, done in (("full/seed0", 1), ("lora/seed0", 0), ("topk/seed0", 3)):
        assert (
            f"Stream `{name}` ({tmp_path / 'runs' / name}) is incomplete: {done} of 3 tasks done, " in printed
        )
    assert (out / "stream_matrix_full_seed0.png").is_file()
    assert not (out / "stream_matrix_lora_seed0.png").exists()  # no row of R yet
    assert empty.is_dir() and (out / STREAM_CURVE_PNG).is_file()


def test_sub_runs_stay_out_of_the_forgetting_table(tmp_path: Path, capsys) -> None:
    stream = write_stream(tmp_path / "runs" / "stream")
    ordinary = write_run(tmp_path / "runs", "full", FULL)
    report = write_report([tmp_path / "runs"], tmp_path / "out")
    assert [r.run for r in report.rows] == [str(ordinary)]  # the stream's three sub-runs are not rows
    assert "The streams' task sub-runs (`1-d45`, `2-d67`, `3-d89`) are ordinary fits" in report.streams
    assert report.document.index("| method | trainable params |") < report.document.index(
        "## Continual streams"
    )
    # a sub-run's own directory is an ordinary run
    alone = write_report([stream / "2-d67"], tmp_path / "out2")
    assert [r.run for r in alone.rows] == [str(stream / "2-d67")] and alone.streams == ""
    # the command prints both tables
    assert cli_main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "out3")]) == 0
    printed = capsys.readouterr().out
    assert "| full fine-tuning |" in printed and "| full fine-tuning | `full/seed0` | 0 | 3 |" in printed


def test_a_stream_file_named_stream_yaml_is_not_a_stream(tmp_path: Path) -> None:
    write_run(tmp_path / "runs", "full", FULL)
    (tmp_path / "runs" / "stream.yaml").write_text(yaml.safe_dump({"method": ["a.yaml"], "tasks": []}))
    report = write_report([tmp_path / "runs"], tmp_path / "out")
    assert report.streams == "" and len(report.rows) == 1


def test_a_damaged_stream_file_is_named(tmp_path: Path, capsys) -> None:
    path = write_stream(tmp_path / "runs")
    (path / "stream_metrics.json").write_text('{"average_accuracy": 0.5')
    with pytest.raises(ReportError, match=re.escape(str(path / "stream_metrics.json"))):
        write_report([tmp_path / "runs"], tmp_path / "out")
    (path / "stream_metrics.json").unlink()
    (path / "stream_forgetting.jsonl").write_text('{"step": 0, "k": 10}\n')
    assert cli_main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "out")]) == 1
    assert f"{path / 'stream_forgetting.jsonl'}:1 lacks ['top1']" in capsys.readouterr().err


@pytest.mark.slow
def test_a_real_stream_is_reported(tmp_path: Path, backbone: Path, capsys) -> None:
    from tests.test_stream import TASKS as STREAM_TASKS
    from tests.test_stream import stream_file

    config = stream_file(tmp_path, backbone, tasks=STREAM_TASKS[:2], hot_swap=True)
    assert cli_main(["stream", "--config", str(config), "--output", str(tmp_path / "stream")]) == 0
    root = tmp_path / "stream" / "full" / "seed0"
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli_main(["report", str(tmp_path / "stream"), "--output", str(out), "--html"]) == 0
    printed = capsys.readouterr().out
    (row,) = table_rows(printed)
    assert (row["method"], row["stream"], row["seed"], row["tasks"]) == (
        "full fine-tuning",
        "`full/seed0`",
        "0",
        "2",
    )
    assert {key: row[key] for key in expected_cells(root)} == expected_cells(root)
    # the heat map's values are the stream's own R, exactly
    assert load_stream(root).values() == json.loads((root / "stream_metrics.json").read_text())["R"]
    assert "The streams' task sub-runs (`1-d45`, `2-d67`, `ref-2-d67`)" in printed
    for name in ("stream_matrix_full_seed0.png", STREAM_CURVE_PNG):
        assert (out / name).read_bytes().startswith(PNG_SIGNATURE)
        assert f"<figcaption>{name}</figcaption>" in (out / "report.html").read_text()
