"""The SLURM job array script without a cluster: stand-in ``srun``/``scontrol`` programs record what the
script runs, so quoting, the requeue trap and the exit status are checked exactly; the options' errors;
and what a fit does inside a SLURM job (no Lightning auto-requeue, never another run's ``hpc_ckpt``)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment

from ftforget.commands import main
from ftforget.slurm import requeue_on_usr1, with_cluster_environment
from tests.test_workflow import DEMO

#: an output directory no shell word or SLURM path survives unquoted
AWKWARD = "sweep dir 'quoted' $HOME"

STUB_SRUN = """#!/usr/bin/env python3
import json, os, sys, time
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({"srun": sys.argv[1:]}) + "\\n")
time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
sys.exit(int(os.environ.get("STUB_STATUS", "0")))
"""
STUB_SCONTROL = """#!/usr/bin/env python3
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps({"scontrol": sys.argv[1:]}) + "\\n")
"""


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    """A directory with stand-in ``srun`` and ``scontrol`` programs that log their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", STUB_SRUN), ("scontrol", STUB_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def _stub_env(stubs: Path, log: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PATH": f"{stubs}{os.pathsep}{env['PATH']}", "STUB_LOG": str(log),
            "SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_ID": "77", **extra}  # fmt: skip


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def _write_script(tmp_path: Path, *options: str) -> tuple[Path, Path]:
    out = tmp_path / AWKWARD
    script = tmp_path / "job.sbatch"
    argv = ["sweep", "--preset", "demo", "--seeds", "0", "--steps", "30", "--output", str(out),
            "--slurm", str(script), *options]  # fmt: skip
    assert main(argv) == 0
    return script, out


