"""Seed groups: runs that repeat one configuration with other seeds become one row of the report.

Two runs are *repeats* when their ``config.yaml`` files are equal once the keys of
:data:`IGNORED_KEYS` are removed (the seed, and the paths that differ from run to run), they measured the
probe up to the same last step, and their seeds (``seed_everything``) are set and all different. Runs
with the same seed, or without a seed or a ``config.yaml``, are not samples of seed variance: each stays
a row of its own, told apart by its directory.

Groups with the same method label (:func:`ftforget.methods.registry.method_label`, e.g. ``LoRA r=4``) but
different configurations are labelled with the settings that differ, e.g. ``LoRA r=4 (lr=0.01)``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from ftforget.methods import registry
from ftforget.report.runs import Run

#: ``config.yaml`` keys (dotted, ``*`` is one key or list index) that do not define the experiment: the
#: seed, the checkpoint to resume from, and where the run writes (the logger's directory, name and
#: version, the trainer's root directory, the checkpoint directory). Runs equal but for these repeat one
#: configuration.
IGNORED_KEYS: tuple[str, ...] = (
    "seed_everything",
    "ckpt_path",
    "trainer.default_root_dir",
    "trainer.logger.init_args.save_dir",
    "trainer.logger.init_args.name",
    "trainer.logger.init_args.version",
    "trainer.logger.init_args.sub_dir",
    "trainer.logger.*.init_args.save_dir",
    "trainer.logger.*.init_args.name",
    "trainer.logger.*.init_args.version",
    "trainer.logger.*.init_args.sub_dir",
    "trainer.callbacks.*.init_args.dirpath",
    "checkpoint.dirpath",
)
#: at most this many differing settings in a label, then ``+N more``
MAX_LABEL_SETTINGS = 3
_MAX_VALUE_CHARS = 24


@dataclass
class RunGroup:
    """One row of the report: a single run, or the runs that repeat one configuration with other seeds.

    Attributes:
        runs: the runs, ordered by seed (a single run: itself).
        label: the row's name, unique in the report.
    """

    runs: list[Run]
    label: str

    @property
    def n(self) -> int:
        """The number of runs (seeds) in the group."""
        return len(self.runs)

    @property
    def seeds(self) -> list[int | None]:
        """Each run's ``seed_everything`` (None where it has none)."""
        return [run_seed(run) for run in self.runs]

    @property
    def paths(self) -> list[Path]:
        """Each run's directory."""
        return [run.path for run in self.runs]


def _model_config(run: Run) -> tuple[str, dict[str, Any]]:
    model = run.config.get("model") or {}
    if not isinstance(model, dict):
        return "", {}
    return str(model.get("class_path", "")), dict(model.get("init_args") or {})


def method_label(run: Run) -> str:
    """A readable method name from the run's ``config.yaml`` (e.g. ``LoRA r=4``), else the directory."""
    class_path, init_args = _model_config(run)
    return registry.method_label(class_path, init_args) if class_path else str(run.path)


def method_rank(run: Run) -> int:
    """The run's method position in the paper's table (unregistered methods and runs without config last)."""
    return registry.method_rank(_model_config(run)[0])


def run_seed(run: Run) -> int | None:
    """The run's ``seed_everything`` from its ``config.yaml``, None if it has none (or only ``true``)."""
    seed = run.config.get("seed_everything")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config`` as ``dotted.key -> value``; mappings and lists of mappings are walked (list items by
    index), other lists are values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            flat.update(flatten({str(i): item for i, item in enumerate(value)}, f"{name}."))
        else:
            flat[name] = value
    return flat


def _ignored(key: str) -> bool:
    parts = key.split(".")
    return any(
        len(pattern.split(".")) == len(parts)
        and all(fnmatchcase(p, q) for p, q in zip(parts, pattern.split("."), strict=True))
        for pattern in IGNORED_KEYS
    )


def experiment_config(run: Run) -> dict[str, Any]:
    """The run's flattened ``config.yaml`` without the :data:`IGNORED_KEYS`: what repeats share."""
    return {key: value for key, value in flatten(run.config).items() if not _ignored(key)}


def _experiment_key(run: Run) -> str:
    return json.dumps(experiment_config(run), sort_keys=True, default=str)


def _end_step(run: Run) -> int | None:
    return max(run.probe_curve(), default=None)


def _is_seed_group(runs: list[Run]) -> bool:
    seeds = [run_seed(run) for run in runs]
    return bool(runs[0].config) and None not in seeds and len(set(seeds)) == len(seeds)


