"""Bootstrap intervals and curve statistics (:mod:`ftforget.stats`): coverage and hand-computed values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ftforget import stats
from ftforget.report import read_csv, write_report
from tests.test_forgetting_callback import read_jsonl, run_fit, small_callback
from tests.test_report import FULL, LORA, seed_config, write_run


def test_bootstrap_interval_covers_p_in_about_95_percent_of_trials() -> None:
    rng = np.random.default_rng(1234)
    p, n, trials = 0.3, 400, 200
    covered = 0
    for trial in range(trials):
        outcomes = rng.random(n) < p  # simulated Bernoulli outcomes with known p
        lo, hi = stats.bootstrap_mean_ci(int(outcomes.sum()), n, seed=trial)
        covered += lo <= p <= hi
    assert 0.90 * trials <= covered <= 0.99 * trials


def test_bootstrap_interval_contains_the_mean_and_is_seeded() -> None:
    lo, hi = stats.bootstrap_mean_ci(3722, 5000)
    assert lo < 3722 / 5000 < hi
    assert (lo, hi) == stats.bootstrap_mean_ci(3722, 5000)
    # binomial sd sqrt(p(1-p)/n) = 0.00619: the interval spans about 2 * 1.96 of it
    assert hi - lo == pytest.approx(2 * 1.96 * math.sqrt(0.7444 * 0.2556 / 5000), rel=0.1)
    assert stats.bootstrap_mean_ci(0, 10) == (0.0, 0.0)
    assert stats.bootstrap_mean_ci(10, 10) == (1.0, 1.0)
    with pytest.raises(ValueError):
        stats.bootstrap_mean_ci(11, 10)


def test_paired_interval_on_a_hand_made_case() -> None:
    before = np.array([1, 1, 1, 1, 0, 0, 1, 0, 1, 1], dtype=bool)
    after = np.array([1, 0, 0, 1, 1, 0, 1, 0, 1, 1], dtype=bool)
    lost, gained, n = stats.paired_counts(before, after)
    assert (lost, gained, n) == (2, 1, 10)  # queries 1 and 2 lost, query 4 gained: drop 0.1
    lo, hi = stats.bootstrap_drop_ci(lost, gained, n)
    assert lo < 0.1 < hi and -1.0 <= lo and hi <= 1.0
    # Identical outcomes: the paired drop is exactly 0 in every resample, however noisy each mean is.
    assert stats.bootstrap_drop_ci(0, 0, 10) == (0.0, 0.0)
    # Every query lost: exactly 1.
    assert stats.bootstrap_drop_ci(10, 0, 10) == (1.0, 1.0)
    # Pairing narrows the interval: 10 lost of 1000 at ~75% accuracy.
    lo, hi = stats.bootstrap_drop_ci(10, 0, 1000)
    unpaired = stats.bootstrap_mean_ci(750, 1000)
    assert hi - lo < (unpaired[1] - unpaired[0]) / 3
    # The sd of the paired drop: sqrt((l + g)/n - ((l - g)/n)^2) / sqrt(n)
    lo, hi = stats.bootstrap_drop_ci(300, 100, 5000)
    sd = math.sqrt(400 / 5000 - (200 / 5000) ** 2) / math.sqrt(5000)
    assert hi - lo == pytest.approx(2 * 1.96 * sd, rel=0.1)
    with pytest.raises(ValueError):
        stats.paired_counts(before, after[:5])


def test_hit_vectors_pack_and_unpack() -> None:
    hits = np.random.default_rng(0).random(50_003) < 0.7
    packed = stats.pack_hits(hits)
    assert isinstance(packed, str) and len(packed) == 4 * math.ceil(math.ceil(50_003 / 8) / 3)
    assert np.array_equal(stats.unpack_hits(packed, 50_003), hits)
    assert stats.unpack_hits(stats.pack_hits([True, False, True]), 3).tolist() == [True, False, True]
    with pytest.raises(ValueError):
        stats.unpack_hits(packed, 60_000)


# Hand-computed: x = log10(1 + step) = 0, 1, 2, 3 at steps 0, 9, 99, 999 (equal widths 1).
CURVE = {0: 0.8, 9: 0.78, 99: 0.6, 999: 0.3}


def test_curve_statistics_of_a_hand_computed_curve() -> None:
    # trapezoids: (0.8 + 0.78)/2 + (0.78 + 0.6)/2 + (0.6 + 0.3)/2 = 0.79 + 0.69 + 0.45 = 1.93, over 3
    assert stats.auc_norm(CURVE) == pytest.approx(1.93 / 3)
    # relative drops: 0, 0.025, 0.25, 0.625
    assert stats.curve_statistics(CURVE) == {
        "auc_norm": pytest.approx(1.93 / 3),
        "max_drop": pytest.approx(0.5),
        "final_drop": pytest.approx(0.5),
        "steps_to_drop_5": 99,
        "steps_to_drop_10": 99,
        "steps_to_drop_50": 999,
    }
    assert stats.steps_to_drop(CURVE, 0.625) is None  # strictly exceeds
    assert stats.steps_to_drop(CURVE, 0.02) == 9
    # A flat curve gives its level; the max drop may come before the end (recovery).
    assert stats.auc_norm({0: 0.5, 3: 0.5, 1000: 0.5}) == pytest.approx(0.5)
    recovering = {0: 0.9, 10: 0.5, 100: 0.8}
    assert stats.max_drop(recovering) == pytest.approx(0.4)
    assert stats.final_drop(recovering) == pytest.approx(0.1)
    # Without step 0: no drops; one step: its value; none: None.
    assert stats.curve_statistics({5: 0.5, 50: 0.4})["steps_to_drop_5"] is None
    assert stats.max_drop({5: 0.5}) is None and stats.auc_norm({7: 0.25}) == 0.25
    assert stats.auc_norm({}) is None
    assert stats.threshold_name(0.05) == "5" and stats.threshold_name(0.125) == "12.5"


def test_a_fit_stores_intervals_that_contain_the_point_estimates(tmp_path: Path) -> None:
    callback = small_callback(eval_at_steps=[0, 2, 5], knn={"k": [5, 3]})
    run_fit(tmp_path, 6, callback)
    records = read_jsonl(tmp_path / "run" / "version_0" / "forgetting.jsonl")
    assert [(r["step"], r["k"]) for r in records] == [(s, k) for s in (0, 2, 5) for k in (5, 3)]
    for r in records:
        lo, hi = r["top1_ci"]
        assert 0.0 <= lo <= r["top1"] <= hi <= 1.0
        if r["step"] == 0:
            assert r["drop_abs_ci"] is None
        else:
            lo, hi = r["drop_abs_ci"]
            assert lo <= r["drop_abs"] <= hi
    # The step-0 hit vectors survive a checkpoint (plain types, weights_only=True) and give the same
    # paired interval after a resume.
    torch.save(callback.state_dict(), tmp_path / "state.pt")
    fresh = small_callback(eval_at_steps=[0, 2, 5], knn={"k": [5, 3]})
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert fresh.baseline_hits == callback.baseline_hits and fresh.baseline_queries == 23
    hits0 = stats.unpack_hits(fresh.baseline_hits[5], 23)
    assert hits0.sum() == round(records[0]["top1"] * 23)


def test_report_statistics_from_a_hand_written_measurement_file(tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "lora" / "version_0"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": LORA}))
    ci = {0: [0.7, 0.9], 9: [0.66, 0.88], 99: [0.46, 0.74], 999: [0.18, 0.42]}
    drop_ci = {0: None, 9: [-0.04, 0.08], 99: [0.08, 0.32], 999: [0.36, 0.64]}
    lines = [
        {"step": s, "k": 20, "probe": "synthetic", "top1": v, "drop_abs": CURVE[0] - v, "num_queries": 50,
         "top1_ci": ci[s], "drop_abs_ci": drop_ci[s]}
        for s, v in CURVE.items()
    ]  # fmt: skip
    (run_dir / "forgetting.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    report = write_report([tmp_path / "runs"], tmp_path / "out")
    assert report.statistics.splitlines() == [
        "| method | probe @end [95% CI] | drop (points) [95% CI] | AUC (log steps) | max drop (points) "
        "| steps to 5% drop | steps to 10% drop | steps to 50% drop |",
        "|---|---|---|---|---|---|---|---|",
        # AUC 1.93 / 3 (see CURVE); relative drops 0, 2.5%, 25%, 62.5%
        "| LoRA r=4 | 30.00 [18.00, 42.00] (step 999) | 50.00 [36.00, 64.00] | 64.33 | 50.00 | 99 | 99 | 999 |",
    ]
    text = (tmp_path / "out" / "forgetting_table.md").read_text()
    assert report.markdown.splitlines()[2] in text and report.statistics in text
    assert "### Curve statistics" in text and "Curve statistics" not in report.markdown
    (row,) = read_csv(tmp_path / "out" / "forgetting_table.csv")
    assert (float(row["probe_acc_end_ci_lo"]), float(row["probe_acc_end_ci_hi"])) == (0.18, 0.42)
    assert (float(row["drop_abs_ci_lo"]), float(row["drop_abs_ci_hi"])) == (0.36, 0.64)
    assert float(row["auc_norm"]) == pytest.approx(1.93 / 3) and float(row["max_drop"]) == pytest.approx(0.5)
    assert (row["steps_to_drop_5"], row["steps_to_drop_10"], row["steps_to_drop_50"]) == ("99", "99", "999")
    assert (row["auc_norm_std"], row["steps_to_drop_50_runs"]) == ("", "1")


def test_report_statistics_of_a_seed_group_are_mean_and_std(tmp_path: Path) -> None:
    # x = log10(1 + step) = 0, 1, 2; relative drops at steps 9 and 99:
    # seed 0: 3/7, 4/7; seed 1: 1/7, 5/7; seed 2: 0, 2/7
    curves = {
        0: {0: 0.875, 9: 0.5, 99: 0.375},
        1: {0: 0.875, 9: 0.75, 99: 0.25},
        2: {0: 0.875, 9: 0.875, 99: 0.625},
    }
    for seed, curve in curves.items():
        write_run(tmp_path / f"s{seed}", "full", FULL, curve, config=seed_config(seed, "full"))
    report = write_report([tmp_path], tmp_path / "out")
    (row,) = report.rows
    # AUC: (0.6875 + 0.4375) / 2, (0.8125 + 0.5) / 2, (0.875 + 0.75) / 2 = 0.5625, 0.65625, 0.8125
    assert row.auc_norm == pytest.approx(2.03125 / 3)
    assert row.auc_norm_std == pytest.approx(np.std([0.5625, 0.65625, 0.8125], ddof=1))
    # max drops 0.5, 0.625, 0.25; first steps past 5% and 10%: 9, 9, 99; past 50%: 99, 99, never
    assert (row.max_drop, row.max_drop_std) == (
        pytest.approx(1.375 / 3),
        pytest.approx(np.std([0.5, 0.625, 0.25], ddof=1)),
    )
    assert (row.steps_to_drop_5, row.steps_to_drop_5_std, row.steps_to_drop_5_runs) == (
        39,
        pytest.approx(np.sqrt(2700)),
        3,
    )
    assert (row.steps_to_drop_50, row.steps_to_drop_50_std, row.steps_to_drop_50_runs) == (99, 0.0, 2)
    assert row.probe_acc_end_ci_lo is None  # a group: its spread is the std over seeds
    assert report.statistics.splitlines()[2] == (
        "| full fine-tuning | 3 | 41.67 ± 19.09 (step 99) | 45.83 ± 19.09 | 67.71 ± 12.63 | 45.83 ± 19.09 "
        "| 39 ± 52 | 39 ± 52 | 99 ± 0 (2 of 3) |"
    )
