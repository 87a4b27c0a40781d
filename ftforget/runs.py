"""A run directory is the unit: ``runs/<name>/version_N/`` holds one experiment from fit to test.

What ``ftforget fit`` writes there (TensorBoard events, ``config.yaml``, ``hparams.yaml``,
``forgetting.jsonl``, ``checkpoints/``) is read back here, so that a resume, a test and a later
measurement find the run's own files and write into the same directory:

- :func:`expand_run_options`: ``ftforget fit --resume RUN_DIR`` and ``ftforget test --run RUN_DIR`` as
  LightningCLI arguments;
- :func:`find_run_dir`: the run a configuration file or a checkpoint belongs to;
- :func:`resolve_checkpoint`: ``best`` and ``last`` as the files the run wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ftforget.files import append_jsonl, atomic_write

CONFIG_FILE = "config.yaml"
TEST_RESULTS = "test_results.jsonl"
CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"


class RunError(ValueError):
    """A run directory or one of its checkpoints is missing; the message lists what exists."""


def is_run_dir(path: Path) -> bool:
    """A directory ``ftforget fit`` wrote: its ``config.yaml`` beside a ``checkpoints/`` folder."""
    return (path / CONFIG_FILE).is_file() and (path / CHECKPOINT_DIR).is_dir()


def checkpoints_of(run_dir: Path) -> list[str]:
    """The names of the run's checkpoint files, sorted."""
    folder = run_dir / CHECKPOINT_DIR
    return sorted(p.name for p in folder.glob("*.ckpt")) if folder.is_dir() else []


def require_run(run_dir: Path, option: str) -> Path:
    """``run_dir`` if it is a run directory, else a :class:`RunError` naming ``option`` and what is missing."""
    if not run_dir.is_dir():
        raise RunError(f"{option} {str(run_dir)!r}: no such directory")
    if not is_run_dir(run_dir):
        raise RunError(
            f"{option} {str(run_dir)!r} is not a run directory (expected {CONFIG_FILE} and {CHECKPOINT_DIR}/ "
            "written by ftforget fit, e.g. runs/lora_r8/version_0)"
        )
    return run_dir


def expand_run_options(argv: list[str]) -> list[str]:
    """LightningCLI arguments for ftforget's run options (the rest is passed through unchanged).

    - ``fit --resume RUN_DIR``: ``fit --config RUN_DIR/config.yaml --ckpt_path RUN_DIR/checkpoints/last.ckpt``;
    - ``test|validate|predict --run RUN_DIR``: ``--config RUN_DIR/config.yaml``, and ``--ckpt_path best``
      unless another is given.

    The configuration comes first, so later options override it. Either way the stage logs into the
    run's own directory (see :func:`find_run_dir`).
    """
    if not argv:
        return argv
    stage, rest = argv[0], list(argv[1:])
    option = "--resume" if stage == "fit" else "--run"
    other = "--run" if stage == "fit" else "--resume"
    if any(a == other or a.startswith(f"{other}=") for a in rest):
        hint = "ftforget fit --resume RUN_DIR" if stage == "fit" else f"ftforget {stage} --run RUN_DIR"
        raise RunError(f"{other} does not go with ftforget {stage}: use {hint}")
    run_dir: Path | None = None
    kept: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == option or arg.startswith(f"{option}="):
            value = arg.split("=", 1)[1] if "=" in arg else (rest[i + 1] if i + 1 < len(rest) else "")
            if not value:
                raise RunError(f"{option} needs a run directory, e.g. runs/lora_r8/version_0")
            run_dir = require_run(Path(value).expanduser(), option)
            i += 1 if "=" in arg else 2
            continue
        kept.append(arg)
        i += 1
    if run_dir is None:
        return argv
    given_ckpt = any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in kept)
    prefix = ["--config", str(run_dir / CONFIG_FILE)]
    if stage == "fit":
        if given_ckpt:
            raise RunError("--resume RUN_DIR resumes from the run's last.ckpt; leave out --ckpt_path")
        prefix += ["--ckpt_path", str(resolve_checkpoint(run_dir, "last"))]
    elif not given_ckpt:
        prefix += ["--ckpt_path", "best"]
    return [stage, *prefix, *kept]


def find_run_dir(config_files: list[Path], ckpt_path: str | None) -> Path | None:
    """The run a stage belongs to: that of its checkpoint file (``<run>/checkpoints/x.ckpt``), else that of
    the last ``--config`` file that is a run's ``config.yaml``; None for a fresh run."""
    if ckpt_path and ckpt_path not in ("best", "last"):
        run = Path(ckpt_path).expanduser().resolve().parent.parent
        if Path(ckpt_path).expanduser().resolve().parent.name == CHECKPOINT_DIR and is_run_dir(run):
            return run
    for config in reversed(config_files):
        path = Path(config).expanduser().resolve()
        if path.name == CONFIG_FILE and is_run_dir(path.parent):
            return path.parent
    return None


