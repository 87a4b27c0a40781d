"""ftforget sweep --stream: one ``ftforget stream`` per (method, seed), in the directory ``ftforget stream``
itself uses; what it plans, what it refuses, the SLURM array it writes (run with stand-in ``srun``), a
local sweep whose streams equal ``ftforget stream``'s and that a second invocation finds done, and (slow,
on the local SLURM cluster) a 2-task array whose streams, sharing one demo pretraining, equal the local
sweep's exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from ftforget.commands import main
from ftforget.commands.sweep import main as sweep_main
from ftforget.resources import demo_config_dir
from tests.slurm_cluster import LocalCluster, local_cluster, missing_programs
from tests.test_slurm_script import STUB_SCONTROL, STUB_SRUN
from tests.test_stream import TASKS, stream_file

FILES = ("accuracy_matrix.json", "stream_metrics.json")


def _lora(out: Path, seed: int, stream: Path) -> str:
    lora, common = demo_config_dir() / "lora.yaml", demo_config_dir() / "common.yaml"
    return f"ftforget stream --config {stream} --method {lora} --method {common} --seed {seed} --output {out}"


def test_dry_run_plans_one_stream_per_method_and_seed(tmp_path: Path, backbone: Path, capsys) -> None:
    path = stream_file(tmp_path, backbone)  # its own method: the demo's full.yaml with common.yaml
    out = tmp_path / "out"
    argv = [
        "sweep",
        "--stream",
        str(path),
        "--methods",
        "full",
        "lora",
        "--seeds",
        "0",
        "1",
        "--output",
        str(out),
    ]
    assert main([*argv, "--dry-run"]) == 0
    # `full` is the stream file's own method (through the configs/ symlink): no --method, as `ftforget stream`
    assert capsys.readouterr().out.splitlines() == [
        f"ftforget stream --config {path} --seed 0 --output {out}",
        f"ftforget stream --config {path} --seed 1 --output {out}",
        _lora(out, 0, path),
        _lora(out, 1, path),
    ]
    assert main([*argv, "--dry-run", "--task", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [_lora(out, 0, path)]
    # no --methods, no --seeds: the stream file's method and seed; --methods also takes files joined by commas
    demo = demo_config_dir()
    files = f"{demo / 'block_expansion.yaml'},{demo / 'common.yaml'}"
    assert main(["sweep", "--stream", str(path), "--output", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out == f"ftforget stream --config {path} --seed 0 --output {out}\n"
    assert main(["sweep", "--stream", str(path), "--methods", files, "--output", str(out), "--dry-run"]) == 0
    assert capsys.readouterr().out == (
        f"ftforget stream --config {path} --method {demo / 'block_expansion.yaml'} --method "
        f"{demo / 'common.yaml'} --seed 0 --output {out}\n"
    )


def test_a_demo_start_plans_its_one_pretraining_first(tmp_path: Path, backbone: Path, capsys) -> None:
    path = stream_file(tmp_path, backbone, start="demo", pretrain_steps=20)
    out = tmp_path / "out"
    assert main(["sweep", "--stream", str(path), "--methods", "full", "lora", "--seeds", "0", "1",
                 "--output", str(out), "--dry-run"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    # every seed and both methods fine-tune one base: one pretraining (seeded with the stream file's seed)
    (note,) = [line for line in lines if line.startswith("#")]
    assert lines[0] == note and len(lines) == 5
    assert note.startswith(
        f"# first the demo's pretraining (in the first stream that needs it), into {out}/pretrained/"
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--preset", "demo", "--knob", "0.5"], "ftforget sweep --stream: --preset, --knob cannot be used with a stream"),
        (["--steps", "3", "--test_ckpt", "last"], "--test_ckpt, --steps cannot be used with a stream"),
        (["--", "--trainer.max_steps", "5"], "--stream: options after -- cannot be used with a stream"),
        (["--methods", "nope"], "sweep --methods 'nope': neither a demo method (full, top1, linear, lora,"),
        (["--methods", "lora", f"{demo_config_dir() / 'lora.yaml'}"], "two methods would share the directory ['lora']"),
        (["--seeds", "0", "0"], "sweep --seeds 0 0: a seed is given twice"),
        (["--slurm", "x.sbatch", "--gpus", "2"], "with 2 processes per task (--gpus/--devices): a stream runs as one process"),
        (["--slurm", "x.sbatch", "--gpus", "0", "--devices", "2"], "a stream runs as one process"),
    ],
)  # fmt: skip
def test_bad_stream_sweeps_are_refused_naming_the_options(
    tmp_path: Path, backbone: Path, capsys, monkeypatch, options: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    path = stream_file(tmp_path, backbone)
    own, extra = (
        (options[: options.index("--")], options[options.index("--") :]) if "--" in options else (options, [])
    )
    assert (
        main(["sweep", "--stream", str(path), "--output", str(tmp_path / "out"), *own, "--dry-run", *extra])
        == 2
    )
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not (tmp_path / "x.sbatch").exists()


def test_methods_need_a_stream_and_a_stream_seed_is_at_least_0(
    tmp_path: Path, backbone: Path, capsys
) -> None:
    assert main(["sweep", "--preset", "demo", "--methods", "lora", "--dry-run"]) == 2
    assert "ftforget sweep --methods: only with --stream FILE" in capsys.readouterr().err
    path = stream_file(tmp_path, backbone)
    assert main(["stream", "--config", str(path), "--seed", "-1", "--output", str(tmp_path / "out")]) == 2
    assert "stream --seed -1: give a seed >= 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_slurm_script_of_a_stream_sweep(tmp_path: Path, backbone: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = stream_file(tmp_path, backbone)
    script = tmp_path / "streams.sbatch"
    sweep = [
        "sweep",
        "--stream",
        str(path),
        "--methods",
        "full",
        "lora",
        "--seeds",
        "0",
        "1",
        "--output",
        "runs/s",
    ]
    assert main([*sweep, "--slurm", str(script), "--gpus", "0", "--time", "1:00:00"]) == 0
    assert f"wrote {script}: 4 array tasks" in capsys.readouterr().out
    lines = script.read_text().splitlines()
    for line in ("#SBATCH --array=0-3", "#SBATCH --ntasks-per-node=1", "#SBATCH --time=1:00:00", "#SBATCH --requeue",
                 "#SBATCH --signal=B:USR1@90", "#   0: full seed 0 -> runs/s/full/seed0",
                 "#   3: lora seed 1 -> runs/s/lora/seed1", "  3) log=runs/s/logs/lora-seed1.log ;;"):  # fmt: skip
        assert line in lines, line
    assert not any("gpu" in line for line in lines if line.startswith("#SBATCH"))
    (srun,) = [line for line in lines if line.startswith("srun ")]
    # the sweep's own arguments and --task, nothing for the fits: a stream's fits take their devices from
    # its method's configs
    assert srun == (
        f'srun --output="$log" --open-mode=append ftforget sweep --stream {path} --methods full lora --seeds 0 1 '
        '--output runs/s --task "$SLURM_ARRAY_TASK_ID" &'
    )
    assert (tmp_path / "runs" / "s" / "logs").is_dir()

    bin_dir = tmp_path / "bin"  # stand-in srun and scontrol that log their arguments
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log = tmp_path / "stub.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        STUB_LOG=str(log),
        SLURM_ARRAY_TASK_ID="2",
        SLURM_JOB_ID="7",
    )
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (call,) = [json.loads(line)["srun"] for line in log.read_text().splitlines()]
    assert call[:2] == ["--output=runs/s/logs/lora-seed0.log", "--open-mode=append"]  # under --chdir
    assert call[2:4] == ["ftforget", "sweep"] and call[-2:] == ["--task", "2"]
    # what task 2 runs: the LoRA stream of seed 0, and nothing else
    assert main([*call[3:], "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines() == [_lora(Path("runs/s"), 0, path)]


def _curve(root: Path) -> list[tuple]:  # timings differ between any two runs; the measurements do not
    lines = (root / "stream_forgetting.jsonl").read_text().splitlines()
    return [(r["step"], r["task"], r["top1"], r["top5"]) for r in map(json.loads, lines)]


@pytest.mark.slow
def test_a_local_stream_sweep_is_ftforget_streams_and_is_done_once(
    tmp_path: Path, backbone: Path, capsys
) -> None:
    path = stream_file(tmp_path, backbone, tasks=TASKS[:2])  # full fine-tuning, 2 tasks of 6 steps
    swept, alone = tmp_path / "swept", tmp_path / "alone"
    sweep = ["sweep", "--stream", str(path), "--seeds", "0", "1", "--output", str(swept)]
    assert main(sweep) == 0
    out = capsys.readouterr().out
    assert sorted(str(p.relative_to(swept)) for p in swept.glob("*/seed*")) == ["full/seed0", "full/seed1"]
    for seed in (0, 1):  # each stream's fits seeded with its seed
        assert f"| full | {seed} | " in out
        root = swept / "full" / f"seed{seed}"
        assert yaml.safe_load((root / "stream.yaml").read_text())["seed"] == seed
        for task in ("1-d45", "2-d67"):
            assert yaml.safe_load((root / task / "config.yaml").read_text())["seed_everything"] == seed
    # the sweep's seed-1 stream is what `ftforget stream --seed 1` gives: the same matrix and metrics exactly
    assert main(["stream", "--config", str(path), "--seed", "1", "--output", str(alone)]) == 0
    for name in FILES:
        assert (swept / "full" / "seed1" / name).read_bytes() == (
            alone / "full" / "seed1" / name
        ).read_bytes()
    assert _curve(swept / "full" / "seed1") == _curve(alone / "full" / "seed1")
    capsys.readouterr()

    calls: list[list[str]] = []

    def stage(args: list[str]) -> int:
        calls.append(args)
        return main(args)

    # Again: both streams are recognised as done and nothing runs; the same for ftforget stream's own stream.
    assert sweep_main(sweep[1:], stage=stage) == 0
    assert calls == [] and "full seed 0: done" in capsys.readouterr().out
    assert sweep_main(["--stream", str(path), "--seeds", "1", "--output", str(alone)], stage=stage) == 0
    assert calls == [] and "full seed 1: done" in capsys.readouterr().out
    assert main([*sweep, "--dry-run"]) == 0
    assert capsys.readouterr().out == "nothing to run: every run is done\n"
    # A stream that misses its last file: only that stream runs again (ftforget stream goes on with it).
    before = {name: (swept / "full" / "seed1" / name).read_bytes() for name in FILES}
    (swept / "full" / "seed1" / "stream_metrics.json").unlink()
    assert sweep_main(sweep[1:], stage=stage) == 0
    assert calls == [["stream", "--config", str(path), "--seed", "1", "--output", str(swept)]]
    assert {name: (swept / "full" / "seed1" / name).read_bytes() for name in FILES} == before


MISSING = missing_programs()


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with local_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


@pytest.mark.slow
@pytest.mark.skipif(bool(MISSING), reason=f"no local SLURM cluster: missing {', '.join(MISSING)} "
                    "(bash tests/system_packages.sh installs slurm-wlm and munge)")  # fmt: skip
def test_a_stream_array_equals_the_local_sweep(
    cluster: LocalCluster, tmp_path: Path, backbone: Path, capsys
) -> None:
    start = time.monotonic()
    # start: demo, a short pretraining: both array tasks ask for it at once, one builds it, the other waits
    path = stream_file(tmp_path, backbone, tasks=TASKS[:2], start="demo", pretrain_steps=20)
    array, local = tmp_path / "array", tmp_path / "local"
    sweep = ["sweep", "--stream", str(path), "--seeds", "0", "1"]
    script = tmp_path / "streams.sbatch"
    proc = subprocess.run(
        [sys.executable, "-m", "ftforget", *sweep, "--output", str(array), "--slurm", str(script), "--gpus", "0"],
        env=cluster.env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = cluster.run("sbatch", "--parsable", str(script)).stdout.strip()
    assert main([*sweep, "--output", str(local)]) == 0  # meanwhile, the same sweep here
    states = cluster.wait(job, timeout=900)
    with capsys.disabled():
        sys.stdout.write(f"\n[slurm] stream array {job}: {states} ({time.monotonic() - start:.0f} s)\n")
    assert states == {f"{job}_0": "COMPLETED", f"{job}_1": "COMPLETED"}
    logs = array / "logs"
    assert sorted(p.name for p in logs.glob("*.log")) == ["full-seed0.log", "full-seed1.log"]
    assert len(list((array / "pretrained").glob("*.pth"))) == 1
    assert sum("pretraining the backbone" in p.read_text() for p in logs.glob("*.log")) == 1  # built once
    for seed in (0, 1):
        a, b = array / "full" / f"seed{seed}", local / "full" / f"seed{seed}"
        for name in FILES:
            assert (a / name).read_bytes() == (b / name).read_bytes(), (seed, name)
        assert _curve(a) == _curve(b)
    # the array's streams are done for the sweep here too
    proc = subprocess.run([sys.executable, "-m", "ftforget", *sweep, "--output", str(array), "--dry-run"],
                          env=cluster.env(), capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.stdout == "nothing to run: every run is done\n", proc.stderr


def test_the_readme_stream_sweep_commands_plan_and_write_what_it_says(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from tests.test_readme import commands, in_tmp, section

    monkeypatch.chdir(tmp_path)
    sweeps = [c for c in commands(section("Continual streams")) if c[0] == "sweep"]
    assert len(sweeps) == 3
    for args in sweeps:
        argv = in_tmp(args, tmp_path)
        streams = 4 * 3 if "block_expansion" in argv else 2 * 2
        if "--slurm" in argv:
            assert main(argv) == 0, argv
            text = (tmp_path / "streams.sbatch").read_text()
            assert f"#SBATCH --array=0-{streams - 1}" in text and "#SBATCH --time=2:00:00" in text
            assert "#   11: full_l2sp seed 2 -> " in text and "--trainer" not in text
            assert subprocess.run(["bash", "-n", str(tmp_path / "streams.sbatch")]).returncode == 0
            continue
        if "--dry-run" not in argv:  # the shipped stream takes minutes per method: plan it
            argv.append("--dry-run")
        capsys.readouterr()
        assert main(argv) == 0, argv
        lines = capsys.readouterr().out.splitlines()
        assert lines[0].startswith("# first the demo's pretraining") and len(lines) == 1 + streams
        assert all(line.startswith("ftforget stream --config ") for line in lines[1:])


def test_a_stream_is_recognised_by_its_files_whatever_the_paths_spelling(
    tmp_path: Path, backbone: Path, monkeypatch
) -> None:
    from dataclasses import replace

    from ftforget.stream.config import load_stream
    from ftforget.stream.run import finished, prepare, same_stream

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(demo_config_dir().parent)  # as the clone's configs/ -> ftforget/configs
    path = stream_file(tmp_path, backbone)
    relative = load_stream(
        Path(path.name), [Path("configs/demo/lora.yaml"), Path("configs/demo/common.yaml")]
    )
    absolute = load_stream(path, [demo_config_dir() / "lora.yaml", demo_config_dir() / "common.yaml"])
    root = tmp_path / "out" / "lora" / "seed0"
    assert same_stream(relative, backbone, root) is None and not finished(relative, backbone, root)
    prepare(relative, backbone, root)  # what `ftforget stream` writes first
    assert same_stream(absolute, backbone, root) is True  # the same files, spelled otherwise
    assert same_stream(replace(absolute, steps=7), backbone, root) is False
    assert same_stream(replace(absolute, hot_swap=True), backbone, root) is True  # hot_swap only adds
    assert not finished(absolute, backbone, root)  # started, not finished
    metrics = root / "stream_metrics.json"
    metrics.write_text(json.dumps({"reference": None}))
    assert finished(absolute, backbone, root) and not finished(
        replace(absolute, hot_swap=True), backbone, root
    )
    metrics.write_text(json.dumps({"reference": [0.5, 0.5, 0.5]}))
    assert finished(replace(absolute, hot_swap=True), backbone, root) and not finished(
        absolute, backbone, root
    )
    assert not finished(replace(absolute, seed=1), backbone, root)  # another stream's record
