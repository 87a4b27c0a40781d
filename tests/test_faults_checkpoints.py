"""Fault injection: checkpoints survive a kill or a full disk during their write, ``last.ckpt`` is refreshed
every N steps before any validation, and signals, a diverged loss and ``max_steps 0`` end a fit with an
honest exit status (issue 10, items 1 and 4)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ftforget.backbones import build_backbone
from ftforget.checkpoint_io import AtomicCheckpointIO
from ftforget.checkpointing import FTForgetCheckpoint
from ftforget.commands import main
from ftforget.forgetting.config import KNNConfig
from ftforget.forgetting.features import shard_features
from ftforget.guards import NonFiniteError, signal_number
from ftforget.methods.base import FineTuningModule

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo"


@pytest.fixture
def backbone(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "backbone.pth"
    kwargs = yaml.safe_load((DEMO / "common.yaml").read_text())["model"]["init_args"]["backbone_kwargs"]
    torch.save(build_backbone("vit_base_patch16_224", **kwargs).state_dict(), path)
    return path


def fit_args(tmp_path: Path, backbone: Path, steps: int, eval_at: list[int]) -> list[str]:
    return [
        "--config", str(DEMO / "full.yaml"), "--config", str(DEMO / "common.yaml"),
        "--model.init_args.checkpoint", str(backbone), "--trainer.max_steps", str(steps),
        f"--trainer.callbacks.eval_at_steps={json.dumps(eval_at)}",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
    ]  # fmt: skip


def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "full" / "version_0"


def steps_of(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------------- atomic writes
def test_a_full_disk_leaves_no_partial_file_and_the_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch
) -> None:
    io = AtomicCheckpointIO()
    path = tmp_path / "best-step8.ckpt"
    io.save_checkpoint({"global_step": 8, "w": torch.arange(10)}, path)
    before = path.read_bytes()

    def full_disk(obj: object, f) -> None:
        f.write(b"x" * 4096)  # some bytes got out, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"global_step": 16}, path)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file, no 0-byte file
    assert path.read_bytes() == before
    assert io.load_checkpoint(path)["global_step"] == 8


@pytest.mark.slow
def test_a_kill_during_the_write_leaves_the_previous_checkpoint_loadable(tmp_path: Path) -> None:
    # $TMPDIR on another file system (tmpfs) than the checkpoint: Lightning's own write would move across.
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 14, "w": torch.ones(1000)}, path)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from ftforget.checkpoint_io import AtomicCheckpointIO

        def killed_halfway(obj, f):
            f.write(b"x" * 100_000)
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)

        torch.save = killed_halfway
        AtomicCheckpointIO().save_checkpoint({{"global_step": 16}}, {str(path)!r})
    """)
    tmpdir = "/dev/shm" if os.path.isdir("/dev/shm") else str(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": tmpdir}
    proc = subprocess.run([sys.executable, "-c", script], env=env, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    state = torch.load(path, weights_only=True)
    assert state["global_step"] == 14 and torch.equal(state["w"], torch.ones(1000))
    # What the kill left: a hidden temporary file, never taken for a checkpoint.
    (leftover,) = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert leftover.startswith(".last.ckpt.") and leftover.endswith(".tmp")
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["last.ckpt"]


def test_save_last_link_replaces_last_by_a_rename(tmp_path: Path, monkeypatch) -> None:
    trainer = SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None))
    io = AtomicCheckpointIO()
    old, new, last = tmp_path / "step8.ckpt", tmp_path / "step16.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 8}, old)
    io.save_checkpoint({"global_step": 16}, new)
    FTForgetCheckpoint._link_checkpoint(trainer, str(old), str(last))
    assert last.is_symlink() and torch.load(last, weights_only=True)["global_step"] == 8
    FTForgetCheckpoint._link_checkpoint(trainer, str(new), str(last))
    assert torch.load(last, weights_only=True)["global_step"] == 16

    # Where links fail, a copy: a copy that fails halfway leaves last.ckpt as it was.
    import shutil

    def no_links(*args: object) -> None:
        raise OSError(errno.EPERM, "no symlinks here")

    def copy_dies(src, dst) -> None:
        dst.write(src.read(10))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "symlink", no_links)
    monkeypatch.setattr(shutil, "copyfileobj", copy_dies)
    with pytest.raises(OSError, match="No space"):
        FTForgetCheckpoint._link_checkpoint(trainer, str(old), str(last))
    assert torch.load(last, weights_only=True)["global_step"] == 16
    monkeypatch.undo()
    monkeypatch.setattr(os, "symlink", no_links)
    FTForgetCheckpoint._link_checkpoint(trainer, str(old), str(last))
    assert not last.is_symlink() and torch.load(last, weights_only=True)["global_step"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "step16.ckpt", "step8.ckpt"]


def test_the_cli_trainer_writes_checkpoints_atomically(tmp_path: Path, backbone: Path) -> None:
    from ftforget.cli import run_lightning

    cli = run_lightning(fit_args(tmp_path, backbone, 4, [0]), run=False)
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


