r"""Reconstruction by N processes: each reads and sums a disjoint ~1/N of the windows.

The pass's windows tile the snapshots' data section (:math:`B` bytes per snapshot).
Rank :math:`r` takes the windows that start in
:math:`[\lfloor rB/N \rfloor, \lfloor (r+1)B/N \rfloor)`, the same for every
snapshot, so the ranks together read every stored byte once and each reads about
:math:`1/N` of them. A window's sum involves that window's bytes only, so each rank
runs the single-process engine (:func:`phema._stream.stream`) over its windows into
K **part files**: raw output bytes, no header, staged and published as
``shards/<output stem>/<id>-<rank>.part`` in the output store (never listed). Rank 0
then writes each output, its header followed by the parts in rank order, staged and
published together exactly as one process does (all or none, never over an existing
file unless asked), and removes the parts. The outputs are byte for byte those of a
single process.

Before reading, the ranks compare a fingerprint of what they planned (outputs,
inputs with the versions listed, coefficients, windows); ranks that listed the store
while it changed refuse to start. Every failure is reported on every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch.distributed as dist

from phema._dist import all_gather_json, broadcast_text, cpu_group, world
from phema._stream import Reader, Window, stream
from phema.errors import ExistsError, StorageError
from phema.shards import encode_manifest, shard_header
from phema.store import SUFFIX, SnapshotInfo, SnapshotStore
from phema.streaming import Job, Reconstruction, _OutputFiles

__all__ = [
    "check_all",
    "my_windows",
    "parallel_plan",
    "part_bytes",
    "run_parallel",
    "write_parallel",
]

#: Bytes of a part copied at a time by rank 0 when it joins the outputs.
JOIN_CHUNK = 8 << 20


def my_windows(windows: list[Window], rank: int, size: int) -> list[Window]:
    """The windows rank ``rank`` of ``size`` sums: those starting in its byte range."""
    total = sum(w.size for w in windows)
    lo, hi = total * rank // size, total * (rank + 1) // size
    return [w for w in windows if lo <= w.offset < hi]


def part_bytes(windows: list[Window]) -> int:
    """Output bytes the windows produce (per output)."""
    return sum(
        (r.stop - r.start) if r.acc < 0 else r.numel * r.out_dtype.itemsize
        for w in windows
        for r in w.runs
    )


def _fingerprint(job: Job, inputs: list[tuple[str, str]]) -> str:
    text = json.dumps([job.names, inputs, job.weights, [(w.offset, w.size) for w in job.windows]])
    return hashlib.sha256(text.encode()).hexdigest()


T = TypeVar("T")


@contextmanager
def _cpu_group() -> Iterator[Any]:
    """A gloo group for this pass (the default group if it is gloo), released after."""
    group = cpu_group()
    try:
        yield group
    finally:
        if group is not None:
            dist.destroy_process_group(group)


def parallel_plan(make: Callable[[], T]) -> T:
    """``make()`` (the plan) on every rank; if any rank fails, every rank raises."""
    with _cpu_group() as group:
        failure: BaseException | None = None
        result: T | None = None
        try:
            result = make()
        except Exception as exc:
            failure = exc
        check_all(failure, group)
    assert result is not None
    return result


def run_parallel(
    setup: Callable[[], tuple[SnapshotStore, Job]],
    read: Reader,
    overwrite: bool,
    max_inflight: int,
    progress: Callable[[int], None] | None,
    inputs: Sequence[SnapshotInfo],
    sharded: bool = False,
) -> list[Reconstruction]:
    """Open the output store and prepare the pass on every rank (failures shared), then
    :func:`write_parallel`; the outputs' descriptions, on every rank."""
    with _cpu_group() as group:
        failure: BaseException | None = None
        try:
            out, job = setup()
        except Exception as exc:
            failure = exc
        check_all(failure, group)
        listed = [(i.url, i.identity) for i in inputs]
        write_parallel(job, read, out, overwrite, max_inflight, progress, listed, group, sharded)
    return job.results


def check_all(failure: BaseException | None, group: Any) -> None:
    """Every rank learns whether any rank failed a step; if one did, every rank raises.

    A rank raises its own error (with the others' noted); a rank that did not fail
    raises a :class:`StorageError` naming the ranks that did. No rank is left waiting
    in a later collective for one that gave up.
    """
    rank = world()[0]
    mine = f"rank {rank}: {type(failure).__name__}: {failure}" if failure is not None else ""
    errors = [e for e in all_gather_json(mine, group) if e]
    if not errors:
        return
    if failure is not None:
        others = [e for e in errors if e != mine]
        if others:
            failure.add_note("also: " + "; ".join(others))
        raise failure
    raise StorageError(f"parallel reconstruction stopped: {'; '.join(errors)}")


