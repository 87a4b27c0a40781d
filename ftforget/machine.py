"""Defaults that depend on the machine, written once: data-loading workers and torch CPU threads.

No other ftforget module is imported here, so that configs (:class:`~ftforget.forgetting.KNNConfig`), data
modules and the CLI can all take their defaults from this one place.
"""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

#: more loader workers than this rarely helps one process and multiplies its memory
MAX_DEFAULT_WORKERS = 8


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one, else ``os.cpu_count()``)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def default_num_workers() -> int:
    """Data-loading workers per process: one core left to the main process, at most 8.

    ``min(8, cores - 1)``: 0 (load in the main process) on 1 core, 1 on 2 cores, 8 from 9 cores on.
    """
    return min(MAX_DEFAULT_WORKERS, available_cores() - 1)


def uses_cpu(accelerator: object) -> bool:
    """Whether a trainer with this ``accelerator`` setting computes on the CPU.

    Args:
        accelerator: ``trainer.accelerator`` as configured (``"cpu"``, ``"gpu"``, ``"auto"``, None, or an
            ``Accelerator`` object).
    """
    if accelerator is None or isinstance(accelerator, str):
        name = (accelerator or "auto").lower()
    else:
        name = type(accelerator).__name__.lower()  # CPUAccelerator, CUDAAccelerator, ...
    if "cpu" in name:
        return True
    if name == "auto":
        return not (torch.cuda.is_available() or torch.backends.mps.is_available())
    return False


def default_threads(accelerator: object) -> int | None:
    """torch intra-op threads for a run on ``accelerator``; None leaves torch's own setting.

    On a GPU the CPU only feeds it: torch's default. On the CPU, half the cores (at least 1, and never more
    than torch's current setting, so ``OMP_NUM_THREADS`` or an earlier ``torch.set_num_threads`` still
    caps it): the data-loading workers and the main process need the other half, and on a 2-core machine
    one thread ran the demo's tiny ViT 2.5-6x faster than two (``benchmarks/bench_demo_fit.py``).
    """
    if not uses_cpu(accelerator):
        return None
    return max(1, min(torch.get_num_threads(), available_cores() // 2))


def configure_threads(threads: int | None, accelerator: object) -> int | None:
    """Sets torch's intra-op threads to ``threads``, or to :func:`default_threads` when None.

    Args:
        threads: the ``--threads`` option; None: the machine's default.
        accelerator: ``trainer.accelerator`` as configured.

    Returns:
        The thread count set, or None when torch's own setting was left alone.
    """
    count = default_threads(accelerator) if threads is None else int(threads)
    if count is None:
        return None
    if count < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    if count != torch.get_num_threads():
        log.info("torch CPU threads: %d (was %d; --threads N sets it)", count, torch.get_num_threads())
        torch.set_num_threads(count)
    return count
