"""The weighted k-NN against a brute-force float64 reference, known answers, and the sharded merge."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from ftforget.forgetting.knn import (
    DEFAULT_BANK_CHUNK,
    DEFAULT_QUERY_CHUNK,
    _above_threshold,
    _blockwise_topk,
    _onednn_linear,
    count_correct,
    knn_predict,
    local_topk,
    merge_topk,
    normalize,
    predict_from_topk,
    weighted_vote,
)


def reference_scores(q: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, c: int, k: int, t: float):
    """DINO's eval_knn written out in float64: cosine sims, full sort, exp(sim/T) votes on one-hot labels.

    Also returns, per query, the similarity gap at the k-th neighbour: where it is tiny, float32 may pick
    either neighbour (a tie).
    """
    qn = torch.nn.functional.normalize(q.double(), dim=1)
    bn = torch.nn.functional.normalize(bank.double(), dim=1)
    sims = qn @ bn.T
    order = sims.argsort(dim=1, descending=True)
    top = sims.gather(1, order[:, :k])
    one_hot = torch.nn.functional.one_hot(labels[order[:, :k]], c).double()
    scores = (one_hot * (top / t).exp()[..., None]).sum(1)
    sorted_sims = sims.gather(1, order)
    boundary_gap = (sorted_sims[:, k - 1] - sorted_sims[:, k]) if k < bank.shape[0] else torch.ones(len(q))
    return scores, boundary_gap


def assert_same_as_reference(preds: torch.Tensor, q, bank, labels, c, k, t) -> None:
    """Same ranked classes as the reference, ties aside.

    Ties: a k-th neighbour gap below 1e-5 (the neighbour set itself is a tie), and classes with equal
    scores (e.g. all the zero-score classes of k=1) whose order is arbitrary: there the reference score of
    each predicted class must equal the reference's score at that rank.
    """
    scores, boundary_gap = reference_scores(q, bank, labels, c, k, t)
    clear = boundary_gap > 1e-5
    assert clear.float().mean() > 0.9, "random data should rarely tie"
    ranked = scores.sort(dim=1, descending=True).values[:, : min(5, c, k)]
    ours = scores.gather(1, preds)
    assert torch.allclose(ours[clear], ranked[clear], rtol=1e-5, atol=0)
    top1_clear = clear & ((ranked[:, 0] - scores.topk(2, dim=1).values[:, 1]) > 1e-5 * ranked[:, 0])
    assert torch.equal(preds[top1_clear, 0], scores.argmax(dim=1)[top1_clear])
    assert top1_clear.float().mean() > 0.9


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
@pytest.mark.parametrize(
    "chunks", [(1024, 65536), (7, 13), (1, 1), (DEFAULT_QUERY_CHUNK, DEFAULT_BANK_CHUNK)]
)
def test_matches_float64_brute_force(k: int, temperature: float, chunks: tuple[int, int]) -> None:
    g = torch.Generator().manual_seed(k)
    q, bank = torch.randn(60, 16, generator=g), torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 10, (300,), generator=g)
    preds = knn_predict(
        q, bank, labels, 10, ks=[k], temperature=temperature, query_chunk=chunks[0], bank_chunk=chunks[1]
    )
    assert preds[k].shape == (60, min(5, k))  # DINO's top-5 looks at min(5, k) predictions
    assert_same_as_reference(preds[k], q, bank, labels, 10, k, temperature)


def test_default_chunks_over_several_bank_blocks_match_float64_brute_force() -> None:
    """The default blocks, with a bank of two full blocks and a partial one."""
    g = torch.Generator().manual_seed(11)
    n = 2 * DEFAULT_BANK_CHUNK + 123
    q, bank = torch.randn(50, 8, generator=g), torch.randn(n, 8, generator=g)
    labels = torch.randint(0, 10, (n,), generator=g)
    preds = knn_predict(q, bank, labels, 10, ks=[20, 1])
    for k in (20, 1):
        assert_same_as_reference(preds[k], q, bank, labels, 10, k, 0.07)


@pytest.mark.parametrize("k", [1, 5, 20, 301])
@pytest.mark.parametrize(
    ("query_chunk", "bank_chunk"), [(60, 300), (7, 13), (60, 1), (1, 300), (64, DEFAULT_BANK_CHUNK)]
)
def test_pruned_blocks_equal_a_topk_of_every_block(k: int, query_chunk: int, bank_chunk: int) -> None:
    """Skipping the blocks a query cannot use (the CPU path) changes nothing: the same sims and labels as
    the top-k of every block (the path of other devices), also where k exceeds the bank (-inf padding)."""
    g = torch.Generator().manual_seed(k)
    q, bank = torch.randn(60, 16, generator=g), torch.randn(300, 16, generator=g)
    labels = torch.randint(0, 10, (300,), generator=g)
    args = (normalize(q), bank, labels, k, bank_chunk, query_chunk)
    pruned = _blockwise_topk(*args, normalize_bank=True, prune=True)
    dense = _blockwise_topk(*args, normalize_bank=True, prune=False)
    assert torch.equal(pruned[0], dense[0])
    assert torch.equal(pruned[1], dense[1])
    assert torch.isinf(pruned[0][:, 300:]).all() and (pruned[1][:, 300:] == 0).all()
    whole = (normalize(q).double() @ normalize(bank).double().T).topk(min(k, 300), dim=1)
    assert torch.allclose(pruned[0][:, :300].double(), whole.values, rtol=0, atol=1e-6)


@pytest.mark.skipif(_onednn_linear() is None, reason="this torch has no oneDNN linear")
@pytest.mark.parametrize("prune", [True, False])
def test_onednn_blocks_match_float64_brute_force(prune: bool) -> None:
    """The oneDNN matmul (the default for large CPU blocks) is float32-exact: same neighbours as torch.mm,
    similarities within float32 rounding, the reference's predictions."""
    g = torch.Generator().manual_seed(8)
    q, bank = torch.randn(64, 32, generator=g), torch.randn(700, 32, generator=g)
    labels = torch.randint(0, 10, (700,), generator=g)
    args = (normalize(q), bank, labels, 20, 256, 64)
    fast = _blockwise_topk(*args, normalize_bank=True, prune=prune, onednn=True)
    plain = _blockwise_topk(*args, normalize_bank=True, prune=prune, onednn=False)
    assert torch.allclose(fast[0], plain[0], rtol=0, atol=1e-6)
    assert torch.equal(fast[1], plain[1])
    for k, preds in predict_from_topk(*fast, 10, [1, 5, 20], 0.07).items():
        assert_same_as_reference(preds, q, bank, labels, 10, k, 0.07)


