"""Collectives for the probe, each a no-op in a single process.

Rules kept here: every rank enters every collective (none is ever behind a rank check), and tensors of
different row counts (uneven shards, even empty ones) travel without padding reaching the caller.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device(fallback: torch.device) -> torch.device:
    """NCCL only moves CUDA tensors, gloo only CPU ones."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    return fallback


def shard_range(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous slice of ``range(n)``; sizes differ by at most one and nothing is padded."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates every rank's tensor along dim 0, in rank order; row counts may differ (even be 0).

    A rank with no rows may not know the trailing shape yet (no batch ran), so the trailing shape is
    agreed on by a max-reduction first.
    """
    _, world = dist_info()
    if world == 1:
        return tensor
    device = _comm_device(tensor.device)
    ndim = torch.tensor([tensor.dim()], device=device)
    dist.all_reduce(ndim, op=dist.ReduceOp.MAX)
    shape = list(tensor.shape) + [0] * (int(ndim) - tensor.dim())
    sizes = torch.tensor(shape, device=device)
    gathered_sizes = [torch.zeros_like(sizes) for _ in range(world)]
    dist.all_gather(gathered_sizes, sizes)
    trailing = torch.stack(gathered_sizes)[:, 1:].max(dim=0).values.tolist()
    rows = [int(s[0]) for s in gathered_sizes]
    padded = tensor.new_zeros((max(rows), *trailing), device=device)
    if tensor.shape[0]:
        padded[: tensor.shape[0]] = tensor.reshape(tensor.shape[0], *trailing).to(device)
    buffers = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(buffers, padded)
    return torch.cat([b[:r] for b, r in zip(buffers, rows, strict=True)]).to(tensor.device)


def all_reduce_sum(values: Sequence[float], device: torch.device) -> list[float]:
    """Sums a few numbers over ranks (float64, exact for counts)."""
    t = torch.tensor(list(values), dtype=torch.float64, device=_comm_device(device))
    if dist_info()[1] > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """True only if ``flag`` is true on every rank, so that all ranks take the same branch."""
    t = torch.tensor([1 if flag else 0], device=_comm_device(device))
    if dist_info()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())
