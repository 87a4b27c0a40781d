"""A stream's anti-forgetting anchor (``anchor: previous | start``): L2-SP and distillation toward each
task's start (the previous task's end) or toward the stream's start weights (the pretrained model)."""

from __future__ import annotations

import pytest
import torch
import yaml

from ftforget.commands import main
from ftforget.commands.stream import check_tasks
from ftforget.resources import config_dir, demo_config_dir
from ftforget.stream.config import fit_settings, load_stream
from ftforget.stream.run import stream_dir
from tests.test_stream import TASKS, stream_file


def _anchors(ckpt) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    prefix = "l2sp_anchors."
    return {k[len(prefix) :].replace("__", "."): v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.slow
@pytest.mark.parametrize("anchor", ["previous", "start"])
def test_the_second_task_pulls_toward_the_chosen_anchor(tmp_path, backbone, anchor) -> None:
    path = stream_file(tmp_path, backbone, method="full_l2sp", steps=4, tasks=TASKS[:2], anchor=anchor)
    assert main(["stream", "--config", str(path), "--output", str(tmp_path / "out")]) == 0
    name = "full_l2sp" + ("_anchor-start" if anchor == "start" else "")
    root = tmp_path / "out" / name / "seed0"
    config = yaml.safe_load((root / "2-d67" / "config.yaml").read_text())["model"]["init_args"]
    anchors = _anchors(root / "2-d67" / "checkpoints" / "last.ckpt")
    start = torch.load(backbone, weights_only=True)
    carried = torch.load(root / "carried" / "1-d45.pth", weights_only=True)
    expected = start if anchor == "start" else carried
    other = carried if anchor == "start" else start
    assert config.get("anchor_weights") == (str(backbone) if anchor == "start" else None)
    assert anchors and set(anchors) == {k for k in start if k in anchors}
    for key, value in anchors.items():  # bit for bit the chosen weights
        assert torch.equal(value, expected[key]), key
    assert any(not torch.equal(value, other[key]) for key, value in anchors.items())
    # task 1 starts from the start weights: both anchors are the same there
    for key, value in _anchors(root / "1-d45" / "checkpoints" / "last.ckpt").items():
        assert torch.equal(value, start[key]), key


def test_anchor_start_needs_an_anti_forgetting_term(tmp_path, backbone, capsys) -> None:
    path = stream_file(tmp_path, backbone, method="full", tasks=TASKS[:2], anchor="start")
    assert main(["stream", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "anchor: start anchors L2-SP and distillation" in err and "'d45'" in err and str(path) in err
    path = stream_file(tmp_path, backbone, method="full", tasks=TASKS[:2], anchor="pretrained")
    assert main(["stream", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    assert "anchor must be one of ['previous', 'start'], got 'pretrained'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_block_expansion_with_l2sp_to_the_start_fails_before_any_fit(tmp_path, backbone, capsys) -> None:
    path = stream_file(
        tmp_path, backbone, method="block_expansion", tasks=TASKS[:2], anchor="start",
        common={"data": {"init_args": {"old_digits": [0, 1, 2, 3]}}, "model": {"init_args": {"l2sp_weight": 0.1}}},
    )  # fmt: skip
    assert main(["stream", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "task 1-d45 does not build" in err and "Block Expansion trains new blocks" in err, err
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_the_distillation_overlay_builds_every_task_of_the_shipped_stream(tmp_path, backbone) -> None:
    methods = [
        demo_config_dir() / "full.yaml",
        demo_config_dir() / "common.yaml",
        config_dir() / "stream" / "distill.yaml",
    ]
    config = load_stream(config_dir() / "stream" / "digits.yaml", methods)
    assert config.method_name == "full+distill"
    assert stream_dir(tmp_path, config) == tmp_path / "full+distill" / "seed0"
    for task in config.tasks:
        assert fit_settings(config, task)["model"]["init_args"]["distill_weight"] == 1.0
    check_tasks(config, backbone, tmp_path / "stream")  # raises if a task does not build
    assert load_stream(config_dir() / "stream" / "digits.yaml").method_name == "full"
