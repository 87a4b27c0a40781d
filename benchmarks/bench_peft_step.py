"""Training-step time of every PEFT method (configs/peft/) against full fine-tuning and ftforget's LoRA r=8.

All models live in one process and are timed in interleaved rounds (round r times every method once, in a
rotated order), so that a load change on a shared machine hits every method alike; the table gives each
method's median over rounds and its ratio to full fine-tuning and to LoRA r=8 within the same rounds. A step
is forward, cross-entropy, backward and an SGD step over the trainable parameters. Also the probe's
inference: the features under the method's inference context (PEFT's adapters merged) against unmerged.
Weights are random (no download): step time does not depend on their values.

    python benchmarks/bench_peft_step.py                            # ViT-B/16, 224 px, batch 8 (CPU) / 64
    python benchmarks/bench_peft_step.py --img-size 112 --rounds 5 --methods lora_qkv dora bitfit
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from ftforget.methods import FullFineTuning, LoRA
from ftforget.methods.registry import method_class
from ftforget.sweep import PEFT_CONFIGS

PEFT_DIR = Path(__file__).resolve().parents[1] / "ftforget" / "configs" / "peft"


def build(name: str, backbone: str, kwargs: dict) -> torch.nn.Module:
    common = {"num_classes": 100, "backbone": backbone, "backbone_kwargs": kwargs}
    if name == "full":
        return FullFineTuning(**common)
    if name == "lora_r8":
        return LoRA(r=8, **common)
    model = yaml.safe_load((PEFT_DIR / f"{name}.yaml").read_text())["model"]
    init = dict(model.get("init_args") or {})
    return method_class(model["class_path"])(**init, **common)


def step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["full", "lora_r8", *PEFT_CONFIGS])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on a GPU, 8 on a CPU")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = args.batch_size or (64 if device.type == "cuda" else 8)
    methods = list(dict.fromkeys(["full", "lora_r8", *args.methods]))
    kwargs = {"img_size": args.img_size}
    torch.manual_seed(0)
    x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    models = {m: build(m, args.backbone, kwargs).to(device).train() for m in methods}
    steps = {m: step_fn(model, x, y) for m, model in models.items()}

    def probe_time(m: str, merged: bool) -> float:
        """One feature pass in eval mode, no grad; ``merged``: inside the inference context (PEFT's adapters
        merged, entered before the clock starts: a probe merges once for thousands of images)."""
        model = models[m].eval()
        with torch.no_grad(), model.inference_context() if merged else nullcontext():
            seconds = timed(lambda: model.features(x), device)
        model.train()
        return seconds

    for m in methods:  # warm-up: one step and one probe pass each
        steps[m]()
        probe_time(m, True)
    times: dict[str, list[float]] = {m: [] for m in methods}
    probe_times: dict[tuple[str, bool], list[float]] = {(m, b): [] for m in methods for b in (False, True)}
    for r in range(args.rounds):
        order = methods[r % len(methods) :] + methods[: r % len(methods)]
        for m in order:
            times[m].append(timed(steps[m], device))
            for merged in (False, True):
                probe_times[(m, merged)].append(probe_time(m, merged))
    full = statistics.median(times["full"])
    lora = statistics.median(times["lora_r8"])
    print(
        f"device {device}, {args.backbone} at {args.img_size} px, batch {batch}, {args.rounds} interleaved rounds, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(
        "| method | trainable | step s (median) | / full | / LoRA r=8 | probe s unmerged | probe s merged |"
    )
    print("|---|---|---|---|---|---|---|")
    for m in methods:
        trainable, _ = models[m].parameter_counts()
        med = statistics.median(times[m])
        pu, pm = (statistics.median(probe_times[(m, b)]) for b in (False, True))
        print(
            f"| {m} | {trainable:,} | {med:.3f} | {med / full:.2f} | {med / lora:.2f} | {pu:.3f} | {pm:.3f} |"
        )


if __name__ == "__main__":
    main()