def best_checkpoint_name(last_ckpt: Path) -> str | None:
    """The file name of the best checkpoint that the run's ModelCheckpoint recorded in ``last.ckpt``."""
    state = torch.load(last_ckpt, map_location="cpu", weights_only=True, mmap=True)
    for key, value in (state.get("callbacks") or {}).items():
        if (
            str(key).startswith("ModelCheckpoint")
            and isinstance(value, dict)
            and value.get("best_model_path")
        ):
            return Path(str(value["best_model_path"])).name
    return None


def resolve_checkpoint(run_dir: Path | None, which: str) -> Path:
    """``best`` or ``last`` of a run as a file path.

    ``best`` is the checkpoint the run's ModelCheckpoint selected (recorded in ``last.ckpt``), or the only
    ``best-*.ckpt`` file.

    Raises:
        RunError: no run, or the run has no such checkpoint; the message lists the run's checkpoints.
    """
    if run_dir is None:
        raise RunError(
            f"--ckpt_path {which}: which run? Give the run directory (ftforget test --run RUN_DIR) or its "
            "config (--config RUN_DIR/config.yaml)"
        )
    folder = run_dir / CHECKPOINT_DIR
    last = folder / LAST
    if which == "last":
        candidate: Path | None = last
    else:
        name = best_checkpoint_name(last) if last.is_file() else None
        bests = sorted(folder.glob("best-*.ckpt"))
        candidate = folder / name if name else (bests[0] if len(bests) == 1 else None)
    if candidate is None or not candidate.is_file():
        existing = ", ".join(checkpoints_of(run_dir)) or "none"
        raise RunError(
            f"--ckpt_path {which}: run {str(run_dir)!r} has no {which} checkpoint (its checkpoints: {existing})"
        )
    return candidate


def append_test_result(run_dir: Path, record: dict) -> None:
    """Appends one test's record to the run's ``test_results.jsonl``, atomically."""
    append_jsonl(run_dir / TEST_RESULTS, record)


def read_test_results(run_dir: Path) -> list[dict]:
    """The run's test records, oldest first (none when it was never tested)."""
    path = run_dir / TEST_RESULTS
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


LOCK_FILE = ".ftforget.lock"
_HELD: dict[Path, int] = {}


def holds_run(path: Path) -> bool:
    """Whether a directory already holds (part of) a run: a config, checkpoints, measurements or events."""
    if not path.is_dir():
        return False
    markers = (CONFIG_FILE, CHECKPOINT_DIR, "forgetting.jsonl", TEST_RESULTS)
    return any((path / m).exists() for m in markers) or any(path.glob("events.out.tfevents.*"))


def is_first_process() -> bool:
    """Whether this is the job's first process (rank 0 of torchrun, SLURM or Lightning's launcher), the one
    that writes the run directory; every other process leaves the lock alone."""
    return all(
        int(os.environ.get(v, "0") or 0) == 0 for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
    )


def lock_run(run_dir: Path) -> None:
    """Takes the run directory for this process (an exclusive ``flock`` on ``RUN_DIR/.ftforget.lock``,
    released by :func:`release_runs` or when the process ends, even by SIGKILL).

    Raises:
        RunError: another process holds it; the message names the directory and that process.
    """
    if not is_first_process() or run_dir.resolve() in _HELD:
        return
    import fcntl

    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise RunError(
            f"run directory {str(run_dir)!r} is in use by another process (pid {holder}): one run directory has "
            "one writer; wait for it to finish, or start a new run"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD[run_dir.resolve()] = fd


def release_runs() -> None:
    """Releases every run directory this process took with :func:`lock_run`."""
    while _HELD:
        _, fd = _HELD.popitem()
        os.close(fd)  # closing the descriptor releases its flock


#: the points ``ftforget knob`` measured (one line per knob value ``a``), in the run directory
KNOB_FILE = "knob.jsonl"


def write_knob_points(run_dir: Path, records: list[dict]) -> None:
    """Replaces the run's knob points with ``records`` (one measurement of one checkpoint), atomically."""
    lines = "".join(json.dumps(r) + "\n" for r in records).encode()
    atomic_write(run_dir / KNOB_FILE, lambda f: f.write(lines))


def read_knob_points(run_dir: Path) -> list[dict]:
    """The run's knob points by increasing ``a`` (none when the knob was never measured)."""
    path = run_dir / KNOB_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda r: float(r["alpha"]))
