"""Subset probes: fixed-seed draws of n per class, disjoint across consecutive seeds, identical on 1 and 2
processes, measured from one extraction of their union with their spread across draws."""

from __future__ import annotations

import json
import logging
import os
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as tmp

from ftforget.data.probe import SubsetDraws, draw_per_class, positions_by_class
from ftforget.forgetting.config import KNNConfig, SubsetConfig
from ftforget.forgetting.evaluate import evaluate_probe, subset_draws
from ftforget.stats import bootstrap_mean_ci
from tests.forgetting_helpers import SyntheticProbe, free_port, worker_context
from tests.tiny import SHALLOW


def test_consecutive_seeds_give_disjoint_draws_of_exactly_n() -> None:
    groups = {"a": list(range(100)), "b": list(range(100, 130)), "c": list(range(130, 137))}
    draws = [draw_per_class(groups, 10, seed) for seed in range(3)]
    for d in draws:
        assert [len(d[c]) for c in "abc"] == [10, 10, 7]  # a class with fewer than n gives all it has
        assert all(d[c] == sorted(d[c]) and set(d[c]) <= set(groups[c]) for c in "abc")
    for c in "ab":  # 3 x 10 <= class size: pairwise disjoint
        assert len(set().union(*(d[c] for d in draws))) == 30
    assert draws[0] == draw_per_class(groups, 10, 0)  # fixed by the seed
    # Beyond the class size the draws overlap as little as possible: 4 draws of 10 in 30 images use every
    # image, 10 of them twice.
    b = [draw_per_class(groups, 10, seed)["b"] for seed in range(4)]
    uses = [sum(x in d for d in b) for x in groups["b"]]
    assert sorted(uses) == [1] * 20 + [2] * 10
    # A class's pick depends only on its own items: adding a class changes nothing in the others.
    more = draw_per_class({**groups, "d": list(range(200, 250))}, 10, 1)
    assert {c: more[c] for c in "abc"} == draws[1]
    with pytest.raises(ValueError, match="n per class must be >= 1"):
        draw_per_class(groups, 0, 0)


def test_subset_draws_union_and_the_short_classes_are_logged(caplog) -> None:
    bank_labels = [0] * 12 + [1] * 5 + [2] * 9
    query_labels = [0, 1, 2] * 4
    with caplog.at_level(logging.WARNING, logger="ftforget.data.probe"):
        draws = SubsetDraws.build(bank_labels, query_labels, 4, 2, [5, 6, 7])
    for d in draws.draws:
        per_class = [sum(bank_labels[i] == c for i in d.bank) for c in range(3)]
        assert per_class == [4, 4, 4]
        assert [sum(query_labels[i] == c for i in d.queries) for c in range(3)] == [2, 2, 2]
    assert [d.seed for d in draws.draws] == [5, 6, 7]
    # union: min(class size, 3 x 4) per class
    assert len(draws.bank_union) == 12 + 5 + 9 and draws.bank_union == sorted(set(draws.bank_union))
    assert len(draws.query_union) == 12
    six = SubsetDraws.build(bank_labels, query_labels, 6, 2, [0])
    assert six.short_classes == {"bank": {1: 5}, "queries": {}}
    assert sum(bank_labels[i] == 1 for i in six.draws[0].bank) == 5
    assert "1 classes have fewer than 6 bank images and give all they have (class 1: 5)" in caplog.text
    assert positions_by_class([2, 0, 2]) == {0: [1], 2: [0, 2]}


def test_subset_config_checks() -> None:
    assert SubsetConfig().is_full and not SubsetConfig(bank_per_class=3).is_full
    assert SubsetConfig(2, 1, draws=3, seed=4).seeds == [4, 5, 6]
    assert SubsetConfig(draws=2).is_full  # every draw would be the whole probe: measured once
    with pytest.raises(ValueError, match="subset.bank_per_class must be >= 1"):
        SubsetConfig(bank_per_class=0)


def _model() -> torch.nn.Module:
    from ftforget.backbones import build_backbone

    torch.manual_seed(0)
    return build_backbone("vit_base_patch16_224", **SHALLOW).eval()


