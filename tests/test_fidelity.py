"""``ftforget fidelity``: its statistics on a hand-computed case, and the README's command on the digits
miniature, checked against the runs' own full-probe measurements and a hand computation."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from scipy.stats import spearmanr

from ftforget.commands import main
from ftforget.forgetting.evaluate import average_ranks, fidelity_statistics, spearman
from tests.test_readme import commands, section

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "configs" / "demo"


def test_fidelity_statistics_by_hand() -> None:
    names = ["A", "B", "C", "D"]
    full = [0.80, 0.70, 0.60, 0.65]
    subset = [0.78, 0.60, 0.62, 0.56]
    stats = fidelity_statistics(names, full, subset, reference=0)
    # ranks: full A4 B3 C1 D2, subset A4 B2 C3 D1; d = 0, 1, -2, 1; rho = 1 - 6 * 6 / (4 * 15) = 0.4
    assert stats["spearman"] == pytest.approx(0.4, abs=1e-12)
    # |full - subset| = 0.02, 0.10, 0.02, 0.09
    assert stats["max_abs_acc_diff"] == pytest.approx(0.10, abs=1e-12)
    # drops from A: full 0.10, 0.20, 0.15; subset 0.18, 0.16, 0.22; differences 0.08, 0.04, 0.07
    assert stats["max_abs_drop_diff"] == pytest.approx(0.08, abs=1e-12)
    # B > C and C < D on the full probe, the other way on the subset; the four other pairs agree
    assert stats["reversed_pairs"] == [["B", "C"], ["C", "D"]]
    assert stats["orderings_preserved"] is False and stats["pairs"] == 6
    same = fidelity_statistics(names, full, [0.9, 0.7, 0.5, 0.6])
    assert same["spearman"] == 1.0 and same["orderings_preserved"] and same["max_abs_drop_diff"] is None
    # ties: average ranks, Pearson of the ranks (1.5 / sqrt(1.5 * 2) = sqrt(3) / 2)
    assert average_ranks([0.5, 0.7, 0.7]) == [1.0, 2.5, 2.5]
    assert spearman([0.5, 0.7, 0.7], [1, 2, 3]) == pytest.approx(3**0.5 / 2, abs=1e-12)
    assert spearman([1, 1], [1, 2]) is None and spearman([1], [1]) is None
    # a tie on one probe only is a changed order
    assert fidelity_statistics(["x", "y"], [0.5, 0.5], [0.5, 0.6])["reversed_pairs"] == [["x", "y"]]
    with pytest.raises(ValueError, match="2 names, 2 full and 1 subset"):
        fidelity_statistics(["x", "y"], [0.5, 0.5], [0.5])


def test_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    assert main(["fidelity", "--probe", "DigitsProbe", "--subset.bank_per_class", "2"]) == 2
    assert "nothing to compare" in capsys.readouterr().err
    ckpt = tmp_path / "missing.ckpt"
    assert main(["fidelity", "--ckpt_paths", f"[{ckpt}]", "--probe", "DigitsProbe"]) == 2
    assert "neither a checkpoint file nor a run directory" in capsys.readouterr().err


@pytest.mark.slow
def test_readme_fidelity_on_the_miniature(tmp_path: Path, backbone: Path, capsys, monkeypatch) -> None:
    for method in ("full", "linear"):
        assert main([
            "fit", "--config", str(DEMO / f"{method}.yaml"), "--config", str(DEMO / "common.yaml"),
            "--model.init_args.checkpoint", str(backbone), "--trainer.max_steps", "16",
            "--trainer.check_val_every_n_epoch", "1", "--trainer.callbacks.eval_at_steps=[0, 8, 16]",
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
        ]) == 0  # fmt: skip
    (argv,) = commands(section("Cheaper probes: subsets, their fidelity, a budget"))
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # the command as written, its runs/ under tmp_path
    assert main(argv) == 0
    printed = capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "fidelity.json").read_text())
    rows = report["models"]
    full_run, linear_run = (
        tmp_path / "runs" / "full" / "version_0",
        tmp_path / "runs" / "linear" / "version_0",
    )
    expected = ["best-step8", "last.ckpt"]
    assert [r["step"] for r in rows] == [0, 8, 16, 16]
    assert rows[0]["model"] == "step 0 of runs/full/version_0"
    assert [Path(r["model"]).name.startswith(e) for r, e in zip(rows[1:3], expected, strict=True)] == [
        True,
        True,
    ]
    assert rows[3]["model"] == str((linear_run / "checkpoints" / "last.ckpt").resolve())
    # The full probe is the callback's probe: its accuracies are the runs' own measurements, exactly.
    logged = {
        (run, json.loads(x)["step"]): json.loads(x)["top1"]
        for run in (full_run, linear_run)
        for x in (run / "forgetting.jsonl").read_text().splitlines()
    }
    assert [r["full"]["20"] for r in rows] == [
        logged[(full_run, 0)],
        logged[(full_run, 8)],
        logged[(full_run, 16)],
        logged[(linear_run, 16)],
    ]
    # The subset: 20 bank images and 10 queries of each of the 5 digits, in 3 draws; its top-1 is the mean.
    assert report["subset"] == {"bank_per_class": 20, "queries_per_class": 10, "draws": 3, "seed": 0,
                                "seeds": [0, 1, 2]}  # fmt: skip
    assert report["subset_images"] == 5 * 3 * 20 + 5 * 3 * 10 and report["full_images"] == 901
    for r in rows:
        assert r["subset"]["20"] == pytest.approx(
            statistics.fmean(d["20"] for d in r["subset_draws"]), abs=1e-12
        )
        assert r["subset_spread"]["20"] == statistics.stdev(d["20"] for d in r["subset_draws"])
    # By hand from the two probes' accuracies: scipy's rank correlation, the largest differences, the orders.
    full, sub = [r["full"]["20"] for r in rows], [r["subset"]["20"] for r in rows]
    stats = report["fidelity"]["20"]
    assert stats["spearman"] == pytest.approx(spearmanr(full, sub).statistic, abs=1e-12)
    assert stats["max_abs_acc_diff"] == max(abs(f - s) for f, s in zip(full, sub, strict=True))
    drop_diffs = [abs((full[0] - f) - (sub[0] - s)) for f, s in zip(full[1:], sub[1:], strict=True)]
    assert stats["max_abs_drop_diff"] == max(drop_diffs)
    flips = [
        (i, j) for i in range(4) for j in range(i + 1, 4)
        if (full[i] > full[j]) - (full[i] < full[j]) != (sub[i] > sub[j]) - (sub[i] < sub[j])
    ]  # fmt: skip
    assert stats["orderings_preserved"] == (not flips) and len(stats["reversed_pairs"]) == len(flips)
    # The linear probe's frozen backbone: the same accuracy as step 0 on both probes, a tie kept.
    assert full[3] == full[0] and sub[3] == sub[0]
    assert f"Spearman rank correlation {stats['spearman']:.4f}" in printed
    assert "images per measurement: full 901, subset 450" in printed
