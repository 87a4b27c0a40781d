"""``ftforget attach``: put an exported task onto a base backbone, as a checkpoint every command reads.

::

    ftforget attach --task lora_r8.safetensors --base dino_vitbase16_pretrain.pth --output lora_r8.ckpt
    ftforget measure --ckpt_path lora_r8.ckpt --probe.root /datasets/imagenet

A base whose SHA-256 is not the one the task was exported from is refused, naming both hashes;
``--ignore_base_hash`` puts it on anyway. The checkpoint computes exactly what the run's did.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import lightning
import torch

from ftforget.backbones import build_backbone
from ftforget.files import atomic_write
from ftforget.methods.base import METHOD_KEY, FineTuningModule
from ftforget.tasks.delta import state_hash
from ftforget.tasks.exported import attach_task, read_task


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftforget attach", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True, help="a .safetensors file written by ftforget export")
    parser.add_argument(
        "--base", required=True, help="the base backbone's weights file (.pth, .safetensors, ...)"
    )
    parser.add_argument("--ignore_base_hash", action="store_true", help="accept a base with another SHA-256")
    parser.add_argument("--output", default=None, help="write the model as a checkpoint (.ckpt) here")
    return parser


def save_as_checkpoint(model: FineTuningModule, path: Path) -> None:
    """A checkpoint of ``model`` that :func:`~ftforget.methods.registry.load_method` (``ftforget measure
    --ckpt_path``) rebuilds: its weights, hyperparameters and method name."""
    hparams = {**dict(model.hparams), "checkpoint": None, "pretrained": False}
    checkpoint = {
        "state_dict": model.state_dict(),
        "hyper_parameters": hparams,
        METHOD_KEY: type(model).__name__,
        "pytorch-lightning_version": lightning.__version__,
        "global_step": 0,
    }
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def main(argv: list[str]) -> int:
    """Runs ``ftforget attach``; returns the exit status."""
    args = _parser().parse_args(argv)
    task = read_task(args.task)
    base_path = Path(args.base).expanduser()
    if not base_path.is_file():
        raise FileNotFoundError(f"--base {args.base!r}: no such file")
    kwargs = dict(task.method_args.get("backbone_kwargs") or {})
    base = build_backbone(task.base_name, checkpoint=base_path, **kwargs)
    model = attach_task(
        task, base, base_source=f"--base {args.base!r}", ignore_base_hash=args.ignore_base_hash
    )
    if args.ignore_base_hash and state_hash(base.state_dict()) != task.base_sha256:
        sys.stdout.write(
            f"note: --base {args.base!r} is not the task's base (SHA-256 {task.base_sha256}); attached anyway, "
            "so the result does not compute what the run computed\n"
        )
    trainable, total = model.parameter_counts()
    sys.stdout.write(
        f"{task.label()} on {task.base_name} ({args.base}): {task.num_parameters:,} task parameters "
        f"({trainable:,} trainable of {total:,}); {len(task.class_names)} classes\n"
    )
    if args.output is not None:
        output = Path(args.output).expanduser()
        if output.is_dir():
            raise ValueError(f"--output {args.output!r} is a directory; give a .ckpt file name")
        save_as_checkpoint(model, output)
        sys.stdout.write(f"wrote {output}\n")
    return 0
