"""``ftforget stream``: tasks in a row, each fine-tuned from the previous one's final weights
(:mod:`ftforget.stream`); prints the accuracy matrix and the stream metrics."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ftforget.demo import PretrainSettings, pretrained_backbone, pretrained_path, settings_from
from ftforget.stream.config import StreamConfig, StreamConfigError, fit_settings, load_stream
from ftforget.stream.run import HOT_SWAP_FILE, METRICS_FILE, finished, read_matrix, run_stream, stream_dir
from ftforget.sweep import LOG_DIR, SweepError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ftforget stream",
        description="A continual stream: the tasks of a stream file fine-tuned one after another with one "
        "method, each from the previous task's final weights, with a new head per task (or, with the stream "
        "file's `heads: shared`, one head over every class so far); the "
        "pretraining-domain probe over the whole stream and the accuracy matrix R[i, j]. Run it again to go "
        "on after an interruption.",
    )
    parser.add_argument("--config", type=Path, required=True, help="the stream file (YAML)")
    parser.add_argument(
        "--method",
        type=Path,
        action="append",
        default=None,
        help="a method fit config, replacing the stream file's `method` (repeat for several files, applied "
        "in order)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="the seed of every task's fit, replacing the stream file's `seed` (the stream goes to "
        "OUTPUT/<method>/seed<SEED>); start: demo's pretraining keeps the file's seed, so that every seed "
        "fine-tunes one base",
    )
    parser.add_argument(
        "--output", type=Path, default=Path("runs/stream"), help="streams go to OUTPUT/<method>/seed<seed>"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="start: demo: pretrained backbones (default: OUTPUT/pretrained)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    return parser


def demo_settings(config: StreamConfig) -> PretrainSettings:
    """``start: demo``: the pretraining of the backbone of the first task's settings, on its old digits, as
    ``ftforget demo`` pretrains it (same settings, same cache file), seeded with the stream's seed.

    Raises:
        StreamConfigError: the settings lack a key the pretraining needs (named).
    """
    settings = fit_settings(config, config.tasks[0])
    model = settings.get("model", {}).get("init_args", {})
    data = settings.get("data", {}).get("init_args", {})
    missing = [k for k in ("backbone", "backbone_kwargs") if k not in model] + [
        k for k in ("old_digits", "image_size", "split_seed") if k not in data
    ]
    if missing:
        raise StreamConfigError(
            f"stream file {str(config.source)!r}: start: demo needs model.init_args.backbone/backbone_kwargs "
            f"and data.init_args.old_digits/image_size/split_seed in the method's files or common (missing {missing})"
        )
    return settings_from(model, data, config.pretrain_steps, config.seed)


def demo_start(config: StreamConfig, cache_dir: Path) -> Path:
    """``start: demo``: the pretrained backbone of :func:`demo_settings`, pretrained once and cached in
    ``cache_dir`` (processes that ask at once wait for one of them: :func:`~ftforget.demo.pretrained_backbone`)."""
    return pretrained_backbone(demo_settings(config), cache_dir)


def with_seed(config: StreamConfig, seed: int | None) -> StreamConfig:
    """The stream with its fits seeded ``seed`` (``--seed``; None: the stream file's own).

    Raises:
        StreamConfigError: a negative seed.
    """
    if seed is None:
        return config
    if seed < 0:
        raise StreamConfigError(f"stream --seed {seed}: give a seed >= 0")
    return replace(config, seed=seed)


def check_tasks(config: StreamConfig, start: Path, root: Path) -> None:
    """Builds every task's model, data module and trainer from its settings (the start weights for all)
    and checks its data (``check_inputs``) before the first fit, so that a bad task fails at once,
    named, not after the tasks before it.

    Raises:
        StreamConfigError: a task's settings do not build; the message names the task and the reason.
    """
    from ftforget.cli import run_lightning
    from ftforget.commands import user_error
    from ftforget.stream.run import prepare, task_dir_name

    prepare(config, start, root)  # writes the settings files the fits read
    for index, task in enumerate(config.tasks):
        name = task_dir_name(index, task.name)
        configs = [*config.method, root / "configs" / "common.yaml", root / "configs" / f"{name}.yaml"]
        argv = [a for c in configs for a in ("--config", str(c))]
        argv += ["--model.init_args.checkpoint", str(start), "--trainer.logger", "false"]
        if config.anchor == "start":
            argv += ["--model.init_args.anchor_weights", str(start)]
        try:
            run_lightning(argv, run=False).datamodule.check_inputs("fit")
        except (ValueError, TypeError, FileNotFoundError) as err:
            message = " ".join(str(user_error(err)).split())
            raise StreamConfigError(
                f"stream file {str(config.source)!r}: task {name} does not build: {message}"
            ) from None


def _say(message: str) -> None:
    sys.stdout.write(f"[ftforget stream] {message}\n")
    sys.stdout.flush()


def matrix_table(root: Path) -> str:
    """R[i, j] as a Markdown table, percentages (rows: after training task i; columns: task j)."""
    matrix = read_matrix(root)
    tasks = matrix["tasks"]
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for i, row in enumerate(matrix["rows"]):
        cells = [
            f"{100 * row['correct'][j] / row['total'][j]:.1f}" if j < len(row["correct"]) else ""
            for j in range(len(tasks))
        ]
        lines.append(f"| {tasks[i]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """Runs ``ftforget stream``; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"stream --threads must be >= 1, got {args.threads}")
    file_config = load_stream(args.config, args.method)
    config = with_seed(file_config, args.seed)
    start_time = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if config.start == "demo":
            start = demo_start(file_config, args.cache_dir or args.output / "pretrained")
        else:
            start = Path(config.start)
        from ftforget.commands import main as stage

        check_tasks(config, start, stream_dir(args.output, config))

        root = run_stream(config, start, args.output, stage, _say, args.threads)
    except SweepError as err:  # a task's fit or test failed (its own error is above): its exit status
        sys.stderr.write(f"ftforget stream: {err}; run the same command again to go on from there\n")
        return err.status
    finally:
        torch.set_num_threads(threads)  # main() may be called in a process that goes on (tests)
    metrics = json.loads((root / METRICS_FILE).read_text())
    if metrics.get("heads") == "shared":
        how = "task i's shared head, the argmax over the classes of tasks 1..i (class-incremental)"
    else:
        how = "task j's own head (task-incremental)"
    sys.stdout.write(f"\nAccuracy R[i, j] (%) on task j's test split after training task i, {how}:\n\n")
    sys.stdout.write(matrix_table(root) + "\n\n")
    for key in ("average_accuracy", "average_forgetting", "backward_transfer"):
        value = metrics[key]
        sys.stdout.write(f"{key}: {'n/a' if value is None else f'{100 * value:.2f}%'}\n")
    if metrics.get("single_task_transfer") is not None:
        sys.stdout.write(f"single_task_transfer: {100 * metrics['single_task_transfer']:.2f}%\n")
    if (root / HOT_SWAP_FILE).is_file():
        swap = json.loads((root / HOT_SWAP_FILE).read_text())
        sys.stdout.write(
            f"hot-swap (each task alone from the start weights): oracle average accuracy "
            f"{100 * swap['oracle_average_accuracy']:.2f}%, routed without labels "
            f"{100 * swap['routed_average_accuracy']:.2f}% (routing accuracy {100 * swap['routing_accuracy']:.2f}%)\n"
        )
    _say(f"done in {time.perf_counter() - start_time:.0f} s: {root}")
    return 0


