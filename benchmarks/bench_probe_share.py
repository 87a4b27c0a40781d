"""The forgetting probe's cost against the training it watches, for the paper's schedule, from measured costs.

Measures on this machine, with ViT-B/16 at 224 px and random weights (costs do not depend on the values):

* a training step per image for full fine-tuning, LoRA (r=8 on q, v) and top-3 (SGD, batch ``--train_batch``,
  fp32; median of ``--rounds`` interleaved rounds, via ``bench_train.py``'s step);
* probe extraction per image: a full forward pass, and for top-3 the rest of the network after its frozen
  prefix (:mod:`ftforget.forgetting.prefix`), via ``bench_prefix.py`` (or read from its ``--json``);
* the k-NN per query per bank row: ``knn_predict`` of ``--knn_queries`` queries against ``--knn_bank``
  random features of width 768 (or ``--knn_s_per_pair`` from a full-scale ``bench_knn.py`` run);

then computes, for the paper's schedule (``--steps`` 10,000 steps of batch ``--batch`` 128; the callback's
default 14 measurements, :data:`~ftforget.forgetting.config.DEFAULT_EVAL_STEPS`), the probe's seconds over
the training's seconds at full scale (1,281,167 bank images, 50,000 queries) and for per-class subsets of
a 1000-class probe. With prefix reuse the first measurement runs the whole network and keeps the tokens
(their memory is shown); the 13 others run only the rest. It prints one table and the recommended subset:
the largest bank per class whose share is at most ``--target`` for every method.

    python benchmarks/bench_probe_share.py                                   # about 10 minutes on 2 cores
    python benchmarks/bench_probe_share.py --prefix_json prefix.json --knn_s_per_pair 4.1e-9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_prefix  # noqa: E402
import bench_train  # noqa: E402

from ftforget.forgetting.config import DEFAULT_EVAL_STEPS  # noqa: E402
from ftforget.forgetting.knn import knn_predict  # noqa: E402

FULL_BANK, FULL_QUERIES, CLASSES = 1_281_167, 50_000, 1000
#: ViT-B/16 at 224 px: 197 tokens of width 768 in float32 per image
TOKEN_BYTES = 197 * 768 * 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--train_batch", type=int, default=8, help="batch of the measured training steps")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefix_json", type=Path, help="bench_prefix.py --json output (else measured here)")
    p.add_argument("--knn_queries", type=int, default=2000)
    p.add_argument("--knn_bank", type=int, default=262_144)
    p.add_argument("--knn_s_per_pair", type=float, help="k-NN seconds per query per bank row (else measured)")
    p.add_argument("--bank_per_class", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument("--queries_per_class", type=int, default=10)
    p.add_argument("--target", type=float, default=0.25)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    return p.parse_args(argv)


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def train_seconds_per_image(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per training image of full, LoRA and top-3, interleaved rounds of 2 steps each."""
    cpu = torch.device("cpu")
    ns = argparse.Namespace(num_classes=100, backbone="vit_base_patch16_224", image_size=224)
    batch = (torch.randn(args.train_batch, 3, 224, 224), torch.randint(0, 100, (args.train_batch,)))
    steps = {}
    for name in ("full", "lora_r8", "top3"):
        module = bench_train.build(name, ns).train()
        steps[name] = bench_train.ftforget_step(module, cpu, batch, bf16=False)
        steps[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.rounds):
        for name, step in steps.items():
            t, _ = bench_train.measure(step, 2, 0, cpu)
            times[name].append(statistics.median(t) / args.train_batch)
            print(
                f"train round {r + 1}: {name} {times[name][-1]:.3f} s/image (load average {load()})",
                flush=True,
            )
    return {name: statistics.median(t) for name, t in times.items()}


