"""Training-step benchmark: every method side by side, ratios to full fine-tuning in the same process.

Also times HF transformers + PEFT LoRA on query/value of the same ViT-B/16 shape (the paper's own stack;
needs ``pip install transformers peft``) and the linear probe's cached-feature epoch against its image
epoch. Weights are random: step time does not depend on their values, so no download is needed.

    python benchmarks/bench_train.py                       # ViT-B/16 at 224, batch 128 on GPU, 8 on CPU
    python benchmarks/bench_train.py --batch-size 32 --steps 20 --methods full lora_r8 --no-peft
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ftforget.methods import BlockExpansion, FullFineTuning, LinearProbing, LoRA, TopKFineTuning

METHODS: dict[str, tuple[type, dict]] = {
    "full": (FullFineTuning, {}),
    "top3": (TopKFineTuning, {"k": 3}),
    "linear": (LinearProbing, {}),
    "lora_r8": (LoRA, {"r": 8}),
    "block_expansion_p3": (BlockExpansion, {"p": 3}),
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    step: Callable[[], None], steps: int, warmup: int, device: torch.device
) -> tuple[float, float | None]:
    """Median seconds per call of ``step`` and peak GPU memory in MiB (None on CPU)."""
    for _ in range(warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return times, peak


def autocast(device: torch.device, bf16: bool):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def ftforget_step(
    module, device: torch.device, batch: tuple[torch.Tensor, torch.Tensor], bf16: bool
) -> Callable:
    params = [p for p in module.parameters() if p.requires_grad]
    fused = device.type == "cuda" or None
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=fused)
    x, y = batch

    def step() -> None:
        with autocast(device, bf16):
            loss = F.cross_entropy(module.training_logits(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def peft_step(args, device: torch.device, batch: tuple[torch.Tensor, torch.Tensor], bf16: bool) -> Callable:
    from peft import LoraConfig, get_peft_model
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=args.image_size, patch_size=16, num_labels=args.num_classes)
    model = ViTForImageClassification(config)
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    # transformers 5 calls the projections q_proj/v_proj, transformers 4 query/value
    targets = ["q_proj", "v_proj"] if "q_proj" in names else ["query", "value"]
    lora = LoraConfig(r=8, lora_alpha=8, target_modules=targets, modules_to_save=["classifier"])
    model = get_peft_model(model, lora).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, fused=device.type == "cuda" or None)
    x, y = batch

    def step() -> None:
        with autocast(device, bf16):
            loss = F.cross_entropy(model(pixel_values=x).logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build(name: str, args) -> torch.nn.Module:
    cls, kwargs = METHODS[name]
    torch.manual_seed(0)
    return cls(
        num_classes=args.num_classes,
        backbone=args.backbone,
        backbone_kwargs={"img_size": args.image_size},
        **kwargs,
    )


def main(argv: list[str] | None = None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128 if cuda else 8)
    parser.add_argument("--steps", type=int, default=20 if cuda else 3)
    parser.add_argument("--warmup", type=int, default=5 if cuda else 1)
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16" if cuda else "fp32")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument(
        "--rounds", type=int, default=1 if cuda else 3, help="interleaved rounds (peak memory only with 1)"
    )
    parser.add_argument("--no-peft", action="store_true", help="skip the HF transformers + PEFT comparison")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if cuda else "cpu")
    bf16 = args.precision == "bf16"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(device)
    name = torch.cuda.get_device_name(device) if cuda else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"# device: {name}; torch {torch.__version__}; {args.backbone} @ {args.image_size}px; "
        f"batch {args.batch_size}; {args.precision}; median of {args.rounds} x {args.steps} steps after {args.warmup} warmup"
    )
    print("| run | trainable | step ms | images/s | x full | peak MiB | mem x full |")
    print("|---|---|---|---|---|---|---|", flush=True)
    runs: dict[str, tuple[int, Callable[[], None]]] = {}
    linear = None
    for method in ["full", *[m for m in args.methods if m != "full"]]:
        module = build(method, args).to(device).train()
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
        runs[f"ftforget {method}"] = (trainable, ftforget_step(module, device, (x, y), bf16))
        linear = module if method == "linear" else linear
    if not args.no_peft:
        runs["HF transformers + PEFT LoRA r8 (q, v)"] = (-1, peft_step(args, device, (x, y), bf16))
    # Rounds interleave the runs, so that a slow phase of a shared machine hits every run alike.
    times: dict[str, list[float]] = {label: [] for label in runs}
    peaks: dict[str, float | None] = {}
    for round_ in range(args.rounds):
        for label, (_, step) in runs.items():
            step_times, peak = measure(step, args.steps, args.warmup if round_ == 0 else 1, device)
            times[label] += step_times
            peaks[label] = peak if args.rounds == 1 else None  # other runs' tensors stay resident
    rows: list[tuple[str, int, float, float | None]] = []
    for label, (trainable, _) in runs.items():
        seconds = statistics.median(times[label])
        rows.append(print_row(label, trainable, seconds, peaks[label], rows, args.batch_size))
    lora = next((r for r in rows if r[0] == "ftforget lora_r8"), None)
    if lora and not args.no_peft:
        print(f"ftforget LoRA step / HF+PEFT LoRA step = {lora[2] / rows[-1][2]:.2f}")
    if linear is not None:
        linear_epoch(linear, device, (x, y), bf16, args)
    return 0


def print_row(
    label: str, trainable: int, seconds: float, peak: float | None, rows: list, batch: int
) -> tuple:
    """Prints one table row, with ratios to the first row (full fine-tuning)."""
    base_t, base_m = (rows[0][2], rows[0][3]) if rows else (seconds, peak)
    mem = f"{peak:.0f}" if peak is not None else "n/a"
    mem_ratio = f"{peak / base_m:.2f}" if peak is not None and base_m else "n/a"
    count = f"{trainable:,}" if trainable >= 0 else "see PEFT"
    print(
        f"| {label} | {count} | {1e3 * seconds:.1f} | {batch / seconds:.1f} | {seconds / base_t:.2f} | "
        f"{mem} | {mem_ratio} |",
        flush=True,
    )
    return label, trainable, seconds, peak


def linear_epoch(
    module, device: torch.device, batch: tuple[torch.Tensor, torch.Tensor], bf16: bool, args
) -> None:
    """One linear-probe step from images against one from cached features (the same batch)."""
    x, y = batch
    with torch.no_grad(), autocast(device, bf16):
        features = module.features(x).float()
    image_s = statistics.median(
        measure(ftforget_step(module, device, (x, y), bf16), args.steps, 1, device)[0]
    )
    cached = ftforget_step(module, device, (features, y), bf16)
    cached_s = statistics.median(measure(cached, max(args.steps, 20), 2, device)[0])
    print(
        f"linear probe: image step {1e3 * image_s:.2f} ms, cached-feature step {1e3 * cached_s:.3f} ms, "
        f"speed-up x{image_s / cached_s:.0f} per epoch once the cache exists"
    )


if __name__ == "__main__":
    sys.exit(main())