def test_awkward_paths_reach_the_task_intact(tmp_path: Path, stubs: Path, capsys) -> None:
    script, out = _write_script(tmp_path, "--gpus", "0", "--devices", "2")
    assert f"wrote {script}: 6 array tasks" in capsys.readouterr().out
    log = tmp_path / "stub.log"
    proc = subprocess.run(["bash", str(script)], env=_stub_env(stubs, log), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (call,) = _records(log)
    # task 2 is the linear probe of seed 0; its log is named after the run, beside the batch logs
    assert call["srun"] == [
        f"--output={out}/logs/linear-seed0.log", "--open-mode=append",
        "ftforget", "sweep", "--preset", "demo", "--seeds", "0", "--steps", "30", "--output", str(out),
        "--task", "2", "--", "--trainer.devices", "2", "--trainer.accelerator", "cpu",
    ]  # fmt: skip
    assert (out / "logs").is_dir()
    # The arguments srun got rebuild the very sweep: its task 2 is the run under the awkward path.
    sweep_args = call["srun"][call["srun"].index("sweep") + 1 :]
    split = sweep_args.index("--")
    assert main(["sweep", *sweep_args[:split], "--dry-run", *sweep_args[split:]]) == 0
    printed = capsys.readouterr().out
    assert f"ftforget test --run {shlex.quote(str(out / 'linear' / 'seed0'))} --ckpt_path last" in printed
    assert "--trainer.devices 2 --trainer.accelerator cpu" in printed
    # sbatch reads the #SBATCH lines itself: the paths are double-quoted, SLURM's own patterns left intact
    lines = script.read_text().splitlines()
    assert f'#SBATCH --output="{out}/logs/slurm-%A_%a.out"' in lines
    assert f'#SBATCH --chdir="{Path.cwd()}"' in lines


def test_usr1_to_the_script_requeues_and_the_task_status_is_kept(tmp_path: Path, stubs: Path) -> None:
    script, _ = _write_script(tmp_path, "--gpus", "0")
    log = tmp_path / "stub.log"
    env = _stub_env(stubs, log, STUB_SLEEP="3", STUB_STATUS="3")
    proc = subprocess.Popen(["bash", str(script)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not _records(log) and time.monotonic() < deadline:  # srun has started
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@90 sends before the time limit
    _, err = proc.communicate(timeout=30)
    assert [r for r in _records(log) if "scontrol" in r] == [{"scontrol": ["requeue", "77"]}]
    assert "requeueing job 77" in err
    assert proc.returncode == 3  # the task's own status, not the trap's interruption of wait


def test_cluster_options_become_sbatch_lines(tmp_path: Path) -> None:
    script, _ = _write_script(
        tmp_path, "--gpus", "0", "--partition", "cpu", "--account", "lab42", "--time", "2:00:00", "--mem", "16G",
        "--cpus-per-task", "4", "--sbatch=--qos=high", "--sbatch=--exclusive",
    )  # fmt: skip
    lines = script.read_text().splitlines()
    sbatch = [line for line in lines if line.startswith("#SBATCH ")]
    assert sbatch[:2] == ["#SBATCH --job-name=ftforget-sweep", "#SBATCH --array=0-5"]
    assert sbatch[2:11] == [
        "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=4", "#SBATCH --mem=16G",
        "#SBATCH --time=2:00:00", "#SBATCH --partition=cpu", "#SBATCH --account=lab42", "#SBATCH --qos=high",
        "#SBATCH --exclusive",
    ]  # fmt: skip
    assert not any("gpu" in line or "gres" in line for line in sbatch)  # --gpus 0: no GPU request
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert srun.endswith("-- --trainer.devices 1 --trainer.accelerator cpu &")
    gpu_script, _ = _write_script(tmp_path, "--gpus", "2")
    text = gpu_script.read_text()
    assert "#SBATCH --ntasks-per-node=2\n#SBATCH --gpus-per-node=2\n" in text
    assert "-- --trainer.devices 2 --trainer.accelerator gpu &" in text


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--gpus", "-1"], "--gpus -1: give 0 (a CPU job) or more GPUs per task"),
        (["--gpus", "1", "--devices", "2"], "--devices 2 with --gpus 1: a GPU job runs one process per GPU"),
        (["--gpus", "0", "--devices", "0"], "--devices 0: give at least 1 process per task"),
        (["--mem", "16 G"], "--mem '16 G': a SLURM value without spaces"),
        (["--time", "1:00:00$(reboot)"], "--time '1:00:00$(reboot)': a SLURM value without spaces"),
        (["--cpus-per-task", "0"], "--cpus-per-task 0: give at least 1"),
        (["--sbatch=qos=high"], "--sbatch 'qos=high': one sbatch option per value"),
    ],
)
def test_bad_cluster_options_are_refused(tmp_path: Path, capsys, options: list[str], message: str) -> None:
    script = tmp_path / "job.sbatch"
    argv = ["sweep", "--preset", "demo", "--output", str(tmp_path / "o"), "--slurm", str(script), *options]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not script.exists()


def test_a_path_sbatch_cannot_read_is_refused(tmp_path: Path, capsys) -> None:
    script = tmp_path / "job.sbatch"
    out = tmp_path / 'say "cheese"'
    assert main(["sweep", "--preset", "demo", "--output", str(out), "--slurm", str(script)]) == 2
    assert "--output " in capsys.readouterr().err and not script.exists()


def test_demo_options_need_the_demo_preset(tmp_path: Path, capsys) -> None:
    argv = ["sweep", str(DEMO / "full.yaml"), "--output", str(tmp_path), "--dry-run", "--steps", "30"]
    assert main(argv) == 2
    assert "--steps: only with --preset demo" in capsys.readouterr().err
    assert (
        main(["sweep", "--preset", "demo", "--output", str(tmp_path), "--dry-run", "--pretrain-steps", "0"])
        == 2
    )
    assert "--pretrain-steps 0: give at least 1" in capsys.readouterr().err


def test_usr1_in_a_sweep_task_requeues_its_job(tmp_path: Path, stubs: Path, monkeypatch) -> None:
    log = tmp_path / "stub.log"
    monkeypatch.setenv("PATH", f"{stubs}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("STUB_LOG", str(log))
    monkeypatch.setenv("SLURM_JOB_ID", "91")
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        monkeypatch.setenv("SLURM_PROCID", "1")  # another rank: it must neither requeue nor die
        requeue_on_usr1()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _records(log) == []
        monkeypatch.setenv("SLURM_PROCID", "0")
        requeue_on_usr1()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _records(log) == [{"scontrol": ["requeue", "91"]}]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_plain_fit_in_a_slurm_job_survives_usr1(monkeypatch, capsys) -> None:
    from ftforget.slurm import keep_running_on_usr1

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        keep_running_on_usr1()
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # not in a SLURM job: nothing changes
        monkeypatch.setenv("SLURM_JOB_ID", "12")
        keep_running_on_usr1()
        os.kill(os.getpid(), signal.SIGUSR1)  # the default action would end this process
        assert "the fit goes on and writes last.ckpt at SIGTERM" in capsys.readouterr().err
        requeue_on_usr1()  # a sweep task's handler first: a fit inside it keeps that one
        handler = signal.getsignal(signal.SIGUSR1)
        keep_running_on_usr1()
        assert signal.getsignal(signal.SIGUSR1) is handler
    finally:
        signal.signal(signal.SIGUSR1, previous)


SLURM_JOB = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "ftforget-test", "SLURM_JOB_ID": "5", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost"}  # fmt: skip


def test_inside_slurm_lightning_does_not_requeue_by_itself(monkeypatch) -> None:
    assert with_cluster_environment(None) is None  # not in a SLURM job: nothing added
    for key, value in SLURM_JOB.items():
        monkeypatch.setenv(key, value)
    (environment,) = with_cluster_environment(None)
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue is False
    own = LightningEnvironment()
    assert with_cluster_environment([own]) == [own]  # a configured environment is kept


@pytest.mark.slow
def test_a_fresh_fit_ignores_another_runs_hpc_checkpoint(tmp_path: Path, backbone: Path, monkeypatch) -> None:
    def fit(save_dir: Path, steps: int) -> Path:
        argv = ["fit", "--config", str(DEMO / "linear.yaml"), "--config", str(DEMO / "common.yaml"),
                "--model.init_args.checkpoint", str(backbone), "--trainer.max_steps", str(steps),
                f"--trainer.callbacks.eval_at_steps={json.dumps([0, steps])}",
                "--trainer.logger.init_args.save_dir", str(save_dir)]  # fmt: skip
        assert main(argv) == 0
        (run,) = (save_dir / "linear").iterdir()
        return run

    other = fit(tmp_path / "other", 6)  # another run, further along than the next one will ever get
    shared = tmp_path / "shared"  # the working directory of every task of an array
    shared.mkdir()
    torch.save(
        torch.load(other / "checkpoints" / "last.ckpt", weights_only=False), shared / "hpc_ckpt_1.ckpt"
    )
    monkeypatch.chdir(shared)
    for key, value in SLURM_JOB.items():
        monkeypatch.setenv(key, value)
    run = fit(tmp_path / "runs", 3)
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 3  # trained from step 0; Lightning would have restored step 6 and stopped
    steps = [json.loads(line)["step"] for line in (run / "forgetting.jsonl").read_text().splitlines()]
    assert steps == [0, 3]
    assert sorted(p.name for p in shared.iterdir()) == ["hpc_ckpt_1.ckpt"]  # nothing written beside it


def test_no_srun_advice_where_slurm_is_installed(tmp_path: Path, stubs: Path) -> None:
    """A machine with SLURM's srun (a login node, a workstation) runs ftforget outside a job without
    Lightning's hint to prepend srun."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{stubs}{os.pathsep}{env['PATH']}"
    argv = [sys.executable, "-m", "ftforget", "fit", "--config", str(DEMO / "full.yaml"),
            "--config", str(DEMO / "common.yaml"), "--trainer.max_steps", "0"]  # fmt: skip
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--trainer.max_steps 0: a fit of 0 optimizer steps trains nothing" in proc.stderr
    assert "srun" not in proc.stderr