def extraction_seconds_per_image(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    if args.prefix_json is None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "prefix.json"
            code = bench_prefix.main(
                ["--methods", "full", "top3", "--rounds", str(args.rounds), "--json", str(out)]
            )
            if code:
                raise SystemExit("bench_prefix: reused features differ from the full forward")
            return json.loads(out.read_text())["results"]
    return json.loads(args.prefix_json.read_text())["results"]


def knn_seconds_per_pair(args: argparse.Namespace) -> float:
    if args.knn_s_per_pair is not None:
        return args.knn_s_per_pair
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(args.knn_bank, 768, generator=g), dim=1)
    labels = torch.randint(0, CLASSES, (args.knn_bank,), generator=g)
    queries = torch.randn(args.knn_queries, 768, generator=g)
    times = []
    for r in range(args.rounds):
        start = time.perf_counter()
        knn_predict(queries, bank, labels, CLASSES, ks=[20])
        times.append((time.perf_counter() - start) / (args.knn_queries * args.knn_bank))
        print(
            f"knn round {r + 1}: {times[-1]:.3g} s per query per bank row (load average {load()})", flush=True
        )
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average at start: {load()}; torch {torch.__version__}, {args.threads} threads")
    extraction = extraction_seconds_per_image(args)
    knn_pair = knn_seconds_per_pair(args)
    train = train_seconds_per_image(args)
    full_fwd = extraction["full"]["full_s_per_image"]
    top3_rest = extraction["top3"]["reuse_s_per_image"]
    measurements = len(DEFAULT_EVAL_STEPS)
    train_images = args.steps * args.batch
    print(
        f"\nmeasured on this CPU: training s/image full {train['full']:.3f}, LoRA {train['lora_r8']:.3f}, "
        f"top-3 {train['top3']:.3f}; extraction s/image full forward {full_fwd:.4f}, top-3 after its "
        f"frozen prefix {top3_rest:.4f}; k-NN {knn_pair:.3g} s per query per bank row"
    )
    print(f"schedule: {args.steps:,} steps x batch {args.batch} = {train_images:,} training images, "
          f"{measurements} measurements {list(DEFAULT_EVAL_STEPS)}\n")  # fmt: skip
    # (label, training s/image, extraction s/image of the first measurement, of the later ones, reuse?)
    methods = [
        ("full fine-tuning", train["full"], full_fwd, full_fwd, False),
        ("LoRA r=8", train["lora_r8"], full_fwd, full_fwd, False),
        ("top-3", train["top3"], full_fwd, full_fwd, False),
        ("top-3 + prefix reuse", train["top3"], full_fwd, top3_rest, True),
    ]
    probes = [("full: 1,281,167 bank + 50,000 queries", FULL_BANK, FULL_QUERIES, None)]
    probes += [
        (
            f"{n}/class bank + {args.queries_per_class}/class queries",
            n * CLASSES,
            args.queries_per_class * CLASSES,
            n,
        )
        for n in args.bank_per_class
    ]
    print("| probe | method | training h | probe h | probe / training | kept tokens GiB |")
    print("|---|---|---|---|---|---|")
    worst: dict[int | None, float] = {}
    for label, bank, queries, per_class in probes:
        images = bank + queries
        knn = measurements * queries * bank * knn_pair
        for name, t_train, t_first, t_later, reuse in methods:
            train_s = train_images * t_train
            probe_s = images * t_first + (measurements - 1) * images * t_later + knn
            share = probe_s / train_s
            worst[per_class] = max(worst.get(per_class, 0.0), share)
            kept = f"{images * TOKEN_BYTES / 2**30:,.0f}" if reuse else "-"
            print(
                f"| {label} | {name} | {train_s / 3600:,.0f} | {probe_s / 3600:,.0f} | {share:.3f} | {kept} |"
            )
    fitting = [n for n in args.bank_per_class if worst[n] <= args.target]
    print(f"\nfull-scale probe / training: up to {worst[None]:.2f}")
    if fitting:
        best = max(fitting)
        print(
            f"recommended: {best}/class bank + {args.queries_per_class}/class queries "
            f"({best * CLASSES + args.queries_per_class * CLASSES:,} images per measurement): probe / training "
            f"<= {worst[best]:.3f} for every method (target {args.target})"
        )
    else:
        print(f"no subset here meets probe / training <= {args.target} for every method")
    print(f"load average at end: {load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
