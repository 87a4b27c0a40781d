"""``ftforget sweep``: configs times seeds, each fitted and tested, then the report (:mod:`ftforget.sweep`);
or, with ``--stream FILE``, continual streams: methods times seeds, one ``ftforget stream`` each.

::

    ftforget sweep --preset paper --seeds 0 1 2 --output runs/paper -- --config configs/forgetting.yaml
    ftforget sweep configs/lora.yaml configs/full.yaml --seeds 0 1 --dry-run
    ftforget sweep configs/lora.yaml configs/full.yaml --knob 0 0.25 0.5 0.75 1
    ftforget sweep --preset demo --seeds 0 1 --steps 100 --output runs/demo-sweep
    ftforget sweep --preset paper --seeds 0 1 2 --slurm sweep.sbatch --gpus 1 --setup 'source .venv/bin/activate'
    ftforget sweep --stream configs/stream/digits.yaml --methods full lora block_expansion --seeds 0 1

Options after ``--`` go to every fit (e.g. ``--trainer.max_steps 100``). Run it again after an
interruption: finished runs are skipped, an interrupted one is resumed from its ``last.ckpt``.
``--preset demo`` is the experiment of ``ftforget demo``: one pretraining (cached, built once even when
array tasks start together) and its fine-tuning runs, for every seed. ``--stream FILE`` sweeps continual
streams instead: one ``ftforget stream`` per method and seed (:class:`ftforget.commands.stream.StreamRun`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ftforget.commands.stream import StreamRun, stream_runs
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
from ftforget.slurm import SlurmOptions, SlurmScriptError, requeue_on_usr1
from ftforget.stream.run import METRICS_FILE
from ftforget.sweep import (
    DEMO_METHODS,
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
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seed_everything values (default: 0; --stream: the stream file's seed)",
    )
    parser.add_argument("--output", type=Path, default=Path("runs/sweep"), help="default: runs/sweep")
    parser.add_argument("--test_ckpt", choices=["best", "last"], default=None,
                        help="the checkpoint each run is tested on (default: best, selected on validation; "
                        "--preset demo: last, as ftforget demo)")  # fmt: skip
    parser.add_argument("--knob", type=float, nargs="+", metavar="A",
                        help="after the test, measure each run's knob at these a (ftforget knob), e.g. 0 0.5 1")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="print the commands still to run, run nothing")
    parser.add_argument("--task", type=int, help="run only run number TASK (a SLURM array task)")
    stream = parser.add_argument_group(
        "--stream (continual streams: one `ftforget stream` per method and seed, in OUTPUT/<method>/seed<seed>)"
    )
    stream.add_argument("--stream", type=Path, metavar="FILE",
                        help="a stream file (e.g. configs/stream/digits.yaml): sweep its streams instead of fits")  # fmt: skip
    stream.add_argument("--methods", nargs="+", metavar="METHOD",
                        help="with --stream, one stream per method (default: the stream file's own): a demo method "
                        f"({', '.join(DEMO_METHODS)}: configs/demo/<name>.yaml with configs/demo/common.yaml), or "
                        "a method's fit config files joined by commas, applied in order (as `ftforget stream "
                        "--method A --method B`), e.g. my_lora.yaml,configs/demo/common.yaml")  # fmt: skip
    demo = parser.add_argument_group("--preset demo (the experiment of ftforget demo)")
    demo.add_argument("--steps", type=int, help="fine-tuning steps per run (default: 500)")
    demo.add_argument("--pretrain-steps", type=int, help="steps of the shared pretraining (default: 1000)")
    demo.add_argument("--pretrain-seed", type=int, help="seed of the shared pretraining (default: 0)")
    slurm = parser.add_argument_group("SLURM job array (written, not submitted; see the README)")
    slurm.add_argument("--slurm", type=Path, help="write a job array script here, one task per run")
    slurm.add_argument(
        "--gpus",
        type=int,
        default=1,
        help="GPUs (and processes) per task; 0: a CPU job (default: 1; --stream: 0 or 1, a stream is one process)",
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
        raise ValueError(
            "ftforget sweep: give config files or --preset paper|peft|demo (one of the two), or --stream FILE"
        )
    if args.methods is not None:
        raise ValueError(
            "ftforget sweep --methods: only with --stream FILE (config files are the runs otherwise)"
        )
    _demo_options(args)
    seeds = [0] if args.seeds is None else args.seeds
    if args.preset == "demo":
        return demo_sweep_runs(args.output, METHODS, demo_config_dir(), _pretrained(args), args.steps,
                               seeds, test_ckpt=args.test_ckpt or "last", knob=args.knob, extra=extra)  # fmt: skip
    config_sets = preset(args.preset) if args.preset else [[c] for c in args.configs]
    return build_runs(config_sets, seeds, args.output, extra, args.test_ckpt or "best", args.knob)


def stream_sweep_runs(args: argparse.Namespace, extra: list[str]) -> list[StreamRun]:
    """``--stream FILE``: one stream per method (``--methods``) and seed (``--seeds``).

    Raises:
        ValueError: an option that makes no sense for a stream (all of them named), or a ``--methods``
            entry that is neither a demo method nor existing fit config files.
    """
    given = {
        "config files": bool(args.configs), "--preset": args.preset is not None,
        "--knob": args.knob is not None, "--test_ckpt": args.test_ckpt is not None,
        **{"--" + name.replace("_", "-"): getattr(args, name) is not None for name in DEMO_DEFAULTS},
        "options after --": bool(extra),
    }  # fmt: skip
    refused = [name for name, yes in given.items() if yes]
    if refused:
        raise ValueError(
            f"ftforget sweep --stream: {', '.join(refused)} cannot be used with a stream: its method, steps, "
            "seed, pretraining and fit settings are in the stream file (--methods and --seeds choose the streams)"
        )
    return stream_runs(args.stream, _stream_methods(args.methods), args.seeds, args.output)


def _stream_methods(items: list[str] | None) -> list[list[Path]] | None:
    """``--methods``: each entry a demo method's name (its file with ``common.yaml``) or fit config files
    joined by commas; None: the stream file's own method."""
    if items is None:
        return None
    methods = []
    for item in items:
        if item in DEMO_METHODS:
            methods.append([demo_config_dir() / f"{item}.yaml", demo_config_dir() / "common.yaml"])
            continue
        files = [Path(f) for f in item.split(",") if f]
        missing = [str(f) for f in files if not f.is_file()]
        if not files or missing:
            raise ValueError(
                f"sweep --methods {item!r}: neither a demo method ({', '.join(DEMO_METHODS)}) nor fit config "
                f"files joined by commas (not found: {', '.join(missing) or item!r})"
            )
        methods.append(files)
    return methods


