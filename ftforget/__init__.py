"""ftforget: fine-tune pretrained ViTs and measure catastrophic forgetting step by step."""

__version__ = "0.1.0"
