"""Shared pieces of the forgetting tests: a synthetic probe, a tiny data module, fits, and the DDP workers.

A plain module (not a conftest) so that processes started with ``spawn`` can import the same classes.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import socket
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, Dataset, TensorDataset

from ftforget.data.probe import IndexedDataset, ProbeData
from ftforget.forgetting.config import KNNConfig
from ftforget.methods import FullFineTuning
from ftforget.methods.schedule import paper_recipe
from tests.tiny import SHALLOW


def worker_context() -> mp.context.ForkServerContext:
    """Start method for the multi-process tests: fresh, single-threaded children, like ``spawn``, but
    forked from one server that imported torch, Lightning and timm once (a spawned child re-imports them,
    which costs tens of seconds on a small CPU machine). Forking the test process itself is unsafe: it
    may have used OpenMP threads, and a forked child that starts OpenMP again can hang.
    """
    ctx = mp.get_context("forkserver")
    # Installed packages only: Python 3.11's fork server ignores sys.path when preloading.
    ctx.set_forkserver_preload(
        ["torch", "lightning", "timm", "ftforget.methods", "ftforget.forgetting.callback"]
    )
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RecordingDataset(Dataset):
    """Remembers which indices were loaded (with ``num_workers=0``), to check each is counted once."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.seen: list[int] = []

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        self.seen.append(int(index))
        return self.dataset[index]


def class_images(
    n: int, num_classes: int, seed: int, noise: float = 0.6
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images near one of ``num_classes`` fixed prototypes (prototypes from seed 1234, noise from ``seed``)."""
    protos = torch.randn(num_classes, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    return protos[labels] + noise * torch.randn(n, 3, 32, 32, generator=g), labels


class SyntheticProbe(ProbeData):
    """An in-memory probe; sizes need not divide anything."""

    name = "synthetic"

    def __init__(
        self, n_bank: int = 37, n_query: int = 23, classes: int = 8, seed: int = 0, noise: float = 1.2
    ) -> None:
        self.n_bank, self.n_query, self.classes, self.seed, self.noise = n_bank, n_query, classes, seed, noise
        self.setup_calls = 0
        self._bank: Dataset | None = None
        self._queries: Dataset | None = None

    @property
    def num_classes(self) -> int:
        return self.classes

    def setup(self) -> None:
        self.setup_calls += 1
        bank = class_images(self.n_bank, self.classes, self.seed, self.noise)
        queries = class_images(self.n_query, self.classes, self.seed + 1, self.noise)
        self._bank = RecordingDataset(TensorDataset(*bank))
        self._queries = RecordingDataset(TensorDataset(*queries))

    def bank_dataset(self) -> Dataset:
        return IndexedDataset(self._bank)  # type: ignore[arg-type]

    def query_dataset(self) -> Dataset:
        return IndexedDataset(self._queries)  # type: ignore[arg-type]

    def cache_key(self) -> str:
        return f"synthetic-{self.n_bank}-{self.n_query}-{self.classes}-{self.seed}-{self.noise}"


class TinyData(L.LightningDataModule):
    """A shuffled random task (so that epochs draw from the global RNG) with a probe attribute."""

    def __init__(
        self, n_train: int = 40, n_val: int = 15, batch_size: int = 8, probe: ProbeData | None = None
    ) -> None:
        super().__init__()
        self.train_set = TensorDataset(*class_images(n_train, 5, seed=10, noise=1.0))
        self.val_set = TensorDataset(*class_images(n_val, 5, seed=11, noise=1.0))
        self.batch_size = batch_size
        self.probe = probe

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any
    ) -> None:
        self.losses.append(float(outputs["loss"]))


class RankReport(L.Callback):
    """Writes, per rank, the world size and which probe samples this rank loaded."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        probe = trainer.datamodule.probe
        report = {
            "world": trainer.world_size,
            "bank_seen": probe._bank.seen,
            "query_seen": probe._queries.seen,
        }
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


class KillAt(L.Callback):
    """SIGKILLs its own process right after the step's other hooks (as a node failure would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def tiny_model(cls: type = FullFineTuning, seed: int = 0, **kwargs: Any) -> L.LightningModule:
    """A tiny method with drop-path, so that training consumes the global RNG every step."""
    torch.manual_seed(seed)
    args = {"backbone": "vit_base_patch16_224", "backbone_kwargs": {**SHALLOW, "drop_path_rate": 0.1}}
    return cls(num_classes=5, **paper_recipe(lr=0.05, warmup_steps=0), **args, **kwargs)


def make_trainer(root: Path, max_steps: int, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=TensorBoardLogger(str(root), name="run", version=0),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        log_every_n_steps=1,
        default_root_dir=str(root),
        callbacks=callbacks,
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def fit_and_die(root: str, steps: list[int], kill_at: int) -> None:
    """Target of a spawned process: fits with checkpoints every 2 steps and SIGKILLs itself at ``kill_at``."""
    from ftforget.forgetting import ForgettingCallback

    torch.set_num_threads(1)
    L.seed_everything(0)
    callback = ForgettingCallback(eval_at_steps=steps, knn=KNNConfig(k=5, batch_size=16, num_workers=0))
    ckpt = ModelCheckpoint(
        dirpath=os.path.join(root, "ckpt"), every_n_train_steps=2, save_last=True, save_top_k=-1
    )
    trainer = make_trainer(Path(root), 100, [callback, KillAt(kill_at), ckpt], enable_checkpointing=True)
    trainer.fit(tiny_model(), datamodule=TinyData(probe=SyntheticProbe()))


def knn_worker(rank: int, world: int, port: int, out_dir: str, configs: list[dict[str, Any]]) -> None:
    """Target of ``torch.multiprocessing.spawn``: one evaluate_probe per config, results to JSON per rank."""
    import torch.distributed as dist

    from ftforget.backbones import build_backbone
    from ftforget.forgetting import evaluate_probe

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = build_backbone("vit_base_patch16_224", **SHALLOW).eval()
        results = []
        for cfg in configs:
            probe = SyntheticProbe(cfg["n_bank"], cfg["n_query"])
            probe.setup()
            config = KNNConfig(
                k=cfg["k"], batch_size=cfg["batch_size"], num_workers=0, bank_chunk=5, query_chunk=4
            )
            with torch.no_grad():
                out = evaluate_probe(model, probe, config, torch.device("cpu"))
            results.append({
                "top1": out.top1, "top5": out.top5, "num_bank": out.num_bank, "num_queries": out.num_queries,
                "bank_seen": probe._bank.seen, "query_seen": probe._queries.seen,  # type: ignore[union-attr]
            })  # fmt: skip
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        if world > 1:
            dist.destroy_process_group()
