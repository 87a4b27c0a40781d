"""TensorBoard views that compare runs by themselves: the HParams dashboard, a custom-scalars layout, a
text card per run, and the report's figures as image summaries.

Every fit and every ``ftforget test`` or ``ftforget knob`` of a run rewrites one *summary* event file in
the run's own directory (``events.out.tfevents.*.ftforget-summary``, written atomically; the older one is
removed), so ``tensorboard --logdir runs`` shows, for each run:

- in **HParams**, the run's settings (:data:`HPARAMS`: method, its arguments, lr, seed, backbone,
  dataset, steps, trainable parameters) and its final metrics (:data:`FINAL_METRICS`), the values of the
  run's row in ``ftforget report`` (float32, as TensorBoard stores every scalar);
- in **Custom Scalars**, the probe k-NN top-1 and the new-task val top-1 against the step in one chart,
  the loss terms in another, the learning rate in a third (:func:`layout`);
- in **Text**, the run's card (:func:`run_card`).

``ftforget report`` adds an event file to its output directory (a TensorBoard run named after that
directory, ``report`` by default) holding the figures as images and the tables as text.
"""

from __future__ import annotations

import io
import logging
import re
import socket
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ftforget.files import atomic_write
from ftforget.report.groups import method_label, run_seed
from ftforget.report.runs import EVENT_GLOB, PROBE_TAG, REPORT_EVENTS_SUFFIX, ReportError, Run, load_run
from ftforget.report.table import Row, summarize, to_markdown, trainable_params

log = logging.getLogger(__name__)

#: the file name ending of a run's summary event file (:func:`write_run_summaries`)
SUMMARY_SUFFIX = ".ftforget-summary"
#: the file name ending of a report's event file (:func:`write_report_summaries`)
REPORT_SUFFIX = REPORT_EVENTS_SUFFIX
#: the HParams metric tags, each the value of one column of the run's report row (``Row`` attribute);
#: ``final/new_task_val_acc1`` is the run's last logged new-task val top-1 (:func:`last_new_task_val`;
#: the table has no val column)
#: (in this order: TensorBoard ticks the first five columns)
FINAL_METRICS: dict[str, str] = {
    "final/new_task_test_acc1": "new_task_test_acc1",
    "final/probe_acc_end": "probe_acc_end",
    "final/drop_abs": "drop_abs",
    "final/auc_norm": "auc_norm",
    "final/steps_to_drop_10": "steps_to_drop_10",
    "final/new_task_val_acc1": "val/acc1",
    "final/drop_rel": "drop_rel",
    "final/probe_share": "probe_share",
}
#: the HParams columns in their order, the same in every run (TensorBoard takes the columns from one
#: run's summary); each is named ``"NN key"`` (``"01 method"``) and shown as ``key``
HPARAMS = (
    "method",
    "lr",
    "trainable_params",
    "method_args",
    "seed",
    "method_class",
    "backbone",
    "dataset",
    "max_steps",
)
#: the new-task accuracy the layout draws beside the probe (the callback's, at the probe's own steps)
NEW_TASK_TAGS = ("val/acc1", "forgetting/new_task_val_acc1")
#: arguments of every method that the HParams table shows elsewhere (backbone) or not at all (paths)
SHARED_ARGS = frozenset(
    {"backbone", "pretrained", "checkpoint", "backbone_kwargs", "num_classes", "optimizer", "lr_scheduler"}
)


def _base_defaults() -> dict[str, Any]:
    """The shared base class's arguments with their defaults (``l2sp_weight: 0.0``, ...)."""
    import inspect

    from ftforget.methods.base import FineTuningModule

    parameters = inspect.signature(FineTuningModule.__init__).parameters.values()
    return {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}


def method_arguments(init_args: dict[str, Any]) -> str:
    """``r=4, alpha=4.0, ...``: the method's own arguments, and the shared ones set away from their
    default (``l2sp_weight=0.1``); ``—`` when there are none."""
    base = _base_defaults()
    shown = {
        key: value
        for key, value in sorted(init_args.items())
        if key not in SHARED_ARGS and (key not in base or base[key] != value)
    }
    return ", ".join(f"{k}={_short(v)}" for k, v in shown.items()) or "—"


