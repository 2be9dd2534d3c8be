r"""The streaming pass of :func:`phema.reconstruct`: windows, pooled reads, blocked sums.

Every input shares one byte layout, cut into windows of at most ``window_bytes``.
For window :math:`w` the outputs are

.. math::

    A_{j}[w] = \sum_i c_{ij}\, \theta^{(i)}[w],

summed :math:`G` snapshots at a time (:math:`G` = reads in flight) as one matrix
product per tile of the window,

.. math::

    A[:, \text{tile}] \leftarrow A[:, \text{tile}] + C_{:, g}\, X_{g, \text{tile}},

where :math:`X_{g,\text{tile}}` is the group's tile in the accumulation dtype (fp32,
fp64 for fp64 inputs). Each accumulator element is thus loaded and stored once per
:math:`G` snapshots instead of once per snapshot, and the arithmetic runs as a few
large operations per window rather than one per tensor.

Reads land in two fixed banks of :math:`G` window-sized buffers: while one bank's
group is summed, the next group is read into the other. Nothing is allocated per
read or per window, so memory is

.. math::

    2 G \cdot \text{window} + K \cdot \text{window} \cdot
    \frac{\text{accumulator itemsize}}{\text{stored itemsize}} + O(\text{tile}),

whatever the model's size or the number of snapshots.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import IO

import torch

from phema.errors import NonFiniteError
from phema.format import TensorInfo

__all__ = ["Run", "Window", "plan_windows", "stream"]

#: Elements per tile of the blocked sum: the group's tile (``G * TILE`` values) and
#: the K outputs' tile stay in cache while the product is formed.
TILE = 1 << 16

#: Reads one range of one input: ``(input index, data offset, destination)``.
Reader = Callable[[int, int, memoryview], None]


@dataclass(frozen=True)
class Run:
    """Consecutive bytes of a window with one stored dtype, all averaged or all copied.

    ``start``/``stop`` are byte offsets in the window; ``acc`` is the run's first
    element in the accumulator (``-1`` for a copied run, taken from the latest input).
    """

    dtype: torch.dtype
    out_dtype: torch.dtype
    start: int
    stop: int
    acc: int

    @property
    def numel(self) -> int:
        return (self.stop - self.start) // self.dtype.itemsize


@dataclass(frozen=True)
class Window:
    """Bytes ``[offset, offset + size)`` of the data section, as runs."""

    offset: int
    size: int
    runs: tuple[Run, ...]
    numel: int  # averaged elements: the accumulator columns it uses


def plan_windows(
    layout: Sequence[TensorInfo],
    averaged: set[str],
    out_dtype: dict[str, torch.dtype],
    window_bytes: int,
) -> list[Window]:
    """Cut the data section into windows of at most ``window_bytes`` (whole elements).

    A window never splits an element; one element wider than the window gets a
    window of its own.
    """
    windows: list[Window] = []
    runs: list[Run] = []
    offset = size = numel = 0

    def close() -> None:
        nonlocal runs, size, numel
        if size:
            windows.append(Window(offset, size, tuple(runs), numel))
        runs, size, numel = [], 0, 0

    for ti in layout:
        item, avg = ti.dtype.itemsize, ti.name in averaged
        start = 0
        while start < ti.numel:
            if size and size + item > window_bytes:
                close()  # not even one more element fits
            if not size:
                offset = ti.begin + start * item
            stop = min(ti.numel, start + max((window_bytes - size) // item, 1))
            nbytes = (stop - start) * item
            last = runs[-1] if runs else None
            if (
                last is not None
                and last.dtype == ti.dtype
                and last.out_dtype == out_dtype[ti.name]
                and (last.acc >= 0) == avg
            ):
                runs[-1] = replace(last, stop=last.stop + nbytes)
            else:
                acc = numel if avg else -1
                runs.append(Run(ti.dtype, out_dtype[ti.name], size, size + nbytes, acc))
            size += nbytes
            numel += (stop - start) if avg else 0
            start = stop
            if size >= window_bytes:
                close()
    close()
    return windows


def stream(
    read: Reader,
    windows: Sequence[Window],
    weights: Sequence[Sequence[float]],
    latest: int,
    files: Sequence[IO[bytes]],
    *,
    max_inflight: int,
    progress: Callable[[int], None] | None = None,
    name_of: Callable[[int | None, int], str] = lambda i, offset: f"input {i}, byte {offset}",
) -> None:
    """Sum every window over the inputs and append it to every output file.

    A window whose sums an output dtype cannot hold (NaN, infinity, or beyond its
    largest value) is not written: the inputs' bytes of that window are read again to
    find the first one holding a NaN or an infinity, and
    :class:`~phema.errors.NonFiniteError` names it (``name_of(input, data offset)``),
    or names the tensor whose sum overflows (``name_of(None, data offset)``).

    Args:
        read: Fills a buffer with one input's bytes at a data offset.
        windows: From :func:`plan_windows`.
        weights: ``[input][output]`` coefficients.
        latest: The input whose copied (not averaged) runs the outputs take.
        files: One open output per column of ``weights``, positioned after its header.
        max_inflight: Reads in flight at once, and snapshots per blocked sum (G).
        progress: Called with the bytes of each finished read.
        name_of: Describes where an input's data byte lies, for errors.
    """
    if not windows:
        return
    n_in, k = len(weights), len(files)
    group = max(1, min(max_inflight, n_in))
    averaged = [r for w in windows for r in w.runs if r.acc >= 0]
    acc_dtype = torch.float64 if any(r.dtype == torch.float64 for r in averaged) else torch.float32
    coef = torch.tensor(weights, dtype=acc_dtype).T.contiguous()  # [K, inputs]
    # 8 spare bytes let every read start at the data's alignment modulo 8.
    row = -(-(max(w.size for w in windows) + 8) // 8) * 8
    banks = [torch.empty(group, row, dtype=torch.uint8) for _ in range(2)]
    acc = torch.empty(k, max(w.numel for w in windows), dtype=acc_dtype)
    tile = torch.empty(group, TILE, dtype=acc_dtype)
    out_bufs: dict[torch.dtype, torch.Tensor] = {}
    batches = _batches(windows, n_in, group)
    pool = ThreadPoolExecutor(max_workers=group, thread_name_prefix="phema-read")
    pending: list[Future[None]] = []
    try:

        def submit(
            bank: torch.Tensor,
        ) -> tuple[Window, int, torch.Tensor, list[Future[None]]] | None:
            """Start reading the next group into ``bank``; its rows are the group's bytes."""
            job = next(batches, None)
            if job is None:
                return None
            w, first, count = job
            shift = w.offset % 8
            data = bank[:count, shift : shift + w.size]
            pending[:] = [
                pool.submit(read, first + i, w.offset, data[i].numpy().data) for i in range(count)
            ]
            return w, first, data, pending[:]

        copied: dict[int, bytes] = {}
        current = submit(banks[0])
        b = 0
        while current is not None:
            w, first, data, futures = current
            for fut in futures:
                fut.result()
                if progress:
                    progress(w.size)
            b ^= 1
            current = submit(banks[b])  # the next group reads while this one is summed
            count = data.shape[0]
            _accumulate(acc, coef[:, first : first + count], data, w, tile, beta=first != 0)
            if first <= latest < first + count:
                copied.update(
                    (i, bytes(data[latest - first, r.start : r.stop].numpy()))
                    for i, r in enumerate(w.runs)
                    if r.acc < 0
                )
            if first + count == n_in:  # window complete
                found = _out_of_range(acc, w)
                if found is not None:
                    raise _non_finite(read, w, weights, name_of, found)
                _write(files, acc, w, copied, out_bufs)
                copied = {}
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True)


