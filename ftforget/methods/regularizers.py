"""Anti-forgetting baselines that compose with every method: L2-SP, feature distillation, LP-FT.

Each is switched on by one argument of :class:`~ftforget.methods.base.FineTuningModule` (so by config, for
any method) and is off by default; off, it adds no parameter, buffer or computation, so training is
bit-identical to the plain method.

- **L2-SP** (Li et al., 2018), ``l2sp_weight`` = λ: adds ``λ Σ ||θ - θ0||²`` over the method's trainable
  backbone parameters, ``θ0`` their values at step 0 (kept as buffers, so also in checkpoints: a resumed
  run pulls toward the same point). The head is left out: its step-0 value is a random initialisation, not
  pretrained knowledge. The gradient of the term is ``2 λ (θ - θ0)``.
- **Feature distillation** (LDIFS-style, Mukhoti et al., 2023), ``distill_weight`` = λ: adds
  ``λ · mean_batch ||f(x) - f0(x)||²``, where ``f`` is the backbone feature the probe measures (CLS after
  the final norm) and ``f0`` the same feature of the frozen step-0 network, on the new-task batch. The
  step-0 network needs no second copy where the method can switch its change off: LoRA runs its backbone
  with the adapters disabled, Block Expansion without its new blocks. Full and top-k fine-tuning keep a
  frozen copy of the backbone (for ViT-B/16: 85.8M parameters, 343 MB in fp32, also stored in checkpoints)
  and spend one more forward pass (no backward) per step.
- **The anchor** of both, ``anchor_weights``: by default ``θ0`` and ``f0`` are this run's step-0 backbone.
  A backbone weights file instead (the same formats as ``checkpoint``) makes both pull toward those
  weights: in a stream (:mod:`ftforget.stream`), where each task starts from the previous task's end,
  the pretrained start rather than the previous task. L2-SP is then measured on the backbone's weights
  under their timm names (:meth:`~ftforget.methods.base.FineTuningModule.anchored_weights`; LoRA: each
  adapted projection's weight with its update, ``W + scale · B @ A``), and distillation keeps a frozen
  network built from the file (a second copy for every method).
- **LP-FT** (Kumar et al., 2022): the head is first trained as a linear probe, then the method trains. Either
  from a linear-probe run (``head_from``: its checkpoint's head initialises this run's head) or as a first
  stage inside one run (``lp_steps``: for the first steps only the head gets gradients; the backbone's
  trainable parameters get none, so every optimiser leaves them bit-identical).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

from ftforget.runs import require_run, resolve_checkpoint

#: the option prefix in messages (the CLI's and the configs' spelling)
OPTION = "model.init_args"


def regularizer_suffix(init_args: dict) -> str:
    """How a table names the baselines switched on, e.g. `` + L2-SP 0.01 + LP-FT 50 steps``."""
    parts = []
    to = " to anchor" if init_args.get("anchor_weights") else ""
    if init_args.get("l2sp_weight"):
        parts.append(f"L2-SP {init_args['l2sp_weight']:g}{to}")
    if init_args.get("distill_weight"):
        parts.append(f"distill {init_args['distill_weight']:g}{to}")
    if init_args.get("lp_steps"):
        parts.append(f"LP-FT {init_args['lp_steps']} steps")
    if init_args.get("head_from"):
        parts.append("LP-FT head")
    return "".join(f" + {p}" for p in parts)


def check_weight(name: str, value: float) -> float:
    """A penalty weight: a finite number >= 0."""
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{OPTION}.{name} must be a finite number >= 0, got {value}")
    return value


class Anchors(nn.Module):
    """The step-0 values of parameters, as buffers (state-dict keys ``<param name with '.' -> '__'>``)."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        self.names = [name for name, _ in named]
        for name, param in named:
            self.register_buffer(name.replace(".", "__"), param.detach().clone())

    def anchor(self, name: str) -> torch.Tensor:
        return getattr(self, name.replace(".", "__"))


def l2sp_penalty(module: nn.Module, anchors: Anchors) -> torch.Tensor:
    """``Σ ||θ - θ0||²`` over the anchored parameters of ``module`` (unweighted)."""
    params = dict(module.named_parameters())
    total = torch.zeros((), device=next(iter(params.values())).device)
    for name in anchors.names:
        theta = params[name]
        total = total + (theta - anchors.anchor(name).to(theta.dtype)).pow(2).sum()
    return total


def l2sp_distance(values: dict[str, torch.Tensor], anchors: Anchors) -> torch.Tensor:
    """``Σ ||w - w0||²`` over ``values`` (name -> the current, differentiable weight), ``w0`` its anchor."""
    total = torch.zeros((), device=next(iter(values.values())).device)
    for name in anchors.names:
        value = values[name]
        total = total + (value - anchors.anchor(name).to(value.dtype)).pow(2).sum()
    return total


