"""``ftforget sweep``: configs times seeds, each fitted and tested, then the report (:mod:`ftforget.sweep`).

::

    ftforget sweep --preset paper --seeds 0 1 2 --output runs/paper -- --config configs/forgetting.yaml
    ftforget sweep configs/lora.yaml configs/full.yaml --seeds 0 1 --dry-run
    ftforget sweep configs/lora.yaml configs/full.yaml --knob 0 0.25 0.5 0.75 1
    ftforget sweep --preset demo --seeds 0 1 --steps 100 --output runs/demo-sweep
    ftforget sweep --preset paper --seeds 0 1 2 --slurm sweep.sbatch --gpus 1 --setup 'source .venv/bin/activate'

Options after ``--`` go to every fit (e.g. ``--trainer.max_steps 100``). Run it again after an
interruption: finished runs are skipped, an interrupted one is resumed from its ``last.ckpt``.
``--preset demo`` is the experiment of ``ftforget demo``: one pretraining (cached, built once even when
array tasks start together) and its fine-tuning runs, for every seed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ftforget.demo import (
    METHODS,
    PretrainSettings,
    demo_sweep_runs,
    pretrain_settings,
    pretrained_backbone,
    pretrained_path,
)
from ftforget.files import atomic_write
from ftforget.report import write_report
from ftforget.resources import demo_config_dir
from ftforget.slurm import SlurmOptions, requeue_on_usr1
from ftforget.sweep import (
    LOG_DIR,
    SweepError,
    SweepRun,
    build_runs,
    plan_commands,
    preset,
    run_sweep,
    slurm_script,
)

#: ``--preset demo``: the defaults of ``ftforget demo``
DEMO_DEFAULTS = {"steps": 500, "pretrain_steps": 1000, "pretrain_seed": 0}


def _parser() -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    parser = argparse.ArgumentParser(
        prog="ftforget sweep", description=__doc__.split("\n\n")[0].replace("``", "")
    )
    parser.add_argument("configs", nargs="*", type=Path, help="config files, one run set each (or --preset)")
    parser.add_argument("--preset", choices=["paper", "peft", "demo"],
                        help="the paper's ten rows, those and every PEFT method (configs/peft/), or the runs of "
                        "ftforget demo (pretraining included)")  # fmt: skip
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="seed_everything values (default: 0)"
    )
    parser.add_argument("--output", type=Path, default=Path("runs/sweep"), help="default: runs/sweep")
    parser.add_argument("--test_ckpt", choices=["best", "last"], default=None,
                        help="the checkpoint each run is tested on (default: best, selected on validation; "
                        "--preset demo: last, as ftforget demo)")  # fmt: skip
    parser.add_argument("--knob", type=float, nargs="+", metavar="A",
                        help="after the test, measure each run's knob at these a (ftforget knob), e.g. 0 0.5 1")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the commands still to run, run nothing")
    parser.add_argument("--task", type=int, help="run only run number TASK (a SLURM array task)")
    demo = parser.add_argument_group("--preset demo (the experiment of ftforget demo)")
    demo.add_argument("--steps", type=int, help="fine-tuning steps per run (default: 500)")
    demo.add_argument("--pretrain-steps", type=int, help="steps of the shared pretraining (default: 1000)")
    demo.add_argument("--pretrain-seed", type=int, help="seed of the shared pretraining (default: 0)")
    slurm = parser.add_argument_group("SLURM job array (written, not submitted; see the README)")
    slurm.add_argument("--slurm", type=Path, help="write a job array script here, one task per run")
    slurm.add_argument(
        "--gpus", type=int, default=1, help="GPUs (and processes) per task; 0: a CPU job (default: 1)"
    )
    slurm.add_argument(
        "--devices", type=int, help="with --gpus 0: processes per task, e.g. 2 for CPU DDP (default: 1)"
    )
    slurm.add_argument("--time", default="24:00:00", help="time limit per task (default: 24:00:00)")
    slurm.add_argument("--partition", help="SLURM partition (default: the cluster's)")
    slurm.add_argument("--account", help="SLURM account to charge")
    slurm.add_argument("--mem", help="memory per node, e.g. 32G (default: the cluster's)")
    slurm.add_argument("--cpus-per-task", type=int, help="CPU cores per process, e.g. for data workers")
    slurm.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                       help="a further #SBATCH option, e.g. --sbatch=--qos=high (repeatable)")  # fmt: skip
    slurm.add_argument("--setup", default="", help="shell line run first in each task")
    return parser, slurm


def _split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1 :]
    return argv, []


def _demo_options(args: argparse.Namespace) -> None:
    """Fills in the ``--preset demo`` options, or refuses them without it."""
    given = [name for name in DEMO_DEFAULTS if getattr(args, name) is not None]
    if args.preset != "demo":
        if given:
            option = "--" + given[0].replace("_", "-")
            raise ValueError(
                f"ftforget sweep {option}: only with --preset demo (for config files give -- --trainer.max_steps N)"
            )
        return
    for name, default in DEMO_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name in ("steps", "pretrain_steps"):
        if getattr(args, name) < 1:
            raise ValueError(
                f"ftforget sweep --{name.replace('_', '-')} {getattr(args, name)}: give at least 1"
            )


def sweep_runs(args: argparse.Namespace, extra: list[str]) -> list[SweepRun]:
    if bool(args.configs) == bool(args.preset):
        raise ValueError("ftforget sweep: give config files or --preset paper|peft|demo (one of the two)")
    _demo_options(args)
    if args.preset == "demo":
        return demo_sweep_runs(args.output, METHODS, demo_config_dir(), _pretrained(args), args.steps,
                               args.seeds, test_ckpt=args.test_ckpt or "last", knob=args.knob, extra=extra)  # fmt: skip
    config_sets = preset(args.preset) if args.preset else [[c] for c in args.configs]
    return build_runs(config_sets, args.seeds, args.output, extra, args.test_ckpt or "best", args.knob)


def _pretrain_settings(args: argparse.Namespace) -> PretrainSettings:
    """The demo preset's one pretraining (``ftforget demo``'s, seeded with ``--pretrain-seed``)."""
    steps_and_seed = argparse.Namespace(pretrain_steps=args.pretrain_steps, seed=args.pretrain_seed)
    return pretrain_settings(demo_config_dir(), steps_and_seed)


def _pretrained(args: argparse.Namespace) -> Path:
    """Where it is cached: ``OUTPUT/pretrained``, as ``ftforget demo --output OUTPUT`` keeps it."""
    return pretrained_path(_pretrain_settings(args), args.output / "pretrained")


def _pretrain(args: argparse.Namespace) -> None:
    """Pretrains (or reuses) it, with the demo's one torch thread, so that its weights are the demo's."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pretrained_backbone(_pretrain_settings(args), args.output / "pretrained")
    finally:
        torch.set_num_threads(threads)


