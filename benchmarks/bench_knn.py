"""Exact k-NN search time: ftforget's ``knn_predict`` against a DINO-style reference and faiss-cpu.

Builds a synthetic bank of L2-normalised Gaussian features with random labels (fixed seed), then times,
in ``--rounds`` interleaved rounds, the weighted k-NN classification of ``--num_queries`` queries by

* ftforget: :func:`ftforget.forgetting.knn.knn_predict` with its default chunk sizes (or the given ones);
* DINO-style: DINO's ``eval_knn.knn_classifier`` (queries in 100 chunks, each against the whole bank:
  one ``mm``, one ``topk``, a one-hot weighted vote);
* faiss: the top-k of faiss-cpu's exact inner-product index ``IndexFlatIP`` (the index is built before the
  clock starts), voted by ftforget's :func:`predict_from_topk`.

It prints each round's seconds with the load average at its end (the machine may be shared), the median, the ratio ftforget / faiss, and whether the three give the
same top-1 prediction for every query (it exits 1 if they do not). The paper's scale (the default) needs
about 8 GiB (the bank and faiss's copy of it); a small run::

    python benchmarks/bench_knn.py --bank_size 100000 --num_queries 500 --rounds 2

faiss-cpu is in the ``bench`` extra; without it the faiss column is skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ftforget.forgetting.knn import (
    DEFAULT_BANK_CHUNK,
    DEFAULT_QUERY_CHUNK,
    DEFAULT_TEMPERATURE,
    knn_predict,
    predict_from_topk,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank_size", type=int, default=1_281_167)
    p.add_argument("--num_queries", type=int, default=2_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--num_classes", type=int, default=1000)
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--query_chunk", type=int, default=DEFAULT_QUERY_CHUNK, help="ftforget's query_chunk")
    p.add_argument("--bank_chunk", type=int, default=DEFAULT_BANK_CHUNK, help="ftforget's bank_chunk")
    p.add_argument("--dino_chunks", type=int, default=100, help="DINO's num_chunks of the queries")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and faiss threads")
    p.add_argument("--no_faiss", action="store_true", help="skip faiss even where it is installed")
    p.add_argument("--no_dino", action="store_true", help="skip the DINO-style reference (the slowest)")
    return p.parse_args(argv)


def make_data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised bank ``(N, D)``, its labels and normalised queries, filled block-wise (no 2x peak)."""
    g = torch.Generator().manual_seed(args.seed)
    bank = torch.empty(args.bank_size, args.dim)
    for start in range(0, args.bank_size, 65536):
        block = bank[start : start + 65536]
        block.normal_(generator=g)
        block.div_(block.norm(dim=1, keepdim=True))
    labels = torch.randint(0, args.num_classes, (args.bank_size,), generator=g)
    queries = F.normalize(torch.randn(args.num_queries, args.dim, generator=g), dim=1)
    return bank, labels, queries


def dino_knn_top1(
    queries: torch.Tensor, bank: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int, chunks: int
) -> torch.Tensor:
    """DINO's ``knn_classifier`` (eval_knn.py), top-1 predictions; the bank is already normalised."""
    train_features = bank.t()
    num_test_images = queries.shape[0]
    imgs_per_chunk = max(1, num_test_images // chunks)
    retrieval_one_hot = torch.zeros(k, num_classes)
    top1 = []
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = queries[idx : idx + imgs_per_chunk]
        batch_size = features.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(DEFAULT_TEMPERATURE).exp_()
        probs = torch.sum(
            torch.mul(
                retrieval_one_hot.view(batch_size, -1, num_classes),
                distances_transform.view(batch_size, -1, 1),
            ),
            1,
        )
        top1.append(probs.argmax(dim=1))
    return torch.cat(top1)


def faiss_search(
    bank: torch.Tensor, k: int
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """A search function over faiss's exact inner-product index of ``bank``, or None without faiss."""
    try:
        import faiss
    except ImportError:
        return None
    index = faiss.IndexFlatIP(bank.shape[1])
    index.add(bank.numpy())

    def search(queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sims, idx = index.search(queries.numpy(), k)
        return torch.from_numpy(sims), torch.from_numpy(idx)

    return search


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bank, labels, queries = make_data(args)
    search = None if args.no_faiss else faiss_search(bank, args.k)
    if search is not None:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    print(
        f"{args.num_queries} queries x {args.bank_size} bank, dim {args.dim}, float32, k={args.k}, "
        f"{args.num_classes} classes, {args.threads} threads, torch {torch.__version__}"
        + ("" if search is None else f", faiss {sys.modules['faiss'].__version__}")
    )
    print(f"ftforget knn_predict: query_chunk={args.query_chunk}, bank_chunk={args.bank_chunk}")

    def run_ftforget() -> torch.Tensor:
        preds = knn_predict(
            queries,
            bank,
            labels,
            args.num_classes,
            ks=[args.k],
            query_chunk=args.query_chunk,
            bank_chunk=args.bank_chunk,
        )
        return preds[args.k][:, 0]

    def run_faiss() -> torch.Tensor:
        sims, idx = search(queries)
        preds = predict_from_topk(sims, labels[idx], args.num_classes, [args.k], DEFAULT_TEMPERATURE)
        return preds[args.k][:, 0]

    runs: dict[str, Callable[[], torch.Tensor]] = {"ftforget": run_ftforget}
    if not args.no_dino:
        runs["DINO-style"] = lambda: dino_knn_top1(
            queries, bank, labels, args.num_classes, args.k, args.dino_chunks
        )
    if search is not None:
        runs["faiss IndexFlatIP"] = run_faiss
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    top1: dict[str, torch.Tensor] = {}
    for r in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            top1[name] = fn()
            seconds[name].append(time.perf_counter() - start)
            load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
            print(f"round {r + 1}: {name} {seconds[name][-1]:.2f} s (load average {load})", flush=True)

    print("\n| run | " + " | ".join(f"round {r + 1} s" for r in range(args.rounds)) + " | median s |")
    print("|---|" + "---|" * (args.rounds + 1))
    for name, s in seconds.items():
        print(f"| {name} | " + " | ".join(f"{x:.2f}" for x in s) + f" | {statistics.median(s):.2f} |")
    if search is not None:
        ratios = [a / b for a, b in zip(seconds["ftforget"], seconds["faiss IndexFlatIP"], strict=True)]
        med = statistics.median(seconds["ftforget"]) / statistics.median(seconds["faiss IndexFlatIP"])
        print(
            f"\nftforget / faiss per round: {', '.join(f'{x:.3f}' for x in ratios)}; of the medians: {med:.3f}"
        )
    reference = top1["ftforget"]
    same = True
    for name, pred in top1.items():
        diff = int((pred != reference).sum())
        same &= diff == 0
        print(f"top-1 of {name}: {'identical to' if diff == 0 else f'{diff} queries differ from'} ftforget's")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
