"""A run directory has one owner, and a checkpoint never chooses which code runs."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from ftforget.commands import main
from ftforget.runs import LOCK_FILE
from tests.test_workflow import DEMO, fit_args

ROOT = Path(__file__).resolve().parent.parent


def snapshot(run: Path) -> dict[str, str]:
    """Every file of a run (the lock file aside) and its SHA-256."""
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


@pytest.fixture
def finished_run(tmp_path: Path, backbone: Path) -> Path:
    assert main(["fit", *fit_args(tmp_path, backbone), "--trainer.max_steps", "8",
                 "--trainer.logger.init_args.version", "mine"]) == 0  # fmt: skip
    return tmp_path / "runs" / "full" / "mine"


@pytest.mark.slow
def test_a_fresh_fit_into_a_run_is_refused(
    tmp_path: Path, backbone: Path, finished_run: Path, capsys
) -> None:
    before = snapshot(finished_run)
    capsys.readouterr()
    code = main(["fit", *fit_args(tmp_path, backbone), "--trainer.logger.init_args.version", "mine"])
    assert code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"run directory '{finished_run}' already holds a run" in line and "--resume" in line
    assert snapshot(finished_run) == before


@pytest.mark.slow
def test_a_second_process_cannot_write_a_run(tmp_path: Path, finished_run: Path, capsys) -> None:
    before = snapshot(finished_run)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from ftforget.runs import lock_run
        lock_run(Path({str(finished_run)!r}))
        print("locked", flush=True)
        time.sleep(60)
    """)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        for argv in (
            ["fit", "--resume", str(finished_run)],
            ["test", "--run", str(finished_run), "--ckpt_path", "last"],
        ):
            assert main(argv) == 2
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert f"run directory '{finished_run}' is in use by another process (pid {holder.pid})" in line
    finally:
        holder.kill()
        holder.wait()
    assert snapshot(finished_run) == before
    time.sleep(0.1)
    assert main(["test", "--run", str(finished_run), "--ckpt_path", "last"]) == 0  # free again


def test_a_checkpoint_naming_foreign_code_imports_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "imported.marker"
    (tmp_path / "evil_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n")
    ckpt = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {}, "global_step": 3, "hyper_parameters": {"_class_path": "evil_module.Evil"}}, ckpt
    )
    env_path = f"{tmp_path}"  # the module is importable: only ftforget's refusal keeps it from running
    argv = [
        "test",
        "--config",
        str(DEMO / "full.yaml"),
        "--config",
        str(DEMO / "common.yaml"),
        "--ckpt_path",
        str(ckpt),
    ]
    for command in (argv, ["measure", "--ckpt_path", str(ckpt), "--probe", "DigitsProbe"]):
        proc = subprocess.run([sys.executable, "-m", "ftforget", *command], cwd=tmp_path, capture_output=True, text=True,
                              env={"PYTHONPATH": env_path + ":" + str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=300)  # fmt: skip
        assert proc.returncode == 2, proc.stderr[-2000:]
        (line,) = [x for x in proc.stderr.splitlines() if "error:" in x]
        assert "'evil_module.Evil' is not an ftforget method" in line
        assert not marker.exists()
