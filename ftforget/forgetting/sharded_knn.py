"""The k-NN driver over ranks: queries gathered once, the bank left sharded, top-k candidates merged.

No rank ever holds the whole bank: only the queries and each query chunk's top-k candidates travel
between ranks (:mod:`~ftforget.forgetting.collectives`); the arithmetic is :mod:`~ftforget.forgetting.knn`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ftforget.forgetting.collectives import all_gather_rows, dist_info
from ftforget.forgetting.features import ShardFeatures
from ftforget.forgetting.knn import count_correct, local_topk, merge_topk, predict_from_topk
from ftforget.progress import progress_bar


def gather_queries(local: ShardFeatures, expected: int) -> ShardFeatures:
    """All ranks' query shards, ordered by sample index, after checking each sample appears exactly once.

    Raises:
        RuntimeError: a sample is missing or duplicated (a padding sampler, or a dataset whose length
            changed between ranks).
    """
    feats = all_gather_rows(local.features)
    labels = all_gather_rows(local.labels)
    indices = all_gather_rows(local.indices)
    order = indices.argsort()
    indices = indices[order]
    if indices.numel() != expected or not torch.equal(indices.cpu(), torch.arange(expected)):
        raise RuntimeError(
            f"distributed feature extraction covered {indices.numel()} query samples, expected each of "
            f"{expected} exactly once"
        )
    return ShardFeatures(feats[order], labels[order], indices)


def sharded_knn_hits(
    queries: ShardFeatures,
    bank: ShardFeatures,
    num_classes: int,
    ks: Sequence[int],
    temperature: float,
    query_chunk: int,
    bank_chunk: int,
) -> tuple[dict[int, tuple[int, int]], dict[int, torch.Tensor]]:
    """Top-1 and top-5 hit counts per k of every query against the bank sharded over the ranks, and per k
    the per-query top-1 hit vector.

    Every rank holds all queries and its own bank shard; per query chunk (the same chunks on every rank)
    each rank finds its local top-k, the candidates are all-gathered and merged, and every rank votes on
    the merged top-k, so all ranks end with the same counts without a broadcast. Rank 0 shows the
    queries done (:func:`~ftforget.progress.progress_bar`).

    Returns:
        ``(counts, hits)``: per k, ``(top-1 hits, top-5 hits)``, and a ``(Q,)`` bool CPU tensor
        in the order of ``queries`` (by sample index after :func:`gather_queries`), True where the
        query's top-1 prediction is its label; ``hits[k].sum()`` is ``counts[k][0]``. Every rank votes
        on the same merged top-k, so every rank ends with the same vectors.
    """
    k_max = max(ks)
    _, world = dist_info()
    counts = {k: [0, 0] for k in ks}
    hit_chunks: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    n = queries.features.shape[0]
    with progress_bar(n, "k-NN", unit="query") as bar:
        for start in range(0, n, query_chunk):
            q = queries.features[start : start + query_chunk].float()
            sims, labels = local_topk(q, bank.features, bank.labels, k_max, bank_chunk)
            if world > 1:
                all_sims = all_gather_rows(sims[None]).flatten(0, 1).split(len(q))
                all_labels = all_gather_rows(labels[None]).flatten(0, 1).split(len(q))
                sims, labels = merge_topk(all_sims, all_labels, k_max)
            preds = predict_from_topk(sims, labels, num_classes, ks, temperature)
            targets = queries.labels[start : start + query_chunk]
            for k, p in preds.items():
                top1, top5 = count_correct(p, targets)
                counts[k][0] += top1
                counts[k][1] += top5
                hit_chunks[k].append((p[:, 0] == targets.to(p.device)).cpu())
            bar.update(len(q))
    hits = {
        k: torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.bool)
        for k, chunks in hit_chunks.items()
    }
    return {k: (c[0], c[1]) for k, c in counts.items()}, hits
