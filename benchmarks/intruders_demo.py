"""Intruder dimensions of demo runs, and the post-hoc knob that scales them down, measured on the demo's probe.

For each run directory: the run's last checkpoint against its step-0 model (rebuilt from its config.yaml as
``ftforget knob`` does), every moved 2-D base weight analysed with the adapters merged
(:func:`ftforget.tasks.intruders.layer_intruders`, top 10 singular vectors, epsilon 0.5). Then, for each
``lam``, every moved weight becomes ``W' + (lam - 1) * (its intruder components)`` in a plain copy of the
backbone, and the run's own probe (k-NN top-1) and new-task val top-1 (with the run's head) are measured.

    python benchmarks/intruders_demo.py runs/demo/lora/seed0 runs/demo_peft/*/seed0 --lams 1 0.5 0
"""

from __future__ import annotations

import argparse
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from ftforget.adapters.intruders import reduce_intruders
from ftforget.backbones import build_backbone
from ftforget.commands.knob import step0_setup
from ftforget.commands.measure import measure
from ftforget.forgetting.evaluate import loader_top1
from ftforget.inference import measurement_mode
from ftforget.methods import FullFineTuning, TopKFineTuning
from ftforget.methods.registry import load_method
from ftforget.runs import resolve_checkpoint
from ftforget.tasks.delta import BACKBONE, base_key_map, task_tensors
from ftforget.tasks.intruders import base_weights, layer_intruders


class Reduced(nn.Module):
    """A plain backbone with given weights and the run's head, offered to the probe (ProbedModel)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    @property
    def feature_module(self) -> nn.Module:
        return self.backbone

    def inference_context(self):
        return nullcontext()


def reduced_model(end, start, lam: float) -> Reduced:
    """``end``'s merged network as a plain timm backbone, each moved weight's intruders scaled by ``lam``."""
    hp = end.hparams
    plain = build_backbone(str(hp.backbone), **dict(hp.backbone_kwargs or {}))
    w1, w0 = base_weights(end), base_weights(start)
    with torch.no_grad(), end.inference_context():
        state = end.state_dict()
        full = {base: state[key].detach().clone() for key, base in base_key_map(end).items()}
        if isinstance(end, FullFineTuning | TopKFineTuning):  # they train the base's own tensors
            full.update(
                {
                    k[len(BACKBONE) :]: v.detach().clone()
                    for k, v in task_tensors(end).items()
                    if k.startswith(BACKBONE)
                }
            )
    full.update(w1)
    for k in w1:
        if k in w0 and not torch.equal(w0[k], w1[k]):
            full[k] = reduce_intruders(w0[k], w1[k], lam)
    plain.load_state_dict(full, strict=True)
    return Reduced(plain, end.head).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--lams", nargs="+", type=float, default=[1.0, 0.5, 0.0])
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device("cpu")
    print("| run | method | weights moved | intruders (top 10, eps 0.5) | " + " | ".join(
        f"lam={lam:g}: probe / new-task val" for lam in args.lams) + " |")  # fmt: skip
    print("|---|---|---|---|" + "---|" * len(args.lams))
    for run in args.runs:
        end = load_method(resolve_checkpoint(run, "last"))
        start, data, callback = step0_setup(run, None)
        found = layer_intruders(end, start)
        probe = callback.probe if callback.probe is not None else data.probe
        data.setup("fit")
        cells = []
        for lam in args.lams:
            model = reduced_model(end, start, lam)
            result = measure(model, probe, callback.config, device)
            with measurement_mode(model):
                val = loader_top1(model, data.val_dataloader(), device)
            k = callback.config.ks[0]
            cells.append(f"{100 * result.top1[k]:.2f} / {100 * val:.2f}")
        label = type(end).describe(dict(end.hparams))
        count = sum(f.count for f in found.values())
        print(
            f"| {run.parent.name} | {label} | {len(found)} | {count} | " + " | ".join(cells) + " |",
            flush=True,
        )
        del end, start


if __name__ == "__main__":
    main()
