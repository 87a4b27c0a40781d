"""The probe's cost: timing fields of every measurement, the report's share column, and ``probe_budget``."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import pytest

from ftforget.forgetting import ForgettingCallback
from ftforget.forgetting.callback import choose_subset, union_size
from ftforget.forgetting.config import KNNConfig, SubsetConfig
from ftforget.report import build_table, load_run, to_markdown
from tests.forgetting_helpers import SyntheticProbe, TinyData, make_trainer, read_jsonl, tiny_model

BANK = [c for c in range(5) for _ in range(100)]  # 5 classes of 100 bank images
QUERIES = [c for c in range(5) for _ in range(20)]  # and of 20 queries


def test_choose_subset_by_hand() -> None:
    # 0.1 s per image over the run's measurements, 100 s of training: a budget of 0.2 allows 200 images.
    assert choose_subset(0.2, 100.0, 0.1, BANK, QUERIES, SubsetConfig(), 20) == (
        SubsetConfig(30, 3, 1, 0),  # 5 x (10 q + q) = 55 q images: q = 3 (165 images), q = 4 is 220
        pytest.approx(0.165, abs=1e-12),
    )
    # Two draws use twice the images (disjoint draws): 110 q, so q = 1.
    chosen, share = choose_subset(0.2, 100.0, 0.1, BANK, QUERIES, SubsetConfig(draws=2, seed=7), 20)
    assert chosen == SubsetConfig(10, 1, 2, 7) and share == pytest.approx(0.11, abs=1e-12)
    # The shape of `subset`: bank : queries = 4 : 2, so 5 x 3 q images: q = 13 (195 images).
    chosen, _ = choose_subset(0.2, 100.0, 0.1, BANK, QUERIES, SubsetConfig(4, 2), 20)
    assert (chosen.bank_per_class, chosen.queries_per_class) == (26, 13)
    # The whole probe (600 images) when it fits.
    assert choose_subset(0.6, 100.0, 0.1, BANK, QUERIES, SubsetConfig(), 20) == (None, pytest.approx(0.6))
    # k = 60 neighbours need 12 bank images per class: q = 2 (20 per class), over the budget.
    chosen, share = choose_subset(0.1, 100.0, 0.1, BANK, QUERIES, SubsetConfig(), 60)
    assert (chosen.bank_per_class, chosen.queries_per_class) == (20, 2) and share == pytest.approx(0.11)
    assert union_size([100, 7], 10, 3) == 30 + 7 and union_size([100, 7], None, 3) == 107


def _fit(root: Path, callback: ForgettingCallback, steps: int = 12) -> list[dict]:
    L.seed_everything(0)
    make_trainer(root, steps, [callback]).fit(
        tiny_model(), datamodule=TinyData(probe=SyntheticProbe(200, 40, 4))
    )
    return read_jsonl(root / "run" / "version_0" / "forgetting.jsonl")


def test_every_measurement_logs_its_cost_and_the_report_its_share(tmp_path: Path) -> None:
    knn = KNNConfig(k=[5, 1], batch_size=64, num_workers=0)
    records = _fit(tmp_path, ForgettingCallback(eval_at_steps=[2, 12], knn=knn, reuse_unchanged=False))
    head = [r for r in records if r["k"] == 5]
    assert [r["step"] for r in head] == [0, 2, 12]
    total = 0.0
    for r in head:
        assert r["num_images"] == 240 and r["images_per_s"] == 240 / r["probe_seconds"]
        assert 0 < r["probe_seconds"] <= r["seconds"]  # the probe is part of the pause
        total += r["seconds"]
        assert r["probe_seconds_total"] == pytest.approx(total, rel=1e-12)
    assert head[0]["elapsed"] < head[1]["elapsed"] < head[2]["elapsed"]
    assert head[-1]["probe_seconds_total"] < head[-1]["elapsed"]
    run = load_run(tmp_path / "run" / "version_0")
    assert run.scalars["forgetting/probe_images_per_s"][12] == pytest.approx(
        head[-1]["images_per_s"], rel=1e-6
    )
    (row,) = build_table([run])
    assert row.probe_share == head[-1]["probe_seconds_total"] / head[-1]["elapsed"]
    table = to_markdown([row])
    assert table.splitlines()[0].endswith("| probe share of wall-clock % |")
    assert table.splitlines()[2].endswith(f"| {100 * row.probe_share:.2f} |")


@pytest.mark.slow
def test_probe_budget_chooses_from_measured_timings_and_says_so(tmp_path: Path, caplog) -> None:
    knn = KNNConfig(k=[5], batch_size=64, num_workers=0)
    callback = ForgettingCallback(eval_at_steps=[2, 12], knn=knn, probe_budget=1e-6, new_task_val=False)
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="probe_budget 1e-06 cannot be met"):
        records = _fit(tmp_path / "tiny", callback)
    # A budget no subset meets: the smallest that keeps k = 5 neighbours (10 bank images and 1 query per
    # class), and a warning; the choice is the pure function's on the logged timings.
    assert callback.chosen_subset == {"bank_per_class": 10, "queries_per_class": 1, "draws": 1, "seed": 0}
    budget = callback.budget
    assert budget["measurements"] == 3 and budget["steps"] == 12
    probe = SyntheticProbe(200, 40, 4)
    probe.setup()
    expected = choose_subset(
        1e-6, budget["step_seconds"] * 12, budget["image_seconds"] * 3, probe.bank_labels(), probe.query_labels(),
        SubsetConfig(), 5,
    )  # fmt: skip
    assert expected == (SubsetConfig(10, 1), budget["predicted_share"])
    assert [(r["num_bank"], r["num_queries"], r["subset"]["bank_per_class"]) for r in records] == [
        (40, 4, 10)
    ] * 3
    assert "probe_budget 1e-06: a probe image costs" in caplog.text
    assert "chose bank_per_class=10, queries_per_class=1, draws=1" in caplog.text
    # After 10 training steps: the measured step time and the share the run is on course for.
    assert budget["measured_step_seconds"] > 0 and "probe_budget check after steps 2-11" in caplog.text
    state = callback.state_dict()
    fresh = ForgettingCallback(probe_budget=1e-6)
    fresh.load_state_dict(state)
    assert fresh.current_subset() == SubsetConfig(10, 1)  # a resumed fit keeps the choice
    # A generous budget: the whole probe.
    generous = ForgettingCallback(eval_at_steps=[2], knn=knn, probe_budget=1e6, new_task_val=False)
    records = _fit(tmp_path / "generous", generous, steps=2)
    assert generous.chosen_subset == {} and generous.current_subset() is None
    assert [(r["num_bank"], r["num_queries"]) for r in records] == [
        (200, 40)
    ] * 2 and "subset" not in records[0]
    with pytest.raises(ValueError, match="probe_budget must be > 0"):
        ForgettingCallback(probe_budget=0)