def _batches(windows: Sequence[Window], n_in: int, group: int) -> Iterator[tuple[Window, int, int]]:
    """``(window, first input, count)`` in read order: window by window, G inputs at a time."""
    for w in windows:
        for first in range(0, n_in, group):
            yield w, first, min(group, n_in - first)


def _out_of_range(acc: torch.Tensor, w: Window) -> tuple[Run, int] | None:
    """The first averaged value of window ``w`` that its output dtype cannot hold, if any.

    A NaN, an infinity, or a finite sum beyond the output dtype's largest value (it
    would be stored as an infinity). One ``aminmax`` per run, no temporary the size of
    the window; only a run that fails is searched, a tile at a time, for its column.
    """
    for r in w.runs:
        if r.acc < 0:
            continue
        lim = torch.finfo(r.out_dtype).max
        values = acc[:, r.acc : r.acc + r.numel]
        lo, hi = torch.aminmax(values)
        if bool(lo >= -lim) and bool(hi <= lim):  # False for NaN
            continue
        for a in range(0, r.numel, TILE):
            bad = (~(values[:, a : a + TILE].abs() <= lim)).nonzero()
            if len(bad):
                return r, a + int(bad[:, 1].min())
    return None


def _non_finite(
    read: Reader,
    w: Window,
    weights: Sequence[Sequence[float]],
    name_of: Callable[[int | None, int], str],
    found: tuple[Run, int],
) -> NonFiniteError:
    """The error for window ``w``: the input holding a NaN or infinity, or the sum's overflow."""
    data = torch.empty(1, w.size + 8, dtype=torch.uint8)
    row = data[:, w.offset % 8 : w.offset % 8 + w.size]
    for i in range(len(weights)):
        read(i, w.offset, row[0].numpy().data)
        for r in w.runs:
            bad = (~_typed(row, r.start, r.stop, r.dtype).isfinite()).nonzero()
            if r.acc >= 0 and len(bad):
                offset = w.offset + r.start + int(bad[0, 1]) * r.dtype.itemsize
                return NonFiniteError(
                    f"{name_of(i, offset)} holds a NaN or an infinity; the outputs would not "
                    "be finite, so none was written. Leave that snapshot out (move it out of "
                    "the store) or pick a target that does not use it"
                )
    run, column = found  # finite inputs whose weighted sum leaves the output's range
    offset = w.offset + run.start + column * run.dtype.itemsize
    return NonFiniteError(
        f"the weighted sum at {name_of(None, offset)} exceeds the largest {run.out_dtype} "
        "(it would be stored as an infinity), so no output was written; store the outputs "
        "in a wider dtype"
    )


