"""Probe feature extraction with and without the reuse of a method's frozen prefix, per method.

For every method it builds the model (ViT-B/16 at 224 px with random weights by default), takes
``--images`` random images as a probe part, and times, in ``--rounds`` interleaved rounds,

* full: :func:`ftforget.forgetting.features.extract_features` of ``model.features`` (what every measurement
  costs without the reuse, and what the first one costs with it);
* reuse: :func:`~ftforget.forgetting.features.shard_features` under
  :class:`ftforget.forgetting.prefix.PrefixReuse` after its first measurement kept the tokens, i.e. what
  every later measurement costs (only the blocks after the frozen prefix, the final norm and the pooling).

Both run in :func:`~ftforget.inference.measurement_mode`; the reused features are checked bit-identical to
the full ones (the script exits 1 otherwise). It prints per method the seconds per image of both, their
ratio (median over rounds of the per-round ratios), the ideal ratio ``depth / (depth - frozen prefix)``
and the measured share of it, with the load average of the machine after each round. ``--json`` writes
the numbers for ``bench_probe_share.py``. A tiny, fast run::

    python benchmarks/bench_prefix.py --backbone_kwargs '{"depth": 4, "embed_dim": 32, "num_heads": 2,
        "img_size": 32, "patch_size": 8}' --images 8 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import TensorDataset

from ftforget.forgetting.config import KNNConfig
from ftforget.forgetting.features import extract_features, shard_features
from ftforget.forgetting.prefix import PrefixReuse
from ftforget.inference import frozen_prefix_depth, measurement_mode
from ftforget.methods import BlockExpansion, FullFineTuning, LinearProbing, LoRA, TopKFineTuning

#: name -> (class, arguments) of the methods timed by default
METHODS: dict[str, tuple[type, dict[str, Any]]] = {
    "full": (FullFineTuning, {}),
    "lora_r8": (LoRA, {"r": 8}),
    "linear": (LinearProbing, {}),
    "top1": (TopKFineTuning, {"k": 1}),
    "top3": (TopKFineTuning, {"k": 3}),
    "block_expansion_p1": (BlockExpansion, {"p": 1}),
    "block_expansion_p2": (BlockExpansion, {"p": 2}),
    "block_expansion_p4": (BlockExpansion, {"p": 4}),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--backbone_kwargs", type=json.loads, default={})
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--images", type=int, default=16, help="images of the probe part")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--json", type=Path, help="write the results here")
    return p.parse_args(argv)


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    size = args.backbone_kwargs.get("img_size", 224)
    dataset = TensorDataset(
        torch.randn(args.images, 3, size, size, generator=g), torch.arange(args.images) % 10
    )
    config = KNNConfig(k=[1], batch_size=args.batch_size, num_workers=0)
    print(
        f"{args.backbone} {args.backbone_kwargs or ''} at {size} px, {args.images} images in batches of "
        f"{args.batch_size}, fp32, {args.threads} threads, torch {torch.__version__}"
    )
    models, reuses, depths = {}, {}, {}
    for name in args.methods:
        cls, kwargs = METHODS[name]
        torch.manual_seed(0)
        model = cls(num_classes=10, backbone=args.backbone, backbone_kwargs=args.backbone_kwargs, **kwargs)
        models[name], reuses[name] = model, PrefixReuse()
        depths[name] = (len(model.backbone.blocks), frozen_prefix_depth(model))
        with measurement_mode(model), reuses[name].active(model, "bench"):  # the step-0 measurement keeps
            shard_features("bank", dataset, model.features, config, cpu)

    seconds: dict[str, dict[str, list[float]]] = {n: {"full": [], "reuse": []} for n in args.methods}
    identical = True
    for r in range(args.rounds):
        for name in args.methods:
            model, reuse = models[name], reuses[name]
            with measurement_mode(model):
                t_full, full = timed(
                    lambda model=model: extract_features(
                        model.features, dataset, args.batch_size, 0, cpu, autocast_dtype=None
                    )
                )
                with reuse.active(model, "bench"):
                    t_reuse, (reused, _) = timed(
                        lambda model=model: shard_features("bank", dataset, model.features, config, cpu)
                    )
            identical &= torch.equal(full.features, reused.features)
            seconds[name]["full"].append(t_full / args.images)
            seconds[name]["reuse"].append(t_reuse / args.images)
            print(
                f"round {r + 1}: {name} full {t_full:.2f} s, reuse {t_reuse:.2f} s (load average {load()})",
                flush=True,
            )

    print(
        "\n| method | blocks | frozen prefix | full s/image | reuse s/image | speed-up | ideal | of ideal |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = {}
    for name in args.methods:
        depth, prefix = depths[name]
        full_s, reuse_s = seconds[name]["full"], seconds[name]["reuse"]
        speedup = statistics.median(f / u for f, u in zip(full_s, reuse_s, strict=True))
        ideal = depth / (depth - prefix) if prefix < depth else float("inf")
        share = speedup / ideal if prefix < depth else float("nan")
        results[name] = {
            "blocks": depth,
            "frozen_prefix": prefix,
            "full_s_per_image": statistics.median(full_s),
            "reuse_s_per_image": statistics.median(reuse_s),
            "speedup": speedup,
            "ideal": ideal,
        }
        print(
            f"| {name} | {depth} | {prefix} | {statistics.median(full_s):.4f} | {statistics.median(reuse_s):.4f} "
            f"| {speedup:.2f}x | {ideal:.2f}x | {share:.2f} |"
        )
    print(f"\nreused features bit-identical to the full forward for every method and round: {identical}")
    if args.json:
        args.json.write_text(
            json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results})
        )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
