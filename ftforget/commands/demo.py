"""``ftforget demo``: the paper's experiment in miniature on scikit-learn's digits (:mod:`ftforget.demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from ftforget.demo import METHODS, run_demo
from ftforget.resources import demo_config_dir


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftforget demo",
        description="The paper's experiment in miniature on scikit-learn's digits: pretraining, five "
        "fine-tuning methods, forgetting curves, the table. A few minutes on 2 CPU cores.",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("runs/demo"), help="runs, cache and report (default: runs/demo)"
    )
    parser.add_argument("--steps", type=int, default=500, help="fine-tuning steps per method (default: 500)")
    parser.add_argument("--pretrain-steps", type=int, default=1000, help="pretraining steps (default: 1000)")
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated, from {','.join(METHODS)} (default: all)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of pretraining and fine-tuning (default: 0)"
    )
    parser.add_argument(
        "--config-dir",
        type=Path,
        default=None,
        help="the demo YAMLs (default: the installed ftforget/configs/demo)",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="pretrained backbones (default: OUTPUT/pretrained)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default: 1, robust on a busy machine)"
    )
    return parser


def main(argv: list[str]) -> int:
    """Runs ``ftforget demo``; returns the exit status."""
    args = _parser().parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    config_dir = args.config_dir or demo_config_dir()
    unknown = [m for m in methods if not (config_dir / f"{m}.yaml").is_file()]
    if unknown or not methods or args.steps < 1 or args.pretrain_steps < 1:
        sys.stderr.write(
            f"ftforget demo: need --steps >= 1, --pretrain-steps >= 1 and methods with a config in "
            f"{config_dir} (got --methods {args.methods!r}; no config for {unknown})\n"
        )
        return 2
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        from ftforget.commands import main as stage

        return run_demo(args, methods, config_dir, stage)
    finally:
        torch.set_num_threads(threads)  # main() may be called in a process that goes on (tests)
