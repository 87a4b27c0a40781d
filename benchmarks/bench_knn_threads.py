"""How the k-NN's threading holds up on a shared CPU: the top-k update on one thread or on all of them.

Times :func:`ftforget.forgetting.knn.knn_predict` in one process, variants interleaved over ``--rounds``
rounds (after one warm-up call), on ``--num_queries`` random queries against ``--bank_size`` random rows:

* ``one-thread update`` (ftforget's default): each block's top-k update with one intra-op thread, the
  similarity matmul with all of them;
* ``all-thread update``: the update with all threads too (ftforget before; its OpenMP barriers wait
  for descheduled threads when other jobs share the CPU);
* ``all on one thread``: ``torch.set_num_threads(1)`` for the whole search.

It prints each round's seconds with the load average (run it while the machine is busy and while it is
quiet to see both sides)::

    python benchmarks/bench_knn_threads.py --bank_size 262144 --num_queries 2000 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import ftforget.forgetting.knn as knn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bank_size", type=int, default=262_144)
    p.add_argument("--num_queries", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(args.bank_size, 768, generator=g), dim=1)
    labels = torch.randint(0, 1000, (args.bank_size,), generator=g)
    queries = torch.randn(args.num_queries, 768, generator=g)
    one_thread = knn._one_thread

    def run(variant: str) -> float:
        knn._one_thread = nullcontext if variant == "all-thread update" else one_thread  # type: ignore[assignment]
        torch.set_num_threads(1 if variant == "all on one thread" else args.threads)
        start = time.perf_counter()
        knn.knn_predict(queries, bank, labels, 1000)
        seconds = time.perf_counter() - start
        torch.set_num_threads(args.threads)
        knn._one_thread = one_thread
        return seconds

    variants = ["one-thread update", "all-thread update", "all on one thread"]
    run(variants[0])
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            times[v].append(run(v))
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(
            f"round {r + 1}: " + ", ".join(f"{v} {t[-1]:.2f} s" for v, t in times.items()) + f" (load {load})"
        )
    print("median: " + ", ".join(f"{v} {statistics.median(t):.2f} s" for v, t in times.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
