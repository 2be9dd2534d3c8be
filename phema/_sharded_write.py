"""Writing one sharded snapshot from every rank: shards first, then rank 0's manifest.

Runs on each rank's writer thread (:class:`phema.writer.SnapshotWriter`), over a
process group of its own (gloo, made on the first sharded save), so that its
collectives never interleave with the training loop's. Per snapshot:

1. every rank that holds rows writes its shard file (staged, then published without
   overwriting, durable before the call returns; Hub stores commit it at once);
2. the ranks' results (shard name and record, or the error) are gathered to rank 0
   as JSON (no pickle crosses ranks);
3. if every rank succeeded, rank 0 publishes the manifest; otherwise it removes the
   shards that were written and reports the failures. Nothing is listed before 3.

A rank that dies mid-snapshot leaves the gather to fail (or its launcher stops the
job): the manifest is never written, so the snapshot is never listed.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from phema._dist import broadcast_text, gather_json
from phema.errors import ExistsError, StorageError
from phema.shards import encode_manifest, encode_shard, shard_name
from phema.store import SUFFIX, SnapshotStore, snapshot_metadata, snapshot_name

__all__ = ["ShardedJob", "ShardedWrites"]


@dataclass(frozen=True)
class ShardedJob:
    """One profile's part on this rank, as queued by ``SnapshotWriter.save``."""

    specs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    pieces: list[tuple[str, int, int, Tensor]]
    copied: tuple[str, ...]
    t: float
    std: float
    gamma: float
    step: int | None
    snapshot_id: str


class ShardedWrites:
    """The writer group and the id scheme shared by every rank of one writer.

    Made collectively on the first sharded save (every rank's main thread, in step);
    ids are ``<token><counter>`` with the token broadcast from rank 0, so that every
    rank names the same snapshot alike without further messages.
    """

    def __init__(self, timeout: float) -> None:
        self.group: Any = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout))
        self.rank, self.size = dist.get_rank(), dist.get_world_size()
        self.token = broadcast_text(uuid.uuid4().hex[:12], 12, self.group)
        self.count = 0

    def next_id(self) -> str:
        """A new snapshot id, the same on every rank."""
        self.count += 1
        return f"{self.token}{self.count:06d}"

    def write(self, store: SnapshotStore, job: ShardedJob, t_unit: str) -> str | None:
        """Write this rank's shard; on rank 0 also the manifest. Returns its path (rank 0)."""
        name = snapshot_name(job.t, job.std)
        meta = snapshot_metadata(
            job.specs,
            t=job.t,
            std=job.std,
            gamma=job.gamma,
            t_unit=t_unit,
            step=job.step,
            copied=job.copied,
        )
        result: dict[str, Any] = {}
        try:
            if store.exists(name):
                raise ExistsError(
                    f"{store.url}/{name} exists; a sharded snapshot is never written twice"
                )
            if job.pieces:
                data, record = encode_shard(job.pieces, job.snapshot_id, meta)
                shard = shard_name(name.removesuffix(SUFFIX), job.snapshot_id, self.rank)
                store.write(shard, data)
                store.flush()
                result = {"shard": shard, "record": record}
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        results = gather_json(result, self.group)
        if self.rank != 0:
            if "error" in result:
                raise StorageError(f"rank {self.rank}: {result['error']}")
            return None
        errors = [f"rank {r}: {res['error']}" for r, res in enumerate(results) if "error" in res]
        written = [(str(res["shard"]), res["record"]) for res in results if "shard" in res]
        if errors:
            self._remove(store, [n for n, _ in written])
            raise StorageError(
                f"sharded snapshot {store.url}/{name} was not published: {'; '.join(errors)}"
            )
        manifest = encode_manifest(job.specs, meta, job.snapshot_id, written)
        path = store.write(name, manifest)
        store.flush()  # a Hub store commits it now, under this snapshot's name
        return path

    def close(self) -> None:
        """Release the writer's process group (every rank, when its writer closes)."""
        if self.group is not None and dist.is_initialized():
            dist.destroy_process_group(self.group)
        self.group = None

    @staticmethod
    def _remove(store: SnapshotStore, names: list[str]) -> None:
        for n in names:  # unlisted either way; removing them only saves space
            with contextlib.suppress(Exception):
                store.fs.rm(store.path_of(n))
