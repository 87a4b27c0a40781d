"""``ftforget knob``: a run's fine-tuned network moved back toward its starting point, measured at several a.

For each knob value ``a`` the backbone's weights become ``W0 + a (W1 - W0)`` (:mod:`ftforget.methods.knob`:
WiSE-FT for full and top-k fine-tuning, the adapter scale for LoRA, partially opened new blocks for Block
Expansion; the fine-tuned head is kept), and the command measures new-task validation and test top-1 and the
run's own forgetting probe (the k-NN of its ForgettingCallback, same probe and settings). The points go into
the run (``knob.jsonl``, replaced by each knob measurement), where ``ftforget report`` draws them as the
method's curve in the stability-plasticity plane::

    ftforget knob --run runs/full/version_0
    ftforget knob --run runs/lora_r8/version_0 --ckpt_path best --alphas '[0, 0.5, 0.8, 1]'

``W0`` is rebuilt from the run's ``config.yaml`` (its weights file or timm weights, and its seed): the same
step-0 model the fit started from. Where the method has frozen weights, the command checks them against the
checkpoint's; ``a = 0`` is always measured and must reproduce the run's step-0 probe accuracy. If the
weights file has moved, give it with ``--checkpoint``.
"""

from __future__ import annotations

import sys
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser

from ftforget.commands.measure import measure
from ftforget.data.probe import ProbeData
from ftforget.forgetting import ForgettingCallback
from ftforget.forgetting.config import KNNConfig, SubsetConfig, to_dtype
from ftforget.forgetting.evaluate import loader_top1
from ftforget.inference import measurement_mode
from ftforget.methods.base import FineTuningModule
from ftforget.methods.knob import knob_model
from ftforget.methods.registry import load_method
from ftforget.report.runs import read_measurements
from ftforget.report.tensorboard import write_run_summaries
from ftforget.runs import (
    CONFIG_FILE,
    KNOB_FILE,
    lock_run,
    release_runs,
    require_run,
    resolve_checkpoint,
    write_knob_points,
)
from ftforget.stats import bootstrap_drop_ci, paired_counts

#: the default knob values: the pretrained backbone, three steps, the fine-tuned model
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="ftforget knob", description=__doc__.split("\n\n")[0], exit_on_error=False)
    parser.add_argument("--run", type=str, required=True, help="the run directory")
    parser.add_argument("--ckpt_path", type=str, default="last",
                        help="best, last (default) or a checkpoint file of the run")  # fmt: skip
    parser.add_argument("--alphas", type=list[float], default=list(DEFAULT_ALPHAS),
                        help="knob values a (0: pretrained backbone, 1: fine-tuned; 0 is always measured)")  # fmt: skip
    parser.add_argument("--checkpoint", type=str | None, default=None,
                        help="the backbone weights file the run started from, if its config's has moved")  # fmt: skip
    parser.add_argument("--device", type=str | None, default=None, help="default: the GPU if any, else cpu")
    return parser


