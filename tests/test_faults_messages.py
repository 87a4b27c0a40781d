"""Fault injection on user input: every message is one line that names the file or option at fault.

Through :func:`ftforget.commands.main`: exit 2 and one ``ftforget <command>: error: ...`` line for bad
input; ``ftforget report`` keeps its own exit 1 for a run it cannot use (a :class:`ReportError`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from ftforget.commands import main
from ftforget.config_files import check_config_file
from ftforget.data.pixel_cache import PixelCacheDataset
from ftforget.report.runs import ReportError, event_file_damage, read_measurements, read_scalars
from tests.helpers import warnings_of
from tests.test_cli import ROOT, tiny_overrides

BAD_YAML = "model:\n  class_path: ftforget.methods.LoRA\n  init_args: [r, 4\n  bad: : :\n"


def one_error_line(capsys: pytest.CaptureFixture[str], command: str, *names: str) -> str:
    """The one error line of ``command`` on stderr, checked to name every one of ``names``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"ftforget {command}: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------ malformed YAML
@pytest.mark.parametrize("command", ["fit", "test", "measure"])
def test_malformed_yaml_config_names_the_file_and_line(tmp_path: Path, capsys, command: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(BAD_YAML)
    extra = ["--probe.root", str(tmp_path)] if command == "measure" else []
    assert main([command, "--config", str(bad), *extra]) == 2
    line = one_error_line(capsys, command, f"--config '{bad}'", "malformed YAML at line 4")
    assert "<unicode string>" not in line and "started at line 3" in line


def test_config_equals_form_and_non_mapping_yaml(tmp_path: Path, capsys) -> None:
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    assert main(["fit", f"--config={listed}"]) == 2
    one_error_line(capsys, "fit", f"--config '{listed}'", "not a mapping of options")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=f"--config '{binary}' is not a text"):
        check_config_file(binary)


# -------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("command", ["fit", "test"])
def test_truncated_ckpt_to_fit_and_test_is_named(tmp_path: Path, capsys, command: str) -> None:
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "ftforget_method": "LoRA", "global_step": 1}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:300])
    args = [command, "--config", str(ROOT / "configs/lora.yaml"), *tiny_overrides(tmp_path)]
    assert main([*args, "--ckpt_path", str(ckpt)]) == 2
    one_error_line(capsys, command, f"--ckpt_path '{ckpt}'", "is not a readable Lightning checkpoint")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("text", "is not a Lightning checkpoint, or it is damaged"),
        ("empty", "is not a Lightning checkpoint, or it is damaged"),
        ("random", "is not a Lightning checkpoint, or it is damaged"),
        ("no_state_dict", "is not a Lightning checkpoint (no 'state_dict')"),
        ("directory", "is a directory; give a .ckpt file in it"),
    ],
)
def test_measure_ckpt_path_that_is_no_checkpoint(tmp_path: Path, capsys, kind: str, message: str) -> None:
    path = tmp_path / "model.ckpt"
    if kind == "text":
        path.write_text("epoch=3 step=100\nnot a checkpoint\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(1000))
    elif kind == "no_state_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    else:
        path.mkdir()
    assert main(["measure", "--ckpt_path", str(path), "--probe.root", str(tmp_path)]) == 2
    one_error_line(capsys, "measure", f"'{path}'", message)


def test_measure_output_directory_is_refused_before_measuring(tmp_path: Path, capsys, monkeypatch) -> None:
    import ftforget.commands.measure as measure_module

    monkeypatch.setattr(measure_module, "measure", lambda *a, **kw: pytest.fail("measured before the check"))
    monkeypatch.setattr(
        measure_module, "load_method", lambda *a, **kw: pytest.fail("loaded before the check")
    )
    out = tmp_path / "results"
    out.mkdir()
    args = [
        "measure",
        "--backbone",
        "vit_base_patch16_224",
        "--probe.root",
        str(tmp_path),
        "--output",
        str(out),
    ]
    assert main(args) == 2
    one_error_line(capsys, "measure", f"--output '{out}' is a directory", str(out / "knn.json"))


# ------------------------------------------------------------------------------------------- report
def write_run(run: Path, lines: list[str]) -> Path:
    run.mkdir(parents=True)
    (run / "forgetting.jsonl").write_text("\n".join(lines) + "\n")
    return run


GOOD = json.dumps({"step": 0, "k": 20, "top1": 0.5, "top5": 0.9, "new_task_val_acc1": None})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"step": 10, "k": 20, "top1": "abc"}', "has top1='abc', expected a number"),
        ('{"step": "10", "k": 20, "top1": 0.4}', "has step='10', expected an integer"),
        ('{"step": 10, "k": 2.5, "top1": 0.4}', "has k=2.5, expected an integer"),
        ('{"step": 10, "k": 20, "top1": true}', "has top1=True, expected a number"),
        ('{"step": 10, "k": 20, "top1": 0.4, "top5": [1]}', "has top5=[1], expected a number or null"),
        ('{"step": -1, "k": 20, "top1": 0.4}', "expected step >= 0 and k >= 1"),
        ("[1, 2, 3]", "is not a JSON object but list"),
        ("7", "is not a JSON object but int"),
        ('{"step": 10, "top1": 0.4}', "lacks ['k']"),
    ],
)
def test_report_names_the_jsonl_line_of_wrong_types(tmp_path: Path, capsys, line: str, message: str) -> None:
    run = write_run(tmp_path / "run", [GOOD, line])
    with pytest.raises(ReportError, match=re.escape("forgetting.jsonl:2 ") + ".*" + re.escape(message)):
        read_measurements(run)
    assert main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1 and err[0].startswith("ftforget report: ") and f"{run / 'forgetting.jsonl'}:2" in err[0]
    )