# ------------------------------------------------------------------------------------- exits
def test_signals_map_to_128_plus_signum() -> None:
    assert signal_number(SIGTERMException()) == signal.SIGTERM
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            sys.exit(1)  # what Lightning does on Ctrl-C, after the callbacks' on_exception
    except SystemExit as err:
        assert signal_number(err) == signal.SIGINT
    assert signal_number(SystemExit(2)) is None


def test_max_steps_0_is_an_error_naming_the_option(tmp_path: Path, backbone: Path, capsys) -> None:
    assert main(["fit", *fit_args(tmp_path, backbone, 0, [0])]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--trainer.max_steps 0" in line
    assert not (tmp_path / "runs").exists()


def test_the_probe_refuses_non_finite_features() -> None:
    from torch.utils.data import TensorDataset

    dataset = TensorDataset(torch.zeros(6, 3), torch.zeros(6, dtype=torch.long))

    def nan_features(x: torch.Tensor) -> torch.Tensor:
        return torch.full((len(x), 4), float("nan"))

    config = KNNConfig(k=2, batch_size=4, num_workers=0)
    with pytest.raises(NonFiniteError, match=r"probe features \(bank\)"):
        shard_features("bank", dataset, nan_features, config, torch.device("cpu"))


# ------------------------------------------------------------------------------------- fits
@pytest.mark.slow
def test_last_is_written_every_n_steps_before_any_validation(
    tmp_path: Path, backbone: Path, monkeypatch
) -> None:
    def crash(self, outputs, batch, batch_idx) -> None:
        if self.trainer.global_step == 15:
            raise RuntimeError("simulated crash at step 15")

    monkeypatch.setattr(FineTuningModule, "on_train_batch_end", crash, raising=False)
    args = [*fit_args(tmp_path, backbone, 20, [0, 20]), "--checkpoint.every_n_train_steps", "2",
            "--trainer.check_val_every_n_epoch", "100"]  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(["fit", *args])
    folder = run_dir(tmp_path) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["interrupted-step15.ckpt", "last.ckpt"]
    # last.ckpt: the step-14 state, not the crash's (which has its own name)
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 14


@pytest.mark.slow
def test_every_n_steps_keeps_the_best_on_validation(tmp_path: Path, backbone: Path) -> None:
    args = [*fit_args(tmp_path, backbone, 16, [0, 16]), "--checkpoint.every_n_train_steps", "4",
            "--trainer.check_val_every_n_epoch", "1"]  # fmt: skip
    assert main(["fit", *args]) == 0
    folder = run_dir(tmp_path) / "checkpoints"
    bests = sorted(p.name for p in folder.glob("best-*.ckpt"))
    assert len(bests) == 1 and bests[0].startswith(("best-step8-", "best-step16-"))
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 16


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143(tmp_path: Path, backbone: Path) -> None:
    args = fit_args(tmp_path, backbone, 100_000, [0, 1])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "ftforget", "fit", *args], env=env)
    jsonl = run_dir(tmp_path) / "forgetting.jsonl"
    deadline = time.monotonic() + 240
    while 1 not in steps_of(jsonl) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(1.0)  # a few steps into training
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    folder = run_dir(tmp_path) / "checkpoints"
    (interrupted,) = folder.glob("interrupted-step*.ckpt")
    step = torch.load(interrupted, weights_only=True)["global_step"]
    assert interrupted.name == f"interrupted-step{step}.ckpt" and step >= 1
    # A preempted fit resumes where it stopped: last.ckpt holds the same (finite) state.
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == step


@pytest.mark.slow
def test_a_diverged_loss_stops_the_fit_and_nothing_is_measured_after_it(
    tmp_path: Path, backbone: Path, capsys
) -> None:
    args = [*fit_args(tmp_path, backbone, 20, [0, 1, 2, 3, 4, 5, 10, 20]), "--optimizer.init_args.lr", "1e6",
            "--lr_scheduler.init_args.warmup_steps", "0"]  # fmt: skip
    assert main(["fit", *args]) == 1
    (line,) = [x for x in capsys.readouterr().err.strip().splitlines() if "error:" in x]
    assert line.startswith("ftforget fit: error: ")
    records = [json.loads(x) for x in (run_dir(tmp_path) / "forgetting.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor([r["top1"], r["top5"]])).all() for r in records)
    if "non-finite loss" in line:
        step = int(line.split(" at step ")[1].split(";")[0])
        assert max(r["step"] for r in records) <= step
    else:  # the weights went non-finite first: the probe refused their features
        assert "probe features" in line
    assert max(r["step"] for r in records) < 20
    folder = run_dir(tmp_path) / "checkpoints"
    assert list(folder.glob("interrupted-step*.ckpt"))
    assert (
        not (folder / "last.ckpt").exists()
        or torch.load(folder / "last.ckpt", weights_only=True)["global_step"]
        < max(r["step"] for r in records) + 1
    )