def step0_cli(run_dir: Path, weights: str | None = None) -> Any:
    """The run's LightningCLI objects (model, data module, trainer) as ``ftforget fit`` built them before its
    first step, from the run's ``config.yaml``: the model has the weights the run started from and the
    seeded initialisation. ``weights`` replaces the config's weights file (it may have moved). Shared by
    ``ftforget knob`` and ``ftforget fidelity``."""
    from ftforget.cli import run_lightning

    config = yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    for stage_key in ("ckpt_path", "weights_only"):  # keys of the fit stage, not of the model
        config.pop(stage_key, None)
    init_args = config.setdefault("model", {}).setdefault("init_args", {})
    if weights is not None:
        init_args["checkpoint"] = weights
    source = init_args.get("checkpoint")
    if source is not None and not Path(source).expanduser().is_file():
        option = (
            "--checkpoint" if weights is not None else f"the run's model.init_args.checkpoint ({CONFIG_FILE})"
        )
        raise FileNotFoundError(
            f"{option}: backbone weights file {source!r} does not exist; the step-0 model needs the weights "
            "the run started from: give them with --checkpoint FILE"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_FILE
        path.write_text(yaml.safe_dump(config))
        return run_lightning(["--config", str(path)], run=False)


def step0_setup(run_dir: Path, weights: str | None) -> tuple[FineTuningModule, Any, ForgettingCallback]:
    """The run's model at step 0, its data module and its forgetting callback (:func:`step0_cli`)."""
    cli = step0_cli(run_dir, weights)
    callbacks = [c for c in cli.trainer.callbacks if isinstance(c, ForgettingCallback)]
    if not callbacks:
        raise ValueError(f"run {str(run_dir)!r} has no ForgettingCallback in its config: nothing to probe")
    return cli.model, cli.datamodule, callbacks[0]


def knob_points(
    end: FineTuningModule,
    start: FineTuningModule,
    alphas: list[float],
    probe: ProbeData,
    knn: KNNConfig,
    loaders: dict[str, Any],
    device: torch.device,
    subset: SubsetConfig | None = None,
) -> list[dict[str, Any]]:
    """One record per ``a`` (``0`` first, always): probe top-1 of the first k with its interval, the drop
    from ``a = 0`` with its paired interval, and top-1 on each of ``loaders`` (``new_task_<split>_acc1``); the
    probe is measured on ``subset``'s draws if given (as the run measured it)."""
    k = knn.ks[0]
    dtype = to_dtype(knn.autocast_dtype)
    records, baseline = [], None
    for a in sorted({0.0, *map(float, alphas)}):
        model = knob_model(end, start, a).to(device)
        result = measure(model, probe, knn, device, subset=subset)
        hits = result.hits(k)
        record: dict[str, Any] = {
            "alpha": a, "probe": probe.name, "k": k, "top1": result.top1[k], "top1_ci": result.top1_ci[k],
            "num_queries": result.num_queries, "subset": None if subset is None else asdict(subset),
        }  # fmt: skip
        if baseline is None:
            baseline = (result.top1[k], hits)
        lost, gained, _ = paired_counts(baseline[1], hits)
        record["drop_abs"] = baseline[0] - result.top1[k]
        record["drop_abs_ci"] = list(bootstrap_drop_ci(lost, gained, result.num_queries))
        with measurement_mode(model):
            for split, loader in loaders.items():
                offset = int(end.hparams.get("label_offset", 0))  # a class-incremental head
                record[f"new_task_{split}_acc1"] = loader_top1(
                    model, loader, device, dtype, label_offset=offset
                )
        records.append(record)
        del model
    return records


def main(argv: list[str]) -> int:
    """Runs ``ftforget knob``; returns the exit status."""
    parser = build_parser()
    try:
        cfg = parser.parse_args(argv)
    except Exception as err:  # jsonargparse's ArgumentError names the option
        raise ValueError(str(err).strip().replace("\n", " ")) from None
    run_dir = require_run(Path(cfg.run).expanduser(), "--run")
    which = cfg.ckpt_path
    ckpt = resolve_checkpoint(run_dir, which) if which in ("best", "last") else Path(which).expanduser()
    bad = [a for a in cfg.alphas if not torch.isfinite(torch.tensor(float(a)))]
    if bad or not cfg.alphas:
        raise ValueError(f"--alphas {cfg.alphas}: give a non-empty list of finite numbers")
    end = load_method(ckpt)
    start, datamodule, callback = step0_setup(run_dir, cfg.checkpoint)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    probe = callback.probe if callback.probe is not None else getattr(datamodule, "probe", None)
    if probe is None:
        raise ValueError(f"run {str(run_dir)!r}: its ForgettingCallback and data module name no probe")
    datamodule.setup("fit")
    datamodule.setup("test")
    loaders = {"val": datamodule.val_dataloader(), "test": datamodule.test_dataloader()}
    measured = read_measurements(run_dir, callback.filename)
    subset = run_subset(measured, callback)
    records = knob_points(end, start, cfg.alphas, probe, callback.config, loaders, device, subset)
    step = int(torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True).get("global_step", 0))
    for record in records:
        record.update({"checkpoint": ckpt.name, "requested": which, "step": step})
    lock_run(run_dir)  # one writer per run directory
    try:
        write_knob_points(run_dir, records)
        write_run_summaries(run_dir)  # the run's TensorBoard card shows its knob
    finally:
        release_runs()
    _print(records, run_dir, ckpt)
    _check_step0(records[0], measured)
    return 0


def run_subset(measured: list[dict[str, Any]], callback: ForgettingCallback) -> SubsetConfig | None:
    """The subset probe the run measured (its last measurement's, which ``probe_budget`` may have chosen),
    else its callback's ``subset``; None: the whole probe."""
    if measured:
        subset = measured[-1].get("subset")
        return SubsetConfig(**subset) if subset else None
    return callback.current_subset()


def _check_step0(zero: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``a = 0`` is the step-0 model: its probe accuracy must be the one the run measured at step 0."""
    step0 = [
        r for r in rows if r.get("step") == 0 and r.get("k") == zero["k"] and r.get("probe") == zero["probe"]
    ]
    if step0 and step0[-1]["top1"] != zero["top1"]:
        sys.stdout.write(
            f"warning: a = 0 gives probe top-1 {100 * zero['top1']:.2f}%, the run measured "
            f"{100 * step0[-1]['top1']:.2f}% at step 0: the rebuilt step-0 model is not the one the run "
            "started from (another weights file or seed?); give the right one with --checkpoint\n"
        )


def _print(records: list[dict[str, Any]], run_dir: Path, ckpt: Path) -> None:
    head = records[0]
    sys.stdout.write(
        f"knob of {run_dir} ({ckpt.name}, step {head['step']}): probe {head['probe']} k-NN top-1 (k={head['k']})\n"
        f"{'a':>6} {'new-task val':>12} {'new-task test':>13} {'probe top-1 [95% CI]':>24} {'drop [95% CI]':>24}\n"
    )
    for r in records:
        lo, hi = r["top1_ci"]
        dlo, dhi = r["drop_abs_ci"]
        sys.stdout.write(
            f"{r['alpha']:>6.3g} {100 * r['new_task_val_acc1']:>11.2f}% {100 * r['new_task_test_acc1']:>12.2f}% "
            f"{100 * r['top1']:>7.2f}% [{100 * lo:.2f}, {100 * hi:.2f}] "
            f"{100 * r['drop_abs']:>+7.2f} [{100 * dlo:+.2f}, {100 * dhi:+.2f}]\n"
        )
    sys.stdout.write(f"wrote {run_dir / KNOB_FILE}\n")
