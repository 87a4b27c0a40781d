"""Real 2-process CPU runs (gloo): the sharded measurement equals the 1-process one and counts each sample once."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch.multiprocessing as tmp
from lightning.pytorch.strategies import DDPStrategy

from ftforget.forgetting import ForgettingCallback
from ftforget.forgetting.collectives import shard_range
from ftforget.forgetting.config import KNNConfig
from ftforget.methods import LinearProbing
from tests.forgetting_helpers import (
    RankReport,
    SyntheticProbe,
    TinyData,
    free_port,
    knn_worker,
    make_trainer,
    read_jsonl,
    tiny_model,
    worker_context,
)

# Sizes that do not divide by 2; the second leaves rank 1 without queries and both ranks with a bank
# smaller than k.
CONFIGS = [
    {"n_bank": 37, "n_query": 23, "k": [1, 5, 10], "batch_size": 4},
    {"n_bank": 3, "n_query": 1, "k": [1, 3], "batch_size": 2},
]


def test_shard_range_partitions_without_padding() -> None:
    for n in (0, 1, 2, 7, 37, 100):
        for world in (1, 2, 3, 8):
            parts = [list(shard_range(n, r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.slow
def test_two_processes_equal_one_process_and_count_each_sample_once(tmp_path: Path) -> None:
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    knn_worker(0, 1, 0, str(tmp_path / "w1"), CONFIGS)
    worker_context()
    args = (2, free_port(), str(tmp_path / "w2"), CONFIGS)
    tmp.start_processes(knn_worker, args=args, nprocs=2, join=True, start_method="forkserver")
    (single,) = [json.loads((tmp_path / "w1" / "rank0.json").read_text())]
    ranks = [json.loads((tmp_path / "w2" / f"rank{r}.json").read_text()) for r in range(2)]
    for i, cfg in enumerate(CONFIGS):
        one, two = single[i], [r[i] for r in ranks]
        assert two[0]["top1"] == two[1]["top1"] == one["top1"]  # exact, for every k
        assert two[0]["top5"] == two[1]["top5"] == one["top5"]
        for part, n in (("bank", cfg["n_bank"]), ("query", cfg["n_query"])):
            seen = two[0][f"{part}_seen"] + two[1][f"{part}_seen"]
            assert sorted(seen) == list(range(n)), f"{part}: each sample extracted exactly once"
            assert two[0][f"{part}_seen"] == list(shard_range(n, 0, 2))
        assert two[0]["num_queries"] == cfg["n_query"] and two[0]["num_bank"] == cfg["n_bank"]
    assert 0 < single[0]["top1"]["10"] < 1  # a probe on which sharding mistakes would show


def _ddp_fit(root: Path, devices: int) -> list[dict]:
    L.seed_everything(0)
    callback = ForgettingCallback(  # no reuse of any kind: every measurement extracts every sample
        eval_at_steps=[1, 3],
        knn=KNNConfig(k=[5, 1], batch_size=4, num_workers=0),
        reuse_unchanged=False,
        prefix_cache_gb=0,
    )
    worker_context()
    strategy = DDPStrategy(start_method="forkserver") if devices > 1 else "auto"
    trainer = make_trainer(root, 3, [callback, RankReport(str(root))], devices=devices, strategy=strategy)
    trainer.fit(tiny_model(LinearProbing), datamodule=TinyData(n_val=15, probe=SyntheticProbe()))
    return read_jsonl(root / "run" / "version_0" / "forgetting.jsonl")


@pytest.mark.slow
def test_callback_under_lightning_ddp_equals_one_device(tmp_path: Path, monkeypatch) -> None:
    """A linear probe keeps the backbone fixed, so the k-NN must be the same at every step on 1 or 2 devices."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    one = _ddp_fit(tmp_path / "one", 1)
    two = _ddp_fit(tmp_path / "two", 2)
    assert [(r["step"], r["k"]) for r in two] == [(s, k) for s in (0, 1, 3) for k in (5, 1)]
    for a, b in zip(one, two, strict=True):
        for key in ("step", "k", "top1", "top5", "num_queries", "num_bank"):
            assert a[key] == b[key], key
    # The new-task val set (15 samples) is split 8/7 over the ranks; the untrained head agrees exactly.
    assert one[0]["new_task_val_acc1"] == two[0]["new_task_val_acc1"]
    assert round(two[0]["new_task_val_acc1"] * 15, 9) == round(two[0]["new_task_val_acc1"] * 15)
    # Two ranks really ran, and each measurement extracted every probe sample exactly once.
    reports = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in reports] == [2, 2]
    for part, n in (("bank", 37), ("query", 23)):
        for rank, report in enumerate(reports):
            assert report[f"{part}_seen"] == list(shard_range(n, rank, 2)) * 3  # steps 0, 1 and 3
