"""Finding run directories and reading what a run logged: TensorBoard scalars and the measurement file.

A *run* is a directory that directly holds TensorBoard event files (a Lightning ``version_N`` directory)
or the forgetting callback's ``forgetting.jsonl``. Real runs and demo runs look the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftforget.runs import read_test_results

EVENT_GLOB = "events.out.tfevents.*"
MEASUREMENT_FILE = "forgetting.jsonl"
#: the headline k-NN curve the forgetting callback logs (its first k)
PROBE_TAG = "forgetting/knn_top1"


class ReportError(RuntimeError):
    """Runs are missing or lack what the report needs; the message names the directory."""


@dataclass
class Run:
    """Everything the report reads from one run directory.

    Attributes:
        path: the run directory.
        scalars: TensorBoard scalars, ``tag -> {step: value}`` (the value logged last wins for a step).
        measurements: the lines of ``forgetting.jsonl``, in file order.
        config: the resolved LightningCLI ``config.yaml`` (empty when there is none).
        hparams: the logger's ``hparams.yaml`` (empty when there is none).
        tests: the records of ``ftforget test`` on the run (``test_results.jsonl``), oldest first.
    """

    path: Path
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    tests: list[dict[str, Any]] = field(default_factory=list)

    def test_accuracy(self) -> float | None:
        """The run's new-task test top-1: its latest recorded test of the checkpoint selected on validation
        (``best``), else its latest recorded test, else the event files' ``test/acc1`` at the highest step
        (a test in the fit's own process)."""
        records = [r for r in self.tests if "test/acc1" in r]
        if records:
            best = [r for r in records if r.get("requested") == "best"]
            return float((best or records)[-1]["test/acc1"])
        last = self.last("test/acc1")
        return None if last is None else last[1]

    def last(self, tag: str) -> tuple[int, float] | None:
        """The ``(step, value)`` of the highest step logged for ``tag``, or None."""
        series = self.scalars.get(tag)
        if not series:
            return None
        step = max(series)
        return step, series[step]

    def probe_curve(self) -> dict[int, float]:
        """Old-domain k-NN top-1 by global step: the event file's, else the measurement file's first k."""
        if self.scalars.get(PROBE_TAG):
            return dict(sorted(self.scalars[PROBE_TAG].items()))
        if not self.measurements:
            return {}
        return {int(r["step"]): float(r["top1"]) for r in self.headline_measurements()}

    def headline_measurements(self) -> list[dict[str, Any]]:
        """The measurement file's lines for its first (headline) k, by step; the last line wins for a step."""
        if not self.measurements:
            return []
        k = self.measurements[0]["k"]
        by_step = {int(r["step"]): r for r in self.measurements if r["k"] == k}
        return [by_step[s] for s in sorted(by_step)]

    def logged_at(self, name: str, step: int) -> float | None:
        """``forgetting/<name>`` at ``step`` from the event file, else the measurement file's ``name`` field."""
        series = self.scalars.get(f"forgetting/{name}")
        if series:
            return series.get(step)
        for record in self.headline_measurements():
            if record["step"] == step and record.get(name) is not None:
                return float(record[name])
        return None

    def has_measurements(self) -> bool:
        return bool(self.probe_curve())


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories at or below each of ``paths``, sorted, each once.

    Raises:
        ReportError: a path does not exist, or holds no run at all.
    """
    found: set[Path] = set()
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise ReportError(f"{str(root)!r} does not exist")
        markers = [*root.rglob(EVENT_GLOB), *root.rglob(MEASUREMENT_FILE)] if root.is_dir() else []
        runs = {m.parent for m in markers if m.is_file()}
        if not runs:
            raise ReportError(
                f"no runs found in {str(root)!r}: no TensorBoard event files ({EVENT_GLOB}) and no "
                f"{MEASUREMENT_FILE} at or below it"
            )
        found |= runs
    return sorted(found)


def load_run(path: str | Path) -> Run:
    """Reads the scalars, the measurement file and the config of one run directory."""
    path = Path(path)
    config, hparams = _read_yaml(path / "config.yaml"), _read_yaml(path / "hparams.yaml")
    return Run(path, read_scalars(path), read_measurements(path), config, hparams, read_test_results(path))


def load_runs(paths: list[str | Path]) -> list[Run]:
    """:func:`find_runs` then :func:`load_run` on each."""
    return [load_run(p) for p in find_runs(paths)]


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every event file directly in ``run_dir``, ``tag -> {step: value}``.

    Files are read oldest first (their names start with the creation time), so a resumed run's later
    values replace earlier ones at the same step.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for file in sorted(run_dir.glob(EVENT_GLOB), key=_event_file_order):
        # size_guidance 0 keeps every event (the default samples 10,000 per tag); no purging, so that a
        # resumed run's events are all seen.
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series = scalars.setdefault(tag, {})
            for event in acc.Scalars(tag):
                series[int(event.step)] = float(event.value)
    return scalars


def _event_file_order(path: Path) -> tuple[int, str]:
    # events.out.tfevents.<seconds>.<host>.<pid>.<n>: order by the creation time, then by name.
    parts = path.name.split(".")
    stamp = parts[3] if len(parts) > 3 and parts[3].isdigit() else "0"
    return int(stamp), path.name


def read_measurements(run_dir: Path) -> list[dict[str, Any]]:
    """The lines of the run's ``forgetting.jsonl`` (none when the file is absent).

    Raises:
        ReportError: a line is not JSON or lacks ``step``, ``k`` or ``top1``.
    """
    file = run_dir / MEASUREMENT_FILE
    if not file.is_file():
        return []
    records = []
    for number, line in enumerate(file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{file}:{number} is not a JSON line: {err}") from err
        missing = [key for key in ("step", "k", "top1") if key not in record]
        if missing:
            raise ReportError(f"{file}:{number} lacks {missing}")
        records.append(record)
    return records


def _read_yaml(file: Path) -> dict[str, Any]:
    """A YAML mapping (LightningCLI's ``config.yaml``, the logger's ``hparams.yaml``), or ``{}``."""
    if not file.is_file():
        return {}
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return {}  # e.g. python-object tags in hparams.yaml: the report only needs plain values
    return loaded if isinstance(loaded, dict) else {}
