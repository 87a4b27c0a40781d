"""SLURM: the job array script of a sweep, and how a fit behaves inside a SLURM job.

A sweep becomes one array task per run (:func:`array_script`). Each task runs
``ftforget sweep ... --task $SLURM_ARRAY_TASK_ID`` under ``srun``, one process per device; Lightning reads
the ranks from SLURM. Preemption and time limits go through ftforget's own requeue, never Lightning's:

- ``#SBATCH --signal=B:USR1@90``: 90 s before the time limit the batch script gets SIGUSR1 and runs
  ``scontrol requeue`` itself; ``scancel --signal=USR1 JOB`` reaches the ``srun`` processes instead,
  where :func:`requeue_on_usr1` does the same. Nothing waits for a checkpoint to be written first.
- ``scontrol requeue`` (by either, by an admin, or a preemption) sends SIGTERM: the fit stops between two
  steps and refreshes its ``last.ckpt`` (:class:`~ftforget.checkpointing.FTForgetCheckpoint`), written
  atomically; if it is killed before that, the previous ``last.ckpt`` is still whole.
- The task starts again and its sweep finds the run ``partial``: ``ftforget fit --resume`` from the run's
  own ``last.ckpt``, bit-identical to an uninterrupted fit.

Lightning's own SLURM requeue (SIGUSR1 -> ``hpc_ckpt_<n>.ckpt`` in ``trainer.default_root_dir``, loaded by
the next fit without ``ckpt_path``) is switched off (:func:`with_cluster_environment`), and every fit's
``default_root_dir`` is its run directory, so no fit can start from another run's ``hpc_ckpt`` file.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``#SBATCH --signal``: SIGUSR1 to the batch script this many seconds before the time limit
WARN_SECONDS = 90


class SlurmScriptError(ValueError):
    """A SLURM option or path that cannot go into the script; the message names it."""


@dataclass(frozen=True)
class SlurmOptions:
    """What each array task asks SLURM for.

    Attributes:
        gpus: GPUs per task, one process each; 0 asks for none (no GPU line, a CPU job).
        devices: processes per task of a CPU job (``--gpus 0``); with GPUs it is ``gpus``.
        time: the time limit of a task (SLURM's ``--time``, e.g. ``24:00:00``).
        partition: SLURM's ``--partition`` (default: the cluster's default partition).
        account: SLURM's ``--account``.
        mem: memory per node (SLURM's ``--mem``, e.g. ``32G``).
        cpus_per_task: CPU cores per process (SLURM's ``--cpus-per-task``; data loading workers need them).
        sbatch: further ``#SBATCH`` options, each one line (e.g. ``--qos=high``).
        setup: shell lines run first in each task (e.g. ``source .venv/bin/activate``).
    """

    gpus: int = 1
    devices: int | None = None
    time: str = "24:00:00"
    partition: str | None = None
    account: str | None = None
    mem: str | None = None
    cpus_per_task: int | None = None
    sbatch: Sequence[str] = field(default_factory=tuple)
    setup: str = ""

    def check(self) -> None:
        """Raises :class:`SlurmScriptError` naming the first option that cannot be used."""
        if self.gpus < 0:
            raise SlurmScriptError(f"--gpus {self.gpus}: give 0 (a CPU job) or more GPUs per task")
        if self.devices is not None and self.devices < 1:
            raise SlurmScriptError(f"--devices {self.devices}: give at least 1 process per task")
        if self.devices is not None and self.gpus and self.devices != self.gpus:
            raise SlurmScriptError(
                f"--devices {self.devices} with --gpus {self.gpus}: a GPU job runs one process per GPU; "
                "give --devices only with --gpus 0 (a CPU job)"
            )
        if self.cpus_per_task is not None and self.cpus_per_task < 1:
            raise SlurmScriptError(f"--cpus-per-task {self.cpus_per_task}: give at least 1")
        values = {"--time": self.time, "--partition": self.partition, "--account": self.account,
                  "--mem": self.mem}  # fmt: skip
        for name, value in values.items():
            if value is not None and (not value.strip() or any(c in value for c in " \t\n\"'#$")):
                raise SlurmScriptError(f"{name} {value!r}: a SLURM value without spaces, quotes, '#' or '$'")
        for line in self.sbatch:
            if "\n" in line or not line.startswith("-"):
                raise SlurmScriptError(f"--sbatch {line!r}: one sbatch option per value, e.g. --qos=high")

    @property
    def processes(self) -> int:
        """Processes (and devices) per task: ``--ntasks-per-node`` and the fit's ``trainer.devices``."""
        return self.gpus or self.devices or 1

    def trainer_args(self) -> list[str]:
        """The fit options that match the request: the device count and the accelerator."""
        accelerator = "gpu" if self.gpus else "cpu"
        return ["--trainer.devices", str(self.processes), "--trainer.accelerator", accelerator]

    def sbatch_lines(self) -> list[str]:
        """The ``#SBATCH`` lines of the resources (one per requested option)."""
        lines = ["--nodes=1", f"--ntasks-per-node={self.processes}"]
        if self.gpus:
            lines.append(f"--gpus-per-node={self.gpus}")
        if self.cpus_per_task is not None:
            lines.append(f"--cpus-per-task={self.cpus_per_task}")
        lines += [f"--{name}={value}" for name, value in (("mem", self.mem), ("time", self.time),
                  ("partition", self.partition), ("account", self.account)) if value is not None]  # fmt: skip
        return [f"#SBATCH {line}" for line in [*lines, *self.sbatch]]


@dataclass(frozen=True)
class ArrayTask:
    """One array task: the run it brings to ``done``, and its log file."""

    name: str
    seed: int
    run_dir: Path
    log: Path


def _sbatch_path(path: Path, option: str, pattern: str = "") -> str:
    """``path`` (then SLURM's file name ``pattern``) for an ``#SBATCH`` line: sbatch reads these lines itself
    (no shell), so it goes in double quotes, with a ``%`` of the path escaped; a double quote or a line break
    cannot be expressed."""
    text = str(path)
    if '"' in text or "\n" in text:
        raise SlurmScriptError(
            f"{option} {text!r}: sbatch cannot read a path with a double quote or a line break; choose another"
        )
    return '"' + text.replace("%", "%%") + pattern + '"'


def array_script(
    tasks: Sequence[ArrayTask],
    command: Sequence[str],
    fit_options: Sequence[str],
    workdir: Path,
    log_dir: Path,
    options: SlurmOptions,
    device_options: Sequence[str] | None = None,
) -> str:
    """A SLURM job array script: task ``i`` runs ``command --task i -- fit_options`` under ``srun``.

    Args:
        tasks: the array's tasks, in order (their runs and log files).
        command: the ``ftforget sweep`` command line that rebuilds the sweep, without ``--task`` and without
            the options for every fit.
        fit_options: the options for every fit (a sweep's arguments after ``--``); the device options of
            ``options`` (:meth:`SlurmOptions.trainer_args`) are appended.
        workdir: the directory the task runs in (relative paths in ``command`` are relative to it).
        log_dir: where SLURM writes the batch logs (``slurm-<job>_<task>.out``); each task's own log
            (everything the run prints, over all restarts) is its :attr:`ArrayTask.log`.
        options: the resources asked for.
        device_options: what tells every fit its devices, after ``fit_options`` (default:
            :meth:`SlurmOptions.trainer_args`); ``[]`` for a command whose fits take their devices from their
            own configs (a stream sweep). Nothing after ``fit_options`` and ``device_options``: no ``--``.

    Raises:
        SlurmScriptError: an option or path that cannot be written into the script.
    """
    options.check()
    tail = [*fit_options, *(options.trainer_args() if device_options is None else device_options)]
    if not tasks:
        raise SlurmScriptError("ftforget sweep --slurm: the sweep has no runs")
    workdir, log_dir = workdir.resolve(), log_dir.resolve()
    q = shlex.quote
    header = [
        "#!/bin/bash",
        "# Written by `ftforget sweep --slurm`: one array task per run; submit with `sbatch THIS_FILE`.",
        "# Each task brings its run to done (fit or resume, test, ...) and stops; sbatch it again to redo what",
        "# failed. Resources: one process per device (Lightning reads the ranks from SLURM).",
        "#SBATCH --job-name=ftforget-sweep",
        f"#SBATCH --array=0-{len(tasks) - 1}",
        *options.sbatch_lines(),
        "# Preemption and the time limit: the task is requeued and its run resumes from its last.ckpt.",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{WARN_SECONDS}",
        f"#SBATCH --chdir={_sbatch_path(workdir, 'the working directory')}",
        f"#SBATCH --output={_sbatch_path(log_dir, '--output', '/slurm-%A_%a.out')}",
        "#SBATCH --open-mode=append",
        "# Task -> run (and its log, kept over restarts):",
        *(f"#   {i}: {t.name} seed {t.seed} -> {t.run_dir}" for i, t in enumerate(tasks)),
    ]
    cases = [
        f"  {i}) log={q(str(t.log).replace('%', '%%'))} ;;" for i, t in enumerate(tasks)
    ]  # srun reads % patterns in --output
    body = [
        "set -uo pipefail",
        f"mkdir -p {q(str(log_dir))}",
        'case "$SLURM_ARRAY_TASK_ID" in',
        *cases,
        '  *) echo "ftforget: array task $SLURM_ARRAY_TASK_ID is not in this sweep" >&2; exit 2 ;;',
        "esac",
        "requeue() {",
        '  echo "ftforget: SIGUSR1: requeueing job $SLURM_JOB_ID; its run resumes from its last.ckpt" >&2',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "}",
        "trap requeue USR1",
        *([options.setup] if options.setup else []),
        # In the background, so that the trap runs at once (bash runs traps between commands).
        f'srun --output="$log" --open-mode=append {shlex.join(command)} --task "$SLURM_ARRAY_TASK_ID"'
        + (f" -- {shlex.join(tail)}" if tail else "")
        + " &",
        "pid=$!",
        'status=0; wait "$pid" || status=$?',
        'while kill -0 "$pid" 2>/dev/null; do status=0; wait "$pid" || status=$?; done',
        'exit "$status"',
        "",
    ]
    return "\n".join([*header, *body])


def under_slurm() -> bool:
    """Whether this process is a task of a SLURM job that Lightning would treat as one (``srun``/``sbatch``)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return SLURMEnvironment.detect()


def with_cluster_environment(plugins: Any) -> Any:
    """``plugins`` plus, inside a SLURM job, Lightning's SLURM environment without its automatic requeue
    (ftforget requeues by itself; see the module). A configured cluster environment is kept as it is."""
    if not under_slurm():
        return plugins
    from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment

    items = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if any(isinstance(p, ClusterEnvironment) for p in items):
        return plugins
    return [*items, SLURMEnvironment(auto_requeue=False)]


def keep_running_on_usr1() -> None:
    """Inside a SLURM job, a fit whose SIGUSR1 nobody handles (a hand-written job script, not a sweep task)
    keeps running on it instead of dying: the signal only warns of the time limit or a preemption, whose
    SIGTERM then makes the fit write ``last.ckpt`` (``ftforget fit --resume RUN`` goes on from there).
    A sweep task's requeue handler (:func:`requeue_on_usr1`) is left in place."""
    if os.environ.get("SLURM_JOB_ID") is None or signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL:
        return

    def warn(signum: int, frame: object) -> None:
        sys.stderr.write(
            "ftforget: SIGUSR1 (SLURM's warning before the time limit or a preemption): the fit goes on and "
            "writes last.ckpt at SIGTERM; resume it with ftforget fit --resume RUN (ftforget sweep --slurm "
            "requeues and resumes by itself)\n"
        )

    signal.signal(signal.SIGUSR1, warn)


def requeue_on_usr1() -> None:
    """Inside a SLURM job, SIGUSR1 requeues the job (``scontrol requeue``; the first process only) instead of
    killing this process. The requeue's SIGTERM then stops the fit, which keeps its state in ``last.ckpt``."""
    job = os.environ.get("SLURM_JOB_ID")
    if job is None:
        return
    first = int(os.environ.get("SLURM_PROCID", "0") or 0) == 0

    def requeue(signum: int, frame: object) -> None:
        if not first:
            return
        sys.stderr.write(f"ftforget: SIGUSR1: requeueing job {job}; its run resumes from its last.ckpt\n")
        try:
            proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            sys.stderr.write(f"ftforget: scontrol requeue {job} failed: {err}\n")
            return
        if proc.returncode != 0:
            sys.stderr.write(f"ftforget: scontrol requeue {job} failed: {proc.stderr.strip()}\n")

    signal.signal(signal.SIGUSR1, requeue)