def _typed(data: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Columns ``[start, stop)`` of the uint8 rows ``data`` as ``dtype`` (no copy if aligned)."""
    part = data[:, start:stop]
    if part.storage_offset() % dtype.itemsize:  # a tensor placed off its alignment
        part = part.clone()
    return part.view(dtype)


def _accumulate(
    acc: torch.Tensor,
    coef: torch.Tensor,
    data: torch.Tensor,
    w: Window,
    tile: torch.Tensor,
    *,
    beta: bool,
) -> None:
    """``acc[:, run] = beta * acc[:, run] + coef @ data[:, run]`` for every averaged run."""
    count = data.shape[0]
    for r in w.runs:
        if r.acc < 0:
            continue
        values = _typed(data, r.start, r.stop, r.dtype)
        for a in range(0, r.numel, TILE):
            b = min(r.numel, a + TILE)
            x = values[:, a:b]
            if x.dtype != acc.dtype:
                x = tile[:count, : b - a].copy_(x)
            dst = acc[:, r.acc + a : r.acc + b]
            dst.addmm_(coef, x, beta=1 if beta else 0)


def _write(
    files: Sequence[IO[bytes]],
    acc: torch.Tensor,
    w: Window,
    copied: dict[int, bytes],
    out_bufs: dict[torch.dtype, torch.Tensor],
) -> None:
    """Append window ``w`` of every output, in the output dtypes."""
    for j, f in enumerate(files):
        for i, r in enumerate(w.runs):
            if r.acc < 0:
                f.write(copied[i])
                continue
            values = acc[j, r.acc : r.acc + r.numel]
            if r.out_dtype != acc.dtype:
                buf = out_bufs.get(r.out_dtype)
                if buf is None:
                    buf = out_bufs[r.out_dtype] = torch.empty(acc.shape[1], dtype=r.out_dtype)
                values = buf[: r.numel].copy_(values)
            f.write(values.view(torch.uint8).numpy().data)