def test_report_names_an_unreadable_jsonl(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "forgetting.jsonl").write_bytes(b"\xff\xfe\x00\x01garbage")
    with pytest.raises(ReportError, match=f"{run / 'forgetting.jsonl'} is unreadable"):
        read_measurements(run)


def scalar_run(run: Path, steps: int = 40) -> Path:
    writer = SummaryWriter(str(run))
    for step in range(steps):
        writer.add_scalar("forgetting/knn_top1", 0.8 - step / 100, step)
    writer.close()
    return next(run.glob("events.out.tfevents.*"))


@pytest.mark.parametrize("damage", ["random", "truncated", "text"])
def test_damaged_event_file_is_named_and_the_rest_used(tmp_path: Path, damage: str) -> None:
    """The decision: a damaged event file never stops the report; a warning names it, and what TensorBoard
    reads before the damage (a run killed while writing) is used."""
    events = scalar_run(tmp_path / "run")
    data = events.read_bytes()
    assert event_file_damage(events) == ""
    if damage == "random":
        events.write_bytes(np.random.default_rng(0).bytes(700))
    elif damage == "truncated":
        events.write_bytes(data[: len(data) * 2 // 3])
    else:
        events.write_text("this is not an event file\n" * 5)
    with warnings_of("ftforget.report.runs") as warned:
        scalars = read_scalars(tmp_path / "run")
    assert len(warned) == 1 and str(events) in warned[0] and "is damaged" in warned[0]
    kept = scalars.get("forgetting/knn_top1", {})
    if damage == "truncated":
        assert "cut short" in warned[0] and 0 < len(kept) < 40 and kept[0] == pytest.approx(0.8)
    else:
        assert "not a TFRecord file" in warned[0] and kept == {}


def test_intact_and_empty_event_files_give_no_warning(tmp_path: Path) -> None:
    scalar_run(tmp_path / "run")
    (tmp_path / "run" / "events.out.tfevents.1.host.1.0").write_bytes(b"")  # a writer that never flushed
    with warnings_of("ftforget.report.runs") as warned:
        assert len(read_scalars(tmp_path / "run")["forgetting/knn_top1"]) == 40
    assert warned == []


# -------------------------------------------------------------------------------------- pixel cache
def test_pixel_cache_garbage_json_names_the_file(tmp_path: Path) -> None:
    prefix = tmp_path / "imagenet1k-abc-bank"
    prefix.with_suffix(".u8").write_bytes(bytes(3 * 32 * 32 * 3))
    prefix.with_suffix(".json").write_bytes(np.random.default_rng(0).bytes(100))
    with pytest.raises(ValueError, match=f"pixel cache file '{prefix}.json' is unreadable.*delete it"):
        PixelCacheDataset(prefix)
    prefix.with_suffix(".json").write_text('{"n": 3, "size": 32}')
    with pytest.raises(ValueError, match=f"pixel cache file '{prefix}.json' is unreadable .KeyError"):
        PixelCacheDataset(prefix)
    prefix.with_suffix(".json").write_text('{"n": 3, "size": 32, "labels": [0, 1, 2]}')
    assert len(PixelCacheDataset(prefix)) == 3
