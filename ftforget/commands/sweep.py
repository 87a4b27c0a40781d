"""``ftforget sweep``: configs times seeds, each fitted and tested, then the report (:mod:`ftforget.sweep`).

::

    ftforget sweep --preset paper --seeds 0 1 2 --output runs/paper -- --config configs/forgetting.yaml
    ftforget sweep configs/lora.yaml configs/full.yaml --seeds 0 1 --dry-run
    ftforget sweep configs/lora.yaml configs/full.yaml --knob 0 0.25 0.5 0.75 1
    ftforget sweep --preset paper --seeds 0 1 2 --slurm sweep.sbatch --gpus 1 --setup 'source .venv/bin/activate'

Options after ``--`` go to every fit (e.g. ``--trainer.max_steps 100``). Run it again after an
interruption: finished runs are skipped, an interrupted one is resumed from its ``last.ckpt``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ftforget.report import write_report
from ftforget.sweep import SweepRun, build_runs, plan_commands, preset, run_sweep, slurm_script


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftforget sweep", description=__doc__.split("\n\n")[0].strip("`"))
    parser.add_argument("configs", nargs="*", type=Path, help="config files, one run set each (or --preset)")
    parser.add_argument(
        "--preset",
        choices=["paper", "peft", "demo"],
        help="the paper's ten rows, those and every PEFT method (configs/peft/), or the demo's five",
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="seed_everything values (default: 0)"
    )
    parser.add_argument("--output", type=Path, default=Path("runs/sweep"), help="default: runs/sweep")
    parser.add_argument("--test_ckpt", choices=["best", "last"], default="best",
                        help="the checkpoint each run is tested on (default: best, selected on validation)")  # fmt: skip
    parser.add_argument("--knob", type=float, nargs="+", metavar="A",
                        help="after the test, measure each run's knob at these a (ftforget knob), e.g. 0 0.5 1")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the commands still to run, run nothing")
    parser.add_argument("--task", type=int, help="run only run number TASK (a SLURM array task)")
    slurm = parser.add_argument_group("SLURM job array (written, not submitted)")
    slurm.add_argument("--slurm", type=Path, help="write a job array script here, one task per run")
    slurm.add_argument("--gpus", type=int, default=1, help="GPUs per task (default: 1)")
    slurm.add_argument("--time", default="24:00:00", help="time limit per task (default: 24:00:00)")
    slurm.add_argument("--setup", default="", help="shell line run first in each task")
    return parser


def _split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def sweep_runs(args: argparse.Namespace, extra: list[str]) -> list[SweepRun]:
    if bool(args.configs) == bool(args.preset):
        raise ValueError("ftforget sweep: give config files or --preset paper|peft|demo (one of the two)")
    config_sets = preset(args.preset) if args.preset else [[c] for c in args.configs]
    return build_runs(config_sets, args.seeds, args.output, extra, args.test_ckpt, args.knob)


def main(argv: list[str], stage: Callable[[list[str]], int] | None = None) -> int:
    """Runs ``ftforget sweep``; ``stage`` runs one ftforget command (default: in this process)."""
    own, extra = _split_extra(argv)
    args = _parser().parse_args(own)
    runs = sweep_runs(args, extra)
    if args.task is not None:
        if not 0 <= args.task < len(runs):
            raise ValueError(f"--task {args.task}: this sweep has runs 0 to {len(runs) - 1}")
        runs = [runs[args.task]]
    if args.slurm is not None:
        sweep_args = [a for a in own if a not in ("--dry-run",)]
        script_args = _strip_slurm_options(sweep_args) + (["--", *extra] if extra else [])
        args.slurm.write_text(slurm_script(runs, script_args, args.gpus, args.time, args.setup))
        sys.stdout.write(
            f"wrote {args.slurm}: {len(runs)} array tasks; submit it with: sbatch {args.slurm}\n"
        )
        return 0
    if args.dry_run:
        commands = plan_commands(runs)
        sys.stdout.write("".join(f"{c}\n" for c in commands) or "nothing to run: every run is done\n")
        return 0
    if stage is None:
        from ftforget.commands import main as stage
    say = lambda line: sys.stdout.write(f"[ftforget sweep] {line}\n")  # noqa: E731
    run_dirs = run_sweep(runs, stage, say)
    if args.task is not None:
        return 0
    report = write_report(run_dirs, args.output / "report")
    sys.stdout.write("\n" + report.markdown + "\n")
    for path in report.files:
        say(f"report: {path}")
    return 0


def _strip_slurm_options(argv: list[str]) -> list[str]:
    """The sweep's arguments without the ones that only shape the script (they mean nothing in a task)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--slurm", "--gpus", "--time", "--setup", "--task"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out
