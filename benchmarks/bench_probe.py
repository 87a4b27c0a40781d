"""Cost of the forgetting probe: extraction throughput, k-NN time, and its share of a training run.

Prints three things:
1. feature-extraction throughput of the ImageNet probe (JPEG decode + DINO eval transform + forward), in
   images/s, on ``--imagenet_root`` or on a synthetic JPEG tree written to a temporary directory;
2. the k-NN classification time for ``--num_queries`` queries against a bank of ``--bank_size`` random
   features (the k-NN does not care where features come from);
3. the wall-clock of a tiny fit with the ForgettingCallback against the same fit without it.

Defaults run in about a minute on a 2-core CPU with a tiny ViT. On a GPU with the real backbone::

    python benchmarks/bench_probe.py --backbone vit_base_patch16_224 --backbone_kwargs '{}' \\
        --imagenet_root /data/imagenet --bank_size 1281167 --num_queries 50000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from ftforget.backbones import build_backbone
from ftforget.data.imagenet import ImageNetProbe
from ftforget.forgetting import DEFAULT_EVAL_STEPS, ForgettingCallback
from ftforget.forgetting.config import KNNConfig
from ftforget.forgetting.features import ShardFeatures, extract_features
from ftforget.forgetting.sharded_knn import sharded_knn_hits
from ftforget.methods import FullFineTuning
from ftforget.methods.schedule import paper_recipe

IMAGENET_IMAGES = 1_281_167 + 50_000
TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2, "img_size": 32, "patch_size": 8}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backbone", default="vit_base_patch16_224")
    p.add_argument("--backbone_kwargs", type=json.loads, default=TINY)
    p.add_argument("--imagenet_root", help="real ImageNet; default: a synthetic JPEG tree")
    p.add_argument("--classes", type=int, default=10, help="synthetic tree: classes")
    p.add_argument("--per_class", type=int, default=20, help="synthetic tree: train images per class")
    p.add_argument("--image_px", type=int, default=64, help="synthetic tree: JPEG height (ImageNet's: ~375)")
    p.add_argument("--bank_per_class", type=int, help="bank subset per class (real ImageNet)")
    p.add_argument("--queries_per_class", type=int, help="query subset per class (real ImageNet)")
    p.add_argument("--bank_size", type=int, default=100_000)
    p.add_argument("--num_queries", type=int, default=2_000)
    p.add_argument("--k", type=int, nargs="+", default=[20, 10, 100, 200])
    p.add_argument("--bank_dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--train_steps", type=int, default=100)
    p.add_argument("--train_batch_size", type=int, default=32)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def write_tree(root: Path, classes: int, per_class: int, size: int = 64) -> None:
    """A synthetic ImageNet layout with real JPEGs, so that decoding and resizing are timed too."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        wnid = f"n{c:08d}"
        for split, n in (("train", per_class), ("val", max(1, per_class // 4))):
            (root / split / wnid).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 255, size=(size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=90)


def bench_extraction(
    args: argparse.Namespace, probe: ImageNetProbe, device: torch.device, label: str = "JPEG path"
) -> float:
    torch.manual_seed(0)
    model = build_backbone(args.backbone, **args.backbone_kwargs).to(device).eval()
    dataset = probe.bank_dataset()
    extract_features(model, torch.utils.data.Subset(dataset, range(min(len(dataset), 2 * args.batch_size))),
                     args.batch_size, 0, device)  # warm-up (allocator, kernels)  # fmt: skip
    start = time.perf_counter()
    shard = extract_features(
        model, dataset, args.batch_size, args.num_workers, device, autocast_dtype=torch.bfloat16
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    rate = len(dataset) / seconds
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.num_workers)
    start = time.perf_counter()
    loaded = sum(len(batch[0]) for batch in loader)
    print(f"data loading only, {label}: {loaded / (time.perf_counter() - start):.1f} images/s")
    print(
        f"feature extraction, {label}: {len(dataset)} images ({probe.crop_size}px, dim {shard.features.shape[1]}) "
        f"in {seconds:.2f} s = {rate:.1f} images/s (batch {args.batch_size}, {args.num_workers} workers)"
    )
    print(f"  -> full ImageNet probe (1.28M bank + 50k val) at this rate: {IMAGENET_IMAGES / rate / 3600:.2f} h "
          "per measurement and device")  # fmt: skip
    return rate


def bench_model_only(args: argparse.Namespace, device: torch.device) -> None:
    """The forward pass alone: float32 eager against the probe's path (inference mode, bf16 autocast on GPU)."""
    torch.manual_seed(0)
    model = build_backbone(args.backbone, **args.backbone_kwargs).to(device).eval()
    img = int(model.patch_embed.img_size[0])
    x = torch.randn(args.batch_size, 3, img, img, device=device)

    def run(fast: bool, reps: int = 5) -> float:
        grad = torch.inference_mode() if fast else torch.enable_grad()
        cast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if fast and device.type == "cuda" else nullcontext()
        )
        with grad, cast:
            model(x)  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(reps):
                model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
        return reps * len(x) / (time.perf_counter() - start)

    slow, fast = run(False), run(True)
    print(f"forward only, batch {len(x)}: float32 eager (autograd on) {slow:.1f} images/s, probe path "
          f"(inference mode{', bf16 autocast' if device.type == 'cuda' else ''}) {fast:.1f} images/s "
          f"= x{fast / slow:.2f}")  # fmt: skip


def bench_knn(args: argparse.Namespace, dim: int, device: torch.device) -> None:
    g = torch.Generator().manual_seed(0)
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[args.bank_dtype]
    bank = torch.nn.functional.normalize(torch.randn(args.bank_size, dim, generator=g), dim=1).to(
        device, dtype
    )
    queries = torch.nn.functional.normalize(torch.randn(args.num_queries, dim, generator=g), dim=1).to(
        device, dtype
    )
    labels = torch.randint(0, 1000, (args.bank_size,), generator=g).to(device)
    q_labels = torch.randint(0, 1000, (args.num_queries,), generator=g).to(device)
    bank_f = ShardFeatures(bank, labels, torch.arange(args.bank_size, device=device))
    query_f = ShardFeatures(queries, q_labels, torch.arange(args.num_queries, device=device))
    start = time.perf_counter()
    chunks = KNNConfig()
    sharded_knn_hits(query_f, bank_f, 1000, args.k, 0.07, chunks.query_chunk, chunks.bank_chunk)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    scale = (50_000 / args.num_queries) * (1_281_167 / args.bank_size)
    print(f"k-NN: {args.num_queries} queries x {args.bank_size} bank ({dim}-dim {args.bank_dtype}), k={args.k}: "
          f"{seconds:.2f} s ({args.num_queries / seconds:.0f} queries/s); linear extrapolation to 50k x 1.28M: "
          f"{seconds * scale / 60:.1f} min")  # fmt: skip


class RandomTask(L.LightningDataModule):
    def __init__(self, img_size: int, batch_size: int, probe: ImageNetProbe) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.data = TensorDataset(
            torch.randn(512, 3, img_size, img_size, generator=g), torch.randint(0, 10, (512,))
        )
        self.val = TensorDataset(
            torch.randn(128, 3, img_size, img_size, generator=g), torch.randint(0, 10, (128,))
        )
        self.batch_size, self.probe = batch_size, probe

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size)


def timed_fit(
    args: argparse.Namespace,
    probe: ImageNetProbe,
    root: Path,
    callback: ForgettingCallback | None,
    steps: int = 0,
) -> float:
    """Wall-clock of a fit of ``steps`` (default ``--train_steps``) steps, with or without the callback."""
    L.seed_everything(0, verbose=False)
    model = FullFineTuning(
        num_classes=10,
        backbone=args.backbone,
        backbone_kwargs=args.backbone_kwargs,
        **paper_recipe(warmup_steps=0),
    )
    trainer = L.Trainer(
        accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1, max_steps=steps or args.train_steps,
        logger=TensorBoardLogger(str(root), name="bench"), callbacks=[callback] if callback else [],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0,
    )  # fmt: skip
    img = int(model.backbone.patch_embed.img_size[0])
    start = time.perf_counter()
    trainer.fit(model, datamodule=RandomTask(img, args.train_batch_size, probe))
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.imagenet_root or Path(tmp) / "imagenet")
        if args.imagenet_root is None:
            write_tree(root, args.classes, args.per_class, args.image_px)
        crop = int(args.backbone_kwargs.get("img_size", 224))
        probe = ImageNetProbe(root=str(root), bank_per_class=args.bank_per_class,
                              queries_per_class=args.queries_per_class, crop_size=crop,
                              resize_size=round(crop * 256 / 224))  # fmt: skip
        probe.setup()
        print(
            f"device {device}, threads {torch.get_num_threads()}, backbone {args.backbone} {args.backbone_kwargs}"
        )
        jpeg_rate = bench_extraction(args, probe, device)
        cached = ImageNetProbe(root=str(root), bank_per_class=args.bank_per_class,
                               queries_per_class=args.queries_per_class, crop_size=crop,
                               resize_size=round(crop * 256 / 224), pixel_cache_dir=str(Path(tmp) / "pixels"))  # fmt: skip
        cached.setup()
        start = time.perf_counter()
        cached.bank_dataset(), cached.query_dataset()  # builds the cache once
        print(f"pixel cache built in {time.perf_counter() - start:.2f} s (one-time)")
        cache_rate = bench_extraction(args, cached, device, label="pixel cache")
        print(f"  -> pixel cache / JPEG path: x{cache_rate / jpeg_rate:.2f}")
        bench_model_only(args, device)
        dim = build_backbone(args.backbone, **args.backbone_kwargs).num_features
        bench_knn(args, dim, device)
        steps = [s for s in DEFAULT_EVAL_STEPS if s <= args.train_steps]
        timed_fit(
            args, probe, Path(tmp) / "runs", None, steps=5
        )  # warm-up: one-time costs out of the timings
        callback = ForgettingCallback(
            knn=KNNConfig(k=args.k[:1], batch_size=args.batch_size, num_workers=args.num_workers)
        )
        with_cb = timed_fit(args, probe, Path(tmp) / "runs", callback)
        base = timed_fit(args, probe, Path(tmp) / "runs", None)
        measured = sum(r["seconds"] for r in callback.records)
        print(f"training: {args.train_steps} steps of batch {args.train_batch_size}: {base:.2f} s without the "
              f"callback, {with_cb:.2f} s with it ({len(steps)} measurements at steps {steps}, "
              f"{len(probe.bank_dataset())} bank + {len(probe.query_dataset())} query images each)")  # fmt: skip
        print(
            f"measurement wall-clock: {measured / len(steps):.2f} s each, {measured:.2f} s in all = "
            f"{measured / base:.2f}x the training run without it (fit overhead {(with_cb - base) / base:.2f}x)"
        )


if __name__ == "__main__":
    main()
