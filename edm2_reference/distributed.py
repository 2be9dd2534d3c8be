"""Process-group set-up for ``torchrun`` (or a single process without one)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["World", "init_world"]


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank, world size and device."""

    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that logs and writes checkpoint files)."""
        return self.rank == 0

    def all_mean(self, value: float) -> float:
        """Mean of a scalar over ranks."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.size

    def from_main(self, value: int) -> int:
        """Rank 0's ``value`` on every rank (so that all ranks take the same branch)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src=0)
        return int(t.item())

    def barrier(self) -> None:
        """Wait for every rank (a no-op alone)."""
        if self.size > 1:
            dist.barrier()


def init_world(device: str | None = None) -> World:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1), else run alone.

    gloo on the CPU, nccl on CUDA (one GPU per local rank).
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return World(rank, size, dev)
