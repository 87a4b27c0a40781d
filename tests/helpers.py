"""Test-only callbacks (importable by name from CLI configs, e.g. ``tests.helpers.LrRecorder``), data and trainers."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset


class LrRecorder(L.Callback):
    """Appends ``{"step", "lr"}`` before every optimizer step to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.is_global_zero:
            with self.path.open("a") as f:
                lr = trainer.optimizers[0].param_groups[0]["lr"]
                f.write(json.dumps({"step": trainer.global_step, "lr": lr}) + "\n")


class StopAfter(L.Callback):
    """Saves a checkpoint at global step ``step`` and stops the fit there, like a crash after a save."""

    def __init__(self, step: int, path: str) -> None:
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)
            trainer.should_stop = True


class DumpTrainable(L.Callback):
    """Each rank saves its trainable parameters at the end of the fit to ``out_dir/rank{r}.pt``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        state = {n: p.detach().cpu().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save(
            {"state": state, "world_size": trainer.world_size, "step": trainer.global_step},
            self.out_dir / f"rank{trainer.global_rank}.pt",
        )


class RandomImages(L.LightningDataModule):
    """A fixed random classification task, for tests that need a Trainer but no real data."""

    def __init__(self, n: int = 24, num_classes: int = 5, batch_size: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, 32, 32, generator=g)
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        self.num_classes, self.batch_size = num_classes, batch_size
        self.probe = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=self.batch_size)


def quiet_trainer(tmp_path, **kwargs) -> L.Trainer:
    """A CPU trainer that writes nothing but what a test asks for."""
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


@contextmanager
def warnings_of(name: str) -> Iterator[list[str]]:
    """The warning messages of logger ``name`` (a handler of its own: ``ftforget`` may not propagate)."""
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger, handler = logging.getLogger(name), Collect(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


class KillAt(L.Callback):
    """SIGKILLs its own process right after optimizer step ``step``: no hook, no checkpoint, no cleanup."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def tiny_trainer_options(tmp_path, steps: int) -> dict[str, str]:
    """CLI trainer options of a short, quiet CPU fit that validates at its last step and logs under
    ``tmp_path/runs`` (``--key value`` pairs without the dashes)."""
    return {
        "trainer.max_steps": str(steps),
        "trainer.val_check_interval": str(steps),
        "trainer.limit_val_batches": "2",
        "trainer.accelerator": "cpu",
        "trainer.devices": "1",
        "trainer.enable_progress_bar": "false",
        "trainer.enable_model_summary": "false",
        "trainer.logger.init_args.save_dir": str(tmp_path / "runs"),
    }


class SigtermAt(L.Callback):
    """Sends SIGTERM to its own process once, at global step ``step``, from ``hook``: ``batch_end`` (between two
    batches) or ``epoch_end`` (in the epoch-end hooks). ``once`` is a file it creates when it fires, so that a
    resumed fit (whose config.yaml holds this callback too) runs on."""

    def __init__(self, step: int, hook: str, once: str) -> None:
        self.step, self.hook, self.once = step, hook, once

    def _fire(self, trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.step and not os.path.exists(self.once):
            open(self.once, "w").close()
            os.kill(os.getpid(), signal.SIGTERM)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._fire(trainer, "batch_end")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._fire(trainer, "epoch_end")
