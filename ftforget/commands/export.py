"""``ftforget export``: what a run's method changed relative to its base, as one safetensors file.

::

    ftforget export --run runs/lora_r8/version_0 --ckpt_path best --output lora_r8.safetensors
    ftforget export --ckpt_path model.ckpt --base dino_vitbase16_pretrain.pth --output task.safetensors
    ftforget export --run runs/peft_dora/version_0 --format peft --output dora_adapter/   # PEFT's own format

The file holds LoRA's A and B, Block Expansion's new blocks, top-k's blocks or full fine-tuning's whole
backbone (the method's trainable parameters), always the head, and metadata: the base's timm name and
SHA-256, the method and its arguments, the class names and the ftforget version. ``ftforget attach``
puts it back onto the base. ``--format peft`` (a :class:`~ftforget.methods.PeftMethod` run) writes a
directory in Hugging Face PEFT's format instead, which ``peft.PeftModel.from_pretrained`` loads onto the
same timm backbone (:mod:`ftforget.tasks.peft_format`; the head beside it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ftforget.runs import CONFIG_FILE, RunError, require_run, resolve_checkpoint
from ftforget.tasks.export import export_checkpoint


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ftforget export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default=None, help="a run directory written by ftforget fit")
    parser.add_argument(
        "--ckpt_path", default=None, help="best, last (with --run; default last) or a checkpoint file"
    )
    parser.add_argument(
        "--output", required=True, help="the .safetensors file to write (--format peft: a directory)"
    )
    parser.add_argument(
        "--format",
        choices=["ftforget", "peft"],
        default="ftforget",
        help="ftforget's task file (default) or, for a PeftMethod run, PEFT's adapter directory",
    )
    parser.add_argument(
        "--base",
        default=None,
        help="the base backbone's weights file (default: the run's model.init_args.checkpoint; for LoRA, Block "
        "Expansion and the linear probe the checkpoint's own frozen weights will do)",
    )
    return parser


def resolve_source(run: str | None, ckpt_path: str | None) -> tuple[Path, dict | None]:
    """The checkpoint to export and the run's configuration (``None`` without a run)."""
    if run is None:
        if ckpt_path in (None, "best", "last"):
            raise RunError(f"--ckpt_path {ckpt_path or '(none)'}: give --run RUN_DIR, or a checkpoint file")
        return Path(ckpt_path).expanduser(), None
    run_dir = require_run(Path(run).expanduser(), "--run")
    which = ckpt_path or "last"
    ckpt = resolve_checkpoint(run_dir, which) if which in ("best", "last") else Path(which).expanduser()
    return ckpt, yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}


def main(argv: list[str]) -> int:
    """Runs ``ftforget export``; returns the exit status."""
    args = _parser().parse_args(argv)
    output = Path(args.output).expanduser()
    if args.format == "peft":
        from ftforget.methods.registry import load_method
        from ftforget.tasks.peft_format import export_peft

        ckpt, _ = resolve_source(args.run, args.ckpt_path)
        written = export_peft(load_method(ckpt), output)
        sys.stdout.write(f"wrote {written}/ (adapter_config.json, adapter_model.safetensors, head)\n")
        return 0
    if output.suffix != ".safetensors" or output.is_dir():
        raise ValueError(f"--output {args.output!r}: give a file name ending in .safetensors")
    ckpt, config = resolve_source(args.run, args.ckpt_path)
    base, pretrained = args.base, False
    if base is None and config is not None:
        init = (config.get("model") or {}).get("init_args") or {}
        recorded = init.get("checkpoint")
        if recorded and Path(recorded).expanduser().is_file():
            base = recorded
        elif recorded:
            sys.stdout.write(
                f"note: the run's base weights file {recorded!r} (model.init_args.checkpoint) is not here; "
                "give it with --base FILE if the export needs it\n"
            )
        else:
            pretrained = bool(init.get("pretrained"))
    if base is not None and not Path(base).expanduser().is_file():
        raise FileNotFoundError(f"--base {base!r}: no such file")
    result = export_checkpoint(ckpt, output, base_file=base, pretrained=pretrained, config=config)
    sys.stdout.write(result.summary() + "\n")
    return 0
