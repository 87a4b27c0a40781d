"""One LightningModule per adaptation method, all on :class:`FineTuningModule`."""

from ftforget.methods.base import FineTuningModule, warmup_cosine
from ftforget.methods.block_expansion import BlockExpansion
from ftforget.methods.full import FullFineTuning
from ftforget.methods.linear import LinearProbing
from ftforget.methods.lora import LoRA
from ftforget.methods.peft_method import PeftMethod
from ftforget.methods.topk import TopKFineTuning
from ftforget.methods.vision_peft import SSF, AdaptFormer, BitFit, VisualPromptTuning

__all__ = [
    "SSF",
    "AdaptFormer",
    "BitFit",
    "BlockExpansion",
    "FineTuningModule",
    "FullFineTuning",
    "LinearProbing",
    "LoRA",
    "PeftMethod",
    "TopKFineTuning",
    "VisualPromptTuning",
    "warmup_cosine",
]
