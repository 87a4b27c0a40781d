"""DINO's weighted k-NN classifier, split into the pieces a sharded bank needs; no Lightning, no collectives.

DINO (``eval_knn.py``) classifies a query by its ``k`` most cosine-similar bank features, each voting for its
label with weight ``exp(sim / T)``. With the bank sharded across ranks, every rank computes the top-k of its
own shard (:func:`local_topk`), the candidates of all shards are merged (:func:`merge_topk`), and the merged
top-k vote (:func:`weighted_vote`). The global top-k is always inside the union of the shards' top-k, so the
result does not depend on the sharding (ties at the k-th neighbour aside).

On a CPU the search is bound by the similarity matmul. It runs through oneDNN's float32 linear where this
torch has it (434 GFLOP/s against 193 for the MKL GEMM behind ``torch.mm`` on an AVX-512 AMD EPYC with 2
cores, about the AVX-512 and AVX2 peaks), in cache-sized blocks of :data:`DEFAULT_BANK_CHUNK` bank rows, and most blocks cost
little more than their matmul: a query whose best similarity in a block does not beat its current k-th
neighbour skips the block (one ``amax``), and in later blocks only the few similarities above the k-th
are gathered and merged instead of a ``topk`` of the query's row. The top-k is the same as a ``topk`` of
every block, exactly (see benchmarks/bench_knn.py for the comparison with faiss-cpu and DINO's code).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
# Queries per similarity block in knn_predict.
DEFAULT_QUERY_CHUNK = 1024
# Bank rows per similarity block: a 1024 x 4096 float32 block (16 MiB, against 256 MiB for 65536 rows)
# keeps the CPU matmul near its peak (benchmarks/bench_knn.py). On a GPU, where every block costs a few
# kernel launches, larger blocks are likely better (not measured yet).
DEFAULT_BANK_CHUNK = 4096
# Smallest block (queries x bank rows x dim multiply-adds) worth oneDNN: below it, its per-call threading
# costs more than the matmul (milliseconds for some tiny shapes), and torch.mm computes it.
_ONEDNN_MIN_MACS = 1 << 24


def check_knn_args(ks: Sequence[int], temperature: float, bank_size: int | None = None) -> list[int]:
    """Validates the k values and the temperature; returns the k values as a list of ints.

    Raises:
        ValueError: naming the offending value.
    """
    ks = [int(k) for k in ks]
    if not ks:
        raise ValueError("k: at least one value is needed")
    if any(k < 1 for k in ks):
        raise ValueError(f"k must be >= 1, got {ks}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"k values must be distinct, got {ks}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if bank_size is not None and max(ks) > bank_size:
        raise ValueError(f"k={max(ks)} exceeds the memory bank size {bank_size}")
    return ks


def normalize(features: torch.Tensor) -> torch.Tensor:
    """L2-normalises rows in float32 (cosine similarity is then a dot product)."""
    return F.normalize(features.float(), dim=1)


def local_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    k: int,
    bank_chunk: int = DEFAULT_BANK_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most similar bank rows of every query, chunk by chunk over the bank.

    Args:
        queries: L2-normalised query features, ``(Q, D)``.
        bank: L2-normalised bank features ``(N, D)``, any floating dtype (fp16/bf16 storage is upcast per
            chunk, similarities are float32).
        bank_labels: ``(N,)`` integer labels.
        k: neighbours to keep.
        bank_chunk: bank rows per similarity block (bounds memory at ``Q * bank_chunk`` floats).

    Returns:
        ``(sims, labels)``, both ``(Q, k)`` sorted by decreasing similarity. Where the bank has fewer than
        ``k`` rows the missing slots hold similarity ``-inf`` (vote weight 0) and label 0.
    """
    return _blockwise_topk(queries, bank, bank_labels, k, bank_chunk, queries.shape[0], normalize_bank=False)