def _init_args(section: Any) -> dict[str, Any]:
    if isinstance(section, dict):
        args = section.get("init_args")
        return dict(args) if isinstance(args, dict) else {}
    return {}


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def run_settings(run: Run, trainable: int | None = None) -> dict[str, str | float]:
    """The run's :data:`HPARAMS` from its ``config.yaml``: strings, and numbers where they are numbers
    (``"—"`` or ``nan`` where the config does not say)."""
    model = run.config.get("model") or {}
    class_path = str(model.get("class_path", "")) if isinstance(model, dict) else ""
    args = _init_args(model)
    optimizer = run.config.get("optimizer") or args.get("optimizer") or {}
    lr = _init_args(optimizer).get("lr", args.get("lr"))
    data = run.config.get("data") or {}
    seed = run_seed(run)
    max_steps = (run.config.get("trainer") or {}).get("max_steps")
    return {
        "method": method_label(run),
        "method_class": class_path.rsplit(".", 1)[-1] or "—",
        "method_args": method_arguments(args),
        "lr": float(lr) if isinstance(lr, (int, float)) else float("nan"),
        "seed": float(seed) if seed is not None else float("nan"),
        "backbone": str(args.get("backbone", "—")),
        "dataset": str(data.get("class_path", "—")).rsplit(".", 1)[-1] if isinstance(data, dict) else "—",
        "max_steps": float(max_steps) if isinstance(max_steps, int) else float("nan"),
        "trainable_params": float(trainable) if trainable is not None else float("nan"),
    }


def last_new_task_val(run: Run) -> float | None:
    """The new-task val top-1 at the last step one was logged: ``val/acc1`` (the trainer's validation) or
    the forgetting callback's ``forgetting/new_task_val_acc1`` (the callback's where both have that step)."""
    lasts = [(last[0], i, last[1]) for i, tag in enumerate(NEW_TASK_TAGS) if (last := run.last(tag))]
    return max(lasts)[2] if lasts else None


def final_metrics(run: Run, row: Row | None) -> dict[str, float]:
    """The run's :data:`FINAL_METRICS` that it has (a metric it lacks, e.g. no test yet, is left out)."""
    values: dict[str, float] = {}
    for tag, name in FINAL_METRICS.items():
        if name == "val/acc1":
            value = last_new_task_val(run)
        else:
            value = None if row is None else getattr(row, name)
        if value is not None:
            values[tag] = float(value)
    return values


def layout() -> dict[str, dict[str, tuple[str, list[str]]]]:
    """The custom-scalars layout (``category -> chart -> ("Multiline", tag regexes)``) every run writes.

    It is the same for every run, so TensorBoard, which merges equal charts across runs, shows one chart
    per quantity with every run in it (the run selector picks the runs, e.g. one method family). Its
    regexes match any run's tags: the probe's :data:`~ftforget.report.runs.PROBE_TAG`, the new-task val
    top-1 (:data:`NEW_TASK_TAGS`), every ``train/loss*`` term and every ``lr-*`` optimiser group.
    """
    exact = [f"^{re.escape(tag)}$" for tag in (PROBE_TAG, *NEW_TASK_TAGS)]
    return {
        "stability-plasticity": {
            "probe k-NN top-1 (old task) and new-task val top-1": ("Multiline", exact),
        },
        "training": {
            "loss terms": ("Multiline", ["^train/loss"]),
            "learning rate": ("Multiline", ["^lr-"]),
        },
    }


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100.0 * value:.2f}"


def run_card(run: Run, row: Row | None, settings: dict[str, str | float]) -> str:
    """The run's Markdown card: method, trainable parameters, settings and its final numbers."""
    params = settings["trainable_params"]
    lines = [
        f"**{settings['method']}** (`{settings['method_class']}`), run `{run.path}`",
        "",
        f"- trainable parameters: {int(params):,}" if params == params else "- trainable parameters: —",
        f"- method arguments: {settings['method_args']}",
        f"- lr {settings['lr']:g}, seed {settings['seed']:g}, {settings['max_steps']:g} steps, "
        f"backbone {settings['backbone']}, data {settings['dataset']}",
    ]
    if row is None:
        lines += ["", "No forgetting measurement yet (no `forgetting/knn_top1`)."]
    else:
        lines += ["", to_markdown([row])]
    if run.knob:
        lines += ["", "Stability-plasticity knob (ftforget knob):", "", "| a | new-task test | probe top-1 |",
                  "|---|---|---|"]  # fmt: skip
        for point in run.knob:
            test = point.get("new_task_test_acc1")
            lines.append(f"| {point.get('alpha')} | {_pct(test)} | {_pct(point.get('top1'))} |")
    return "\n".join(lines) + "\n"


