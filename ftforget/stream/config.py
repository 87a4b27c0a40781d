"""A stream's configuration file: tasks in order, one method, the weights it starts from.

A stream file is YAML::

    method: [../demo/full.yaml, ../demo/common.yaml]  # the method's fit configs, relative to this file
    start: demo            # the first task's backbone: a weights file (relative to this file) or `demo`
    pretrain_steps: 1000   # start: demo: pretraining steps (as `ftforget demo --pretrain-steps`)
    steps: 100             # optimizer steps of every task
    seed: 0
    checkpoint_every: 10   # a task's last.ckpt every N steps: where a killed stream goes on from
    common: {data: {init_args: {old_digits: [0, 1, 2, 3]}}}  # fit settings for every task
    tasks:                 # in order; each task's fit settings come after `common`
      - {name: d45, config: {data: {init_args: {new_digits: [4, 5]}}}}
      - {name: d67, config: {data: {init_args: {new_digits: [6, 7]}}}}
    hot_swap: true         # also fit every task alone from `start`, and route (ftforget.stream.hotswap)
    anchor: previous       # L2-SP / distillation pull toward each task's start (the previous task's end),
                           # or `start`: toward the stream's start weights (the pretrained model)
    heads: task            # task: a new head per task, every head kept (task-incremental, the default);
                           # shared: one head over the classes of every task so far (class-incremental)

``ftforget stream --method FILE ...`` replaces ``method`` (paths relative to the working directory), so
one stream file serves every method.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

#: the keys a stream file may have (every other key is a mistake: it is named in the error)
KEYS = {
    "method",
    "start",
    "pretrain_steps",
    "steps",
    "seed",
    "checkpoint_every",
    "common",
    "tasks",
    "hot_swap",
    "anchor",
    "heads",
}
#: what a stream's L2-SP and distillation pull toward (``anchor``)
ANCHORS = ("previous", "start")
#: ``heads``: a new head per task (task-incremental), or one head over every class so far (class-incremental)
HEADS = ("task", "shared")
#: a task name becomes part of a directory name
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class StreamConfigError(ValueError):
    """A stream file or option that cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class StreamTask:
    """One task of a stream: its name (a directory name) and its fit settings (a LightningCLI config)."""

    name: str
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamConfig:
    """A parsed stream file (see the module's docstring for its keys).

    Attributes:
        source: the stream file.
        method: the method's fit config files, applied in order before ``common`` and the task's settings.
        start: the first task's backbone weights file, or ``"demo"``: pretrained as ``ftforget demo`` does.
        hot_swap: also fit every task alone from ``start`` (the references of the single-task transfer and
            the hot-swap alternative, :mod:`ftforget.stream.hotswap`).
        anchor: the anchor of the method's L2-SP (``l2sp_weight``) and distillation (``distill_weight``):
            ``previous``, each task's own start (the weights the previous task ended with: the methods'
            default); ``start``, the stream's start weights for every task (``anchor_weights``).
        heads: ``task``: each task's fit has its own head over its own classes, every head kept
            (task-incremental); ``shared``: task ``i``'s head covers the classes of tasks ``1..i`` (earlier
            tasks' first), its first rows start from task ``i-1``'s trained head (class-incremental).
    """

    source: Path
    method: list[Path]
    tasks: list[StreamTask]
    start: str = "demo"
    pretrain_steps: int = 1000
    steps: int = 100
    seed: int = 0
    checkpoint_every: int = 10
    common: dict[str, Any] = field(default_factory=dict)
    hot_swap: bool = False
    anchor: str = "previous"
    heads: str = "task"

    @property
    def method_name(self) -> str:
        """The stream's method as a directory name: its config files' stems but ``common`` joined by ``+``
        (``full``, ``lora``, ``full+distill`` for ``--method full.yaml --method common.yaml --method
        distill.yaml``), with ``_anchor-start`` for ``anchor: start``."""
        stems = [m.stem for m in self.method if m.stem != "common"] or [self.method[0].stem]
        return "+".join(stems) + ("_anchor-start" if self.anchor == "start" else "")


