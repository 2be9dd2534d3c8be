"""Background snapshot writing: training hands over copies, a thread serialises and stores them.

``SnapshotWriter.save(ema)`` copies every profile's state on the training thread
(one device-side copy per profile, so later updates cannot leak into a snapshot)
and queues them; a single background thread casts them to the storage dtype,
moves them to the CPU, serialises and writes each file atomically. The queue is
bounded (``max_pending`` snapshots), so a slow store slows training down instead
of growing memory without limit. A failure in the background is raised by the
next :meth:`SnapshotWriter.save` or by :meth:`SnapshotWriter.close`; nothing is
swallowed. Under ``torch.distributed`` only rank 0 writes; other ranks return at
once.
"""

from __future__ import annotations

import queue
import threading
from types import TracebackType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from phema.errors import StorageError
from phema.store import SnapshotStore
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
        **storage_options: For a URL ``store``, passed to fsspec.
    """

    def __init__(
        self,
        store: SnapshotStore | str,
        *,
        dtype: torch.dtype | None = None,
        t_unit: str = "steps",
        max_pending: int = 2,
        **storage_options: Any,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.store = (
            store if isinstance(store, SnapshotStore) else SnapshotStore(store, **storage_options)
        )
        self.dtype = dtype
        self.t_unit = t_unit
        self.active = _rank() == 0
        self.written: list[str] = []
        self._error: BaseException | None = None
        self._queue: queue.Queue[list[_Job] | None] = queue.Queue(maxsize=max_pending)
        self._thread = threading.Thread(target=self._run, name="phema-writer", daemon=True)
        self._closed = False
        if self.active:
            self._thread.start()

    def save(self, ema: PowerFunctionEMA, step: int | None = None) -> None:
        """Queue one snapshot of every profile of ``ema`` at its current time."""
        self._raise_error()
        if self._closed:
            raise StorageError("this SnapshotWriter is closed")
        if not self.active:
            return
        averaged = set(ema.names)
        jobs: list[_Job] = []
        for std, gamma in zip(ema.stds, ema.gammas, strict=True):
            state = ema.profile_state_dict(std)
            copied = tuple(n for n in state if n not in averaged)
            jobs.append((state, ema.t, std, gamma, copied, step))
        self._queue.put(jobs)

    def _run(self) -> None:
        while True:
            jobs = self._queue.get()
            if jobs is None:
                if self._error is None:
                    try:
                        self.store.flush()  # publish what a Hub store still holds back
                    except BaseException as exc:
                        self._error = exc
                return
            if self._error is not None:
                continue  # drop work after a failure; it is reported by save/close
            try:
                for state, t, std, gamma, copied, step in jobs:
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
            except BaseException as exc:  # handed to the training thread by save()/close()
                self._error = exc

    def _raise_error(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            raise StorageError(f"writing a snapshot to {self.store.url} failed: {exc}") from exc

    def close(self) -> None:
        """Wait for every queued snapshot to be written; raise the first failure."""
        if not self._closed:
            self._closed = True
            if self.active:
                self._queue.put(None)
                self._thread.join()
        self._raise_error()

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