def _pretraining_notes(args: argparse.Namespace, runs: list) -> list[str]:
    """``--dry-run``: the pretrainings the sweep would build first (none when they are cached)."""
    if args.stream is not None:
        starts = dict.fromkeys(r.start for r in runs if r.pretrains and r.state() != "done")
        return [f"# first the demo's pretraining (in the first stream that needs it), into {s}"
                for s in starts if not s.is_file()]  # fmt: skip
    if args.preset == "demo" and plan_commands(runs) and not _pretrained(args).is_file():
        return [f"# first the demo's pretraining, into {_pretrained(args)}"]
    return []


def stream_summary(runs: list[StreamRun]) -> str:
    """Each stream's metrics (``stream_metrics.json``) as a Markdown table, in %."""
    lines = ["| method | seed | ACC | forgetting | BWT | stream |", "|---|---|---|---|---|---|"]
    for run in runs:
        metrics = json.loads((run.run_dir / METRICS_FILE).read_text())
        cells = [
            "n/a" if metrics[k] is None else f"{100 * metrics[k]:.1f}"
            for k in ("average_accuracy", "average_forgetting", "backward_transfer")
        ]
        lines.append(f"| {run.name} | {run.seed} | {' | '.join(cells)} | {run.run_dir} |")
    return "\n".join(lines) + "\n"


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
    runs = stream_sweep_runs(args, extra) if args.stream is not None else sweep_runs(args, extra)
    if args.task is not None:
        if not 0 <= args.task < len(runs):
            raise ValueError(f"--task {args.task}: this sweep has runs 0 to {len(runs) - 1}")
        runs = [runs[args.task]]
    if args.slurm is not None:
        return _write_slurm(args, own, extra, runs, slurm_group)
    if args.dry_run:
        commands = [*_pretraining_notes(args, runs), *plan_commands(runs)]
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
    if args.stream is not None:
        sys.stdout.write("\n" + stream_summary(runs))
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
    device_options = None
    if args.stream is not None:  # one process, whose fits run on the devices their configs name
        if options.processes > 1:
            raise SlurmScriptError(
                f"ftforget sweep --stream --slurm with {options.processes} processes per task (--gpus/--devices): "
                "a stream runs as one process, its fits one after another on the devices of its method's "
                "configs; give --gpus 0 (a CPU job) or --gpus 1"
            )
        device_options = []
    script_only = {name for action in slurm_group._group_actions for name in action.option_strings}
    task_args = _strip_options(own, script_only | {"--task", "--dry-run"})
    text = slurm_script(runs, ["ftforget", "sweep", *task_args], extra, options, device_options)
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
