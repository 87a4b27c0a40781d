"""``ftforget measure``: one ImageNet-1k k-NN measurement outside training.

Measures either a method checkpoint (a Lightning ``.ckpt`` of any ftforget method, rebuilt from its own
hyperparameters, so the feature is exactly the one the callback measured during training) or a pretrained
backbone. Under ``torchrun`` the bank is sharded over the processes as in training::

    ftforget measure --ckpt_path runs/ftforget/version_0/checkpoints/last.ckpt \\
        --imagenet_root /data/imagenet --k 10 20 100 200 --output knn.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from ftforget.backbones import DEFAULT_BACKBONE, build_backbone
from ftforget.data.imagenet import ImageNetProbe
from ftforget.forgetting.cache import FeatureCache, feature_fingerprint, state_fingerprint
from ftforget.forgetting.distributed import dist_info
from ftforget.forgetting.evaluate import KNNConfig, evaluate_probe, measurement_mode
from ftforget.forgetting.knn import DEFAULT_K, DEFAULT_TEMPERATURE
from ftforget.methods import (
    BlockExpansion,
    FineTuningModule,
    FullFineTuning,
    LinearProbing,
    LoRA,
    TopKFineTuning,
)

_METHODS = {c.__name__: c for c in (FullFineTuning, LinearProbing, TopKFineTuning, LoRA, BlockExpansion)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftforget measure", description=__doc__.split("\n")[0])
    src = p.add_argument_group("what to measure (--ckpt_path, or --backbone with its weights)")
    src.add_argument("--ckpt_path", help="Lightning checkpoint of an ftforget method")
    src.add_argument("--backbone", help=f"timm backbone name, e.g. {DEFAULT_BACKBONE}")
    src.add_argument("--checkpoint", help="local backbone weights (timm, DINO or Hugging Face format)")
    src.add_argument("--pretrained", action="store_true", help="download timm's weights for --backbone")
    src.add_argument("--backbone_kwargs", type=json.loads, default={}, help="JSON, e.g. '{\"depth\": 2}'")
    probe = p.add_argument_group("ImageNet-1k probe")
    probe.add_argument("--imagenet_root", help="directory with train/ and val/")
    probe.add_argument("--train_dir", help="train tree <wnid>/*.JPEG (default <root>/train)")
    probe.add_argument("--val_dir", help="val tree or flat folder (default <root>/val)")
    probe.add_argument("--val_labels", help="LOC_val_solution.csv for a flat val folder")
    probe.add_argument("--bank_per_class", type=int, help="bank: n train images per class (default: all)")
    probe.add_argument("--queries_per_class", type=int, help="queries: n val images per class (default: all)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the subsets")
    probe.add_argument("--crop_size", type=int, help="center crop (default: the model's input size)")
    probe.add_argument("--resize_size", type=int, help="bicubic resize (default: crop_size * 256 / 224)")
    probe.add_argument("--pixel_cache_dir", help="memory-mapped center-cropped pixels (built on first use)")
    knn = p.add_argument_group("k-NN")
    knn.add_argument(
        "--k", type=int, nargs="+", default=[DEFAULT_K], help="neighbour counts, e.g. 10 20 100 200"
    )
    knn.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE)
    knn.add_argument("--batch_size", type=int, default=256, help="images per forward pass and process")
    knn.add_argument("--num_workers", type=int, default=8, help="data-loading workers per process")
    knn.add_argument("--bank_dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    knn.add_argument("--autocast_dtype", default="bfloat16", help="CUDA autocast dtype, or 'none' for fp32")
    knn.add_argument("--device", help="default: cuda (the local rank's GPU) if available, else cpu")
    knn.add_argument("--cache_dir", help="on-disk feature cache, keyed by weights and probe")
    p.add_argument("--output", help="JSON file for the result (written by rank 0)")
    return p


def _method_class(hparams: dict[str, Any]) -> type[FineTuningModule]:
    """The method a checkpoint was trained with, from LightningCLI's ``_class_path`` or its own arguments."""
    class_path = hparams.get("_class_path")
    if class_path:
        name = str(class_path).rsplit(".", 1)[-1]
        if name not in _METHODS:
            raise ValueError(f"--ckpt_path: unknown method class {class_path!r}; known: {sorted(_METHODS)}")
        return _METHODS[name]
    if "targets" in hparams and "r" in hparams:
        return LoRA
    if "positions" in hparams and "p" in hparams:
        return BlockExpansion
    if "train_final_norm" in hparams:
        return TopKFineTuning
    return FullFineTuning  # full and linear have the same network: the feature is the same function


