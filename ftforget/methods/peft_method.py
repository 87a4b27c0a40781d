"""Any Hugging Face PEFT method on the timm backbone: LoRA and its variants, LoHa, LoKr, OFT, BOFT, IA3, VeRA,
AdaLoRA, given as a PEFT config.

In YAML, through jsonargparse (every option of the PEFT class is checked when the config is parsed)::

    model:
      class_path: ftforget.methods.PeftMethod
      init_args:
        peft_config:
          class_path: peft.LoraConfig
          init_args: {r: 8, lora_alpha: 8, target_modules: [qkv], use_dora: true}

Target names are timm's module names (``qkv``, ``proj``, ``fc1``, ``fc2``; ``attn.qkv`` or a regular
expression also work, as in PEFT). Which rows of the fused ``qkv`` each PEFT method changes:
:mod:`ftforget.adapters.peft_layers`.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import peft
import torch
from peft import PeftConfig

from ftforget.adapters.peft_layers import (
    ADAPTER,
    adapter_parameters,
    can_merge,
    inject_peft,
    peft_disabled,
    peft_merged,
    tuner_layers,
)
from ftforget.methods.base import FineTuningModule

#: the PEFT config classes ftforget has tests for (any other tuner config of peft is accepted too)
TESTED_CONFIGS = (
    "LoraConfig", "LoHaConfig", "LoKrConfig", "OFTConfig", "BOFTConfig", "IA3Config", "VeraConfig", "AdaLoraConfig",
)  # fmt: skip
_LABELS = {"LoraConfig": "LoRA", "AdaLoraConfig": "AdaLoRA", "VeraConfig": "VeRA", "IA3Config": "IA3"}


def _plain(value: Any) -> Any:
    """A config value as YAML/``weights_only``-safe python (sets sorted into lists, enums as values)."""
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return sorted(_plain(v) for v in value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    return value


def config_spec(config: PeftConfig | dict[str, Any]) -> dict[str, Any]:
    """``{"class_path": "peft.<Config>", "init_args": {...}}``: the options of a PEFT config that differ
    from that class's defaults, as plain values (what checkpoints and ``hparams.yaml`` store)."""
    if isinstance(config, dict):
        config = build_config(config)
    init_args = {}
    for field in dataclasses.fields(config):
        if not field.init or field.name in ("peft_type", "task_type", "peft_version", "auto_mapping"):
            continue
        value = getattr(config, field.name)
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = dataclasses.MISSING
        if default is dataclasses.MISSING or _plain(value) != _plain(default):
            init_args[field.name] = _plain(value)
    return {"class_path": f"peft.{type(config).__name__}", "init_args": init_args}


def build_config(spec: PeftConfig | dict[str, Any]) -> PeftConfig:
    """The PEFT config of a ``{"class_path", "init_args"}`` spec (only classes of the ``peft`` package,
    looked up by name: nothing else is imported).

    Raises:
        ValueError: the class is not a PEFT config of the installed peft, or an option is unknown.
    """
    if isinstance(spec, PeftConfig):
        return copy.deepcopy(spec)  # PEFT's tuner edits its config (e.g. target_modules into a set)
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(
            f"model.peft_config: expected a PEFT config or {{class_path, init_args}}, got {spec!r}"
        )
    class_path = str(spec["class_path"])
    name = class_path.rsplit(".", 1)[-1]
    cls = getattr(peft, name, None)
    if not (isinstance(cls, type) and issubclass(cls, PeftConfig)) or class_path not in (
        name,
        f"peft.{name}",
    ):
        raise ValueError(
            f"model.peft_config: {class_path!r} is not a config class of peft {peft.__version__}; "
            f"e.g. {', '.join('peft.' + c for c in TESTED_CONFIGS)}"
        )
    init_args = dict(spec.get("init_args") or {})
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(init_args) - known)
    if unknown:
        raise ValueError(f"model.peft_config: {name} has no option(s) {unknown}")
    return cls(**init_args)