def _events(summaries: Iterable[tuple[Any, int]]) -> bytes:
    """The TFRecord bytes of an event file: the version header, then one event per ``(summary, step)``."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    buffer = io.BytesIO()
    writer = RecordWriter(buffer)
    now = time.time()
    writer.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
    for summary, step in summaries:
        writer.write(Event(wall_time=now, step=step, summary=summary).SerializeToString())
    return buffer.getvalue()


def write_event_file(folder: Path, suffix: str, summaries: list[tuple[Any, int]]) -> Path:
    """Writes ``summaries`` as one new event file in ``folder`` (atomically) and removes the older files
    ending in ``suffix`` there, so that one file of each kind remains. Returns the new file."""
    folder.mkdir(parents=True, exist_ok=True)
    old = sorted(folder.glob(f"{EVENT_GLOB}{suffix}"))
    stamp = int(time.time())
    # TensorBoard reads a run's files in name order: the new one sorts after the old ones and after the
    # run's own event files of this second (Lightning's end in ``.<pid>.<n>``).
    name = f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.~{time.time_ns()}{suffix}"
    path = folder / name
    data = _events(summaries)
    atomic_write(path, lambda f: f.write(data))
    for file in old:
        if file != path:
            file.unlink(missing_ok=True)
    return path


def _typed_domain(dtype: type) -> Any:
    """A TensorBoard hparam domain that fixes only the type of the values (``str`` or ``float``), so that
    the HParams filters and the parallel-coordinates axes fit every run (a listed domain would be one
    run's values: TensorBoard takes the columns from one run's summary)."""
    from tensorboard.plugins.hparams import api_pb2
    from tensorboard.plugins.hparams import summary_v2 as hp

    class Typed(hp.Domain):
        @property
        def dtype(self) -> type:
            return dtype

        def sample_uniform(self, rng: Any = None) -> Any:
            raise NotImplementedError("a typed domain has no values to sample")

        def update_hparam_info(self, hparam_info: Any) -> None:
            hparam_info.type = api_pb2.DATA_TYPE_FLOAT64 if dtype is float else api_pb2.DATA_TYPE_STRING

    return Typed()


def run_summaries(run: Run) -> list[tuple[Any, int]]:
    """The summaries of one run's summary event file, each with its step: the HParams experiment and
    session (step 0), the layout and the card, and the final metrics at the run's last probe step."""
    from tensorboard.plugins.hparams import summary_v2 as hp
    from torch.utils.tensorboard.summary import custom_scalars, scalar, text

    try:
        row: Row | None = summarize(run)
    except ReportError:
        row = None  # no forgetting measurement (a run without the callback): settings and val only
    settings = run_settings(run, trainable_params(run)[0])
    end = row.end_step if row is not None else (run.last("val/acc1") or (0, 0.0))[0]
    # TensorBoard orders the columns by name and ticks the first five: the names carry the order.
    names = {key: f"{i:02d} {key}" for i, key in enumerate(HPARAMS, start=1)}
    typed = {key: _typed_domain(float if isinstance(settings[key], float) else str) for key in HPARAMS}
    experiment = hp.hparams_config_pb(
        hparams=[hp.HParam(names[key], typed[key], display_name=key) for key in HPARAMS],
        metrics=[hp.Metric(tag, display_name=tag.removeprefix("final/")) for tag in FINAL_METRICS],
    )
    values = {hp.HParam(names[key], display_name=key): settings[key] for key in HPARAMS}
    session = hp.hparams_pb(values, trial_id=trial_id(run.path))
    summaries: list[tuple[Any, int]] = [(experiment, 0), (session, 0)]
    summaries.append((custom_scalars(layout()), 0))
    summaries.append((text("ftforget/run", run_card(run, row, settings)), end))
    summaries += [(scalar(tag, value), end) for tag, value in final_metrics(run, row).items()]
    return summaries


def trial_id(run_dir: Path) -> str:
    """The run's name in the HParams table: its last two directories (``lora_r8/version_0``)."""
    return "/".join(Path(run_dir).parts[-2:])


def write_run_summaries(run_dir: str | Path) -> Path:
    """Reads the run at ``run_dir`` and (re)writes its summary event file; returns the file.

    Called by every ``ftforget fit``, ``test`` and ``knob`` of the run; the values are those of the run's
    row in ``ftforget report``.
    """
    run = load_run(run_dir)
    return write_event_file(Path(run_dir), SUMMARY_SUFFIX, run_summaries(run))


def write_report_summaries(out_dir: Path, figures: list[Path], markdown: str) -> Path:
    """The report's event file in ``out_dir``: each PNG of ``figures`` as an image (tag ``report/<stem>``)
    and the report's Markdown as text (tag ``report/tables``)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard.summary import text

    summaries: list[tuple[Any, int]] = [(text("report/tables", markdown), 0)]
    for figure in figures:
        if figure.suffix != ".png":
            continue
        data = figure.read_bytes()
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR
        image = Summary.Image(height=height, width=width, colorspace=4, encoded_image_string=data)
        summaries.append((Summary(value=[Summary.Value(tag=f"report/{figure.stem}", image=image)]), 0))
    return write_event_file(out_dir, REPORT_SUFFIX, summaries)
