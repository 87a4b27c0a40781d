"""``ftforget demo``: the whole experiment in miniature, on scikit-learn's digits, on a CPU, in minutes.

1. Pretrain a tiny ViT of timm's real architecture on the old digits (the probe's memory bank), once:
   the backbone is cached as a timm-format ``.pth`` keyed by every setting that shapes it.
2. Fine-tune it on the new digits with every method as a sweep (:mod:`ftforget.sweep`), through the real
   CLI (``ftforget fit --config configs/demo/<method>.yaml --config configs/demo/common.yaml``), while the
   forgetting callback measures k-NN accuracy on the old digits at fixed steps; then test the final
   weights (``ftforget test --run <run> --ckpt_path last``) in the same run directory. A demo run again
   skips what is done and resumes what was interrupted.
3. Write and print the report (:mod:`ftforget.report`) of exactly these runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml
from lightning.fabric.plugins.environments import LightningEnvironment

import ftforget
from ftforget.data.digits import DigitsBankDataModule
from ftforget.files import atomic_write
from ftforget.forgetting.config import eval_steps_until
from ftforget.methods import FullFineTuning
from ftforget.methods.schedule import paper_recipe
from ftforget.sweep import SweepRun, build_runs, run_sweep

#: the methods in the paper's order, then an anti-forgetting baseline; each is ``configs/demo/<name>.yaml``
METHODS = ("full", "top1", "linear", "lora", "block_expansion", "full_l2sp")
#: the stability-plasticity knob values each demo run is measured at (``ftforget knob``)
KNOB = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass(frozen=True)
class PretrainSettings:
    """Supervised pretraining on the old domain (the real run's backbone is DINO on ImageNet-1k).

    The architecture and the old-domain data come from ``configs/demo/common.yaml``; the rest are the
    demo's options. Every field is part of the cache key.
    """

    backbone: str
    backbone_kwargs: dict[str, Any]
    old_digits: list[int]
    image_size: int
    split_seed: int
    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    max_shift: int = 2
    seed: int = 0
    trainer: str = "lightning"  # how it was trained: a new loop means new weights, hence a new cache entry
    data_order: str = "seed-epoch-sample"  # ftforget.data.resumable's order and augmentation draws
    versions: dict[str, str] = field(
        default_factory=lambda: {"torch": torch.__version__.split("+")[0], "ftforget": ftforget.__version__}
    )

    def key(self) -> str:
        """A short hash of every field: the cache file's name."""
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def pretrain(settings: PretrainSettings) -> tuple[dict[str, torch.Tensor], float]:
    """Trains backbone + linear head on the probe's bank (the old digits' pretraining split), through
    Lightning: :class:`~ftforget.methods.FullFineTuning` of a randomly initialised backbone with AdamW and
    the warmup-cosine schedule, on :class:`~ftforget.data.digits.DigitsBankDataModule`.

    Returns:
        The backbone's state dict (timm key names) and its accuracy on the bank it was trained on
        (unaugmented: the images the probe's k-NN later searches).
    """
    L.seed_everything(settings.seed, verbose=False)
    data = DigitsBankDataModule(
        settings.old_digits, settings.image_size, settings.split_seed, settings.batch_size, settings.max_shift
    )
    optimizer = {
        "class_path": "torch.optim.AdamW",
        "init_args": {"lr": settings.lr, "weight_decay": settings.weight_decay},
    }
    model = FullFineTuning(
        num_classes=data.num_classes,
        backbone=settings.backbone,
        backbone_kwargs=settings.backbone_kwargs,
        optimizer=optimizer,
        lr_scheduler=paper_recipe(settings.lr, settings.warmup_steps)["lr_scheduler"],
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=settings.steps, limit_val_batches=0, num_sanity_val_steps=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        # one process, also as one rank of a multi-process SLURM task (SLURM's world size is the fits')
        plugins=[LightningEnvironment()],
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    images, labels = data.bank_tensors()
    with torch.no_grad():
        accuracy = float((model.eval()(images).argmax(1) == labels).float().mean())
    return model.backbone.state_dict(), accuracy


def pretrained_path(settings: PretrainSettings, cache_dir: Path) -> Path:
    """Where the pretrained backbone of ``settings`` is cached (whether or not it is there yet)."""
    return cache_dir / f"{settings.backbone}-{settings.key()}.pth"


def pretrained_backbone(settings: PretrainSettings, cache_dir: Path) -> Path:
    """The cached pretrained backbone for ``settings``, pretraining it first if there is none.

    Safe when several processes ask at once (the tasks of a SLURM array, the ranks of one task): an
    exclusive lock beside the file lets one of them pretrain while the others wait, then reuse its file.
    """
    import fcntl

    path = pretrained_path(settings, cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if path.is_file():
            _say(f"pretrained backbone: reusing {path}")
            return path
        _say(f"pretraining the backbone on digits {settings.old_digits} ({settings.steps} steps) ...")
        start = time.perf_counter()
        state, train_acc = pretrain(settings)
        # Written atomically: an interrupted run never leaves a truncated cache entry.
        atomic_write(path, lambda f: torch.save(state, f))
        seconds = time.perf_counter() - start
        info = json.dumps(
            {"settings": asdict(settings), "bank_acc1": train_acc, "seconds": seconds}, indent=2
        )
        atomic_write(path.with_suffix(".json"), lambda f: f.write((info + "\n").encode()))
    _say(f"pretrained in {seconds:.0f}s (accuracy on its bank {100 * train_acc:.1f}%): {path}")
    return path


def pretrain_settings(config_dir: Path, args: argparse.Namespace) -> PretrainSettings:
    """Architecture and old domain from ``common.yaml`` (one source of truth), the rest from ``args``
    (``pretrain_steps`` and ``seed``)."""
    common = yaml.safe_load((config_dir / "common.yaml").read_text())
    return settings_from(
        common["model"]["init_args"], common["data"]["init_args"], args.pretrain_steps, args.seed
    )


def settings_from(model: dict[str, Any], data: dict[str, Any], steps: int, seed: int) -> PretrainSettings:
    """The pretraining of the backbone that ``model`` (its ``init_args``: ``backbone``, ``backbone_kwargs``)
    fine-tunes, on the old domain of ``data`` (its ``init_args``: ``old_digits``, ``image_size``,
    ``split_seed``)."""
    return PretrainSettings(
        backbone=model["backbone"],
        backbone_kwargs=dict(model["backbone_kwargs"]),
        old_digits=list(data["old_digits"]),
        image_size=int(data["image_size"]),
        split_seed=int(data["split_seed"]),
        steps=steps,
        seed=seed,
    )


def _say(message: str) -> None:
    sys.stdout.write(f"[ftforget demo] {message}\n")
    sys.stdout.flush()


def demo_runs(
    args: argparse.Namespace, methods: list[str], config_dir: Path, checkpoint: Path
) -> list[SweepRun]:
    """The demo as a sweep of one seed (``args.seed``): :func:`demo_sweep_runs` with the demo's options."""
    return demo_sweep_runs(
        args.output, methods, config_dir, checkpoint, args.steps, [args.seed], args.threads
    )


def demo_sweep_runs(
    output: Path,
    methods: Sequence[str],
    config_dir: Path,
    checkpoint: Path,
    steps: int,
    seeds: Sequence[int],
    threads: int = 1,
    test_ckpt: str = "last",
    knob: Sequence[float] | None = KNOB,
    extra: Sequence[str] = (),
) -> list[SweepRun]:
    """The demo's runs: each method's config with ``common.yaml``, the pretrained backbone (one for every
    seed, as the real run's one DINO checkpoint), the step count and the log-spaced eval steps; tested on
    the last checkpoint (the final weights, the ones the callback measured last: a row's two accuracies
    are of one model). ``ftforget sweep --preset demo`` uses it too, so its runs are the demo's.

    Args:
        extra: further options for every fit, after the demo's own.
    """
    demo_extra = [
        *("--model.init_args.checkpoint", str(checkpoint)),
        *("--trainer.max_steps", str(steps)),
        f"--trainer.callbacks.eval_at_steps={json.dumps(eval_steps_until(steps))}",
        *("--threads", str(threads)),
        *extra,
    ]
    config_sets = [[config_dir / f"{m}.yaml", config_dir / "common.yaml"] for m in methods]
    return build_runs(config_sets, seeds, output, demo_extra, test_ckpt=test_ckpt, knob=knob)


def run_demo(
    args: argparse.Namespace, methods: list[str], config_dir: Path, stage: Callable[[list[str]], int]
) -> int:
    """Pretrains (or reuses) the backbone, runs the demo sweep, writes and prints the report.

    Args:
        args: the demo's options.
        methods: names of configs in ``config_dir``.
        config_dir: the demo's YAMLs.
        stage: runs one ``ftforget`` command (fit, test) and returns its exit status.
    """
    start = time.perf_counter()
    cache_dir = args.cache_dir or args.output / "pretrained"
    checkpoint = pretrained_backbone(pretrain_settings(config_dir, args), cache_dir)
    run_dirs = run_sweep(demo_runs(args, methods, config_dir, checkpoint), stage, _say)
    # One base, many tasks (ftforget.tasks): export every run, route a mixed stream; the report reads the JSON.
    from ftforget.tasks.digits import evaluate_routing

    evaluate_routing(checkpoint, run_dirs, args.output / "report", _say)
    from ftforget.report import write_report

    report = write_report(run_dirs, args.output / "report")
    seconds = time.perf_counter() - start
    sys.stdout.write("\n" + report.markdown + "\n")
    if report.knob_table:
        sys.stdout.write("Stability-plasticity knob (ftforget knob):\n\n" + report.knob_table + "\n")
    _say(f"done in {seconds / 60:.1f} min ({seconds:.0f} s)")
    _say(f"TensorBoard logs (tensorboard --logdir {args.output}):")
    for run_dir in run_dirs:
        _say(f"  {run_dir}")
    for path in report.files:
        _say(f"report: {path}")
    return 0
