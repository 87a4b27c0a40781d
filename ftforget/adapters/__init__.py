"""Network surgery in plain PyTorch (no Lightning): LoRA and Block Expansion here; the PEFT-issue adapters
(``bitfit``, ``ssf``, ``adaptformer``, ``prompts``, ``peft_layers``, ``intruders``) are imported from their modules."""

from ftforget.adapters.block_expansion import expand, identity_copy, paper_positions
from ftforget.adapters.lora import (
    LORA_TARGETS,
    LoRALinear,
    apply_lora,
    lora_disabled,
    lora_merged,
    lora_modules,
    merge_lora,
    unmerge_lora,
)

__all__ = [
    "LORA_TARGETS",
    "LoRALinear",
    "apply_lora",
    "expand",
    "identity_copy",
    "lora_disabled",
    "lora_merged",
    "lora_modules",
    "merge_lora",
    "paper_positions",
    "unmerge_lora",
]