class PeftMethod(FineTuningModule):
    """Fine-tuning with a Hugging Face PEFT adapter; exactly PEFT's adapter parameters and the head train.

    Args:
        peft_config: a PEFT config (``peft.LoraConfig``, ``LoHaConfig``, ``LoKrConfig``, ``OFTConfig``,
            ``BOFTConfig``, ``IA3Config``, ``VeraConfig``, ``AdaLoraConfig``, ...; LoRA variants through its
            options: ``use_dora``, ``init_lora_weights: pissa | olora | gaussian | ...``). Stored in the
            checkpoint as the options that differ from PEFT's defaults. ``bias`` other than ``none`` and
            ``modules_to_save`` are refused: they would train base parameters PEFT does not count as its own.
        **kwargs: the arguments of :class:`FineTuningModule`.

    The probe's feature is the backbone's (CLS after the final norm), computed with the adapters merged into
    the base weights where PEFT can merge (every Linear adapter), restored bit for bit after.
    """

    def __init__(self, peft_config: PeftConfig, **kwargs: Any) -> None:
        config = build_config(peft_config)
        peft_config = config_spec(config)  # noqa: F841 - what save_hyperparameters records, plain values
        if getattr(config, "bias", "none") != "none" or getattr(config, "modules_to_save", None):
            raise ValueError(
                "model.peft_config: bias must be 'none' and modules_to_save empty (use BitFit for biases; the "
                "head always trains)"
            )
        super().__init__(**kwargs)
        self._peft_tuner = [inject_peft(self.backbone, config)]  # a list: outside the module tree
        adapters = adapter_parameters(self.backbone)
        marked = [p for p in self.backbone.parameters() if p.requires_grad]
        if {id(p) for p in adapters} != {id(p) for p in marked} or not adapters:
            raise RuntimeError(
                f"PEFT marked {len(marked)} trainable tensors, its adapter layers hold {len(adapters)}: this "
                f"peft version ({peft.__version__}) is not one ftforget supports"
            )
        self.set_trainable([*adapters, self.head])

    @classmethod
    def describe(cls, init_args: dict[str, Any]) -> str:
        """E.g. ``PEFT LoRA r=8 (qkv)``, ``PEFT DoRA r=8 (qkv)``, ``PEFT LoHa r=4 (qkv)``."""
        spec = init_args.get("peft_config") or {}
        try:
            config = build_config(spec)
        except ValueError:
            return "PEFT"
        name = type(config).__name__
        label = _LABELS.get(name, name.removesuffix("Config"))
        if getattr(config, "use_dora", False):
            label = "DoRA"
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str):
            label += f" ({init.split('_')[0]} init)"
        keys = (
            ("init_r", "target_r")
            if isinstance(config, peft.AdaLoraConfig)
            else ("r", "oft_block_size", "boft_block_size")
        )
        settings = [f"{k}={getattr(config, k)}" for k in keys if getattr(config, k, 0)]
        targets = config.target_modules
        target = ",".join(sorted(targets)) if isinstance(targets, set | list | tuple) else str(targets)
        return f"PEFT {label} {' '.join(settings)} ({target})".replace("  ", " ")

    @property
    def peft_tuner(self) -> Any:
        """PEFT's tuner object (``LoraModel``, ``AdaLoraModel``, ...) around ``self.backbone``."""
        return self._peft_tuner[0]

    def inference_context(self) -> AbstractContextManager:
        """The adapters merged into the base weights while measuring (the base's speed), restored exactly."""
        return peft_merged(self.backbone) if can_merge(self.backbone) else nullcontext()

    @property
    def base_untouched(self) -> bool:
        """Whether PEFT left the base weights as they were: false for the LoRA inits that move part of the
        weight into the adapter (PiSSA, OLoRA, LoftQ, CorDA, EVA, ...: ``init_lora_weights`` a string other
        than ``gaussian``). Then the adapters off is not the pretrained network."""
        init = getattr(self.peft_tuner.peft_config[ADAPTER], "init_lora_weights", True)
        return not isinstance(init, str) or init == "gaussian"

    @property
    def starts_as_identity(self) -> bool:
        """Whether the adapters start as the identity, so that step 0 is the pretrained network: PEFT's
        default inits (``init_lora_weights``, ``init_weights``, ``init_ia3_weights`` true, or LoRA's
        ``gaussian``); false for random inits (``false``) and for PiSSA-like ones."""
        config = self.peft_tuner.peft_config[ADAPTER]
        for name in ("init_lora_weights", "init_weights", "init_ia3_weights"):
            if hasattr(config, name):
                value = getattr(config, name)
                return value is True or value == "gaussian"
        return False

    def pretrained_context(self) -> AbstractContextManager | None:
        """PEFT's adapters switched off: the step-0 (pretrained) function, with no copy of any weight; None
        where the adapters do not start as the identity (:attr:`starts_as_identity`)."""
        return peft_disabled(self.backbone) if self.starts_as_identity else None

    @torch.no_grad()
    def apply_knob(self, start: FineTuningModule, a: float) -> None:
        """The knob for PEFT adapters. LoRA-type adapters whose ``B`` starts at zero (LoRA, DoRA's low-rank
        part, AdaLoRA; :attr:`starts_as_identity`): the adapter scale times ``a``, since the update
        ``scale * B @ A`` is all that changed. Every other adapter parameter (DoRA's magnitudes, LoHa, LoKr,
        OFT, BOFT, IA3, VeRA, and PiSSA-like inits whose ``B`` does not start at zero): ``W0 + a (W1 - W0)``,
        ``W0`` its step-0 value. ``a = 0`` is the step-0 network and ``a = 1`` the checkpoint, exactly."""
        from peft.tuners.lora import LoraLayer

        layers = tuner_layers(self.backbone) if self.starts_as_identity else []
        scaled = [layer for layer in layers if isinstance(layer, LoraLayer)]
        keep = {id(p) for layer in scaled for n in ("lora_A", "lora_B", "lora_E") for p in _params(layer, n)}
        self.check_knob_start(start)
        starts = dict(start.backbone.named_parameters())
        for name, p in self.backbone.named_parameters():
            if p.requires_grad and id(p) not in keep:
                p.copy_(torch.lerp(starts[name].to(p.device, p.dtype), p, a))
        for layer in scaled:
            layer.scaling[ADAPTER] = layer.scaling[ADAPTER] * a

    def method_loss_terms(self) -> dict[str, torch.Tensor]:
        """AdaLoRA's orthogonality penalty, as ``AdaLoraModel.forward`` adds it (``train/loss_orth``):
        ``orth_reg_weight`` times the mean over its A and B of ``||A A^T - I||_F`` and ``||B^T B - I||_F``."""
        weight = float(getattr(self.peft_tuner.peft_config[ADAPTER], "orth_reg_weight", 0.0) or 0.0)
        if not isinstance(self.peft_tuner, peft.AdaLoraModel) or weight == 0:
            return {}
        norms = []
        for layer in tuner_layers(self.backbone):
            for a in _params(layer, "lora_A"):
                norms.append(
                    torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0], dtype=a.dtype, device=a.device))
                )
            for b in _params(layer, "lora_B"):
                norms.append(
                    torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1], dtype=b.dtype, device=b.device))
                )
        return {"orth": weight * torch.stack(norms).mean()}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        total = getattr(self.peft_tuner.peft_config[ADAPTER], "total_step", None)
        if isinstance(self.peft_tuner, peft.AdaLoraModel) and total != self.trainer.max_steps:
            raise ValueError(
                f"model.peft_config: AdaLoRA's total_step ({total}) must equal trainer.max_steps "
                f"({self.trainer.max_steps}): its rank budget follows that schedule"
            )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # AdaLoRA reallocates its ranks from the gradients of the step just taken (before they are zeroed).
        if isinstance(self.peft_tuner, peft.AdaLoraModel):
            self.peft_tuner.update_and_allocate(self.global_step)


def _params(layer: Any, name: str) -> list[torch.nn.Parameter]:
    container = getattr(layer, name, None)
    if container is None or ADAPTER not in container:
        return []
    item = container[ADAPTER]
    return [item] if isinstance(item, torch.nn.Parameter) else list(item.parameters())