@dataclass
class StreamRun:
    """One stream of ``ftforget sweep --stream`` (one method, one seed): the unit of a stream sweep, as a
    :class:`~ftforget.sweep.SweepRun` is a fit's (the same ``state``/``steps`` interface, so the sweep's
    planning, local loop and SLURM array take either). Its one command is ``ftforget stream``, so that the
    stream's directory is the one ``ftforget stream --output OUTPUT`` uses, and either goes on with the
    other's stream.

    Attributes:
        stream: the stream file, as given.
        method: the method's fit config files (``--method``), or None: the stream file's own.
        seed: the fits' seed (``--seed``).
        output: the sweep's directory; the stream lives in ``output/<method>/seed<seed>``.
        config: the stream with this method and seed.
        start: its start weights (for ``start: demo``, the cache file, whether it is there yet or not).
    """

    stream: Path
    method: list[Path] | None
    seed: int
    output: Path
    config: StreamConfig
    start: Path

    @property
    def name(self) -> str:
        return self.config.method_name

    @property
    def run_dir(self) -> Path:
        return stream_dir(self.output, self.config)

    @property
    def log_file(self) -> Path:
        """Where a SLURM array task of this stream writes what it prints (appended over restarts)."""
        return self.output / LOG_DIR / f"{self.name}-seed{self.seed}.log"

    @property
    def pretrains(self) -> bool:
        """Whether the stream starts from the demo's pretraining (built by the first stream that needs it)."""
        return self.config.start == "demo"

    def state(self) -> str:
        """``done`` (:func:`~ftforget.stream.run.finished`), ``partial`` (its directory exists: the stream
        goes on from there) or ``new``."""
        if finished(self.config, self.start, self.run_dir):
            return "done"
        return "partial" if self.run_dir.exists() else "new"

    def args(self) -> list[str]:
        """The ``ftforget stream`` command of this stream (it starts or goes on with it)."""
        method = [a for m in self.method or [] for a in ("--method", str(m))]
        return ["stream", "--config", str(self.stream), *method, "--seed", str(self.seed), "--output", str(self.output)]  # fmt: skip

    def steps(self) -> list[list[str]]:
        return [] if self.state() == "done" else [self.args()]


def stream_runs(
    stream: Path, methods: list[list[Path]] | None, seeds: list[int] | None, output: Path
) -> list[StreamRun]:
    """Every (method, seed) of a stream sweep, method-major. ``methods`` None: the stream file's own method;
    a method whose files are the stream file's own is run without ``--method`` (the same stream, the same
    directory as ``ftforget stream --config STREAM``). ``seeds`` None: the stream file's seed.

    Raises:
        FileNotFoundError, StreamConfigError: the stream file or a method's file (named).
        ValueError: two methods that would share a directory, or a seed given twice.
    """
    try:
        own: StreamConfig | None = load_stream(stream)
    except StreamConfigError:
        if methods is None:
            raise
        own = None  # a stream file without a method of its own (or another error, raised again below)
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise ValueError(f"sweep --seeds {' '.join(map(str, seeds))}: a seed is given twice")
    runs, names = [], []
    for method in methods or [None]:
        if (
            own is not None
            and method is not None
            and [p.resolve() for p in method] == [p.resolve() for p in own.method]
        ):
            method = None
        file_config = load_stream(stream, method) if method is not None else own  # own: not None here
        start = Path(file_config.start)
        if file_config.start == "demo":
            start = pretrained_path(demo_settings(file_config), output / "pretrained")
        names.append(file_config.method_name)
        for seed in [file_config.seed] if seeds is None else seeds:
            runs.append(StreamRun(stream, method, seed, output, with_seed(file_config, seed), start))
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(
            f"sweep --methods: two methods would share the directory {twice}; give methods whose first "
            "files have distinct names"
        )
    return runs
