"""Background snapshot writing: training hands over copies, a thread serialises and stores them.

``SnapshotWriter.save(ema)`` copies every profile's state on the training thread
(one device-side copy per profile, so later updates cannot leak into a snapshot)
and queues them; a single background thread casts them to the storage dtype,
moves them to the CPU, serialises and writes each file atomically. The queue is
bounded (``max_pending`` snapshots), so a slow store slows training down instead
of growing memory without limit.

Each snapshot file is written on its own: a failure (a full disk, a lost
connection, a file that exists with other bytes) is raised by the next
:meth:`SnapshotWriter.save` or by :meth:`SnapshotWriter.close`, naming the file it
concerns, and never stops the snapshots queued before or after it. ``save`` queues
its own snapshot before it raises, so a loop that catches the error loses nothing
else. A snapshot that already exists with the same bytes is accepted (a run resumed
after a crash writes it again); a sharded one that exists is refused (its shards
carry a per-write id, so it is never rewritten: skip it on resume). Under ``torch.distributed`` only rank 0 writes an
unsharded EMA's snapshots; other ranks return at once.

A sharded EMA (FSDP2, or ``partition=True``) is written without any gather: every
rank must create the writer and call :meth:`SnapshotWriter.save` at the same
points; each writes its own rows as a shard and rank 0 publishes a manifest once all
are durable (:mod:`phema.shards`). A snapshot some rank failed to write is never
listed; the failure is reported by rank 0 (and by the rank that failed).
"""

from __future__ import annotations

import queue
import threading
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from phema._sharded_write import ShardedJob, ShardedWrites
from phema.errors import StorageError
from phema.format import check_storage_dtype
from phema.store import SnapshotStore, snapshot_name
from phema.tracking import PowerFunctionEMA

__all__ = ["SnapshotWriter"]

_Job = tuple[dict[str, Tensor], float, float, float, tuple[str, ...], int | None]


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class SnapshotWriter:
    """Write ``PowerFunctionEMA`` snapshots to a store without stalling training.

    Args:
        store: A :class:`~phema.store.SnapshotStore` or a URL for one.
        dtype: Storage dtype of floating-point tensors (e.g. ``torch.float16``);
            default: as tracked (fp32).
        t_unit: Unit of the EMA's time, recorded in the metadata (``"images"``...).
        max_pending: Snapshots that may wait in the queue before ``save`` blocks.
        shard_timeout: Sharded snapshots: seconds rank 0 waits for the other ranks'
            shards before it gives the snapshot up.
        **storage_options: For a URL ``store``, passed to fsspec.
    """

    def __init__(
        self,
        store: SnapshotStore | str,
        *,
        dtype: torch.dtype | None = None,
        t_unit: str = "steps",
        max_pending: int = 2,
        shard_timeout: float = 1800.0,
        **storage_options: Any,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        if dtype is not None:
            check_storage_dtype(dtype, "dtype")
        self.store = (
            store if isinstance(store, SnapshotStore) else SnapshotStore(store, **storage_options)
        )
        self.dtype = dtype
        self.t_unit = t_unit
        self.active = _rank() == 0
        self.written: list[str] = []
        self._failures: list[tuple[str, BaseException]] = []  # (file, error), not yet raised
        self._lock = threading.Lock()
        self._queue: queue.Queue[list[_Job | ShardedJob] | None] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="phema-writer", daemon=True)
        self._closed = False
        self._shard_timeout = shard_timeout
        self._sharded: ShardedWrites | None = None
        if self.active:
            self._thread.start()

    def save(self, ema: PowerFunctionEMA, step: int | None = None) -> None:
        """Queue one snapshot of every profile of ``ema`` at its current time.

        Raises :class:`~phema.errors.StorageError` naming every earlier snapshot that
        failed since the last report, after this call's snapshots were queued.
        """
        if self._closed:
            raise StorageError("this SnapshotWriter is closed")
        if ema.sharded and dist.is_available() and dist.is_initialized():
            self._queue.put(self._shard_jobs(ema, step))
        elif self.active:
            copied = ema.copied_keys()  # by identity: tied parameters are averaged
            jobs: list[_Job | ShardedJob] = []
            for std, gamma in zip(ema.stds, ema.gammas, strict=True):
                state = ema.profile_state_dict(std, dtype=self.dtype)  # cast as copied
                jobs.append((state, ema.t, std, gamma, copied, step))
            self._queue.put(jobs)
        self._raise_failures()

    def _shard_jobs(self, ema: PowerFunctionEMA, step: int | None) -> list[_Job | ShardedJob]:
        """This rank's part of every profile, copied now (collective on first use)."""
        if self._sharded is None:
            self._sharded = ShardedWrites(self._shard_timeout)
            self.active = True
            if not self._thread.is_alive():
                self._thread.start()
        jobs: list[_Job | ShardedJob] = []
        for std, gamma in zip(ema.stds, ema.gammas, strict=True):
            part = ema.shard_state(std, self.dtype)  # cast as copied: no fp32 copy is held
            sid = self._sharded.next_id()
            jobs.append(
                ShardedJob(part.specs, part.pieces, part.copied, ema.t, std, gamma, step, sid)
            )
        return jobs

    def _run(self) -> None:
        while True:
            jobs = self._queue.get()
            if jobs is None:
                try:
                    self.store.flush()  # publish what a Hub store still holds back
                except BaseException as exc:
                    self._fail(f"{self.store.url} (files waiting for a Hub commit)", exc)
                return
            while jobs:  # each job is dropped once written: memory falls as files go
                job = jobs.pop(0)
                if isinstance(job, ShardedJob):
                    self._write_sharded(job)
                    continue
                state, t, std, gamma, copied, step = job
                try:
                    cpu = {
                        n: v.to(self.dtype if self.dtype and v.is_floating_point() else v.dtype)
                        .to("cpu")
                        .contiguous()
                        for n, v in state.items()
                    }
                    path = self.store.save(
                        cpu,
                        t=t,
                        std=std,
                        gamma=gamma,
                        t_unit=self.t_unit,
                        step=step,
                        copied=copied,
                    )
                    self.written.append(path)
                except BaseException as exc:  # reported by save()/close(); later jobs go on
                    name = f"{self.store.url.rstrip('/')}/{snapshot_name(t, std)}"
                    self._fail(f"{name} (t={t:g}, std={std:g}, step={step})", exc)

    def _write_sharded(self, job: ShardedJob) -> None:
        assert self._sharded is not None
        try:
            path = self._sharded.write(self.store, job, self.t_unit)
            if path is not None:
                self.written.append(path)
        except BaseException as exc:
            name = f"{self.store.url.rstrip('/')}/{snapshot_name(job.t, job.std)}"
            self._fail(f"{name} (t={job.t:g}, std={job.std:g}, step={job.step})", exc)

    def _fail(self, what: str, exc: BaseException) -> None:
        with self._lock:
            self._failures.append((what, exc))

    def _raise_failures(self) -> None:
        with self._lock:
            failures, self._failures = self._failures, []
        if not failures:
            return
        lines = "; ".join(f"{what}: {exc}" for what, exc in failures)
        plural = "s" if len(failures) > 1 else ""
        raise StorageError(
            f"{len(failures)} snapshot{plural} could not be written ({lines}); "
            "the writer goes on with the others"
        ) from failures[0][1]

    def close(self) -> None:
        """Wait for every queued snapshot to be written; raise the first failure."""
        if not self._closed:
            self._closed = True
            if self.active:
                self._queue.put(None)
                self._thread.join()
            if self._sharded is not None:
                self._sharded.close()
        self._raise_failures()

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
