"""Running a stream: one run directory, one sub-run per task, each starting where the previous one ended.

``<output>/<method>/seed<seed>/`` holds::

    stream.yaml               the stream as it was started (a restart with another one is refused)
    configs/common.yaml       the stream's `common` fit settings; configs/<i>-<task>.yaml each task's
    <i>-<task>/               task i's sub-run: an ordinary run directory (ftforget fit, then test)
    carried/<i>-<task>.pth    the backbone task i hands on (ftforget.stream.carry), .yaml how to build it
    accuracy_matrix.json      R[i][j] (with the correct/total counts behind it), row i after task i; `heads`
                              (task or shared) and, shared, each task's `label_offsets`
    stream_forgetting.jsonl   the pretraining-domain probe over the cumulative step of the whole stream
    stream_metrics.json       average accuracy, forgetting, backward transfer (ftforget.stream.metrics),
                              their 95% bootstrap intervals over the test images (ftforget.stream.bootstrap)
    ref-<i>-<task>/           with hot_swap: task i fitted alone from the start weights (i >= 2; task 1's
                              reference is 1-<task> itself)
    hot_swap.json             with hot_swap: those references routed without labels (ftforget.stream.hotswap)

Each task's fit goes through the ordinary fit path (``ftforget fit``, resumed with ``ftforget fit
--resume`` from its ``last.ckpt``: :class:`ftforget.sweep.SweepRun`); everything else is a deterministic
function of the sub-runs' files, rewritten atomically, so a stream killed anywhere and started again with
the same command ends with the files of an uninterrupted one.

``heads: shared`` (class-incremental): task ``i >= 2``'s fit gets ``--model.init_args.label_offset`` (the
classes of the tasks before it: the rows of task ``i-1``'s head) and ``--model.init_args.earlier_head_from``
(task ``i-1``'s ``last.ckpt``, whose head becomes the first rows of task ``i``'s); ``R[i][j]`` is task
``i``'s head on task ``j``'s test split, labels offset, the argmax over every class seen so far. The hot-swap
references stay single-task fits with their own heads; their accuracies are within a task's classes, not
comparable with a shared head's ``R[j][j]``, so the single-task transfer is not computed (null).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ftforget.files import atomic_write
from ftforget.forgetting.config import eval_steps_until
from ftforget.runs import CHECKPOINT_DIR, LAST
from ftforget.stats import pack_hits, unpack_hits
from ftforget.stream.bootstrap import stream_metrics_ci
from ftforget.stream.carry import (
    label_offset,
    read_carried,
    run_data_module,
    task_head,
    test_hits,
    write_carried,
)
from ftforget.stream.config import StreamConfig, StreamConfigError
from ftforget.stream.hotswap import hot_swap_results
from ftforget.stream.metrics import stream_metrics
from ftforget.sweep import SweepRun, run_sweep

MATRIX_FILE = "accuracy_matrix.json"
FORGETTING_FILE = "stream_forgetting.jsonl"
METRICS_FILE = "stream_metrics.json"
STREAM_FILE = "stream.yaml"
HOT_SWAP_FILE = "hot_swap.json"


@dataclass
class TaskRun(SweepRun):
    """A task's sub-run: a :class:`~ftforget.sweep.SweepRun` whose directory is ``output/name`` (the
    stream's directory is ``output``; the seed is the stream's)."""

    @property
    def run_dir(self) -> Path:
        return self.output / self.name

    def fit_args(self) -> list[str]:
        args = super().fit_args()
        logger = "--trainer.logger.init_args"  # TensorBoard's log_dir is save_dir/name/version
        for key, value in (
            (f"{logger}.save_dir", str(self.output.parent)),
            (f"{logger}.name", self.output.name),
            (f"{logger}.version", self.name),
        ):
            args[args.index(key) + 1] = value
        return args


def stream_dir(output: Path, config: StreamConfig) -> Path:
    """The stream's run directory: ``<output>/<method>/seed<seed>``."""
    return Path(output) / config.method_name / f"seed{config.seed}"


def task_dir_name(index: int, name: str) -> str:
    return f"{index + 1}-{name}"


def _write_yaml(path: Path, data: Any) -> None:
    text = yaml.safe_dump(data, sort_keys=False).encode()
    atomic_write(path, lambda f: f.write(text))