def test_draws_share_one_extraction_and_each_equals_its_own_measurement() -> None:
    model = _model()
    probe = SyntheticProbe(n_bank=48, n_query=32, classes=4)
    probe.setup()
    knn = KNNConfig(k=[3, 1], batch_size=16, num_workers=0)
    subset = SubsetConfig(bank_per_class=4, queries_per_class=3, draws=3, seed=0)
    draws = subset_draws(probe, subset)
    probe._bank.seen.clear()  # the default bank_labels() read every item once
    with torch.no_grad():
        result = evaluate_probe(model, probe, knn, torch.device("cpu"), subset=subset, draws=draws)
    # One extraction: every image of the union loaded exactly once, nothing else.
    assert sorted(probe._bank.seen) == draws.bank_union and len(draws.bank_union) == 3 * 4 * 4
    # 8 queries per class: 3 draws of 3 overlap in one image per class (min(8, 3 x 3) = 8 of each class)
    assert result.num_images == len(draws.bank_union) + len(draws.query_union) == 48 + 32
    assert result.num_queries == 3 * 12 and result.num_bank == 16
    # Each draw's k-NN equals a measurement of that draw alone (a probe made of its images).
    for d, got in zip(draws.draws, result.draws, strict=True):
        alone = SubsetConfig(bank_per_class=4, queries_per_class=3, draws=1, seed=d.seed)
        with torch.no_grad():
            single = evaluate_probe(model, probe, knn, torch.device("cpu"), subset=alone)
        assert got["seed"] == d.seed and got["top1"] == single.top1
    for k in (3, 1):
        per_draw = [d["top1"][k] for d in result.draws]
        assert result.top1[k] == pytest.approx(statistics.fmean(per_draw), abs=1e-12)
        assert result.top1_spread[k] == statistics.stdev(per_draw)
        hits = result.hits(k)
        assert hits.sum() == round(result.top1[k] * 36)
        assert result.top1_ci[k] == list(bootstrap_mean_ci(int(hits.sum()), 36))
    assert len({tuple(d["top1"].values()) for d in result.draws}) > 1  # draws that differ: a real spread


def subset_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """One subset measurement on ``world`` processes; draws, results and loaded images to JSON per rank."""
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        probe = SyntheticProbe(n_bank=45, n_query=29, classes=4)
        probe.setup()
        subset = SubsetConfig(bank_per_class=5, queries_per_class=3, draws=2, seed=3)
        draws = subset_draws(probe, subset)
        probe._bank.seen.clear()  # type: ignore[union-attr]
        knn = KNNConfig(k=[5, 1], batch_size=4, num_workers=0, bank_chunk=5, query_chunk=4)
        with torch.no_grad():
            out = evaluate_probe(_model(), probe, knn, torch.device("cpu"), subset=subset, draws=draws)
        result: dict[str, Any] = {
            "draws": [[d.seed, d.bank, d.queries] for d in draws.draws], "union": draws.bank_union,
            "top1": out.top1, "draw_top1": [d["top1"] for d in out.draws], "hits": out.top1_hits,
            "seen": probe._bank.seen,  # type: ignore[union-attr]
        }  # fmt: skip
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        if world > 1:
            dist.destroy_process_group()


@pytest.mark.slow
def test_the_same_seed_gives_the_same_bank_on_one_and_two_processes(tmp_path: Path) -> None:
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()
    subset_worker(0, 1, 0, str(tmp_path / "w1"))
    worker_context()
    tmp.start_processes(
        subset_worker,
        args=(2, free_port(), str(tmp_path / "w2")),
        nprocs=2,
        join=True,
        start_method="forkserver",
    )
    one = json.loads((tmp_path / "w1" / "rank0.json").read_text())
    two = [json.loads((tmp_path / "w2" / f"rank{r}.json").read_text()) for r in range(2)]
    for rank in two:
        for key in ("draws", "union", "top1", "draw_top1", "hits"):
            assert rank[key] == one[key], key
    assert [len(d[1]) for d in one["draws"]] == [20, 20]  # exactly 5 per class, 4 classes
    assert not set(one["draws"][0][1]) & set(one["draws"][1][1])  # seeds 3 and 4: disjoint
    # The union is extracted once over the two processes, each image by one of them.
    assert sorted(two[0]["seen"] + two[1]["seen"]) == one["union"] == sorted(one["seen"])


def test_imagenet_subsets_read_labels_without_images_and_cache_only_the_chosen_pixels(tmp_path: Path) -> None:
    from tests.test_imagenet_probe import make_tree, tiny_probe

    root = make_tree(tmp_path / "tree", n_train=6, n_val=3)
    probe = tiny_probe(root, pixel_cache_dir=str(tmp_path / "pixels"))
    full = tiny_probe(root)
    assert probe.bank_labels() == [label for _, label in probe._bank] == [0] * 6 + [1] * 6 + [2] * 6
    assert probe.query_labels() == [0] * 3 + [1] * 3 + [2] * 3
    draws = subset_draws(probe, SubsetConfig(bank_per_class=2, queries_per_class=1, draws=2))
    assert not (tmp_path / "pixels").exists()  # nothing decoded to draw
    bank, queries = probe.subset_datasets(draws.bank_union, draws.query_union)
    assert (len(bank), len(queries)) == (12, 6)
    for j, i in enumerate(draws.bank_union):  # the chosen images, re-indexed from 0
        image, label, index = bank[j]
        ref_image, ref_label, _ = full.bank_dataset()[i]
        assert (label, index) == (ref_label, j) and torch.allclose(image, ref_image, atol=0.03)
    assert sum(p.stat().st_size for p in (tmp_path / "pixels").iterdir()) < 20 * 32 * 32 * 3 + 4096
    # The built-in fixed-seed subsets follow the same rule: consecutive seeds give disjoint banks.
    a, b = tiny_probe(root, bank_per_class=3, seed=0), tiny_probe(root, bank_per_class=3, seed=1)
    assert not {p for p, _ in a._bank} & {p for p, _ in b._bank} and len(a._bank) == len(b._bank) == 9
