"""Seconds per training step: the demo's in-process fit against ``ftforget fit`` with the demo configs.

``ftforget demo`` runs each fine-tuning in its process with one torch thread (``--threads 1``); a user
who reruns a row with ``ftforget fit --config configs/demo/<method>.yaml --config configs/demo/common.yaml``
gets the CLI's thread count. This prints, side by side, seconds per step of

1. the demo's fit (its sweep run, :func:`ftforget.demo.demo_runs`, in this process, ``--threads 1``);
2. ``ftforget fit`` with the demo configs, in a fresh process, as shipped (``threads`` from common.yaml);
3. the same with ``--threads T`` (T = torch's default here: what the CLI used before ``threads`` existed).

Seconds per step come from the wall times of the TensorBoard scalars between the first and the last
logged step, so start-up, the final test and the process launch are excluded and every variant pays for
the same forgetting measurements. The acceptance: row 2 within 1.3x of row 1 on a 2-core machine.

    python benchmarks/bench_demo_fit.py                 # 100 steps of full fine-tuning, ~1-2 min
    python benchmarks/bench_demo_fit.py --steps 200 --method lora --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ftforget.commands import main as ftforget_main
from ftforget.demo import demo_runs, pretrain_settings, pretrained_backbone
from ftforget.forgetting.config import eval_steps_until
from ftforget.machine import available_cores
from ftforget.resources import demo_config_dir


def seconds_per_step(run_dir: Path) -> tuple[float, int]:
    """(seconds per step, steps timed) from the wall times of a run's logged training scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    events = [e for tag in acc.Tags()["scalars"] if tag.startswith("train/") for e in acc.Scalars(tag)]
    if len({e.step for e in events}) < 2:
        raise RuntimeError(f"{run_dir}: fewer than two logged training steps")
    first = min(events, key=lambda e: (e.step, e.wall_time))
    last = max(events, key=lambda e: (e.step, e.wall_time))
    return (last.wall_time - first.wall_time) / (last.step - first.step), last.step - first.step


def demo_fit(method: str, checkpoint: Path, steps: int, output: Path) -> Path:
    """The demo's fit of ``method`` (its sweep run, in this process, ``--threads 1``); the run directory."""
    args = argparse.Namespace(steps=steps, output=output, seed=0, threads=1)
    (run,) = demo_runs(args, [method], demo_config_dir(), checkpoint)
    threads = torch.get_num_threads()
    try:
        assert ftforget_main(run.fit_args()) == 0
    finally:
        torch.set_num_threads(threads)
    return run.run_dir


def cli_fit(method: str, checkpoint: Path, steps: int, output: Path, extra: list[str]) -> Path:
    """``python -m ftforget fit`` with the demo configs in a fresh process; returns the run directory."""
    config_dir = demo_config_dir()
    cmd = [
        sys.executable, "-m", "ftforget", "fit",
        "--config", str(config_dir / f"{method}.yaml"), "--config", str(config_dir / "common.yaml"),
        "--model.init_args.checkpoint", str(checkpoint),
        "--trainer.max_steps", str(steps),
        f"--trainer.callbacks.eval_at_steps={json.dumps(eval_steps_until(steps))}",
        "--trainer.logger.init_args.save_dir", str(output),
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "FTFORGET_PROGRESS": "0"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    (run_dir,) = sorted((output / method).glob("version_*"))
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--method", default="full", help="a config of configs/demo (default: full)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant; the best is shown")
    parser.add_argument(
        "--cache-dir", type=Path, default=Path("runs/demo/pretrained"), help="the demo's pretrained backbones"
    )
    args = parser.parse_args()
    settings = pretrain_settings(demo_config_dir(), argparse.Namespace(pretrain_steps=1000, seed=0))
    checkpoint = pretrained_backbone(settings, args.cache_dir)
    default_threads = torch.get_num_threads()
    variants = {
        "demo, in-process (1 thread)": lambda out: demo_fit(args.method, checkpoint, args.steps, out),
        "ftforget fit, demo configs": lambda out: cli_fit(args.method, checkpoint, args.steps, out, []),
        f"ftforget fit --threads {default_threads} (torch's default)": lambda out: cli_fit(
            args.method, checkpoint, args.steps, out, ["--threads", str(default_threads)]
        ),
    }
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for number, (name, run) in enumerate(variants.items()):
                start = time.perf_counter()
                run_dir = run(Path(tmp) / f"{number}-{repeat}")
                per_step, timed = seconds_per_step(run_dir)
                results[name] = min(results.get(name, float("inf")), per_step)
                sys.stderr.write(f"{name}: {per_step:.4f} s/step over {timed} steps "
                                 f"({time.perf_counter() - start:.1f} s in all)\n")  # fmt: skip
    base = results["demo, in-process (1 thread)"]
    sys.stdout.write(
        f"\n{args.method}, {args.steps} steps, {available_cores()} cores, torch default threads "
        f"{default_threads}, best of {args.repeats}\n\n| variant | s/step | vs demo |\n|---|---|---|\n"
    )
    for name, value in results.items():
        sys.stdout.write(f"| {name} | {value:.4f} | {value / base:.2f}x |\n")


if __name__ == "__main__":
    main()
