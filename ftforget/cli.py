"""The LightningCLI behind ``ftforget fit|validate|test|predict``.

``ftforget fit --config configs/<method>.yaml`` is a LightningCLI: every argument of the method
(``--model``), the data module (``--data``), the trainer (``--trainer``), the checkpointing
(``--checkpoint``) can be set from YAML or the command line, and ``--print_config`` shows them all.
ftforget's own commands (``measure``, ``report``, ``demo``) live in :mod:`ftforget.commands`.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from jsonargparse.typing import PositiveInt
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ftforget.backbones import input_size, weights_restored_later
from ftforget.checkpoint_io import with_atomic_checkpoint_io
from ftforget.checkpointing import FTForgetCheckpoint
from ftforget.config_files import check_config_files
from ftforget.data.base import FineTuneDataModule
from ftforget.guards import NonFiniteLossGuard
from ftforget.logging_setup import silence_known_noise
from ftforget.machine import configure_threads
from ftforget.methods.base import FineTuningModule
from ftforget.methods.registry import MethodCheckpointError, checkpoint_method, checkpoint_names
from ftforget.methods.schedule import DEFAULT_LR_SCHEDULER, DEFAULT_OPTIMIZER, resolve_spec
from ftforget.progress import with_default_progress_bar
from ftforget.resources import defaults_config
from ftforget.runs import (
    RunError,
    append_test_result,
    expand_run_options,
    find_run_dir,
    holds_run,
    lock_run,
    release_runs,
    resolve_checkpoint,
)
from ftforget.slurm import keep_running_on_usr1, under_slurm, with_cluster_environment
from ftforget.validation import LastStepValidation


class FTForgetCLI(LightningCLI):
    """LightningCLI with the data's class count linked to the model and ftforget's checkpointing."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("model.init_args.backbone", "data.init_args.backbone")  # its mean/std
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

    def _parse_ckpt_path(self) -> None:
        """Lightning merges a checkpoint's saved hyperparameters into the configuration here, importing the
        class it names. ftforget does not: the user's configuration builds the model (a run's own
        ``config.yaml`` via ``--run``/``--resume``), and :meth:`before_instantiate_classes` checks that the
        checkpoint was saved by the same registered method, without importing anything it names."""

    def before_instantiate_classes(self) -> None:
        if self.subcommand:
            self._bind_to_run(self.config[self.subcommand])
        trainer = self.config[self.subcommand].trainer if self.subcommand else self.config.trainer
        threads = self.config[self.subcommand].threads if self.subcommand else self.config.threads
        configure_threads(threads, trainer.accelerator)  # None: torch's on a GPU, half the cores on a CPU
        silence_known_noise()  # Lightning's LeafSpec deprecation warning and litlogger tip
        if trainer.precision is None and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            # bf16 autocast is the fast default on GPUs; --trainer.precision 32-true is the paper's fp32.
            trainer.precision = "bf16-mixed"
            rank_zero_info("trainer.precision not set: using bf16-mixed on this GPU (32-true for fp32)")

    def _bind_to_run(self, config: Namespace) -> None:
        """A stage with a checkpoint of a run (resume, test, validate) resolves ``best``/``last`` to the run's
        files, logs into that run's own directory, keeps its ``config.yaml``, and builds the model without
        loading or downloading weights (the checkpoint restores them all)."""
        ckpt = config.get("ckpt_path")
        self._restoring = ckpt is not None
        self._ckpt_step = 0
        needs_run = self.subcommand != "fit" or ckpt is not None
        run_dir = find_run_dir(list(config.get("config") or []), ckpt) if needs_run else None
        self._run_dir, self._ckpt_alias = run_dir, ckpt
        if ckpt in ("best", "last"):
            config.ckpt_path = ckpt = str(resolve_checkpoint(run_dir, ckpt))
        if ckpt is not None:
            self._check_method(Path(ckpt), config)
        if run_dir is None:
            return
        logger = config.trainer.get("logger")
        if isinstance(logger, Namespace) and str(logger.get("class_path", "")).endswith("TensorBoardLogger"):
            logger.init_args.save_dir = str(run_dir.parent.parent)
            logger.init_args.name = run_dir.parent.name
            logger.init_args.version = run_dir.name
        self.save_config_callback = None  # the run's config.yaml stays the one that reproduces it

    def _check_method(self, ckpt: Path, config: Namespace) -> None:
        if not ckpt.is_file():
            raise RunError(f"--ckpt_path {str(ckpt)!r} does not exist")
        try:
            state = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises many types for a file that is not a checkpoint
            raise RunError(
                f"--ckpt_path {str(ckpt)!r} is not a readable Lightning checkpoint: {err}"
            ) from None
        self._ckpt_step = int(state.get("global_step", 0))
        if not checkpoint_names(state):
            return  # a plain Lightning checkpoint: its strict loading reports any mismatch
        try:
            saved = checkpoint_method(state)
        except MethodCheckpointError as err:
            raise RunError(f"--ckpt_path {str(ckpt)!r}: {err}") from None
        class_path = str(config.model.get("class_path", ""))
        if class_path.rsplit(".", 1)[-1] != saved.__name__:
            raise RunError(
                f"--ckpt_path {str(ckpt)!r} was saved by {saved.__name__}, but the configuration builds "
                f"{class_path or 'another model'}: pass the run's own config (ftforget test --run RUN_DIR, "
                "ftforget fit --resume RUN_DIR, or --config RUN_DIR/config.yaml)"
            )

    def _preflight(self, stage: str) -> None:
        """The data module and the callbacks check their inputs before the trainer creates the run
        directory: a failed start leaves nothing behind."""
        match = getattr(self.datamodule, "match_input_size", None)
        size = input_size(getattr(self.model, "backbone", None))
        if callable(match) and size is not None:
            match(size)  # image_size null: the data follows the built backbone
        check = getattr(self.datamodule, "check_inputs", None)
        if callable(check):
            check(stage)
        for callback in self.trainer.callbacks:
            check = getattr(callback, "check_inputs", None)
            if callable(check):
                check(self.datamodule, self.model, stage)

    def _own_run_dir(self) -> None:
        """This process becomes the run directory's one writer: a fresh fit refuses a directory that already
        holds a run (``--resume`` is the way in), and a lock refuses a second process writing the same run."""
        run_dir = getattr(self, "_run_dir", None)
        if run_dir is None:
            log_dir = self.trainer.log_dir
            if log_dir is None or not self.trainer.loggers:
                return
            run_dir = Path(log_dir)
            if holds_run(run_dir):
                raise RunError(
                    f"run directory {str(run_dir)!r} already holds a run: resume it with ftforget fit --resume "
                    f"{run_dir}, or give the new run another --trainer.logger.init_args.version"
                )
        lock_run(run_dir)
        # Lightning's fallback directory, where under SLURM a fit without ckpt_path would load the newest
        # hpc_ckpt_<n>.ckpt it finds: the run's own directory, never a working directory shared with other
        # runs (Trainer(default_root_dir=...) comes before the logger that names the run, hence here).
        self.trainer._default_root_dir = str(run_dir)
        self.owned_run_dir = run_dir  # every rank knows it: no collective needed to ask later

    def before_fit(self) -> None:
        self._preflight("fit")
        self._own_run_dir()
        if under_slurm():
            keep_running_on_usr1()  # SLURM's warning signal must not kill the fit (ftforget.slurm)

    def _log_at_checkpoint_step(self) -> None:
        # Lightning restores only the weights for validate/test and logs at step 0; the run's curves need
        # the result at the step the checkpoint was taken (Lightning's logging step counter, set once here).
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = getattr(self, "_ckpt_step", 0)

    def before_validate(self) -> None:
        self._preflight("validate")
        self._own_run_dir()
        self._log_at_checkpoint_step()

    def before_test(self) -> None:
        self._preflight("test")
        self._own_run_dir()
        self._log_at_checkpoint_step()

    def after_test(self) -> None:
        """A test of a run's checkpoint is recorded in the run (``test_results.jsonl``): which checkpoint,
        its step, and the metrics."""
        run_dir = getattr(self, "_run_dir", None)
        if run_dir is None or not self.trainer.is_global_zero:
            return
        ckpt = Path(self.config[self.subcommand].ckpt_path)
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        record = {"checkpoint": ckpt.name, "requested": self._ckpt_alias, "step": self._ckpt_step, **metrics}
        append_test_result(run_dir, record)

    def instantiate_classes(self) -> None:
        # A checkpoint restores every weight: build the backbone without its weights file or a download.
        with weights_restored_later() if getattr(self, "_restoring", False) else nullcontext():
            super().instantiate_classes()

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's, with ftforget's step-counting bar where Lightning would add its default bar, the
        non-finite loss guard, a validation at the last training step (:mod:`ftforget.validation`), and atomic
        checkpoint writes unless a CheckpointIO plugin is configured."""
        trainer = self._get(self.config_init, "trainer", default={})
        kwargs.setdefault(
            "callbacks",
            [*with_default_progress_bar(trainer.get("callbacks"), trainer.get("enable_progress_bar")),
             NonFiniteLossGuard(), LastStepValidation()],
        )  # fmt: skip
        # Inside a SLURM job: Lightning's SLURM environment without its own requeue (ftforget.slurm's instead)
        kwargs.setdefault(
            "plugins", with_cluster_environment(with_atomic_checkpoint_io(trainer.get("plugins")))
        )
        if self.subcommand == "fit" and trainer.get("max_steps") == 0:
            raise ValueError("--trainer.max_steps 0: a fit of 0 optimizer steps trains nothing (give >= 1)")
        return super().instantiate_trainer(**kwargs)


@contextmanager
def _releasing_runs() -> Iterator[None]:
    # A stage releases the run directories it locked when it ends, so that the next stage of the same
    # process (a sweep's test after its fit) can take them.
    try:
        yield
    finally:
        release_runs()


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
    if argv is not None and run:
        argv = expand_run_options(list(argv))
    check_config_files(list(argv or []))  # a malformed YAML file: named, with its line
    defaults = {"default_config_files": [str(defaults_config())]}
    parser_kwargs = {stage: defaults for stage in FTForgetCLI.subcommands()} if run else defaults
    with warnings.catch_warnings(), _releasing_runs():
        # ftforget hands LightningCLI its (expanded) arguments on purpose, also when they came from sys.argv.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
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
