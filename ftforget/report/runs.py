"""Finding run directories and reading what a run logged: TensorBoard scalars and the measurement file.

A *run* is a directory that directly holds TensorBoard event files (a Lightning ``version_N`` directory)
or the forgetting callback's ``forgetting.jsonl``. Real runs and demo runs look the same.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ftforget.runs import read_knob_points, read_test_results

log = logging.getLogger(__name__)

EVENT_GLOB = "events.out.tfevents.*"
MEASUREMENT_FILE = "forgetting.jsonl"
#: the file name ending of the event file ``ftforget report`` writes beside its table
#: (:func:`ftforget.report.tensorboard.write_report_summaries`): its directory is a report, not a run
REPORT_EVENTS_SUFFIX = ".ftforget-report"
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
        knob: the points of ``ftforget knob`` on the run (``knob.jsonl``), by increasing ``a``.
    """

    path: Path
    scalars: dict[str, dict[int, float]] = field(default_factory=dict)
    measurements: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    tests: list[dict[str, Any]] = field(default_factory=list)
    knob: list[dict[str, Any]] = field(default_factory=list)

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
    """Run directories at or below each of ``paths``, sorted, each once (a report's own directory, with
    its figures' event file, is not a run).

    Raises:
        ReportError: a path does not exist, or holds no run at all.
    """
    found: set[Path] = set()
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise ReportError(f"{str(root)!r} does not exist")
        markers = [*root.rglob(EVENT_GLOB), *root.rglob(MEASUREMENT_FILE)] if root.is_dir() else []
        runs = {m.parent for m in markers if m.is_file() and not m.name.endswith(REPORT_EVENTS_SUFFIX)}
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
    tests, knob = read_test_results(path), read_knob_points(path)
    return Run(path, read_scalars(path), read_measurements(path), config, hparams, tests, knob)


def load_runs(paths: list[str | Path]) -> list[Run]:
    """:func:`find_runs` then :func:`load_run` on each."""
    return [load_run(p) for p in find_runs(paths)]


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar of every event file directly in ``run_dir``, ``tag -> {step: value}``.

    Files are read oldest first (their names start with the creation time), so a resumed run's later
    values replace earlier ones at the same step. A damaged event file (:func:`event_file_damage`:
    garbage, truncated by a killed run) is reported with a warning naming it; its events before the
    damage are used, as TensorBoard shows them.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, dict[int, float]] = {}
    for file in sorted(run_dir.glob(EVENT_GLOB), key=_event_file_order):
        # size_guidance 0 keeps every event (the default samples 10,000 per tag); no purging, so that a
        # resumed run's events are all seen.
        damage = event_file_damage(file)
        if damage:
            log.warning(
                "ftforget report: event file %s is damaged (%s); the scalars before the damage are used, "
                "delete the file to silence this", file, damage,
            )  # fmt: skip
        acc = EventAccumulator(str(file), size_guidance={"scalars": 0}, purge_orphaned_data=False)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series = scalars.setdefault(tag, {})
            for event in acc.Scalars(tag):
                series[int(event.step)] = float(event.value)
    return scalars


def event_file_damage(path: Path) -> str:
    """What is wrong with the TFRecord framing of an event file ("" when nothing): garbage, or a record cut
    short (a run killed while writing). TensorBoard's reader stops silently at such a record.

    Each record is ``uint64 length, uint32 CRC of it, data, uint32 CRC of the data``; the walk checks the
    lengths against the file size and the first record's length CRC (a garbage file fails it), not every
    CRC (pure Python, slow on long runs): a flipped bit inside a record's data goes unnoticed here.
    """
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    try:
        data = path.read_bytes()
    except OSError as err:
        return f"unreadable: {err}"
    position, records = 0, 0
    while position < len(data):
        if len(data) - position < 12:
            return f"record {records} at byte {position} is cut short ({len(data) - position} of its 12 header bytes)"
        header = data[position : position + 8]
        (length,) = struct.unpack("<Q", header)
        if records == 0 and struct.unpack("<I", data[8:12])[0] != masked_crc32c(header):
            return "not a TFRecord file (the first record's length fails its CRC)"
        end = position + 12 + length + 4
        if end > len(data):
            return f"record {records} at byte {position} is cut short ({len(data) - position} of {end - position} bytes)"
        position, records = end, records + 1
    return ""


def _event_file_order(path: Path) -> tuple[int, str]:
    # events.out.tfevents.<seconds>.<host>.<pid>.<n>: order by the creation time, then by name.
    parts = path.name.split(".")
    stamp = parts[3] if len(parts) > 3 and parts[3].isdigit() else "0"
    return int(stamp), path.name


def read_measurements(run_dir: Path, filename: str = MEASUREMENT_FILE) -> list[dict[str, Any]]:
    """The lines of the run's ``forgetting.jsonl`` (or the callback's ``filename``; none when the file is
    absent).

    Raises:
        ReportError: a line is not JSON or lacks ``step``, ``k`` or ``top1``.
    """
    file = run_dir / filename
    if not file.is_file():
        return []
    records = []
    try:
        lines = file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{file} is unreadable ({err}); delete it or restore it from the run") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ReportError(f"{file}:{number} is not a JSON line: {err}") from err
        problem = _measurement_problem(record)
        if problem:
            raise ReportError(
                f"{file}:{number} {problem}; fix or delete that line (the callback writes them)"
            )
        records.append(record)
    return records


#: the fields of a ``forgetting.jsonl`` line: required ones and optional numbers (``None`` allowed)
_REQUIRED_FIELDS = ("step", "k", "top1")
_NUMBER_FIELDS = ("top5", "drop_abs", "drop_rel", "new_task_val_acc1", "temperature")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _measurement_problem(record: object) -> str:
    """What is wrong with one parsed ``forgetting.jsonl`` line ("" when nothing): its type, a missing
    field, or a field of the wrong type (``step`` and ``k`` integers, ``top1`` and the optional
    accuracies numbers)."""
    if not isinstance(record, dict):
        return f"is not a JSON object but {type(record).__name__} {record!r:.60}"
    missing = [key for key in _REQUIRED_FIELDS if key not in record]
    if missing:
        return f"lacks {missing}"
    for key, ok, what in (("step", _is_int, "an integer"), ("k", _is_int, "an integer"),
                          ("top1", _is_number, "a number")):  # fmt: skip
        if not ok(record[key]):
            return f"has {key}={record[key]!r:.60}, expected {what}"
    if record["step"] < 0 or record["k"] < 1:
        return f"has step={record['step']} and k={record['k']}, expected step >= 0 and k >= 1"
    for key in _NUMBER_FIELDS:
        if record.get(key) is not None and not _is_number(record[key]):
            return f"has {key}={record[key]!r:.60}, expected a number or null"
    return ""


def _read_yaml(file: Path) -> dict[str, Any]:
    """A YAML mapping (LightningCLI's ``config.yaml``, the logger's ``hparams.yaml``), or ``{}``."""
    if not file.is_file():
        return {}
    try:
        loaded = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return {}  # e.g. python-object tags in hparams.yaml: the report only needs plain values
    return loaded if isinstance(loaded, dict) else {}