def _int(raw: dict[str, Any], key: str, default: int, minimum: int, where: str) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise StreamConfigError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _tasks(raw: Any, where: str) -> list[StreamTask]:
    if not isinstance(raw, list) or not raw:
        raise StreamConfigError(f"{where}: tasks must be a non-empty list of {{name, config}} entries")
    tasks = []
    for number, entry in enumerate(raw, start=1):
        if not isinstance(entry, dict) or set(entry) - {"name", "config"} or "name" not in entry:
            raise StreamConfigError(
                f"{where}: task {number} must be a mapping with name and config, got {entry!r}"
            )
        name, config = str(entry["name"]), entry.get("config") or {}
        if not NAME.match(name):
            raise StreamConfigError(
                f"{where}: task {number} name {name!r} must be letters, digits, '_', '.', '-'"
            )
        if not isinstance(config, dict):
            raise StreamConfigError(f"{where}: task {name!r} config must be a mapping of fit settings")
        tasks.append(StreamTask(name, config))
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise StreamConfigError(f"{where}: task names {duplicates} appear twice; each task needs its own")
    return tasks


def load_stream(path: Path, method: list[Path] | None = None) -> StreamConfig:
    """Reads and checks a stream file; ``method`` (if given) replaces its ``method`` list.

    Raises:
        FileNotFoundError: the stream file, a method config or the ``start`` weights file is missing.
        StreamConfigError: a key that is unknown, missing or of the wrong kind (named with the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stream --config {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise StreamConfigError(
            f"stream file {str(path)!r} is not valid YAML: {' '.join(str(err).split())}"
        ) from None
    where = f"stream file {str(path)!r}"
    if not isinstance(raw, dict):
        raise StreamConfigError(f"{where}: expected a mapping of {sorted(KEYS)}")
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise StreamConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(KEYS)}")
    here = path.resolve().parent
    if method is None:
        listed = raw.get("method")
        if isinstance(listed, str):
            listed = [listed]
        if not isinstance(listed, list) or not listed:
            raise StreamConfigError(
                f"{where}: method must list the method's fit config files (or give --method)"
            )
        method = [here / str(m) for m in listed]
    if not method:
        raise StreamConfigError("stream --method: give at least one fit config file")
    for config in method:
        if not Path(config).is_file():
            raise FileNotFoundError(f"{where}: method config {str(config)!r} does not exist")
    start = str(raw.get("start", "demo"))
    if start != "demo":
        start_path = here / start
        if not start_path.is_file():
            raise FileNotFoundError(f"{where}: start weights file {str(start_path)!r} does not exist")
        start = str(start_path)
    hot_swap = raw.get("hot_swap", False)
    if not isinstance(hot_swap, bool):
        raise StreamConfigError(f"{where}: hot_swap must be true or false, got {hot_swap!r}")
    heads = raw.get("heads", "task")
    if heads not in HEADS:
        raise StreamConfigError(f"{where}: heads must be one of {list(HEADS)}, got {heads!r}")
    common = raw.get("common") or {}
    if not isinstance(common, dict):
        raise StreamConfigError(f"{where}: common must be a mapping of fit settings")
    anchor = raw.get("anchor", "previous")
    if anchor not in ANCHORS:
        raise StreamConfigError(f"{where}: anchor must be one of {list(ANCHORS)}, got {anchor!r}")
    config = StreamConfig(
        source=path,
        method=[Path(m) for m in method],
        tasks=_tasks(raw.get("tasks"), where),
        start=start,
        pretrain_steps=_int(raw, "pretrain_steps", 1000, 1, where),
        steps=_int(raw, "steps", 100, 1, where),
        seed=_int(raw, "seed", 0, 0, where),
        checkpoint_every=_int(raw, "checkpoint_every", 10, 1, where),
        common=common,
        hot_swap=hot_swap,
        anchor=anchor,
        heads=heads,
    )
    if anchor == "start":
        for task in config.tasks:
            args = fit_settings(config, task).get("model", {}).get("init_args", {})
            if not (args.get("l2sp_weight") or args.get("distill_weight")):
                raise StreamConfigError(
                    f"{where}: anchor: start anchors L2-SP and distillation, but task {task.name!r}'s method "
                    "sets neither model.init_args.l2sp_weight nor distill_weight (e.g. --method "
                    "configs/demo/full_l2sp.yaml)"
                )
    return config


def merged(*configs: dict[str, Any]) -> dict[str, Any]:
    """Later mappings over earlier ones, recursively (lists and values replaced): what LightningCLI makes
    of several ``--config`` files, for the few keys the stream reads itself (the backbone, the old digits)."""
    out: dict[str, Any] = {}
    for config in configs:
        for key, value in (config or {}).items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def fit_settings(config: StreamConfig, task: StreamTask) -> dict[str, Any]:
    """The method's files, ``common`` and the task's settings merged (see :func:`merged`)."""
    files = [yaml.safe_load(Path(m).read_text()) or {} for m in config.method]
    return merged(*files, config.common, task.config)
