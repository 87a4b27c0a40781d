"""Hugging Face PEFT adapters on a timm ViT: injection, the adapters' parameters, merge, disable.

PEFT adapts whole modules named by ``target_modules``. timm's attention computes q, k and v with one
fused ``qkv`` Linear (output rows ``[q | k | v]``), so a PEFT config with ``target_modules: [qkv]``
adapts **all three** row blocks, k included, with one adapter per layer (for LoRA: one ``A`` shared by
the q, k and v rows and one ``B`` of ``3 * dim`` rows). Row by row, for a ``qkv`` target:

- LoRA / DoRA / PiSSA / OLoRA / AdaLoRA / LoHa / LoKr / VeRA: a low-rank (or Hadamard / Kronecker)
  update of the whole ``3 dim x dim`` weight: q, k and v rows;
- IA3: one learned scale per output row (q, k and v); as a ``feedforward_modules`` target (e.g.
  ``fc2``), one scale per *input* column instead;
- OFT / BOFT: a (block-diagonal / butterfly) orthogonal rotation of the layer's input space, which
  changes every output row.

None of them can leave the k rows alone, unlike ftforget's own :class:`~ftforget.adapters.lora.LoRALinear`
(the paper's q and v rows only). On a plain Linear (``proj``, ``fc1``, ``fc2``) PEFT's LoRA and
ftforget's are the same update ``scale * B @ A``.

The helpers select PEFT's modules by identity (instances of ``peft``'s ``BaseTunerLayer``) and their
parameters through each layer's declared ``adapter_layer_names``, never by key names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from peft import PeftConfig
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn

#: the adapter name every ftforget model uses (PEFT's default)
ADAPTER = "default"


def inject_peft(model: nn.Module, config: PeftConfig) -> BaseTuner:
    """Injects the adapters of ``config`` into ``model`` in place and returns PEFT's tuner object.

    As ``peft.inject_adapter_in_model``, but it keeps the tuner, which AdaLoRA's rank allocation needs
    and which owns the projections VeRA shares between layers. ``model`` itself stays the same object.

    Raises:
        ValueError: a prompt-learning config (it needs a Hugging Face transformer), a PEFT type that has no
            tuner, or ``target_modules`` that match no module (PEFT's message names them).
    """
    if config.is_prompt_learning or config.is_adaption_prompt:
        raise ValueError(
            f"{type(config).__name__} is a prompt-learning method for Hugging Face transformers; for ViTs use "
            "ftforget.methods.VisualPromptTuning"
        )
    tuner_cls = PEFT_TYPE_TO_TUNER_MAPPING.get(config.peft_type)
    if tuner_cls is None:
        raise ValueError(f"PEFT type {config.peft_type} has no tuner that can adapt a plain torch model")
    tuner = tuner_cls(model, config, adapter_name=ADAPTER)
    if tuner.model is not model:  # pragma: no cover - PEFT's contract
        raise RuntimeError("PEFT replaced the model instead of adapting it in place")
    return tuner


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    """Every PEFT adapter layer inside ``model`` (module order)."""
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every PEFT adapter of ``model``: for each adapter layer, the entries of its
    ``adapter_layer_names`` containers (``lora_A``, ``lora_B``, ``lora_magnitude_vector``, ``ia3_l``,
    ``oft_R``, ``hada_w1_a``, ...) for the adapter ``default``; each parameter once."""
    seen: dict[int, nn.Parameter] = {}
    for layer in tuner_layers(model):
        for name in layer.adapter_layer_names:
            container = getattr(layer, name, None)
            if container is None or ADAPTER not in container:
                continue
            item = container[ADAPTER]
            params = [item] if isinstance(item, nn.Parameter) else list(item.parameters())
            for p in params:
                seen.setdefault(id(p), p)
    return list(seen.values())


@contextmanager
def peft_disabled(model: nn.Module) -> Iterator[None]:
    """Every PEFT adapter of ``model`` switched off inside (the base layers alone: the pretrained
    function); on exit the adapters are on again and every ``requires_grad`` flag is as before."""
    layers = [layer for layer in tuner_layers(model) if not layer.disable_adapters]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if any(layer.merged for layer in layers):
        raise RuntimeError("peft_disabled: unmerge the adapters first (PEFT would unmerge them inexactly)")
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def can_merge(model: nn.Module) -> bool:
    """Whether every PEFT adapter layer of ``model`` has a ``merge`` (all of PEFT's Linear layers do)."""
    layers = tuner_layers(model)
    return bool(layers) and all(callable(getattr(layer, "merge", None)) for layer in layers)


@contextmanager
def peft_merged(model: nn.Module) -> Iterator[None]:
    """Every PEFT adapter merged into its base layer inside (one matmul per layer, the base's speed); on
    exit each base layer's tensors are restored bit for bit from a copy taken before the merge (PEFT's
    own ``unmerge`` subtracts the update again, which is not exact in floating point)."""
    layers = [layer for layer in tuner_layers(model) if not layer.merged and not layer.disable_adapters]
    backups = []
    try:
        for layer in layers:
            base = layer.get_base_layer()
            backups.append((layer, base, {k: v.detach().clone() for k, v in base.state_dict().items()}))
            layer.merge(adapter_names=[ADAPTER])
        yield
    finally:
        with torch.no_grad():
            for layer, base, saved in backups:
                for key, value in base.state_dict().items():
                    value.copy_(saved[key])
                layer.merged_adapters.clear()