def group_runs(runs: list[Run]) -> list[RunGroup]:
    """The rows of the report: ``runs`` grouped into seed groups, in the paper's method order.

    Groups are ordered by method, then label (numbers by value), then first directory; this is the order
    of the table's rows and of the figures' colours.
    """
    buckets: dict[tuple[str, int | None], list[Run]] = {}
    for run in sorted(runs, key=lambda r: str(r.path)):
        buckets.setdefault((_experiment_key(run), _end_step(run)), []).append(run)
    members: list[list[Run]] = []
    for bucket in buckets.values():
        if len(bucket) > 1 and _is_seed_group(bucket):
            members.append(sorted(bucket, key=lambda r: (run_seed(r), str(r.path))))
        else:
            members.extend([run] for run in bucket)
    labels = _labels(members)
    groups = [RunGroup(runs, label) for runs, label in zip(members, labels, strict=True)]
    return sorted(groups, key=lambda g: (method_rank(g.runs[0]), _natural(g.label), str(g.runs[0].path)))


def different_bases(groups: list[RunGroup]) -> list[str]:
    """A warning per seed group whose runs measured different step-0 probe accuracies.

    Repeats of one configuration fine-tune one base: the step-0 model is the pretrained backbone (and
    identity-initialised adapters), the same for every seed, so its probe accuracy is too. Different
    values mean different bases, e.g. ``pretrained: false`` without a ``checkpoint``, where each seed
    initialises its own random backbone; the row's mean and std then mix bases, not seeds.
    """
    warnings = []
    for group in groups:
        step0 = {run.path: run.probe_curve().get(0) for run in group.runs}
        values = {v for v in step0.values() if v is not None}
        if group.n > 1 and len(values) > 1:
            listed = ", ".join(f"{p} ({100 * v:.2f})" for p, v in step0.items() if v is not None)
            warnings.append(
                f"Warning: the runs of '{group.label}' start from different step-0 probe accuracies ({listed}): "
                "they fine-tune different bases, not one base with other seeds; give them one pretrained "
                "backbone (model.init_args.checkpoint, or ftforget sweep --preset demo for the demo's)."
            )
    return warnings


def _natural(label: str) -> list[tuple[int, float | str]]:
    """A sort key that orders the numbers in a label by value: ``LoRA r=2`` before ``LoRA r=10``,
    ``lr=0.01`` before ``lr=0.1``."""
    parts = re.split(r"(\d+(?:\.\d+)?)", label)
    return [(0, float(part)) if i % 2 else (1, part) for i, part in enumerate(parts) if part]


def _labels(members: list[list[Run]]) -> list[str]:
    """Method labels; where several groups share one, the settings that differ are appended, and where
    that is not enough (equal configurations), the run directories."""
    base = [method_label(runs[0]) for runs in members]
    labels = list(base)
    for label in {b for b, count in Counter(base).items() if count > 1}:
        same = [i for i, b in enumerate(base) if b == label]
        settings = _differing_settings([experiment_config(members[i][0]) for i in same])
        for i, parts in zip(same, settings, strict=True):
            if parts:
                labels[i] = f"{label} ({parts})"
    counts = Counter(labels)
    return [
        f"{label} ({', '.join(f'{p.parent.name}/{p.name}' for p in (r.path for r in runs))})"
        if counts[label] > 1
        else label
        for label, runs in zip(labels, members, strict=True)
    ]


def _differing_settings(configs: list[dict[str, Any]]) -> list[str]:
    """For each flattened config, ``name=value`` of the keys whose values are not equal in all of them."""
    keys = sorted({key for config in configs for key in config})
    differing = [key for key in keys if len({json.dumps(c.get(key), default=str) for c in configs}) > 1]
    names = _short_names(differing)
    out = []
    for config in configs:
        parts = [f"{names[key]}={_format_value(config.get(key))}" for key in differing]
        if len(parts) > MAX_LABEL_SETTINGS:
            parts = [*parts[:MAX_LABEL_SETTINGS], f"+{len(parts) - MAX_LABEL_SETTINGS} more"]
        out.append(", ".join(parts))
    return out


def _short_names(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key (``init_args`` left out) that no other key shares."""
    parts = {key: [p for p in key.split(".") if p != "init_args"] for key in keys}
    for length in range(1, max((len(p) for p in parts.values()), default=0) + 1):
        names = {key: ".".join(p[-length:]) for key, p in parts.items()}
        if len(set(names.values())) == len(names):
            return names
    return {key: key for key in keys}


def _format_value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (list, dict)):
        text = json.dumps(value, separators=(",", ":"))
    else:
        text = str(value)
    return text if len(text) <= _MAX_VALUE_CHARS else "…" + text[-(_MAX_VALUE_CHARS - 1) :]