def main(argv: list[str], stage: Callable[[list[str]], int] | None = None) -> int:
    """Runs ``ftforget sweep``; ``stage`` runs one ftforget command (default: in this process)."""
    own, extra = _split_extra(argv)
    parser, slurm_group = _parser()
    args = parser.parse_args(own)
    runs = sweep_runs(args, extra)
    if args.task is not None:
        if not 0 <= args.task < len(runs):
            raise ValueError(f"--task {args.task}: this sweep has runs 0 to {len(runs) - 1}")
        runs = [runs[args.task]]
    if args.slurm is not None:
        return _write_slurm(args, own, extra, runs, slurm_group)
    if args.dry_run:
        commands = plan_commands(runs)
        if args.preset == "demo" and commands and not _pretrained(args).is_file():
            commands.insert(0, f"# first the demo's pretraining, into {_pretrained(args)}")
        sys.stdout.write("".join(f"{c}\n" for c in commands) or "nothing to run: every run is done\n")
        return 0
    if args.task is not None:
        requeue_on_usr1()  # a SLURM array task: SIGUSR1 requeues it (see ftforget.slurm)
    if args.preset == "demo":
        _pretrain(args)
    if stage is None:
        from ftforget.commands import main as stage
    say = lambda line: sys.stdout.write(f"[ftforget sweep] {line}\n")  # noqa: E731
    try:
        run_dirs = run_sweep(runs, stage, say)
    except SweepError as err:  # the command's own error is above; its exit status is the sweep's
        sys.stderr.write(f"ftforget {err}; run the sweep again to go on from there\n")
        return err.status
    if args.task is not None:
        return 0
    report = write_report(run_dirs, args.output / "report")
    sys.stdout.write("\n" + report.markdown + "\n")
    for path in report.files:
        say(f"report: {path}")
    return 0


def _write_slurm(
    args: argparse.Namespace,
    own: list[str],
    extra: list[str],
    runs: list[SweepRun],
    slurm_group: argparse._ArgumentGroup,
) -> int:
    options = SlurmOptions(
        gpus=args.gpus, devices=args.devices, time=args.time, partition=args.partition, account=args.account,
        mem=args.mem, cpus_per_task=args.cpus_per_task, sbatch=tuple(args.sbatch), setup=args.setup,
    )  # fmt: skip
    script_only = {name for action in slurm_group._group_actions for name in action.option_strings}
    task_args = _strip_options(own, script_only | {"--task", "--dry-run"})
    text = slurm_script(runs, ["ftforget", "sweep", *task_args], extra, options)
    (args.output / LOG_DIR).mkdir(parents=True, exist_ok=True)  # SLURM opens the batch logs there first
    atomic_write(args.slurm, lambda f: f.write(text.encode()))
    args.slurm.chmod(0o755)
    sys.stdout.write(f"wrote {args.slurm}: {len(runs)} array tasks; submit it with: sbatch {args.slurm}\n")
    return 0


def _strip_options(argv: list[str], names: set[str]) -> list[str]:
    """``argv`` without the options in ``names`` and their values (``--x v`` or ``--x=v``)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in names:
            skip = "=" not in arg and name != "--dry-run"
            continue
        out.append(arg)
    return out
