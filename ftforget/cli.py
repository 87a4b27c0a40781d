"""The LightningCLI behind ``ftforget fit|validate|test|predict``.

``ftforget fit --config configs/<method>.yaml`` is a LightningCLI: every argument of the method
(``--model``), the data module (``--data``), the trainer (``--trainer``), the checkpointing
(``--checkpoint``) can be set from YAML or the command line, and ``--print_config`` shows them all.
ftforget's own commands (``measure``, ``report``, ``demo``) live in :mod:`ftforget.commands`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from jsonargparse.typing import PositiveInt
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ftforget.checkpointing import FTForgetCheckpoint
from ftforget.data.base import FineTuneDataModule
from ftforget.logging_setup import silence_known_noise
from ftforget.machine import configure_threads
from ftforget.methods.base import FineTuningModule
from ftforget.methods.schedule import DEFAULT_LR_SCHEDULER, DEFAULT_OPTIMIZER, resolve_spec
from ftforget.progress import with_default_progress_bar
from ftforget.resources import defaults_config


class FTForgetCLI(LightningCLI):
    """LightningCLI with the data's class count linked to the model and ftforget's checkpointing."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(FTForgetCheckpoint, "checkpoint")  # a crash: interrupted-step<N>.ckpt
        parser.set_defaults(
            {
                "checkpoint.monitor": "val/acc1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                "checkpoint.filename": "best-step{step}-acc{val/acc1:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "checkpoint.save_on_exception": True,  # nothing lost on a crash
            }
        )
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        # The paper's new task; a config or --data picks another data module.
        parser.set_defaults({"data": {"class_path": "ftforget.data.CIFAR100DataModule"}})
        # --optimizer / --lr_scheduler take any torch class; the method gets them as plain dicts (saved in
        # its hyperparameters) and builds them over its trainable parameters. Default: the paper's recipe.
        # Linked here rather than with link_to=, which would hand the method jsonargparse Namespaces.
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args((LRScheduler,))
        parser.set_defaults({"optimizer": DEFAULT_OPTIMIZER, "lr_scheduler": DEFAULT_LR_SCHEDULER})
        for key in ("optimizer", "lr_scheduler"):
            parser.link_arguments(key, f"model.init_args.{key}", compute_fn=partial(resolve_spec, what=key))
        parser.add_argument("--threads", type=PositiveInt | None, default=None,
                            help="torch CPU threads (default: torch's on a GPU, half the cores on a CPU)")  # fmt: skip

    def before_instantiate_classes(self) -> None:
        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        threads = self.config[self.subcommand].threads if self.subcommand else self.config.threads
        configure_threads(threads, trainer.accelerator)  # None: torch's on a GPU, half the cores on a CPU
        silence_known_noise()  # Lightning's LeafSpec deprecation warning and litlogger tip
        if trainer.precision is None and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            # bf16 autocast is the fast default on GPUs; --trainer.precision 32-true is the paper's fp32.
            trainer.precision = "bf16-mixed"
            rank_zero_info("trainer.precision not set: using bf16-mixed on this GPU (32-true for fp32)")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's, with ftforget's step-counting bar where Lightning would add its default bar."""
        trainer = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault(
            "callbacks",
            with_default_progress_bar(trainer.get("callbacks"), trainer.get("enable_progress_bar")),
        )
        return super().instantiate_trainer(**kwargs)


def run_lightning(argv: list[str] | None = None, run: bool = True) -> FTForgetCLI:
    """Runs a Lightning stage (``fit``, ``validate``, ``test``, ``predict``).

    Every stage starts from ``configs/defaults.yaml`` (the paper's shared recipe), then applies the
    ``--config`` files and options in the order given.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv``.
        run: run the stage; ``False`` only parses ``argv`` (no stage name then) and instantiates the
            model, data module and trainer.
    """
    # The paper's shared recipe (backbone, steps, logger), read before any --config; with subcommands the
    # parser of each stage needs it.
    defaults = {"default_config_files": [str(defaults_config())]}
    parser_kwargs = {stage: defaults for stage in FTForgetCLI.subcommands()} if run else defaults
    return FTForgetCLI(
        FineTuningModule,
        FineTuneDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        parser_kwargs=parser_kwargs,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=argv,
        run=run,
    )
