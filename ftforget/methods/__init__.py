"""One LightningModule per adaptation method, all on :class:`FineTuningModule`."""

from ftforget.methods.base import FineTuningModule, warmup_cosine
from ftforget.methods.block_expansion import BlockExpansion
from ftforget.methods.full import FullFineTuning
from ftforget.methods.linear import LinearProbing
from ftforget.methods.lora import LoRA
from ftforget.methods.topk import TopKFineTuning

__all__ = [
    "BlockExpansion",
    "FineTuningModule",
    "FullFineTuning",
    "LinearProbing",
    "LoRA",
    "TopKFineTuning",
    "warmup_cosine",
]
