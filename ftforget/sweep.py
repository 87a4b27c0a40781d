"""Sweeps: a set of configs times seeds, each fitted, tested on its selected checkpoint, then reported.

One run per (config, seed), in a directory the sweep names, ``<output>/<config name>/seed<seed>/``, so
that a restarted sweep finds every run again and does only what is missing:

- no run yet (or a start that died before its first checkpoint): ``ftforget fit``;
- a run with a ``last.ckpt`` short of ``max_steps``: ``ftforget fit --resume``;
- a trained run without a test of the requested checkpoint: ``ftforget test --run``;
- with ``knob`` values, a tested run without knob points of that checkpoint: ``ftforget knob --run``;
- a run with all of these: nothing.

Runs go one after another in this process (:func:`run_sweep`), or one SLURM array task each
(:func:`slurm_script`, :mod:`ftforget.slurm`); :func:`plan_commands` prints what would run.
"""

from __future__ import annotations

import os
import shlex
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from ftforget.resources import config_dir, demo_config_dir
from ftforget.runs import CHECKPOINT_DIR, CONFIG_FILE, LAST, read_knob_points, read_test_results
from ftforget.slurm import ArrayTask, SlurmOptions, array_script

#: the sweep's logs of SLURM array tasks, under its output directory (outside the runs: a run directory
#: that is started again from scratch is removed, its log is not)
LOG_DIR = "logs"

#: the paper's ten rows, in its table order
PAPER_CONFIGS = (
    "full", "top3", "linear", "lora_r4", "lora", "lora_r16",
    "block_expansion_p1", "block_expansion_p2", "block_expansion", "block_expansion_p4",
)  # fmt: skip
#: the PEFT methods (configs/peft/), each at a budget comparable to LoRA r=8 where the method allows one
PEFT_CONFIGS = (
    "lora_qkv", "lora_all", "dora", "pissa", "loha", "lokr", "oft", "boft", "ia3", "vera", "adalora",
    "bitfit", "ssf", "adaptformer", "vpt_shallow", "vpt_deep",
)  # fmt: skip
#: the demo's five methods in the paper's order and an anti-forgetting baseline (each with ``common.yaml``)
DEMO_METHODS = ("full", "top1", "linear", "lora", "block_expansion", "full_l2sp")


def preset(name: str) -> list[list[Path]]:
    """The ``--config`` files of each run of a preset: ``paper`` (ten rows), ``peft`` (the paper's rows, then
    every PEFT method) or ``demo`` (five methods)."""
    if name == "paper":
        return [[config_dir() / f"{c}.yaml"] for c in PAPER_CONFIGS]
    if name == "peft":
        return preset("paper") + [[config_dir() / "peft" / f"{c}.yaml"] for c in PEFT_CONFIGS]
    if name == "demo":
        return [[demo_config_dir() / f"{m}.yaml", demo_config_dir() / "common.yaml"] for m in DEMO_METHODS]
    raise ValueError(f"sweep preset {name!r}: choose 'paper', 'peft' or 'demo', or give config files")


class SweepError(RuntimeError):
    """A command of the sweep failed; the message names it (its own error was printed before).

    Attributes:
        status: the command's exit status (128 + N when signal N stopped it), the sweep's own.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class SweepRun:
    """One (config, seed) of a sweep.

    Attributes:
        name: the run's name (its first config's file name without ``.yaml``).
        seed: ``seed_everything`` of the run.
        configs: the ``--config`` files, applied in order.
        output: the sweep's directory; the run lives in ``output/name/seed<seed>``.
        extra: options for every fit after the configs (e.g. ``--trainer.max_steps 100``).
        test_ckpt: the checkpoint the run is tested on: ``best`` (selected on validation) or ``last``.
        knob: the stability-plasticity knob values measured on that checkpoint (``ftforget knob``), or None.
    """

    name: str
    seed: int
    configs: list[Path]
    output: Path
    extra: list[str] = field(default_factory=list)
    test_ckpt: str = "best"
    knob: list[float] | None = None

    @property
    def run_dir(self) -> Path:
        return self.output / self.name / f"seed{self.seed}"

    @property
    def log_file(self) -> Path:
        """Where a SLURM array task of this run writes what it prints (appended over restarts)."""
        return self.output / LOG_DIR / f"{self.name}-seed{self.seed}.log"

    def fit_args(self) -> list[str]:
        configs = [a for c in self.configs for a in ("--config", str(c))]
        logger = "--trainer.logger.init_args"
        return [
            "fit", *configs, "--seed_everything", str(self.seed),
            f"{logger}.save_dir", str(self.output), f"{logger}.name", self.name, f"{logger}.version", f"seed{self.seed}",
            *self.extra,
        ]  # fmt: skip

    def resume_args(self) -> list[str]:
        return ["fit", "--resume", str(self.run_dir)]

    def test_args(self) -> list[str]:
        # --verbose false: no per-run results table, the sweep's report shows them all
        return ["test", "--run", str(self.run_dir), "--ckpt_path", self.test_ckpt, "--verbose", "false"]

    def knob_args(self) -> list[str]:
        alphas = "[" + ", ".join(f"{a:g}" for a in self.knob or []) + "]"
        return ["knob", "--run", str(self.run_dir), "--ckpt_path", self.test_ckpt, "--alphas", alphas]

    def state(self) -> str:
        """``new``, ``partial`` (resume it), ``trained`` (test it), ``tested`` (measure its knob) or ``done``."""
        last = self.run_dir / CHECKPOINT_DIR / LAST
        if not (self.run_dir / CONFIG_FILE).is_file() or not last.is_file():
            return "new"
        max_steps = int(
            (yaml.safe_load((self.run_dir / CONFIG_FILE).read_text()) or {})["trainer"]["max_steps"]
        )
        step = int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
        if step < max_steps:
            return "partial"
        if not any(r.get("requested") == self.test_ckpt for r in read_test_results(self.run_dir)):
            return "trained"
        if self.knob and not self._knob_measured():
            return "tested"
        return "done"

    def _knob_measured(self) -> bool:
        points = read_knob_points(self.run_dir)
        measured = {float(p["alpha"]) for p in points if p.get("requested") == self.test_ckpt}
        return set(map(float, self.knob or [])) <= measured

    def steps(self) -> list[list[str]]:
        """The ``ftforget`` commands still needed, given the run's state."""
        state = self.state()
        knob = [self.knob_args()] if self.knob else []
        if state == "done":
            return []
        if state == "tested":
            return knob
        if state == "trained":
            return [self.test_args(), *knob]
        return [self.resume_args() if state == "partial" else self.fit_args(), self.test_args(), *knob]


