"""Under DDP the new task's validation and test splits are scored exactly as on one process: each image once
(no padding by a DistributedSampler), and the mean loss over the images, whatever the split's size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ftforget.commands import main
from tests.test_workflow import DEMO

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_two_process_test_equals_a_one_process_test(tmp_path: Path, backbone: Path) -> None:
    argv = ["fit", "--config", str(DEMO / "linear.yaml"), "--config", str(DEMO / "common.yaml"),
            "--model.init_args.checkpoint", str(backbone), "--trainer.max_steps", "5",
            "--trainer.callbacks.eval_at_steps=[0, 5]", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]  # fmt: skip
    assert main(argv) == 0
    (run,) = (tmp_path / "runs" / "linear").iterdir()
    test = ["test", "--run", str(run), "--ckpt_path", "last", "--verbose", "false"]
    assert main(test) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "FTFORGET_PROGRESS": "0"}
    ddp = [sys.executable, "-m", "ftforget", *test, "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    proc = subprocess.run(ddp, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    one, two = [json.loads(line) for line in (run / "test_results.jsonl").read_text().splitlines()]
    # 179 test images (odd): Lightning's sampler would score 180, its mean of a logged loss divide by 178
    assert abs(one["test/acc1"] * 179 - round(one["test/acc1"] * 179)) < 1e-4  # a count out of 179
    assert two["test/acc1"] == one["test/acc1"] and two["test/acc5"] == one["test/acc5"]
    assert two["test/loss"] == pytest.approx(one["test/loss"], rel=1e-6)  # sums added in another order
