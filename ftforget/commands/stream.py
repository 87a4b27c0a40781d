"""``ftforget stream``: tasks in a row, each fine-tuned from the previous one's final weights
(:mod:`ftforget.stream`); prints the accuracy matrix and the stream metrics."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ftforget.demo import pretrained_backbone, settings_from
from ftforget.stream.config import StreamConfig, StreamConfigError, fit_settings, load_stream
from ftforget.stream.run import HOT_SWAP_FILE, METRICS_FILE, read_matrix, run_stream


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


def demo_start(config: StreamConfig, cache_dir: Path) -> Path:
    """``start: demo``: the backbone pretrained on the old digits of the first task's settings, cached as
    ``ftforget demo`` caches it (same settings, same file)."""
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
    return pretrained_backbone(settings_from(model, data, config.pretrain_steps, config.seed), cache_dir)


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
    config = load_stream(args.config, args.method)
    start_time = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        if config.start == "demo":
            start = demo_start(config, args.cache_dir or args.output / "pretrained")
        else:
            start = Path(config.start)
        from ftforget.commands import main as stage
        from ftforget.stream.run import stream_dir

        check_tasks(config, start, stream_dir(args.output, config))

        root = run_stream(config, start, args.output, stage, _say, args.threads)
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
