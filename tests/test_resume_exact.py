"""Resume is exact on the CPU: a fit killed between checkpoints and resumed from the last one trains on the
same batches, with the same augmentation draws and random states, as the uninterrupted fit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ftforget.commands import main
from ftforget.data.resumable import ResumableSampler, SeededItems
from ftforget.report import load_run
from tests.test_workflow import DEMO

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20  # 8 steps an epoch: the kill at step 11 is mid-epoch, the resume at 9 too


def fit_argv(tmp_path: Path, backbone: Path, name: str, workers: int) -> list[str]:
    return [
        "fit", "--config", str(DEMO / "full.yaml"), "--config", str(DEMO / "common.yaml"),
        "--model.init_args.checkpoint", str(backbone), "--model.init_args.backbone_kwargs.drop_rate", "0.1",
        "--data.init_args.num_workers", str(workers),
        "--trainer.max_steps", str(STEPS), "--trainer.log_every_n_steps", "1",
        "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", name,
        f"--trainer.callbacks.eval_at_steps={json.dumps([0, 5, 10, 15, STEPS])}",
        # a checkpoint every 3 steps, independent of validation: the resume point
        "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps", "3", "--trainer.callbacks.save_last", "true",
        "--trainer.callbacks.dirpath", str(tmp_path / f"{name}_periodic"),
    ]  # fmt: skip


def losses(run: Path) -> dict[int, float]:
    return load_run(run).scalars["train/loss"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_kill_between_checkpoints_then_resume_is_bit_identical(
    tmp_path: Path, backbone: Path, workers: int
) -> None:
    assert main(fit_argv(tmp_path, backbone, "whole", workers)) == 0

    # The same fit, SIGKILLed right after step 11: the last checkpoint on disk is step 9's.
    argv = fit_argv(tmp_path, backbone, "cut", workers)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FTFORGET_PROGRESS": "0"}
    kill = ["--trainer.callbacks+=tests.helpers.KillAt", "--trainer.callbacks.step", "11"]
    proc = subprocess.run(
        [sys.executable, "-m", "ftforget", *argv, *kill], env=env, capture_output=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    periodic = tmp_path / "cut_periodic" / "last.ckpt"
    assert torch.load(periodic, weights_only=True)["global_step"] == 9
    assert main([*argv, "--ckpt_path", str(periodic)]) == 0

    whole = tmp_path / "runs" / "whole" / "version_0"
    cut, resumed = (tmp_path / "runs" / "cut" / v for v in ("version_0", "version_1"))
    expected = losses(whole)  # train/loss is logged at steps 0-19: the loss of the (step + 1)-th batch
    assert sorted(expected) == list(range(STEPS))
    again = losses(resumed)
    assert sorted(again) == list(range(9, STEPS))  # from the checkpoint of step 9 on
    assert again == {step: expected[step] for step in again}
    flushed = losses(cut)  # what the killed process's event writer had flushed, if anything
    assert flushed == {step: expected[step] for step in flushed}
    line = lambda r: (r["step"], r["top1"], r["top5"], r["new_task_val_acc1"])  # noqa: E731
    read = lambda run: [line(json.loads(x)) for x in (run / "forgetting.jsonl").read_text().splitlines()]  # noqa: E731
    assert read(resumed) == read(whole)
    # Both validate at the last step (ftforget.validation), with the same result.
    validated = [load_run(r).scalars["val/acc1"] for r in (whole, resumed)]
    assert sorted(validated[0]) == [STEPS] and validated[0] == validated[1]
    final = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (whole, resumed)]
    assert final[0]["global_step"] == final[1]["global_step"] == STEPS
    assert final[0]["state_dict"].keys() == final[1]["state_dict"].keys()
    for key, value in final[0]["state_dict"].items():
        assert torch.equal(value, final[1]["state_dict"][key]), key


def test_sampler_order_depends_on_seed_and_epoch_only_and_skips_done_batches() -> None:
    def keys(epoch: int, done: int = 0, rank: int = 0, world: int = 1, seed: int = 0) -> list:
        sampler = ResumableSampler(10, seed, 2, rank, world, lambda: done)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert keys(0) == keys(0) and keys(0) != keys(1) and keys(0) != keys(0, seed=1)
    assert sorted(i for _, _, i in keys(3)) == list(range(10))
    assert keys(2, done=3) == keys(2)[6:]  # three batches of two done: the epoch goes on from the seventh
    shards = [keys(1, rank=r, world=3) for r in range(3)]  # 10 samples, 3 ranks: 3 each, one dropped
    assert [len(s) for s in shards] == [3, 3, 3] and not set(shards[0]) & set(shards[1])


def test_items_are_drawn_under_their_own_seed_and_leave_the_callers_state() -> None:
    class Noisy:
        def __len__(self) -> int:
            return 4

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.rand(3) + index

    items = SeededItems(Noisy())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = items[(0, 1, 2)]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(999)  # another caller state: the item does not change
    assert torch.equal(items[(0, 1, 2)], a)
    assert not torch.equal(items[(0, 2, 2)], a) and not torch.equal(items[(1, 1, 2)], a)


@pytest.mark.slow
@pytest.mark.parametrize(("hook", "step", "resumed_from"), [("batch_end", 11, 11), ("epoch_end", 16, 15)])
def test_sigterm_then_resume_is_bit_identical(
    tmp_path: Path, backbone: Path, hook: str, step: int, resumed_from: int
) -> None:
    """A preemption's SIGTERM between two batches refreshes last.ckpt there; at an epoch's end (where Lightning
    would resume into a skipped epoch) the last periodic one stays. Either way the resume is exact."""

    def argv(name: str) -> list[str]:
        return [
            "fit", "--config", str(DEMO / "full.yaml"), "--config", str(DEMO / "common.yaml"),
            "--model.init_args.checkpoint", str(backbone), "--model.init_args.backbone_kwargs.drop_rate", "0.1",
            "--trainer.max_steps", str(STEPS), f"--trainer.callbacks.eval_at_steps={json.dumps([0, 10, STEPS])}",
            "--checkpoint.every_n_train_steps", "3",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.name", name,
        ]  # fmt: skip

    assert main(argv("whole")) == 0
    stop = ["--trainer.callbacks+=tests.helpers.SigtermAt", "--trainer.callbacks.step", str(step),
            "--trainer.callbacks.hook", hook, "--trainer.callbacks.once", str(tmp_path / "fired")]  # fmt: skip
    assert main([*argv("cut"), *stop]) == 128 + signal.SIGTERM
    cut = tmp_path / "runs" / "cut" / "version_0"
    assert torch.load(cut / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == resumed_from
    assert main(["fit", "--resume", str(cut)]) == 0
    whole = tmp_path / "runs" / "whole" / "version_0"
    final = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (whole, cut)]
    assert final[0]["global_step"] == final[1]["global_step"] == STEPS
    for key, value in final[0]["state_dict"].items():
        assert torch.equal(value, final[1]["state_dict"][key]), key
    assert losses(cut) == losses(whole)