def _blockwise_topk(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    k: int,
    bank_chunk: int,
    query_chunk: int,
    normalize_bank: bool,
    prune: bool | None = None,
    onednn: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`local_topk` over ``query_chunk x bank_chunk`` similarity blocks, bank chunks outermost.

    Each bank chunk is upcast (and, with ``normalize_bank``, L2-normalised) once, so no full float32 copy
    of the bank is ever made. Every query keeps a running top-k, updated block by block.

    Args:
        queries: L2-normalised queries ``(Q, D)``.
        bank: bank features ``(N, D)``, any floating dtype.
        bank_labels: ``(N,)`` labels.
        k: neighbours to keep.
        bank_chunk: bank rows per block.
        query_chunk: queries per block (values below 1 mean one block, e.g. for zero queries).
        normalize_bank: L2-normalise each bank chunk (as :func:`normalize` does for the whole bank).
        prune: skip the top-k of a block for the queries it cannot change (a sync per block: the default
            is on for CPU tensors only).
        onednn: compute the blocks with oneDNN's linear instead of ``torch.mm``: True for every block,
            False for none, None (default) for blocks of at least ``_ONEDNN_MIN_MACS``; only where
            :func:`_onednn_linear` finds it, for CPU tensors without autograd.

    Returns:
        ``(sims, labels)`` as :func:`local_topk`.
    """
    if bank_chunk < 1:
        raise ValueError(f"bank_chunk must be >= 1, got {bank_chunk}")
    q = queries.float().contiguous()
    n_queries, n_bank = q.shape[0], bank.shape[0]
    cpu = q.device.type == "cpu"
    prune = cpu if prune is None else prune
    linear = _onednn_linear() if cpu and not q.requires_grad and onednn is not False else None
    if onednn and linear is None:
        raise RuntimeError("oneDNN's float32 linear is not available for these tensors")
    best_sims = q.new_full((n_queries, k), float("-inf"))
    best_labels = torch.zeros(n_queries, k, dtype=torch.long, device=q.device)
    query_chunk = max(1, min(query_chunk, n_queries))
    buffer = None  # one buffer for every torch.mm similarity block, instead of an allocation per block
    staging = None
    for start in range(0, n_bank, bank_chunk):
        chunk = bank[start : start + bank_chunk]
        if normalize_bank or chunk.dtype != torch.float32 or chunk.device != q.device:
            # Upcast and normalise into one reused buffer: a fresh allocation per chunk costs page faults.
            if staging is None:
                staging = q.new_empty(min(bank_chunk, n_bank), bank.shape[1])
            chunk = _stage_chunk(chunk, staging[: chunk.shape[0]], normalize_bank)
        chunk_labels = bank_labels[start : start + bank_chunk].to(q.device)
        for q_start in range(0, n_queries, query_chunk):
            rows = q[q_start : q_start + query_chunk]
            macs = rows.shape[0] * chunk.shape[0] * chunk.shape[1]
            if linear is not None and not chunk.requires_grad and (onednn or macs >= _ONEDNN_MIN_MACS):
                sims = linear(rows, chunk.contiguous())
            else:
                if buffer is None:
                    buffer = q.new_empty(query_chunk * min(bank_chunk, n_bank))
                sims = buffer[: rows.shape[0] * chunk.shape[0]].view(rows.shape[0], chunk.shape[0])
                torch.mm(rows, chunk.T, out=sims)
            with _one_thread() if cpu else nullcontext():
                _update_topk(
                    best_sims[q_start : q_start + query_chunk],
                    best_labels[q_start : q_start + query_chunk],
                    sims,
                    chunk_labels,
                    prune,
                )
    return best_sims, best_labels


@contextmanager
def _one_thread() -> Iterator[None]:
    """torch's intra-op threads set to 1 inside (restored after): the top-k update of a block on the CPU.

    The update is a handful of passes over a block (``amax``, a comparison, ``nonzero``, gathers), each
    an OpenMP region that ends in a barrier. On a CPU shared with other jobs a barrier waits for a
    descheduled thread while the others spin: with 2 threads and one other busy process the whole
    search ran 3-4x slower (35-46 s instead of 10.7 s for 2,000 queries x 1.28M rows on 2 cores).
    Single-threaded, the update has no barrier; the matmul keeps every thread. Measured on 2,000 x
    262,144: 11% slower on a quiet machine (2.74 s against 2.46 s), up to 3.4x faster on a busy one.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stage_chunk(chunk: torch.Tensor, out: torch.Tensor, normalize_rows: bool) -> torch.Tensor:
    """``chunk`` as float32 on ``out``'s device, written into ``out``; with ``normalize_rows``, L2-normalised
    exactly as :func:`normalize` (``F.normalize`` of the float32 rows, bit for bit)."""
    if not normalize_rows:
        return out.copy_(chunk)
    if chunk.dtype != torch.float32 or chunk.device != out.device:
        chunk = out.copy_(chunk)
    # F.normalize: x / x.norm(2, dim, keepdim=True).clamp_min(eps), eps=1e-12
    return torch.div(chunk, chunk.norm(2, dim=1, keepdim=True).clamp_min_(1e-12), out=out)


@functools.cache
def _onednn_linear() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """``(a, b) -> a @ b.T`` by oneDNN's float32 linear for CPU tensors, or None where this torch lacks it.

    ``torch.ops.mkldnn._linear_pointwise`` is the op torch's compiler uses for CPU linears. Plain float32
    arithmetic (unless ``torch.backends.mkldnn``'s fp32 precision is lowered on purpose, as for
    ``torch.mm``); it is checked once against ``torch.mm`` here, and any failure means ``torch.mm``.
    """
    try:
        op = torch.ops.mkldnn._linear_pointwise
        if not torch.backends.mkldnn.is_available():
            return None
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(5, 64, generator=g), torch.randn(7, 64, generator=g)
        if not torch.allclose(op(a, b, None, "none", [], ""), a @ b.T, rtol=1e-5, atol=1e-5):
            return None
    except (AttributeError, RuntimeError):
        return None
    return lambda a, b: op(a, b, None, "none", [], "")


def _update_topk(
    best_sims: torch.Tensor,
    best_labels: torch.Tensor,
    sims: torch.Tensor,
    chunk_labels: torch.Tensor,
    prune: bool,
) -> None:
    """Merges one similarity block ``(q, n)`` into the running top-k ``(q, k)``, in place.

    With ``prune``, only the similarities above a row's current k-th one can enter its top-k (a tie with
    the k-th neighbour may go either way, as in any top-k): rows whose block maximum does not beat it are
    skipped, and where some rows are skipped and every other one has at most ``k`` such similarities,
    only those are gathered and merged, without a top-k of the block's rows.
    """
    k = best_sims.shape[1]
    rows = None
    if prune:
        thresholds = best_sims[:, -1]
        rows = (sims.amax(dim=1) > thresholds).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        if rows.numel() == sims.shape[0]:
            rows = None
        else:
            sims = sims.index_select(0, rows)
            thresholds = thresholds.index_select(0, rows)
    old_sims = best_sims if rows is None else best_sims.index_select(0, rows)
    old_labels = best_labels if rows is None else best_labels.index_select(0, rows)
    # Where every row is hit, the block is an early one: most rows have more than k similarities above.
    candidates = _above_threshold(sims, thresholds, chunk_labels, k) if rows is not None else None
    if candidates is None:
        top_sims, top_idx = sims.topk(min(k, sims.shape[1]), dim=1)
        candidates = top_sims, chunk_labels[top_idx]
    new_sims, new_labels = merge_topk([old_sims, candidates[0]], [old_labels, candidates[1]], k)
    if rows is None:
        best_sims.copy_(new_sims)
        best_labels.copy_(new_labels)
    else:
        best_sims.index_copy_(0, rows, new_sims)
        best_labels.index_copy_(0, rows, new_labels)


def _above_threshold(
    sims: torch.Tensor, thresholds: torch.Tensor, chunk_labels: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Every row's similarities above its threshold, packed left into ``(q, m)`` with their labels.

    Returns None where some row has more than ``k`` of them, or has no k-th neighbour yet (threshold
    ``-inf``): a top-k of the rows is then the cheaper way. Unused slots hold similarity ``-inf`` and label
    0. After the first few blocks rows usually have a handful of such similarities, so this costs one
    comparison pass and a few small gathers, where a top-k of a row copies and partially sorts it.
    """
    if bool(torch.isneginf(thresholds).any()):
        return None
    row, col = (sims > thresholds[:, None]).nonzero(as_tuple=True)  # row-major: a row's hits are adjacent
    counts = torch.bincount(row, minlength=sims.shape[0])
    width = int(counts.max())
    if width > k:
        return None
    slot = torch.arange(row.numel(), device=row.device) - (counts.cumsum(0) - counts)[row]
    packed_sims = sims.new_full((sims.shape[0], width), float("-inf"))
    packed_labels = torch.zeros(sims.shape[0], width, dtype=torch.long, device=sims.device)
    packed_sims[row, slot] = sims[row, col]
    packed_labels[row, slot] = chunk_labels[col]
    return packed_sims, packed_labels


def merge_topk(
    sims: Sequence[torch.Tensor], labels: Sequence[torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merges candidate lists ``(Q, k_i)`` (e.g. one per bank shard) into the overall top-``k``, sorted."""
    all_sims = torch.cat(list(sims), dim=1)
    all_labels = torch.cat(list(labels), dim=1)
    top_sims, pos = all_sims.topk(min(k, all_sims.shape[1]), dim=1)
    return top_sims, all_labels.gather(1, pos)


def weighted_vote(
    sims: torch.Tensor, labels: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Class scores ``(Q, C)``: each neighbour adds ``exp(sim / T)`` to its label (DINO's vote).

    The weights are computed as ``exp((sim - max_sim) / T)``, a positive per-query constant times DINO's,
    so the ranking of the classes is DINO's exactly while small temperatures cannot overflow float32.
    """
    top = sims[:, :1]
    # Empty slots (-inf) of a bank smaller than k get weight exactly 0.
    weights = torch.exp((sims - top) / temperature).nan_to_num(nan=0.0)
    scores = torch.zeros(sims.shape[0], num_classes, dtype=weights.dtype, device=sims.device)
    return scores.scatter_add_(1, labels, weights)


def predict_from_topk(
    sims: torch.Tensor, labels: torch.Tensor, num_classes: int, ks: Sequence[int], temperature: float
) -> dict[int, torch.Tensor]:
    """Ranked class predictions ``(Q, min(5, k, C))`` per k, best first.

    As DINO's ``knn_classifier``, top-5 looks at ``min(5, k)`` predictions: beyond the k-th, classes have
    no vote and their order would be arbitrary.

    Args:
        sims: merged neighbour similarities ``(Q, >= max(ks))``, sorted decreasingly.
        labels: their labels.
        num_classes: number of classes.
        ks: neighbour counts; each uses the first ``k`` columns, so one top-k pass serves them all.
        temperature: DINO's T.
    """
    out: dict[int, torch.Tensor] = {}
    for k in ks:
        scores = weighted_vote(sims[:, :k], labels[:, :k], num_classes, temperature)
        out[k] = scores.topk(min(5, k, num_classes), dim=1).indices
    return out


def count_correct(predictions: torch.Tensor, targets: torch.Tensor) -> tuple[int, int]:
    """(top-1 hits, top-5 hits) of ``(Q, m)`` ranked predictions against ``(Q,)`` targets."""
    hits = predictions == targets.to(predictions.device)[:, None]
    return int(hits[:, 0].sum()), int(hits.any(dim=1).sum())


def knn_predict(
    queries: torch.Tensor,
    bank: torch.Tensor,
    bank_labels: torch.Tensor,
    num_classes: int,
    ks: Sequence[int] = (DEFAULT_K,),
    temperature: float = DEFAULT_TEMPERATURE,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
    bank_chunk: int = DEFAULT_BANK_CHUNK,
) -> dict[int, torch.Tensor]:
    """Weighted k-NN predictions for every query against a whole (single-process) bank.

    The bank is normalised chunk by chunk (no normalised copy of the whole bank is made, whatever its
    dtype); the queries are normalised into one float32 copy.

    Args:
        queries: ``(Q, D)`` features (normalised here).
        bank: ``(N, D)`` features (normalised here, per chunk).
        bank_labels: ``(N,)`` labels in ``[0, num_classes)``.
        num_classes: number of classes.
        ks: neighbour counts evaluated in one pass.
        temperature: DINO's T.
        query_chunk: queries per block.
        bank_chunk: bank rows per block.

    Returns:
        ``k -> (Q, min(5, k, C))`` predictions, best first.
    """
    ks = check_knn_args(ks, temperature, bank_size=bank.shape[0])
    check_labels(bank_labels, num_classes, "bank")
    if query_chunk < 1:
        raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
    sims, labels = _blockwise_topk(
        normalize(queries), bank, bank_labels, max(ks), bank_chunk, query_chunk, normalize_bank=True
    )
    preds: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    for start in range(0, queries.shape[0], query_chunk):
        rows = slice(start, start + query_chunk)
        for k, p in predict_from_topk(sims[rows], labels[rows], num_classes, ks, temperature).items():
            preds[k].append(p)
    return {
        k: torch.cat(p)
        if p
        else torch.empty(0, min(5, k, num_classes), dtype=torch.long, device=queries.device)
        for k, p in preds.items()
    }


def check_labels(labels: torch.Tensor, num_classes: int, what: str) -> None:
    """Raises ``ValueError`` if a label lies outside ``[0, num_classes)``."""
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{what} labels must lie in [0, {num_classes}), got min {int(labels.min())}, max {int(labels.max())}"
        )
