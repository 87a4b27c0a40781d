"""ftforget stream: the stream file's checks, what a task hands on, and short digits streams end to end
(each task's fit from the previous one's carried backbone, the matrix, the probe over the stream, a SIGKILL
during task 2 and a restart that ends bit-identical to an uninterrupted stream)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ftforget.backbones import build_backbone
from ftforget.commands import main
from ftforget.methods import BlockExpansion, FullFineTuning, LoRA
from ftforget.resources import config_dir
from ftforget.stream.carry import plain_backbone_state
from ftforget.stream.config import load_stream
from ftforget.stream.metrics import stream_metrics
from tests.test_workflow import DEMO

ROOT = Path(__file__).resolve().parent.parent
KWARGS = yaml.safe_load((DEMO / "common.yaml").read_text())["model"]["init_args"]["backbone_kwargs"]
TASKS = [{"name": f"d{a}{b}", "config": {"data": {"init_args": {"new_digits": [a, b]}}}} for a, b in ((4, 5), (6, 7), (8, 9))]  # fmt: skip


def stream_file(
    tmp_path: Path, backbone: Path, method: str = "full", steps: int = 6, tasks=TASKS, **extra
) -> Path:
    config = {
        "method": [str(DEMO / f"{method}.yaml"), str(DEMO / "common.yaml")],
        "start": str(backbone), "steps": steps, "seed": 0, "checkpoint_every": 3,
        "common": {"data": {"init_args": {"old_digits": [0, 1, 2, 3]}}}, "tasks": tasks, **extra,
    }  # fmt: skip
    path = tmp_path / f"stream_{method}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_shipped_digits_stream_loads() -> None:
    config = load_stream(config_dir() / "stream" / "digits.yaml")
    assert [t.name for t in config.tasks] == ["d45", "d67", "d89"]
    assert [t.config["data"]["init_args"]["new_digits"] for t in config.tasks] == [[4, 5], [6, 7], [8, 9]]
    assert config.method == [
        config_dir() / "stream" / ".." / "demo" / f for f in ("full.yaml", "common.yaml")
    ]
    assert (config.start, config.steps, config.method_name, config.hot_swap) == ("demo", 200, "full", True)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": []}, "tasks must be a non-empty list"),
        ({"taskz": 1}, "unknown key(s) ['taskz']"),
        ({"tasks": [TASKS[0], TASKS[0]]}, "task names ['d45'] appear twice"),
        ({"steps": 0}, "steps must be an integer >= 1, got 0"),
        ({"tasks": [{"name": "a/b"}]}, "task 1 name 'a/b'"),
        ({"method": ["nowhere.yaml"]}, "method config"),
        ({"start": "missing.pth"}, "start weights file"),
    ],
)
def test_bad_streams_fail_in_one_line_naming_the_key(tmp_path, backbone, capsys, change, message) -> None:
    path = stream_file(tmp_path, backbone, **change)
    assert main(["stream", "--config", str(path), "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_missing_stream_file_is_named(tmp_path, capsys) -> None:
    assert main(["stream", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "stream --config" in capsys.readouterr().err


def _trained(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("method", ["full", "lora", "block_expansion"])
def test_the_carried_backbone_computes_the_trained_backbones_function(method) -> None:
    make = {
        "full": lambda: FullFineTuning(num_classes=2, backbone="vit_base_patch16_224", backbone_kwargs=KWARGS),
        "lora": lambda: LoRA(r=4, num_classes=2, backbone="vit_base_patch16_224", backbone_kwargs=KWARGS),
        "block_expansion": lambda: BlockExpansion(p=1, num_classes=2, backbone="vit_base_patch16_224", backbone_kwargs=KWARGS),
    }  # fmt: skip
    model = _trained(make[method]())
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = model.backbone(x)
        state = plain_backbone_state(model.backbone)
    depth = KWARGS["depth"] + (1 if method == "block_expansion" else 0)
    plain = build_backbone("vit_base_patch16_224", **{**KWARGS, "depth": depth}).eval()
    plain.load_state_dict(state, strict=True)  # plain timm names, nothing left over
    with torch.no_grad():
        got = plain(x)
    if method == "lora":  # the merged weight W + scale·B@A: one rounding away from the two matmuls
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert not torch.equal(
            state["blocks.0.attn.qkv.weight"],
            make["lora"]().backbone.state_dict()["blocks.0.attn.qkv.base.weight"],
        )
    else:
        assert torch.equal(got, expected)


def _run(path: Path, out: Path) -> int:
    return main(["stream", "--config", str(path), "--output", str(out)])


def _files(root: Path) -> dict[str, bytes]:
    names = ["accuracy_matrix.json", "stream_metrics.json", "stream_forgetting.jsonl"]
    return {n: (root / n).read_bytes() for n in names}


@pytest.mark.slow
def test_full_fine_tuning_stream_end_to_end(tmp_path, backbone, capsys) -> None:
    path = stream_file(tmp_path, backbone)
    assert _run(path, tmp_path / "out") == 0
    root = tmp_path / "out" / "full" / "seed0"
    names = ["1-d45", "2-d67", "3-d89"]
    # each task's fit started from the backbone the previous task carried out, bit for bit
    for i, name in enumerate(names):
        config = yaml.safe_load((root / name / "config.yaml").read_text())
        start = str(backbone) if i == 0 else str(root / "carried" / f"{names[i - 1]}.pth")
        assert config["model"]["init_args"]["checkpoint"] == start
        assert (
            config["data"]["init_args"]["new_digits"] == TASKS[i]["config"]["data"]["init_args"]["new_digits"]
        )
        assert config["data"]["init_args"]["old_digits"] == [0, 1, 2, 3]
        last = torch.load(root / name / "checkpoints" / "last.ckpt", weights_only=True)
        carried = torch.load(root / "carried" / f"{name}.pth", weights_only=True)
        assert last["global_step"] == 6
        assert all(torch.equal(last["state_dict"][f"backbone.{k}"], v) for k, v in carried.items())
    matrix = json.loads((root / "accuracy_matrix.json").read_text())
    assert matrix["tasks"] == names and [len(r["correct"]) for r in matrix["rows"]] == [1, 2, 3]
    # the diagonal is each sub-run's own test of its final weights (full fine-tuning: the same weights)
    for i, name in enumerate(names):
        test = [json.loads(line) for line in (root / name / "test_results.jsonl").read_text().splitlines()]
        row = matrix["rows"][i]
        assert row["correct"][i] / row["total"][i] == pytest.approx(test[-1]["test/acc1"], abs=1e-7)
    R = [
        [r["correct"][j] / r["total"][j] if j < len(r["correct"]) else None for j in range(3)]
        for r in matrix["rows"]
    ]
    metrics = json.loads((root / "stream_metrics.json").read_text())
    assert {k: metrics[k] for k in stream_metrics(R)} == stream_metrics(R) and metrics["R"] == R
    for name in ("average_accuracy", "average_forgetting", "backward_transfer"):  # 95% bootstrap intervals
        lo, hi = metrics["ci95"][name]
        assert lo <= metrics[name] <= hi
    # the probe: one curve over the cumulative step, equal on both sides of every task boundary
    curve = [json.loads(line) for line in (root / "stream_forgetting.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve] == [0, 1, 2, 5, 6, 6, 7, 8, 11, 12, 12, 13, 14, 17, 18]
    for i, record in enumerate(curve):
        if record["boundary"]:
            assert record["top1"] == curve[i - 1]["top1"] and record["task_step"] == 0
    assert all(r["stream_drop_abs"] == curve[0]["top1"] - r["top1"] for r in curve)
    assert "average_forgetting" in capsys.readouterr().out
    # again: nothing to do, the same files
    before = _files(root)
    assert _run(path, tmp_path / "out") == 0
    assert "3-d89 seed 0: done" in capsys.readouterr().out and _files(root) == before
    # and with other settings in the same directory: refused, naming the file
    path.write_text(path.read_text().replace("steps: 6", "steps: 7"))
    assert _run(path, tmp_path / "out") == 2
    assert "started with other settings" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "block_expansion"])
def test_lora_merges_and_block_expansion_grows_across_tasks(tmp_path, backbone, method) -> None:
    path = stream_file(tmp_path, backbone, method=method, steps=4, tasks=TASKS[:2])
    assert _run(path, tmp_path / "out") == 0
    root = tmp_path / "out" / method / "seed0"
    grows = 1 if method == "block_expansion" else 0
    for i, name in enumerate(["1-d45", "2-d67"]):
        settings = yaml.safe_load((root / "carried" / f"{name}.yaml").read_text())
        assert settings["backbone_kwargs"]["depth"] == KWARGS["depth"] + grows * (i + 1)
        state = torch.load(root / "carried" / f"{name}.pth", weights_only=True)
        assert not any("lora" in k or ".base." in k for k in state)
    config = yaml.safe_load((root / "2-d67" / "config.yaml").read_text())
    assert config["model"]["init_args"]["backbone_kwargs"]["depth"] == KWARGS["depth"] + grows
    curve = [json.loads(line) for line in (root / "stream_forgetting.jsonl").read_text().splitlines()]
    (boundary,) = [i for i, r in enumerate(curve) if r["boundary"]]
    if method == "block_expansion":  # the new block is an identity copy: the same function
        assert curve[boundary]["top1"] == curve[boundary - 1]["top1"]
    else:  # merged: the same function up to rounding, at most one probe query apart
        assert (
            abs(curve[boundary]["top1"] - curve[boundary - 1]["top1"]) <= 1 / curve[boundary]["num_queries"]
        )


def kill_during_task_2(path: Path, output: Path, root: Path) -> Path:
    """Starts ``ftforget stream --config path --output output`` in a child process and SIGKILLs it (its
    whole process group) as soon as task 2's ``last.ckpt`` exists under the stream directory ``root``;
    returns that checkpoint's path."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FTFORGET_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "ftforget", "stream", "--config", str(path), "--output", str(output)]
    proc = subprocess.Popen(command, env=env, cwd=path.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    task2 = root / "2-d67" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not task2.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return task2


@pytest.mark.slow
def test_a_stream_killed_during_task_2_resumes_bit_identical(tmp_path, backbone) -> None:
    steps = 12
    path = stream_file(tmp_path, backbone, steps=steps)
    assert _run(path, tmp_path / "whole") == 0

    task2 = kill_during_task_2(path, tmp_path / "cut", tmp_path / "cut" / "full" / "seed0")
    cut_step = torch.load(task2, weights_only=True)["global_step"]
    assert 0 < cut_step < steps  # killed during task 2, between its checkpoints
    assert not (tmp_path / "cut" / "full" / "seed0" / "carried" / "2-d67.pth").exists()

    assert _run(path, tmp_path / "cut") == 0  # the same command again
    whole, cut = tmp_path / "whole" / "full" / "seed0", tmp_path / "cut" / "full" / "seed0"
    for name in ["1-d45", "2-d67", "3-d89"]:
        a = torch.load(whole / "carried" / f"{name}.pth", weights_only=True)
        b = torch.load(cut / "carried" / f"{name}.pth", weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        heads = [
            torch.load(r / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
            for r in (whole, cut)
        ]
        assert torch.equal(heads[0]["head.weight"], heads[1]["head.weight"])
    assert (whole / "accuracy_matrix.json").read_text() == (cut / "accuracy_matrix.json").read_text()
    assert (whole / "stream_metrics.json").read_text() == (cut / "stream_metrics.json").read_text()

    def curve(root: Path) -> list[tuple]:  # timings differ between any two runs; the measurements do not
        lines = (root / "stream_forgetting.jsonl").read_text().splitlines()
        return [(r["step"], r["task"], r["top1"], r["top5"]) for r in map(json.loads, lines)]

    assert curve(whole) == curve(cut)


@pytest.mark.slow
def test_hot_swap_references_are_fits_from_the_start_weights(tmp_path, backbone, capsys) -> None:
    path = stream_file(tmp_path, backbone, steps=4, tasks=TASKS[:2])
    assert _run(path, tmp_path / "out") == 0
    root = tmp_path / "out" / "full" / "seed0"
    assert not (root / "hot_swap.json").exists()
    before = (root / "accuracy_matrix.json").read_bytes()
    # switched on later, in the same directory: the stream is done, only the references are fitted
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), "hot_swap": True}))
    assert _run(path, tmp_path / "out") == 0
    assert "2-d67 seed 0: done" in capsys.readouterr().out
    assert (root / "accuracy_matrix.json").read_bytes() == before
    config = yaml.safe_load((root / "ref-2-d67" / "config.yaml").read_text())
    assert config["model"]["init_args"]["checkpoint"] == str(backbone)
    swap = json.loads((root / "hot_swap.json").read_text())
    test = [json.loads(line) for line in (root / "ref-2-d67" / "test_results.jsonl").read_text().splitlines()]
    assert swap["oracle"][1] == pytest.approx(test[-1]["test/acc1"], abs=1e-7)
    first = json.loads((root / "1-d45" / "test_results.jsonl").read_text().splitlines()[-1])
    assert swap["oracle"][0] == pytest.approx(first["test/acc1"], abs=1e-7)  # task 1's reference is itself
    assert (
        0 <= swap["routed_correct"] <= swap["total"]
        and swap["routed_average_accuracy"] <= swap["oracle_average_accuracy"]
    )
    metrics = json.loads((root / "stream_metrics.json").read_text())
    R = metrics["R"]
    assert metrics["reference"] == swap["oracle"]
    assert metrics["single_task_transfer"] == R[1][1] - swap["oracle"][1]


def test_the_readme_stream_commands_name_real_files() -> None:
    from tests.test_readme import commands, section

    found = [c for c in commands(section("Continual streams")) if c[0] == "stream"]
    names = set()
    for args in found:
        methods = [ROOT / a for i, a in enumerate(args) if args[i - 1] == "--method"] or None
        config = load_stream(ROOT / args[args.index("--config") + 1], methods)
        assert [t.name for t in config.tasks] == ["d45", "d67", "d89"] and config.hot_swap
        names.add(config.method_name)
    assert len(found) == 5
    assert names == {"full", "lora", "block_expansion", "full_l2sp", "lora+distill"}


def test_a_task_that_does_not_build_fails_before_any_fit(tmp_path, backbone, capsys) -> None:
    bad = [*TASKS[:2], {"name": "d8x", "config": {"data": {"init_args": {"new_digits": [8, 11]}}}}]
    path = stream_file(tmp_path, backbone, tasks=bad)
    assert _run(path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "task 3-d8x does not build: digits [8, 11] must be at least two distinct values in 0..9" in err
    assert str(path) in err and err.count("\n") == 1
    assert not list((tmp_path / "out" / "full" / "seed0").glob("*-d*/"))  # no sub-run started
