"""ftforget sweep: the commands it plans, the SLURM array it writes, and a kill-and-restart that ends with
the table of an uninterrupted sweep, each run once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ftforget.commands import main
from ftforget.report import read_csv
from ftforget.resources import config_dir, demo_config_dir
from ftforget.runs import write_knob_points
from ftforget.sweep import DEMO_METHODS, PAPER_CONFIGS, SweepRun, build_runs, preset

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_of_the_paper_preset(tmp_path: Path, capsys) -> None:
    assert (
        main(
            ["sweep", "--preset", "paper", "--seeds", "0", "1", "--output", str(tmp_path / "s"), "--dry-run"]
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10 * 2 * 2  # ten rows, two seeds, fit + test each
    full = config_dir() / "full.yaml"
    out = tmp_path / "s"
    assert lines[0] == (
        f"ftforget fit --config {full} --seed_everything 0 --trainer.logger.init_args.save_dir {out} "
        f"--trainer.logger.init_args.name full --trainer.logger.init_args.version seed0"
    )
    assert lines[1] == f"ftforget test --run {out}/full/seed0 --ckpt_path best --verbose false"
    assert [line.split()[3] for line in lines[::4]] == [
        str(config_dir() / f"{c}.yaml") for c in PAPER_CONFIGS
    ]


def test_slurm_array_script(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    script = tmp_path / "sweep.sbatch"
    argv = ["sweep", "--preset", "paper", "--seeds", "0", "1", "2", "--output", "runs/paper", "--slurm", str(script),
            "--gpus", "4", "--time", "12:00:00", "--setup", "source .venv/bin/activate", "--",
            "--config", "configs/forgetting.yaml"]  # fmt: skip
    assert main(argv) == 0
    assert f"wrote {script}: 30 array tasks" in capsys.readouterr().out
    text = script.read_text()
    for line in ("#SBATCH --array=0-29", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --time=12:00:00", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@90",
                 f'#SBATCH --chdir="{tmp_path}"', f'#SBATCH --output="{tmp_path}/runs/paper/logs/slurm-%A_%a.out"',
                 "source .venv/bin/activate", "#   0: full seed 0 -> runs/paper/full/seed0",
                 "#   29: block_expansion_p4 seed 2 -> runs/paper/block_expansion_p4/seed2",
                 "  0) log=runs/paper/logs/full-seed0.log ;;"):  # fmt: skip
        assert line in text.splitlines(), line
    (srun,) = [line for line in text.splitlines() if line.startswith("srun ")]
    # --task before the fit options; the device count of every fit follows --gpus
    assert srun == (
        'srun --output="$log" --open-mode=append ftforget sweep --preset paper --seeds 0 1 2 --output runs/paper '
        '--task "$SLURM_ARRAY_TASK_ID" -- --config configs/forgetting.yaml --trainer.devices 4 '
        "--trainer.accelerator gpu &"
    )
    assert (tmp_path / "runs" / "paper" / "logs").is_dir()  # SLURM opens the batch logs there at the start
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0  # valid shell


def test_a_task_is_one_run(tmp_path: Path, capsys) -> None:
    base = ["sweep", "--preset", "demo", "--seeds", "0", "1", "--output", str(tmp_path), "--dry-run"]
    assert main([*base, "--task", "3"]) == 0
    pretrain, fit, test = capsys.readouterr().out.splitlines()
    assert pretrain.startswith("# first the demo's pretraining, into ") and fit.startswith("ftforget fit ")
    # the demo preset tests the last checkpoint, as ftforget demo
    assert test == f"ftforget test --run {tmp_path}/top1/seed1 --ckpt_path last --verbose false"
    assert main([*base, "--task", "12"]) == 2
    assert "--task 12: this sweep has runs 0 to 11" in capsys.readouterr().err


def _fake_run(run: SweepRun, step: int, max_steps: int, tested: str | None = None) -> None:
    (run.run_dir / "checkpoints").mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_steps": max_steps}}))
    torch.save({"global_step": step}, run.run_dir / "checkpoints" / "last.ckpt")
    if tested:
        (run.run_dir / "test_results.jsonl").write_text(f'{{"requested": "{tested}"}}\n')


def test_each_state_gets_only_what_it_misses(tmp_path: Path) -> None:
    runs = build_runs(preset("demo")[:1], [0, 1, 2, 3, 4], tmp_path)
    _fake_run(runs[1], 3, 5)  # interrupted
    _fake_run(runs[2], 5, 5)  # trained
    _fake_run(runs[3], 5, 5, tested="best")  # done
    _fake_run(runs[4], 5, 5, tested="last")  # tested on another checkpoint than the sweep asks for
    (tmp_path / "full" / "seed0").mkdir(parents=True)  # a start that died before its first checkpoint
    assert [r.state() for r in runs] == ["new", "partial", "trained", "done", "trained"]
    assert [[a[:2] for a in r.steps()] for r in runs] == [
        [["fit", "--config"], ["test", "--run"]],
        [["fit", "--resume"], ["test", "--run"]],
        [["test", "--run"]],
        [],
        [["test", "--run"]],
    ]


def test_a_knob_is_measured_once_after_the_test(tmp_path: Path, capsys) -> None:
    runs = build_runs(preset("demo")[:1], [0, 1, 2], tmp_path, knob=[0.5, 1])
    _fake_run(runs[0], 5, 5)  # trained
    _fake_run(runs[1], 5, 5, tested="best")  # tested, no knob yet
    _fake_run(runs[2], 5, 5, tested="best")
    write_knob_points(runs[2].run_dir, [{"alpha": a, "requested": "best"} for a in (0.0, 0.5, 1.0)])
    assert [r.state() for r in runs] == ["trained", "tested", "done"]
    knob = ["knob", "--run", str(runs[1].run_dir), "--ckpt_path", "best", "--alphas", "[0.5, 1]"]
    assert runs[1].steps() == [knob]
    assert [a[0] for a in runs[0].steps()] == ["test", "knob"]
    write_knob_points(
        runs[2].run_dir, [{"alpha": 0.0, "requested": "best"}, {"alpha": 1.0, "requested": "last"}]
    )
    assert runs[2].state() == "tested"  # its points are of another checkpoint, or miss an a
    base = ["sweep", "--preset", "demo", "--output", str(tmp_path), "--dry-run", "--knob", "0.5", "1",
            "--test_ckpt", "best"]  # fmt: skip
    assert main(base) == 0
    assert (
        f"ftforget knob --run {tmp_path}/full/seed0 --ckpt_path best --alphas '[0.5, 1]'"
        in capsys.readouterr().out
    )


def test_bad_sweeps_are_refused(tmp_path: Path, capsys) -> None:
    assert main(["sweep", "--output", str(tmp_path)]) == 2
    assert "give config files or --preset" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' does not exist" in capsys.readouterr().err
    assert main(["sweep", str(config_dir() / "lora.yaml"), str(demo_config_dir() / "lora.yaml")]) == 2
    assert "share the name ['lora']" in capsys.readouterr().err


def _sweep_cmd(out: Path) -> list[str]:
    # The demo's experiment: its pretraining (short here), then every method for 12 steps, tested on last.
    return [sys.executable, "-m", "ftforget", "sweep", "--preset", "demo", "--seeds", "0", "1", "--output", str(out),
            "--steps", "12", "--pretrain-steps", "20"]  # fmt: skip


@pytest.mark.slow
def test_killed_and_restarted_sweep_ends_with_the_uninterrupted_table(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FTFORGET_PROGRESS": "0"}

    whole = tmp_path / "whole"
    subprocess.run(_sweep_cmd(whole), env=env, cwd=tmp_path, check=True, capture_output=True, timeout=900)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_sweep_cmd(killed), env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 600
    while not (killed / "linear" / "seed0").exists() and time.monotonic() < deadline:  # the 5th of 10 runs
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "report").exists()
    restarted = subprocess.run(_sweep_cmd(killed), env=env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=900)  # fmt: skip
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert "full seed 0: done" in restarted.stdout  # finished runs are skipped

    def table(out: Path) -> list[dict]:
        rows = read_csv(out / "report" / "forgetting_table.csv")
        # the probe's share of the wall-clock is a timing: it differs between any two sweeps
        return [
            {k: v for k, v in r.items() if k not in ("run", "probe_share", "probe_share_std")} for r in rows
        ]

    assert table(killed) == table(whole)
    assert len(table(whole)) == len(DEMO_METHODS) and all(r["n"] == "2" for r in table(whole))
    for out in (whole, killed):  # each run once: one directory per method and seed, no extra versions
        assert sorted(str(p.relative_to(out)) for p in out.glob("*/seed*")) == sorted(
            f"{m}/seed{s}" for m in DEMO_METHODS for s in (0, 1)
        )
