"""Small collectives over gloo for phema's own coordination: JSON and text, never pickles.

Sharded snapshot writes and parallel reconstruction exchange a few records between
ranks (file names, sizes, errors, plan fingerprints). They travel as UTF-8 JSON in
uint8 tensors, so nothing a peer sends is ever unpickled.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_json", "broadcast_text", "cpu_group", "gather_json", "world"]


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def cpu_group() -> Any:
    """A group of every rank that takes CPU tensors: the default one if it is gloo, else a
    new gloo group (a collective: every rank must call it, in the same order)."""
    if dist.get_backend() == "gloo":
        return None
    return dist.new_group(backend="gloo")


def all_gather_json(obj: Any, group: Any = None) -> list[Any]:
    """``obj`` of every rank, on every rank, in rank order."""
    size = dist.get_world_size(group)
    data = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
    n = torch.tensor([data.numel()], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(sizes, n, group=group)
    width = max(1, int(max(s.item() for s in sizes)))
    padded = torch.zeros(width, dtype=torch.uint8)
    padded[: data.numel()] = data
    rows = [torch.empty(width, dtype=torch.uint8) for _ in range(size)]
    dist.all_gather(rows, padded, group=group)
    return [
        json.loads(bytes(row[: int(s.item())].numpy()).decode())
        for row, s in zip(rows, sizes, strict=True)
    ]


def gather_json(obj: Any, group: Any = None) -> list[Any]:
    """``obj`` of every rank on rank 0 of ``group`` (others get ``[]``)."""
    everyone = all_gather_json(obj, group)
    return everyone if dist.get_rank(group) == 0 else []


def broadcast_text(text: str, length: int, group: Any = None) -> str:
    """Rank 0's ``text`` (exactly ``length`` ASCII characters) on every rank."""
    buf = torch.zeros(length, dtype=torch.uint8)
    if dist.get_rank(group) == 0:
        buf.copy_(torch.frombuffer(bytearray(text.encode("ascii")), dtype=torch.uint8))
    dist.broadcast(buf, group_src=0, group=group)
    return bytes(buf.numpy()).decode("ascii")