def test_similarities_above_threshold_are_packed_left() -> None:
    sims = torch.tensor([[0.5, 0.125, 0.75, 0.0], [0.25, 0.875, 0.375, 0.125], [0.0, 0.0, 0.0, 0.625]])
    labels, thresholds = torch.tensor([7, 8, 9, 6]), torch.tensor([0.375, 0.1875, 0.5])
    packed = _above_threshold(sims, thresholds, labels, k=3)
    assert packed is not None
    inf = float("-inf")
    assert packed[0].tolist() == [[0.5, 0.75, inf], [0.25, 0.875, 0.375], [0.625, inf, inf]]
    assert packed[1].tolist() == [[7, 9, 0], [7, 8, 9], [6, 0, 0]]
    assert _above_threshold(sims, thresholds, labels, k=2) is None  # a row has 3 > k


def test_bank_normalised_per_chunk_equals_normalised_bank() -> None:
    """Normalising chunk by chunk gives the same similarities, bit for bit, as normalising the whole bank."""
    g = torch.Generator().manual_seed(2)
    q, bank = normalize(torch.randn(30, 16, generator=g)), torch.randn(300, 16, generator=g) * 5
    labels = torch.randint(0, 10, (300,), generator=g)
    per_chunk = _blockwise_topk(q, bank, labels, 20, 13, 30, normalize_bank=True)
    whole = _blockwise_topk(q, normalize(bank), labels, 20, 13, 30, normalize_bank=False)
    assert torch.equal(per_chunk[0], whole[0])
    assert torch.equal(per_chunk[1], whole[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_bank_is_never_copied_whole(dtype: torch.dtype) -> None:
    """No allocation as large as a float32 copy of the bank, and the result of the upcast bank exactly."""
    g = torch.Generator().manual_seed(4)
    bank, labels = torch.randn(20000, 32, generator=g).to(dtype), torch.randint(0, 5, (20000,), generator=g)
    q = torch.randn(10, 32, generator=g)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        preds = knn_predict(q, bank, labels, 5, ks=[3, 10], bank_chunk=1000)
    assert max(e.cpu_memory_usage for e in prof.events()) < bank.numel() * 4 // 10
    upcast = knn_predict(q, bank.float(), labels, 5, ks=[3, 10], bank_chunk=1000)
    for k in (3, 10):
        assert torch.equal(preds[k], upcast[k])


@pytest.mark.parametrize("bounds", [[0, 300], [0, 150, 300], [0, 1, 2, 299, 300], [0, 0, 97, 211, 300]])
def test_sharded_bank_merge_matches_reference(bounds: list[int]) -> None:
    """Each shard's local top-k, merged, votes exactly as the whole bank (shards may be tiny or empty)."""
    g = torch.Generator().manual_seed(3)
    q, bank = torch.randn(40, 8, generator=g), torch.randn(300, 8, generator=g)
    labels = torch.randint(0, 6, (300,), generator=g)
    qn, bn = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(bank, dim=1)
    ks = [1, 10, 20]
    parts = [local_topk(qn, bn[a:b], labels[a:b], max(ks), bank_chunk=17) for a, b in pairwise(bounds)]
    sims, lab = merge_topk([p[0] for p in parts], [p[1] for p in parts], max(ks))
    whole = knn_predict(q, bank, labels, 6, ks=ks)
    merged = predict_from_topk(sims, lab, 6, ks, 0.07)
    for k in ks:
        assert torch.equal(merged[k], whole[k])
        assert_same_as_reference(merged[k], q, bank, labels, 6, k, 0.07)


def test_several_k_in_one_pass_equal_separate_calls() -> None:
    g = torch.Generator().manual_seed(5)
    q, bank, labels = (
        torch.randn(30, 8, generator=g),
        torch.randn(120, 8, generator=g),
        torch.randint(0, 7, (120,), generator=g),
    )
    together = knn_predict(q, bank, labels, 7, ks=[20, 1, 10])
    for k in (20, 1, 10):
        assert torch.equal(together[k], knn_predict(q, bank, labels, 7, ks=[k])[k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_separable_clusters_score_100_percent(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.eye(8)[:5] * 10
    bank_labels = torch.arange(100) % 5
    bank = (centers[bank_labels] + torch.randn(100, 8, generator=g)).to(dtype)
    q_labels = torch.arange(40) % 5
    q = centers[q_labels] + torch.randn(40, 8, generator=g)
    preds = knn_predict(q, bank, bank_labels, 5, ks=[1, 20], temperature=0.07)
    for k in (1, 20):
        assert count_correct(preds[k], q_labels) == (40, 40)


def test_exp_weighting_known_answer() -> None:
    """One close neighbour of class 0 against two farther ones of class 1: T decides, as exp(sim/T) says."""
    q = torch.tensor([[1.0, 0.0]])
    a = 0.2  # sims: 1.0 for class 0, cos(a) for both class-1 points
    bank = torch.tensor([[1.0, 0.0], [math.cos(a), math.sin(a)], [math.cos(a), -math.sin(a)]])
    labels = torch.tensor([0, 1, 1])
    # class 0 wins iff exp(1/T) > 2 exp(cos(a)/T)  <=>  T < (1 - cos a) / ln 2 = 0.0287
    assert knn_predict(q, bank, labels, 2, ks=[3], temperature=0.02)[3][0, 0] == 0
    assert knn_predict(q, bank, labels, 2, ks=[3], temperature=0.07)[3][0, 0] == 1
    scores = weighted_vote(torch.tensor([[1.0, math.cos(a), math.cos(a)]]), labels[None], 2, 0.07)
    expected = torch.tensor([1.0, 2 * math.exp((math.cos(a) - 1) / 0.07)])
    assert torch.allclose(scores[0], expected, rtol=1e-6)
    # k=1 only sees the nearest neighbour
    assert knn_predict(q, bank, labels, 2, ks=[1], temperature=0.07)[1][0, 0] == 0


def test_tiny_temperature_does_not_overflow() -> None:
    q = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    preds = knn_predict(q, bank, torch.tensor([2, 1, 0]), 3, ks=[3], temperature=0.001)
    assert preds[3][0].tolist() == [2, 1, 0]


def test_bank_smaller_than_local_k_pads_with_zero_weight() -> None:
    sims, labels = local_topk(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), torch.tensor([3]), k=4)
    assert sims[0, 1:].tolist() == [float("-inf")] * 3
    assert weighted_vote(sims, labels, 4, 0.07)[0].tolist() == [0.0, 0.0, 0.0, 1.0]
    empty = local_topk(torch.tensor([[1.0, 0.0]]), torch.empty(0, 2), torch.empty(0, dtype=torch.long), k=2)
    assert weighted_vote(*empty, 4, 0.07).sum() == 0


def test_top5_counts_and_few_classes() -> None:
    preds = torch.tensor([[3, 1, 0, 2, 4], [0, 1, 2, 3, 4]])
    assert count_correct(preds, torch.tensor([1, 0])) == (1, 2)
    g = torch.Generator().manual_seed(0)
    q, bank, labels = torch.randn(12, 3, generator=g), torch.randn(9, 3, generator=g), torch.arange(9) % 3
    three = knn_predict(q, bank, labels, 3, ks=[4, 1])
    assert three[4].shape == (12, 3)  # top-5 of 3 classes is top-3: every query is a top-5 hit
    assert count_correct(three[4], torch.arange(12) % 3)[1] == 12
    # As DINO: with k=1 only the nearest neighbour's class is ranked, so top-5 equals top-1.
    assert three[1].shape == (12, 1)
    top1, top5 = count_correct(three[1], torch.arange(12) % 3)
    assert top1 == top5


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ks": [0]}, "k must be >= 1"),
        ({"ks": [11]}, "exceeds the memory bank size 10"),
        ({"ks": [5, 5]}, "distinct"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"ks": [3], "query_chunk": 0}, "query_chunk must be >= 1"),
        ({"ks": [3], "bank_chunk": 0}, "bank_chunk must be >= 1"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        knn_predict(torch.randn(2, 4), torch.randn(10, 4), torch.zeros(10, dtype=torch.long), 2, **kwargs)


def test_out_of_range_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match=r"bank labels must lie in \[0, 2\)"):
        knn_predict(torch.randn(2, 4), torch.randn(10, 4), torch.full((10,), 2), 2, ks=[3])


def test_the_top_k_update_runs_on_one_thread_and_the_thread_count_comes_back(monkeypatch) -> None:
    """The update of each block runs with torch's intra-op threads at 1 (no OpenMP barriers to wait on
    when other jobs share the CPU); the matmul and the caller keep their thread count, also on errors."""
    import ftforget.forgetting.knn as knn

    seen: list[int] = []
    real = knn._update_topk
    monkeypatch.setattr(knn, "_update_topk", lambda *a: seen.append(torch.get_num_threads()) or real(*a))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(0)
        bank, queries = torch.randn(300, 8, generator=g), torch.randn(7, 8, generator=g)
        labels = torch.arange(300) % 3
        expected = knn.knn_predict(queries, bank, labels, 3, ks=[5], bank_chunk=300)
        seen.clear()
        got = knn.knn_predict(queries, bank, labels, 3, ks=[5], bank_chunk=64)
        assert seen == [1] * 5 and torch.get_num_threads() == 2
        assert torch.equal(got[5], expected[5])
        monkeypatch.setattr(knn, "_update_topk", lambda *a: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            knn.knn_predict(queries, bank, labels, 3, ks=[5])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