def load_method(ckpt_path: str | os.PathLike[str]) -> FineTuningModule:
    """Rebuilds an ftforget method from its checkpoint (hyperparameters, then the strict state dict).

    The backbone is built without its original weights file (``checkpoint=None``): the state dict holds
    every weight, and the file may not exist on the measuring machine.
    """
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt_path {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        hparams, state = dict(ckpt["hyper_parameters"]), ckpt["state_dict"]
    except (OSError, RuntimeError, KeyError, EOFError, TypeError) as err:
        raise ValueError(
            f"--ckpt_path {str(path)!r} is not a readable ftforget Lightning checkpoint: {err}"
        ) from err
    cls = _method_class(hparams)
    accepted = set(inspect.signature(cls.__init__).parameters) | set(
        inspect.signature(FineTuningModule.__init__).parameters
    )
    kwargs = {k: v for k, v in hparams.items() if k in accepted and k != "self"}
    kwargs.update(checkpoint=None, pretrained=False)
    model = cls(**kwargs)
    model.load_state_dict(state, strict=True)
    return model


class _BackboneOnly(nn.Module):
    """A bare backbone exposing the probe's ``features`` interface."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


def _build_model(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[nn.Module, str, str]:
    """(module with ``features``, its fingerprint, a description of the source)."""
    if (args.ckpt_path is None) == (args.backbone is None):
        parser.error("give exactly one of --ckpt_path and --backbone")
    if args.ckpt_path is not None:
        if args.checkpoint or args.pretrained or args.backbone_kwargs:
            parser.error(
                "--checkpoint, --pretrained and --backbone_kwargs go with --backbone, not --ckpt_path"
            )
        model = load_method(args.ckpt_path)
        return model, feature_fingerprint(model), f"ckpt:{args.ckpt_path}"
    if not isinstance(args.backbone_kwargs, dict):
        parser.error(f"--backbone_kwargs must be a JSON object, got {args.backbone_kwargs!r}")
    backbone = build_backbone(
        args.backbone, checkpoint=args.checkpoint, pretrained=args.pretrained, **args.backbone_kwargs
    )
    source = f"backbone:{args.backbone}" + (f":{args.checkpoint}" if args.checkpoint else "")
    return _BackboneOnly(backbone), state_fingerprint(backbone), source


def _setup_distributed(device_arg: str | None) -> tuple[torch.device, bool]:
    """Joins the ``torchrun`` process group when there is one; (this process's device, whether it joined)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_arg in (None, "cuda")
    joined = world > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if device_arg not in (None, "cuda"):
        return torch.device(device_arg), joined
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), joined
    return torch.device("cpu"), joined


def main(argv: list[str] | None = None) -> int:
    """Runs ``ftforget measure``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.imagenet_root is None and (args.train_dir is None or args.val_dir is None):
        parser.error("give --imagenet_root, or both --train_dir and --val_dir")
    autocast = None if str(args.autocast_dtype).lower() == "none" else args.autocast_dtype
    config = KNNConfig(
        k=args.k, temperature=args.temperature, batch_size=args.batch_size, num_workers=args.num_workers,
        bank_dtype=args.bank_dtype, autocast_dtype=autocast,
    )  # fmt: skip
    model, fingerprint, source = _build_model(args, parser)
    crop = args.crop_size or int(model.backbone.patch_embed.img_size[0])
    probe = ImageNetProbe(
        root=args.imagenet_root, train_dir=args.train_dir, val_dir=args.val_dir, val_labels=args.val_labels,
        bank_per_class=args.bank_per_class, queries_per_class=args.queries_per_class, seed=args.seed,
        crop_size=crop, resize_size=args.resize_size or round(crop * 256 / 224),
        pixel_cache_dir=args.pixel_cache_dir,
    )  # fmt: skip
    probe.setup()
    device, joined = _setup_distributed(args.device)
    model.to(device)
    cache = FeatureCache(args.cache_dir) if args.cache_dir else None
    with measurement_mode(model):
        result = evaluate_probe(model.features, probe, config, device, fingerprint=fingerprint, cache=cache)
    report = {
        "source": source, "probe": probe.name, "temperature": config.temperature,
        "results": [{"k": k, "top1": result.top1[k], "top5": result.top5[k]} for k in config.k],
        "num_queries": result.num_queries, "num_bank": result.num_bank, "seconds": result.seconds,
        "world_size": dist_info()[1],
    }  # fmt: skip
    if dist_info()[0] == 0:
        for row in report["results"]:
            rank_zero_info(
                f"{source}: {probe.name} k-NN k={row['k']} top-1 {row['top1']:.4f} top-5 {row['top5']:.4f}"
            )
        if args.output:
            Path(args.output).expanduser().parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).expanduser().write_text(json.dumps(report, indent=2) + "\n")
    if joined:
        dist.destroy_process_group()
    return 0