def anchor_state(name: str, path: str, backbone_kwargs: dict) -> tuple[dict[str, torch.Tensor], nn.Module]:
    """The backbone ``name`` built from the weights file ``path`` (frozen, eval mode) and its state dict.

    ``backbone_kwargs`` are the run's; where the file holds another number of blocks than their ``depth``
    (a stream of Block Expansion grows the network every task, the anchor is its start), the file's count
    is used.

    Raises:
        FileNotFoundError: ``path`` does not exist (named as the option).
    """
    from ftforget.backbones import CheckpointError, _read_file, build_backbone, normalize_state_dict

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{OPTION}.anchor_weights: backbone weights file {path!r} does not exist")
    kwargs = dict(backbone_kwargs or {})
    if "depth" in kwargs:
        blocks = {k.split(".")[1] for k in normalize_state_dict(_read_file(file)) if k.startswith("blocks.")}
        if blocks:
            kwargs["depth"] = len(blocks)
    try:
        network = frozen_copy(build_backbone(name, checkpoint=file, **kwargs))
    except CheckpointError as err:
        raise CheckpointError(f"{OPTION}.anchor_weights: {err}") from None
    return {k: v.detach() for k, v in network.state_dict().items()}, network


def distillation_loss(features: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """``mean_batch ||f - f0||²`` (squared L2 distance per sample, summed over the feature, batch mean)."""
    return (features - frozen.detach().to(features.dtype)).pow(2).sum(dim=-1).mean()


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every parameter frozen, in eval mode."""
    teacher = copy.deepcopy(module)
    teacher.requires_grad_(False)
    return teacher.eval()


def load_head(source: str, head: nn.Linear) -> str:
    """Copies the head of a run or checkpoint into ``head`` (``head_from``, LP-FT's second stage).

    Args:
        source: a ``.ckpt`` file, or a run directory (its ``best`` checkpoint, the one selected on validation).
        head: this model's head; its shape must match the checkpoint's.

    Returns:
        The checkpoint file the head came from.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = resolve_checkpoint(require_run(path, f"{OPTION}.head_from"), "best")
    if not path.is_file():
        raise FileNotFoundError(f"{OPTION}.head_from: {str(path)!r} is neither a checkpoint file nor a run")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise ValueError(
            f"{OPTION}.head_from: {str(path)!r} is not a readable Lightning checkpoint ({err})"
        ) from None
    weight, bias = state.get("head.weight"), state.get("head.bias")
    if weight is None or bias is None:
        raise ValueError(f"{OPTION}.head_from: {str(path)!r} has no 'head.weight'/'head.bias'")
    if tuple(weight.shape) != tuple(head.weight.shape):
        raise ValueError(
            f"{OPTION}.head_from: the head in {str(path)!r} is {tuple(weight.shape)} (classes x feature), this "
            f"model's is {tuple(head.weight.shape)}: the probe must be of the same backbone and task"
        )
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return str(path)


def load_earlier_head(source: str, head: nn.Linear, rows: int) -> str:
    """Copies the head of a checkpoint into the first ``rows`` rows of ``head`` (``earlier_head_from``, a
    class-incremental task: the earlier tasks' classes come first); the other rows are left as they are.

    Args:
        source: a ``.ckpt`` file (a stream gives the previous task's ``last.ckpt``).
        head: this model's head, over ``rows`` earlier classes and this task's.
        rows: the earlier classes (``label_offset``); the checkpoint's head must have exactly as many.

    Returns:
        The checkpoint file the rows came from.
    """
    option = f"{OPTION}.earlier_head_from"
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{option}: checkpoint file {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    except Exception as err:  # torch raises many types for a file that is not a checkpoint
        raise ValueError(f"{option}: {str(path)!r} is not a readable Lightning checkpoint ({err})") from None
    weight, bias = state.get("head.weight"), state.get("head.bias")
    if weight is None or bias is None:
        raise ValueError(f"{option}: {str(path)!r} has no 'head.weight'/'head.bias'")
    expected = (rows, head.weight.shape[1])
    if tuple(weight.shape) != expected:
        raise ValueError(
            f"{option}: the head in {str(path)!r} is {tuple(weight.shape)} (classes x feature); with "
            f"{OPTION}.label_offset {rows} it must be {expected}: the earlier tasks' head on the same backbone"
        )
    with torch.no_grad():
        head.weight[:rows].copy_(weight)
        head.bias[:rows].copy_(bias)
    return str(path)
