"""Collectives for metric statistics and loss histories: sums, ordered gathers and shards, no-ops without
``torch.distributed``.

Every rank must call these (never from rank-zero-only code: a collective that only rank 0 enters hangs,
the torchmetrics#2684 failure; docs/metrics.md#multi-gpu-evaluation). Tensors travel on the process group's device
(CPU for
gloo, the current CUDA device for nccl) and come back on the caller's device.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank_and_world", "all_reduce_sum", "all_gather_rows", "shard"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without an initialised process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over all ranks (same shape and dtype; keep float64 for feature moments)."""
    if not is_distributed():
        return tensor
    buf = tensor.to(_comm_device()).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(tensor.device)


def all_gather_rows(rows: torch.Tensor) -> torch.Tensor:
    """``[sum_r N_r, ...]``: every rank's ``[N_r, ...]`` rows concatenated in rank order (N_r may differ)."""
    if not is_distributed():
        return rows
    device = _comm_device()
    counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, torch.tensor([rows.shape[0]], device=device))
    counts = [int(c) for c in counts]
    padded = rows.new_zeros((max(counts), *rows.shape[1:]), device=device)
    padded[: rows.shape[0]] = rows.to(device)
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, counts, strict=True)]).to(rows.device)


def shard(n: int, rank: int | None = None, world: int | None = None) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` handles (sizes differ by at most one), so that
    gathering in rank order restores the original order. Defaults to this process's rank and world."""
    if rank is None or world is None:
        rank, world = rank_and_world()
    return range(rank * n // world, (rank + 1) * n // world)