def build_runs(
    config_sets: Sequence[Sequence[Path]],
    seeds: Sequence[int],
    output: Path,
    extra: Sequence[str] = (),
    test_ckpt: str = "best",
    knob: Sequence[float] | None = None,
) -> list[SweepRun]:
    """Every (config set, seed), config-major; names must be unique (the first config's stem)."""
    if not seeds:
        raise ValueError("sweep --seeds: at least one seed")
    if test_ckpt not in ("best", "last"):
        raise ValueError(f"sweep --test_ckpt {test_ckpt!r}: choose best or last")
    names = [Path(configs[0]).stem for configs in config_sets]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"sweep: two runs would share the name {duplicates}; give configs with distinct file names"
        )
    for configs in config_sets:
        for config in configs:
            if not Path(config).is_file():
                raise FileNotFoundError(f"sweep: config file {str(config)!r} does not exist")
    return [
        SweepRun(
            name,
            seed,
            [Path(c) for c in configs],
            output,
            list(extra),
            test_ckpt,
            list(knob) if knob else None,
        )
        for name, configs in zip(names, config_sets, strict=True)
        for seed in seeds
    ]


def plan_commands(runs: Sequence[SweepRun]) -> list[str]:
    """The shell commands a sweep would run now (``--dry-run``)."""
    return [shlex.join(["ftforget", *args]) for run in runs for args in run.steps()]


def run_sweep(
    runs: Sequence[SweepRun],
    stage: Callable[[list[str]], int],
    say: Callable[[str], None] = lambda _: None,
) -> list[Path]:
    """Brings every run to ``done``, one after another; returns the run directories.

    Args:
        runs: the sweep: :class:`SweepRun` s, or anything with their ``name``, ``seed``, ``run_dir``,
            ``state()`` and ``steps()`` (a stream of ``ftforget sweep --stream``, whose state is never
            ``new`` once its directory exists, so nothing of it is removed here).
        stage: runs one ``ftforget`` command (its arguments) and returns its exit status.
        say: progress lines.

    Raises:
        SweepError: a command failed (the sweep stops; run it again to go on from there).
    """
    for number, run in enumerate(runs, start=1):
        state = run.state()
        say(f"[{number}/{len(runs)}] {run.name} seed {run.seed}: {state}")
        if state == "new" and run.run_dir.exists() and os.environ.get("SLURM_PROCID", "0") == "0":
            shutil.rmtree(run.run_dir)  # a start that died before its first checkpoint: nothing to keep
        for args in run.steps():
            code = stage(args)
            if code != 0:
                raise SweepError(
                    f"sweep: `{shlex.join(['ftforget', *args])}` failed with exit status {code}", code
                )
    return [run.run_dir for run in runs]


def slurm_script(
    runs: Sequence[SweepRun],
    command: Sequence[str],
    fit_options: Sequence[str],
    options: SlurmOptions,
    device_options: Sequence[str] | None = None,
) -> str:
    """A SLURM job array with one task per run; each task brings its run to ``done`` (:mod:`ftforget.slurm`).

    Args:
        runs: the sweep (its length is the array size).
        command: the ``ftforget sweep`` command line that rebuilds this sweep, without ``--task`` and the
            options after ``--``.
        fit_options: the options after ``--``, for every fit.
        options: the resources of each task; the fits get the matching ``trainer.devices``.
        device_options: instead of those, what tells every fit its devices (``[]``: nothing, the fits'
            own configs say; :func:`~ftforget.slurm.array_script`).

    Raises:
        SlurmScriptError: an option or path that cannot be written into the script.
    """
    output = runs[0].output if runs else Path("runs")
    tasks = [ArrayTask(run.name, run.seed, run.run_dir, run.log_file) for run in runs]
    return array_script(tasks, command, fit_options, Path.cwd(), output / LOG_DIR, options, device_options)