def _write_json(path: Path, data: Any) -> None:
    text = (json.dumps(data, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(text))


def _record(config: StreamConfig, start: Path) -> dict[str, Any]:
    """What ``stream.yaml`` records of a stream."""
    record = {**asdict(config), "source": str(config.source), "start": str(start)}
    record["method"] = [str(m) for m in config.method]
    record.pop("hot_swap")
    return record


def _comparable(record: dict[str, Any]) -> dict[str, Any]:
    """A ``stream.yaml`` record as two of them are compared: without ``hot_swap`` (it only adds sub-runs
    beside the stream's: switching it on later goes on with the same stream), ``anchor`` and ``heads``
    filled in for a stream started before the keys existed, and the file paths resolved (``configs/x.yaml`` given relative or
    absolute, or through a symlink, is one file: ``ftforget stream`` and ``ftforget sweep --stream`` go on
    with each other's streams)."""
    out = yaml.safe_load(yaml.safe_dump(record, sort_keys=False))
    out.pop("hot_swap", None)
    out.setdefault("anchor", "previous")
    out.setdefault("heads", "task")  # a stream started before `heads` existed had a head per task
    for key in ("source", "start"):
        out[key] = str(Path(out[key]).resolve())
    out["method"] = [str(Path(m).resolve()) for m in out["method"]]
    return out


def same_stream(config: StreamConfig, start: Path, root: Path) -> bool | None:
    """Whether ``root/stream.yaml`` records this stream (None: ``root`` holds no stream yet)."""
    copy = root / STREAM_FILE
    if not copy.is_file():
        return None
    return _comparable(yaml.safe_load(copy.read_text())) == _comparable(_record(config, start))


def finished(config: StreamConfig, start: Path, root: Path) -> bool:
    """Whether the stream in ``root`` is complete, cheaply (two small files read, nothing written): its
    ``stream.yaml`` records this stream and ``stream_metrics.json``, written last, is there, with the
    hot-swap references exactly when ``hot_swap`` is on."""
    path = root / METRICS_FILE
    if not path.is_file() or not same_stream(config, start, root):
        return False
    return (json.loads(path.read_text()).get("reference") is not None) == config.hot_swap


def prepare(config: StreamConfig, start: Path, root: Path) -> None:
    """Writes ``stream.yaml`` and the fit settings files, or checks that a started stream is this one.

    Raises:
        StreamConfigError: ``root`` holds a stream started with other settings.
    """
    same = same_stream(config, start, root)
    if same is False:
        raise StreamConfigError(
            f"stream directory {str(root)!r} was started with other settings (its {STREAM_FILE}); "
            "give another --output, or remove that directory"
        )
    if same is None:
        root.mkdir(parents=True, exist_ok=True)
        _write_yaml(root / STREAM_FILE, _record(config, start))
    _write_yaml(root / "configs" / "common.yaml", config.common)
    for index, task in enumerate(config.tasks):
        _write_yaml(root / "configs" / f"{task_dir_name(index, task.name)}.yaml", task.config)


def task_run(
    config: StreamConfig,
    root: Path,
    index: int,
    checkpoint: Path,
    backbone_kwargs: dict[str, Any] | None = None,
    threads: int = 1,
    prefix: str = "",
    start: Path | None = None,
    head: tuple[int, Path] | None = None,
) -> TaskRun:
    """Task ``index``'s sub-run: the method's configs, ``common``, the task's settings; the backbone
    ``checkpoint`` (the stream's start, or the one carried out of the previous task, with the
    ``backbone_kwargs`` that build it); ``steps`` steps; the probe at log-spaced steps. ``prefix`` names
    another sub-run of the same task (``ref-``: a hot-swap reference). With ``anchor: start``, ``start``
    (the stream's start weights) is every task's ``anchor_weights``. ``head`` (a shared head): the earlier
    classes and the checkpoint whose head their rows start from."""
    name = task_dir_name(index, config.tasks[index].name)
    configs = [*config.method, root / "configs" / "common.yaml", root / "configs" / f"{name}.yaml"]
    extra = [
        *("--model.init_args.checkpoint", str(checkpoint)),
        *("--trainer.max_steps", str(config.steps)),
        f"--trainer.callbacks.eval_at_steps={json.dumps(eval_steps_until(config.steps))}",
        *("--checkpoint.every_n_train_steps", str(config.checkpoint_every)),
        *("--threads", str(threads)),
    ]
    if config.anchor == "start":
        if start is None:
            raise ValueError("task_run: anchor: start needs the stream's start weights")
        extra += ["--model.init_args.anchor_weights", str(start)]
    if backbone_kwargs is not None:  # Block Expansion's carried backbone is deeper than the method's
        extra += ["--model.init_args.backbone_kwargs", json.dumps(backbone_kwargs, sort_keys=True)]
    if head is not None:
        extra += ["--model.init_args.label_offset", str(head[0])]
        extra += ["--model.init_args.earlier_head_from", str(head[1])]
    return TaskRun(prefix + name, config.seed, configs, root, extra, test_ckpt="last")


def carried_path(root: Path, index: int, name: str) -> Path:
    return root / "carried" / f"{task_dir_name(index, name)}.pth"


def accuracy_row(runs: Sequence[TaskRun], index: int, carried: Path, shared: bool = False) -> dict[str, list]:
    """Row ``index`` of R: each earlier task's head (and this one's) on the backbone carried out of task
    ``index``, on that task's test split; ``shared``: task ``index``'s head for every task, each task's labels
    offset by its ``label_offset`` (the argmax over every class seen so far)."""
    backbone, _ = read_carried(carried)
    correct, total, packed = [], [], []
    for j in range(index + 1):
        ckpt = runs[j].run_dir / CHECKPOINT_DIR / LAST
        head = task_head(runs[index].run_dir / CHECKPOINT_DIR / LAST if shared else ckpt)
        offset = label_offset(ckpt) if shared else 0
        hits = test_hits(backbone, head, run_data_module(runs[j].run_dir), offset)
        correct.append(int(hits.sum()))
        total.append(int(hits.numel()))
        packed.append(pack_hits(hits.numpy()))
    return {"correct": correct, "total": total, "hits": packed}


def matrix_hits(matrix: dict[str, Any]) -> list[list[Any]] | None:
    """Every row's per-image hit vectors (None for a matrix written without them)."""
    rows = matrix["rows"]
    if not rows or any("hits" not in row for row in rows):
        return None
    return [[unpack_hits(h, n) for h, n in zip(row["hits"], row["total"], strict=True)] for row in rows]


def read_matrix(root: Path) -> dict[str, Any]:
    path = root / MATRIX_FILE
    return json.loads(path.read_text()) if path.is_file() else {"tasks": [], "rows": []}


def matrix_values(matrix: dict[str, Any]) -> list[list[float | None]]:
    """R as fractions, ``None`` above the diagonal (a task-incremental stream has no head there yet)."""
    T = len(matrix["tasks"])
    return [
        [row["correct"][j] / row["total"][j] if j < len(row["correct"]) else None for j in range(T)]
        for row in matrix["rows"]
    ]


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    latest: dict[tuple[int, Any], dict] = {}  # a resumed fit may measure a step again: keep the last
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            latest[(int(record["step"]), record.get("k"))] = record
    return [latest[key] for key in sorted(latest, key=lambda sk: (sk[0], str(sk[1])))]


def stream_curve(runs: Sequence[TaskRun], steps: int) -> list[dict]:
    """Every task's probe measurements on the stream's cumulative step (task ``i``'s step ``s`` is
    ``i · steps + s``): ``task``, ``task_step``, ``boundary`` (a task's first measurement, at the weights the
    previous task ended with) and ``stream_drop_abs`` (from the stream's own step 0, per ``k``)."""
    out: list[dict] = []
    first: dict[Any, float] = {}
    for index, run in enumerate(runs):
        for record in _records(run.run_dir / "forgetting.jsonl"):
            k = record.get("k")
            first.setdefault(k, float(record["top1"]))
            out.append({
                **record, "step": index * steps + int(record["step"]), "task_step": int(record["step"]),
                "task": run.name, "task_index": index, "boundary": index > 0 and int(record["step"]) == 0,
                "stream_drop_abs": first[k] - float(record["top1"]),
            })  # fmt: skip
    return out


def write_curve(root: Path, runs: Sequence[TaskRun], steps: int) -> None:
    lines = "".join(json.dumps(r) + "\n" for r in stream_curve(runs, steps)).encode()
    atomic_write(root / FORGETTING_FILE, lambda f: f.write(lines))


def run_stream(
    config: StreamConfig,
    start: Path,
    output: Path,
    stage: Callable[[list[str]], int],
    say: Callable[[str], None] = lambda _: None,
    threads: int = 1,
) -> Path:
    """Runs (or goes on with) the stream; returns its directory.

    Args:
        config: the stream.
        start: the first task's backbone weights file.
        output: the stream is ``output/<method>/seed<seed>``.
        stage: runs one ``ftforget`` command and returns its exit status.
        say: progress lines.

    Raises:
        SweepError: a task's fit or test failed (run the same command again to go on from there).
        StreamConfigError: the directory holds a stream started with other settings.
    """
    root = stream_dir(output, config)
    prepare(config, start, root)
    matrix = read_matrix(root)
    matrix["tasks"] = [task_dir_name(i, t.name) for i, t in enumerate(config.tasks)]
    matrix["heads"] = config.heads
    shared = config.heads == "shared"
    runs: list[TaskRun] = []
    checkpoint, kwargs = start, None
    began = time.perf_counter()
    for index, task in enumerate(config.tasks):
        head = None
        if shared and index > 0:  # the earlier classes: every row of the previous task's head
            previous = runs[-1].run_dir / CHECKPOINT_DIR / LAST
            head = (task_head(previous).out_features, previous)
        run = task_run(config, root, index, checkpoint, kwargs, threads, head=head, start=start)
        runs.append(run)
        say(f"task {index + 1}/{len(config.tasks)} {run.name}")
        run_sweep([run], stage, say)
        checkpoint = carried_path(root, index, task.name)
        if not (checkpoint.is_file() and checkpoint.with_suffix(".yaml").is_file()):
            write_carried(run.run_dir / CHECKPOINT_DIR / LAST, checkpoint)
        kwargs = yaml.safe_load(checkpoint.with_suffix(".yaml").read_text())["backbone_kwargs"]
        if shared:
            matrix["label_offsets"] = [label_offset(r.run_dir / CHECKPOINT_DIR / LAST) for r in runs]
        if len(matrix["rows"]) <= index:
            matrix["rows"] = matrix["rows"][:index] + [accuracy_row(runs, index, checkpoint, shared)]
            _write_json(root / MATRIX_FILE, matrix)
        write_curve(root, runs, config.steps)
    say(f"the stream's {len(runs)} tasks: {time.perf_counter() - began:.0f} s in this process")
    reference = None
    if config.hot_swap:
        began = time.perf_counter()
        reference = hot_swap(config, start, root, runs, stage, say, threads)["oracle"]
        if shared:  # within a task's classes: not comparable with a shared head's R[j][j] (see above)
            reference = None
        say(f"hot-swap references and routing: {time.perf_counter() - began:.0f} s in this process")
    R = matrix_values(matrix)
    metrics = stream_metrics(R, reference=reference)
    hits = matrix_hits(matrix)
    ci = None if hits is None else stream_metrics_ci(hits, reference=reference)
    _write_json(
        root / METRICS_FILE,
        {
            "tasks": matrix["tasks"],
            "heads": config.heads,
            "R": R,
            "reference": reference,
            **metrics,
            "ci95": ci,
        },
    )
    return root


def hot_swap(
    config: StreamConfig,
    start: Path,
    root: Path,
    runs: Sequence[TaskRun],
    stage: Callable[[list[str]], int],
    say: Callable[[str], None],
    threads: int,
) -> dict[str, Any]:
    """Fits every task after the first alone from ``start`` (resumable, as the stream's tasks), then
    writes and returns :func:`~ftforget.stream.hotswap.hot_swap_results`."""
    references = [runs[0]]
    for index in range(1, len(config.tasks)):
        run = task_run(config, root, index, start, None, threads, prefix="ref-", start=start)
        say(f"hot-swap reference {index + 1}/{len(config.tasks)} {run.name}")
        run_sweep([run], stage, say)
        references.append(run)
    path = root / HOT_SWAP_FILE
    if not path.is_file():
        names = [task_dir_name(i, t.name) for i, t in enumerate(config.tasks)]
        _write_json(path, hot_swap_results(start, [r.run_dir for r in references], names))
    return json.loads(path.read_text())
