"""Shadows in host memory, updated off the training thread: ``PowerFunctionEMA(device="cpu")``.

With the parameters on an accelerator and the shadows in host memory, each update is

1. a copy of the parameters into host staging buffers (pinned), issued on a side
   stream after the work already queued on the training stream; the training
   stream waits for that copy only on the device (``wait_event``: the optimizer's
   next step cannot overwrite a parameter before it is copied), the Python thread
   does not wait at all;
2. the fused lerp of the host shadows towards the staged copy
   (:class:`phema._shadow.FusedShadows`), run by a background thread once the copy
   has landed.

The next update, and every read of the shadows (``get``, ``set``, a state dict, a
swap), first waits for the pending one; an error in it is raised there. Updates
therefore apply in order and the profiles are exactly those of the synchronous
update (the same lerp on the same values). With CPU parameters step 1 is a plain
copy, so the same machinery runs (and is tested) on machines without an
accelerator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from phema._shadow import FusedShadows

__all__ = ["OffloadedShadows"]


class OffloadedShadows:
    """:class:`FusedShadows` on ``device`` (host) fed from ``sources`` anywhere, asynchronously."""

    def __init__(
        self,
        sources: Sequence[Tensor],
        num_profiles: int,
        dtype: torch.dtype | None,
        device: torch.device,
    ) -> None:
        cuda = any(s.device.type == "cuda" for s in sources)
        self.sources = list(sources)  # the tracked tensors (parameters), wherever they are
        self.staging = [
            torch.empty(s.shape, dtype=s.dtype, device=device, pin_memory=cuda) for s in sources
        ]
        self.inner = FusedShadows(self.staging, num_profiles, dtype, device=device)
        self.k = num_profiles
        self._side: Any = None
        if cuda and sources:
            self._side = torch.cuda.Stream(sources[0].device)  # type: ignore[no-untyped-call]
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="phema-offload")
        self._pending: Future[None] | None = None

    def _current(self, sources: Sequence[Tensor] | None) -> list[Tensor]:
        if sources is not None:
            self.sources = list(sources)
        return self.sources

    def _stage(self, sources: Sequence[Tensor]) -> Callable[[], None]:
        """Start copying ``sources`` into the staging buffers; returns the wait for it."""
        if self._side is None:
            torch._foreach_copy_(self.staging, list(sources))
            return lambda: None
        current = torch.cuda.current_stream(self._side.device)
        self._side.wait_stream(current)  # after the step that produced the parameters
        with torch.cuda.stream(self._side):
            for dst, src in zip(self.staging, sources, strict=True):
                dst.copy_(src.detach(), non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(self._side)
        current.wait_event(done)  # the device, not this thread, holds later writes back
        return done.synchronize

    def _submit(self, sources: Sequence[Tensor], work: Callable[[], None]) -> None:
        self.wait()
        landed = self._stage(sources)

        def run() -> None:
            landed()
            work()

        self._pending = self._pool.submit(run)

    def wait(self) -> None:
        """Wait for the pending update; raise its error, if any."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def lerp(self, weights: Sequence[float], sources: Sequence[Tensor] | None = None) -> None:
        """Queue ``shadow[k] += weights[k] * (source - shadow[k])`` for every profile."""
        ws = list(weights)
        self._submit(self._current(sources), lambda: self.inner.lerp(ws))

    def copy_from_sources(self, sources: Sequence[Tensor] | None = None) -> None:
        """Queue setting every profile to the sources (the first update)."""
        self._submit(self._current(sources), self.inner.copy_from_sources)

    def get(self, index: int, k: int, dtype: torch.dtype | None = None) -> Tensor:
        """As :meth:`FusedShadows.get`, after the pending update."""
        self.wait()
        return self.inner.get(index, k, dtype)

    def set(self, index: int, k: int, value: Tensor) -> None:
        """As :meth:`FusedShadows.set`, after the pending update."""
        self.wait()
        self.inner.set(index, k, value)

    def dtype_of(self, index: int) -> torch.dtype:
        """The shadow dtype of tensor ``index``."""
        return self.inner.dtype_of(index)

    @property
    def entries(self) -> list[Any]:
        """The shadow buffers (after the pending update)."""
        self.wait()
        return self.inner.entries