def write_parallel(
    job: Job,
    read: Reader,
    out: SnapshotStore,
    overwrite: bool,
    max_inflight: int,
    progress: Callable[[int], None] | None,
    inputs: list[tuple[str, str]],
    group: Any,
    sharded: bool = False,
) -> None:
    """This rank's share of the pass, then (rank 0) the outputs; every rank must call it.

    With ``sharded`` each rank's parts are shard files of the outputs and rank 0
    publishes one manifest per output instead of joining them (:mod:`phema.shards`).
    """
    rank, size = world()
    prints = all_gather_json(_fingerprint(job, inputs), group)
    if len(set(prints)) > 1:
        raise StorageError(
            "the ranks planned different reconstructions (the store changed while they "
            "listed it, or they were given other options); run again"
        )
    failure: BaseException | None = None
    if rank == 0 and not overwrite:  # rank 0 decides for all; publish checks again
        taken = [n for n in job.names if out.exists(n)]
        if taken:
            failure = ExistsError(
                f"{out.url}/{taken[0]} exists; pass overwrite=True (--overwrite) to replace it"
            )
    check_all(failure, group)
    token = broadcast_text(uuid.uuid4().hex[:12], 12, group)
    ext = ".safetensors" if sharded else ".part"
    parts = [
        [f"shards/{n.removesuffix(SUFFIX)}/{token}{j}-{r:05d}{ext}" for r in range(size)]
        for j, n in enumerate(job.names)
    ]
    mine = my_windows(job.windows, rank, size)
    heads = (
        [_shard_head(job, mine, f"{token}{j}") for j in range(len(job.names))] if sharded else []
    )
    names = [p[rank] for p in parts] if mine else []  # a rank with no windows writes nothing
    error = _write_part(job, read, out, names, mine, heads, max_inflight, progress)
    answers = all_gather_json(
        {"error": error and f"rank {rank}: {error}", "records": [r for _, r in heads]}, group
    )
    errors = [a["error"] for a in answers if a["error"]]
    final = ""
    if rank == 0:
        if errors:
            final = "; ".join(errors)
        elif sharded:
            final = _manifests(job, out, parts, [a["records"] for a in answers], token, overwrite)
        else:
            final = _join(job, out, parts, overwrite, size)
        if errors or final or not sharded:  # parts joined or refused; shards of outputs stay
            _remove(out, [n for p in parts for n in p])
    final = str(all_gather_json(final, group)[0])
    if final:
        raise StorageError(
            f"parallel reconstruction into {out.url} failed, nothing was published: {final}"
        )


def _remove(out: SnapshotStore, names: list[str]) -> None:
    """Remove the parts (unlisted either way), and on local disk their emptied folders."""
    for name in names:
        with contextlib.suppress(Exception):
            out.fs.rm(out.path_of(name))
    if out.is_local:
        for folder in sorted({os.path.dirname(out.path_of(n)) for n in names}):
            for empty in (folder, os.path.dirname(folder)):  # shards/<stem>, then shards
                with contextlib.suppress(OSError):
                    os.rmdir(empty)


def _shard_head(job: Job, mine: list[Window], snapshot_id: str) -> tuple[bytes, dict[str, Any]]:
    """Header of this rank's shard of one output and the record its manifest keeps.

    The rank's windows cover input bytes ``[lo, hi)``; each tensor's part of that range
    is a piece of whole elements (windows never split one), in the stream's order.
    """
    pieces: list[tuple[str, int, int]] = []
    if mine:
        lo, hi = mine[0].offset, mine[-1].offset + mine[-1].size
        for ti in job.layout:
            b, e = max(ti.begin, lo), min(ti.end, hi)
            if b < e:
                item = ti.dtype.itemsize
                pieces.append((ti.name, (b - ti.begin) // item, (e - ti.begin) // item))
    dtypes = {n: d for n, d, _ in job.specs}
    prefix, _, record = shard_header(
        [(n, dtypes[n], b, e) for n, b, e in pieces], snapshot_id, {}, keep_order=True
    )
    return prefix, record


def _manifests(
    job: Job,
    out: SnapshotStore,
    parts: list[list[str]],
    records: list[list[dict[str, Any]]],
    token: str,
    overwrite: bool,
) -> str:
    """Rank 0, sharded outputs: one manifest per output, published together; ``""`` or the error."""
    try:
        with _OutputFiles(out, job.names, overwrite) as files:
            for j, f in enumerate(files):
                shards = [
                    (names[j], rec[j])
                    for names, rec in zip(zip(*parts, strict=True), records, strict=True)
                    if rec[j]["pieces"]
                ]
                f.write(
                    encode_manifest(
                        job.specs,
                        job.metas[j],
                        f"{token}{j}",
                        shards,
                        content="reconstruction",
                        keep_order=True,
                    )
                )
    except Exception as exc:
        return f"publishing the manifests: {type(exc).__name__}: {exc}"
    return ""


def _write_part(
    job: Job,
    read: Reader,
    out: SnapshotStore,
    names: list[str],
    mine: list[Window],
    heads: list[tuple[bytes, dict[str, Any]]],
    max_inflight: int,
    progress: Callable[[int], None] | None,
) -> str:
    """Stream this rank's windows into its K part (or shard) files; ``""`` or the error."""
    backend = out.backend
    staged = []
    try:
        for n in names:  # one at a time, so that a failure discards the ones made
            staged.append(backend.stage(n, out.path_of(n), False))  # noqa: PERF401
        files = [s.file for s in staged]
        for f, (head, _) in zip(files, heads, strict=False):  # shard headers first
            f.write(head)
        stream(
            read,
            mine,
            job.weights,
            job.latest,
            files,
            max_inflight=max_inflight,
            progress=progress,
            name_of=job.where,
        )
        backend.publish(staged, False)
    except Exception as exc:
        backend.discard(staged)
        return f"{type(exc).__name__}: {exc}"
    return ""


def _join(job: Job, out: SnapshotStore, parts: list[list[str]], overwrite: bool, size: int) -> str:
    """Rank 0: header + parts into each output, published together; ``""`` or the error."""
    lengths = [part_bytes(my_windows(job.windows, r, size)) for r in range(size)]
    buf = bytearray(JOIN_CHUNK)
    try:
        with _OutputFiles(out, job.names, overwrite) as files:
            for f, head, names in zip(files, job.headers, parts, strict=True):
                f.write(head)
                for name, length in zip(names, lengths, strict=True):
                    for start in range(0, length, JOIN_CHUNK):
                        n = min(JOIN_CHUNK, length - start)
                        view = memoryview(buf)[:n]
                        out.read_into(out.path_of(name), start, view)
                        f.write(view)
    except Exception as exc:
        return f"joining the parts: {type(exc).__name__}: {exc}"
    return ""
