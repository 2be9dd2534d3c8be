r"""Streaming reconstruction: many new profiles in one pass over a store of snapshots.

Every snapshot of a run shares one byte layout (:mod:`phema.format`), so the
engine walks that layout in windows of at most ``window_bytes``: for each window
it reads the same byte range from every snapshot that takes part (exact ranged
reads, ``max_inflight`` at once, into reused buffers), adds them into the K
outputs' accumulators with their coefficients,

.. math::

    \hat\theta_j[w] \mathrel{+}= \sum_i c_{ij}\, \theta^{(i)}[w]

(a blocked matrix product, :mod:`phema._stream`), and appends the K finished
windows to the K output files, whose headers were written up front. Each stored
byte is read at most once (snapshots after the target time and zero-weight ones
are not read at all), and memory stays near
``window_bytes * (2 * max_inflight + 2 * K)`` for fp16 snapshots whatever the
model's size. Tensors that snapshots copy rather than average (``phema.copied``:
buffers, integer counters) are taken from the latest snapshot used.
"""

from __future__ import annotations

import bisect
import itertools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Literal

import numpy as np
import torch
from numpy.typing import NDArray

from phema._backends import Staged
from phema._stream import Window, plan_windows, stream
from phema.errors import ExistsError, FormatError, OptionError, PhemaError, StorageError
from phema.format import FORMAT_VERSION, TensorInfo, check_storage_dtype, encode_header
from phema.shards import read_logical, verify_shards
from phema.solver import TIME_RTOL, Fit, fit_profiles
from phema.store import SnapshotInfo, SnapshotStore, check_layouts, snapshot_name
from phema.targets import PowerProfile, power_density

__all__ = ["Plan", "Reconstruction", "plan", "reconstruct", "write_plan"]

#: Default window: 2 MiB of stored bytes per snapshot per read. Peak memory is about
#: ``window * 2 * max_inflight + K * window * 4 / itemsize`` (two banks of reads and
#: K fp32 accumulators): 80 MiB for 8 outputs from fp16 snapshots. Smaller windows
#: keep the accumulators in cache; larger ones mean fewer requests to remote stores.
WINDOW_BYTES = 2 << 20


@dataclass(frozen=True)
class Reconstruction:
    """One output: where it went, its target, and the fit's quality.

    ``path`` is the file's path for the store's filesystem (``store.fs``); ``url``
    is the same file as a full URL (``s3://bucket/run/phema-ema-...``).
    """

    path: str
    url: str
    fit: Fit
    coefficients: dict[str, float]


@dataclass(frozen=True)
class Plan:
    """What a reconstruction will read and write, computed before any tensor byte is read."""

    inputs: list[SnapshotInfo]
    weights: list[list[float]]  # [input][output], only inputs with a non-zero weight
    fits: tuple[Fit, ...]
    t: float
    stds: tuple[float, ...]
    #: Snapshots the solver weighted, but too little to change the outputs (not read).
    skipped: list[SnapshotInfo] = field(default_factory=list)
    #: Time of the store's latest snapshot (``t`` may be before or after it).
    last_t: float = 0.0
    #: The output dtype the negligible inputs were dropped for (finer ones need a new plan).
    dtype: torch.dtype = torch.float32

    @property
    def names(self) -> list[str]:
        """The output file names, one per std: ``phema-ema-<t>-<std>.safetensors``."""
        return [snapshot_name(self.t, s).replace("phema-", "phema-ema-", 1) for s in self.stds]

    @property
    def bytes_to_read(self) -> int:
        """Data bytes the pass will read (headers are read while listing)."""
        return sum(i.header.data_bytes for i in self.inputs)

    def curves(self, tau: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        r"""Target and achieved profiles on the times ``tau``, each ``[num_outputs, len(tau)]``.

        The target of output ``j`` is the power profile :math:`q_j` (std ``stds[j]``, age
        ``t``); what the reconstruction achieves is :math:`\sum_i c_{ij}\, p_i(\tau)`,
        the snapshots' profiles weighted by the plan's coefficients.
        """
        tau = np.asarray(tau, dtype=np.float64)
        target = np.stack([PowerProfile(self.t, s).density(tau) for s in self.stds])
        basis = np.stack([power_density(tau, i.t, i.gamma) for i in self.inputs])
        achieved = np.asarray(self.weights, dtype=np.float64).T @ basis
        return target, achieved


def plan(
    store: SnapshotStore,
    stds: Sequence[float],
    *,
    at: float | None = None,
    constraint: Literal["rescale", "exact"] = "rescale",
    dtype: torch.dtype = torch.float32,
    after_last: bool = True,
) -> Plan:
    """List the store, check layouts, solve for the coefficients of each std at ``at``.

    With ``after_last=False`` an ``at`` after the latest snapshot is refused
    (:class:`~phema.errors.OptionError`) before solving: no snapshot covers the end
    of such a profile, so every fit is poor.

    Snapshots whose coefficients cannot change outputs stored in ``dtype`` are left
    out and not read (:func:`negligible`: e.g. a target equal to a stored profile reads
    that one snapshot). The shards of every sharded snapshot the plan uses are checked
    (their headers read, several at once) and pinned, so a missing or foreign shard
    fails here, named.
    """
    check_storage_dtype(dtype, "dtype")
    infos = store.list()
    if not infos:
        raise StorageError(f"{store.url} holds no snapshots")
    check_layouts(infos)
    for a, b in itertools.pairwise(infos):  # sorted by (t, std)
        if (a.t, a.std) == (b.t, b.std):
            raise FormatError(
                f"{a.url} and {b.url} are snapshots of one profile (t={a.t:g}, std={a.std:g}); "
                "move one out of the store"
            )
    last = max(i.t for i in infos)
    t = last if at is None else float(at)
    if not after_last and t > last * (1 + TIME_RTOL):
        raise OptionError(
            f"at={t:g} is after the last snapshot (t={last:g}) of {store.url}: nothing "
            "covers the end of the profile, so every fit is poor; pass after_last=True to "
            "accept it"
        )
    targets = [PowerProfile(t, s) for s in stds]
    solution = fit_profiles(
        [i.t for i in infos], [i.std for i in infos], targets, constraint=constraint
    )
    weights = drop_negligible(solution.weights, dtype)
    used = [r for r in range(len(infos)) if any(weights[r] != 0.0)]
    skipped = [infos[r] for r in range(len(infos)) if r not in used and solution.weights[r].any()]
    with ThreadPoolExecutor(max_workers=8, thread_name_prefix="phema-verify") as pool:
        inputs = list(pool.map(lambda r: verify_shards(store, infos[r]), used))  # shard headers
    return Plan(
        inputs,
        [[float(w) for w in weights[r]] for r in used],
        solution.fits,
        t,
        tuple(float(x) for x in stds),
        skipped,
        last,
        dtype,
    )


def drop_negligible(weights: NDArray[np.float64], dtype: torch.dtype) -> NDArray[np.float64]:
    r"""``weights`` ``[inputs, outputs]`` without the terms too small to change an output.

    For output :math:`j` with coefficients :math:`c_{ij}` (summing to 1) and L1 norm
    :math:`L_j`, the smallest coefficients are zeroed while their magnitudes sum to at
    most :math:`u / (4 (L_j + 1))`, :math:`u` the unit roundoff of ``dtype`` (2^-24
    for float32), and the rest are rescaled to sum to 1 again. Every output element
    then moves by at most :math:`u/4 \cdot \max_i |\theta_i|`: a quarter of the
    rounding the output's own storage (and the sum in that precision) commits. An
    input zeroed in every output is not read at all.
    """
    u = torch.finfo(dtype).eps / 2
    out = np.array(weights, dtype=np.float64)
    for j in range(out.shape[1]):
        col = out[:, j]
        budget = u / (4.0 * (np.abs(col).sum() + 1.0))
        order = np.argsort(np.abs(col), kind="stable")
        small = order[np.cumsum(np.abs(col[order])) <= budget]
        if small.size and small.size < col.size:
            col[small] = 0.0
            col /= col.sum()
    return out


def reconstruct(
    src: SnapshotStore | str,
    stds: Sequence[float],
    out: SnapshotStore | str,
    *,
    at: float | None = None,
    dtype: torch.dtype = torch.float32,
    window_bytes: int = WINDOW_BYTES,
    max_inflight: int = 8,
    overwrite: bool = False,
    constraint: Literal["rescale", "exact"] = "rescale",
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    parallel: bool = False,
    sharded: bool = False,
) -> list[Reconstruction]:
    """Synthesise profiles ``stds`` at time ``at`` (default: the last snapshot) into ``out``.

    Args:
        src: The store of snapshots (or its URL).
        stds: Target relative stds.
        out: Where the outputs go (a store or URL); one safetensors file per std that
            loads into the original module.
        at: Target time; defaults to the latest snapshot's.
        dtype: Storage dtype of averaged floating-point tensors in the outputs.
        window_bytes: Bytes per snapshot read at a time.
        max_inflight: Ranged reads in flight at once; also the number of snapshots
            summed by one matrix product.
        overwrite: Replace existing outputs instead of refusing.
        constraint: Passed to :func:`~phema.solver.fit_profiles`.
        threads: If given, torch's intra-op thread count (process-wide) for the
            duration of the pass. Reads run on their own threads, so 1 leaves the
            other cores to them, and a single compute thread does not stall when
            the machine is busy (torch's parallel ops wait for every thread they
            start). ``None`` leaves torch's setting alone.
        progress: Called with the number of bytes each finished read brought.
        parallel: Every rank of an initialised process group calls ``reconstruct``
            with the same arguments; each reads and sums a disjoint ~1/N of every
            snapshot's bytes, and the outputs are those one process writes.
        sharded: With ``parallel``: leave each output as the ranks' shards plus a
            manifest (:mod:`phema.shards`) instead of joining them; listed by
            :meth:`~phema.store.SnapshotStore.reconstructions` and read whole by
            :meth:`~phema.store.SnapshotStore.load`.

    Returns:
        One :class:`Reconstruction` per std, in order.
    """
    _check_options(window_bytes, max_inflight, threads, dtype, sharded, parallel)  # first
    src_store = src if isinstance(src, SnapshotStore) else SnapshotStore(src)
    if parallel:  # a rank that cannot plan must not leave the others waiting
        from phema._parallel import parallel_plan

        the_plan = parallel_plan(
            lambda: plan(src_store, stds, at=at, constraint=constraint, dtype=dtype)
        )
    else:
        the_plan = plan(src_store, stds, at=at, constraint=constraint, dtype=dtype)
    return write_plan(
        the_plan,
        src_store,
        out,
        dtype=dtype,
        window_bytes=window_bytes,
        max_inflight=max_inflight,
        overwrite=overwrite,
        threads=threads,
        progress=progress,
        parallel=parallel,
        sharded=sharded,
    )


def write_plan(
    the_plan: Plan,
    src: SnapshotStore,
    out: SnapshotStore | str,
    *,
    dtype: torch.dtype = torch.float32,
    window_bytes: int = WINDOW_BYTES,
    max_inflight: int = 8,
    overwrite: bool = False,
    threads: int | None = None,
    progress: Callable[[int], None] | None = None,
    parallel: bool = False,
    sharded: bool = False,
) -> list[Reconstruction]:
    """Carry out a :func:`plan` made on ``src``: the streaming pass of :func:`reconstruct`.

    With ``parallel`` (every rank of an initialised process group calls it, with the
    same plan), each rank reads and sums a disjoint ~1/N of the windows and rank 0
    joins the parts into the same outputs a single process writes
    (:mod:`phema._parallel`).
    """
    _check_options(window_bytes, max_inflight, threads, dtype, sharded, parallel)
    if torch.finfo(dtype).eps < torch.finfo(the_plan.dtype).eps:
        raise OptionError(
            f"the plan left out inputs too small to change {the_plan.dtype} outputs, not "
            f"{dtype} ones; make it with plan(..., dtype={dtype})"
        )
    inputs = the_plan.inputs

    def read(r: int, offset: int, buf: memoryview) -> None:
        read_logical(src, inputs[r], offset, buf)

    if parallel:
        from phema._parallel import run_parallel

        def setup() -> tuple[SnapshotStore, Job]:
            store = out if isinstance(out, SnapshotStore) else SnapshotStore(out)
            return store, prepare(the_plan, store, dtype, window_bytes)

        with _torch_threads(threads):
            return run_parallel(setup, read, overwrite, max_inflight, progress, inputs, sharded)
    out_store = out if isinstance(out, SnapshotStore) else SnapshotStore(out)
    job = prepare(the_plan, out_store, dtype, window_bytes)
    with _OutputFiles(out_store, job.names, overwrite) as files, _torch_threads(threads):
        for f, head in zip(files, job.headers, strict=True):
            f.write(head)
        stream(
            read,
            job.windows,
            job.weights,
            job.latest,
            files,
            max_inflight=max_inflight,
            progress=progress,
            name_of=job.where,
        )
    return job.results


@dataclass(frozen=True)
class Job:
    """Everything a pass writes, fixed before any tensor byte is read."""

    names: list[str]  # output file names
    headers: list[bytes]  # their encoded headers
    results: list[Reconstruction]
    windows: list[Window]
    weights: list[list[float]]
    latest: int
    layout: tuple[TensorInfo, ...] = ()  # the inputs' (logical) layout
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = field(default_factory=list)  # out
    metas: list[dict[str, str]] = field(default_factory=list)  # each output's metadata
    sources: list[str] = field(default_factory=list)  # the inputs' URLs, for errors

    def where(self, i: int | None, offset: int) -> str:
        """Input ``i``'s URL (unless None) and the tensor holding logical data byte ``offset``."""
        k = bisect.bisect_right(self.layout, offset, key=lambda ti: ti.begin) - 1
        info = self.layout[max(k, 0)]
        element = (offset - info.begin) // info.dtype.itemsize
        tensor = f"tensor {info.name!r} (element {element})"
        return tensor if i is None else f"{self.sources[i]}: {tensor}"


def prepare(the_plan: Plan, out_store: SnapshotStore, dtype: torch.dtype, window_bytes: int) -> Job:
    """Output names, headers and metadata, and the windows of the pass."""
    stds = the_plan.stds
    inputs, weights = the_plan.inputs, the_plan.weights
    layout = inputs[0].header.tensors
    latest = max(range(len(inputs)), key=lambda r: inputs[r].t)
    copied = set(inputs[latest].copied)
    out_dtype = {
        ti.name: dtype if ti.name not in copied and ti.dtype.is_floating_point else ti.dtype
        for ti in layout
    }
    names = the_plan.names
    results = []
    headers = []
    metas = []
    specs = [(ti.name, out_dtype[ti.name], ti.shape) for ti in layout]
    for j, (std, fit) in enumerate(zip(stds, the_plan.fits, strict=True)):
        coefs = {os.path.basename(i.path): weights[r][j] for r, i in enumerate(inputs)}
        meta = {
            "phema.format": FORMAT_VERSION,
            "phema.kind": "reconstruction",
            "phema.std": repr(float(std)),
            "phema.t": repr(the_plan.t),
            "phema.t_unit": inputs[latest].t_unit,
            "phema.coefficients": json.dumps(coefs),
            "phema.fit": json.dumps(
                {"rel_error": fit.rel_error, "l1_norm": fit.l1_norm, "condition": fit.condition}
            ),
        }
        metas.append(meta)
        headers.append(encode_header(specs, meta, keep_order=True)[0])
        results.append(
            Reconstruction(
                out_store.path_of(names[j]), f"{out_store.url.rstrip('/')}/{names[j]}", fit, coefs
            )
        )
    averaged = {ti.name for ti in layout if ti.name not in copied and ti.dtype.is_floating_point}
    windows = plan_windows(layout, averaged, out_dtype, window_bytes)
    sources = [i.url for i in inputs]
    return Job(names, headers, results, windows, weights, latest, layout, specs, metas, sources)


def _check_options(
    window_bytes: int,
    max_inflight: int,
    threads: int | None,
    dtype: torch.dtype,
    sharded: bool = False,
    parallel: bool = False,
) -> None:
    check_storage_dtype(dtype, "dtype")
    if sharded and not parallel:
        raise OptionError(
            "sharded outputs are the shards of ranks that reconstruct together: pass "
            "parallel=True and run every rank (torchrun), or leave sharded=False"
        )
    for option, value in (("window_bytes", window_bytes), ("max_inflight", max_inflight)):
        if value < 1:
            raise OptionError(f"{option} must be at least 1, got {value}")
    if threads is not None and threads < 1:
        raise OptionError(
            f"threads must be at least 1 (or None for torch's setting), got {threads}"
        )


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """Set torch's intra-op thread count to ``n`` (if given) and restore it after."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _OutputFiles:
    """K output files that appear together at the end, or not at all.

    Each is staged by the store's backend (invisible while written); at the end they
    are published together (:meth:`phema._backends.Backend.publish`): without
    ``overwrite`` none replaces an existing file, also when another run races for the
    same names, and a failure part way rolls back the ones already published.
    """

    def __init__(self, store: SnapshotStore, names: list[str], overwrite: bool) -> None:
        self.store, self.names, self.overwrite = store, names, overwrite
        self.staged: list[Staged] = []

    def __enter__(self) -> list[IO[bytes]]:
        for name in self.names:  # fail before the pass; publish checks again, race-free
            if not self.overwrite and self.store.exists(name):
                raise ExistsError(
                    f"{self.store.url}/{name} exists; pass overwrite=True (--overwrite) to replace it"
                )
        backend = self.store.backend
        try:
            for name in self.names:
                self.staged.append(backend.stage(name, self.store.path_of(name), self.overwrite))
        except BaseException:
            backend.discard(self.staged)
            raise
        return [s.file for s in self.staged]

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        backend = self.store.backend
        if exc_type is not None:
            backend.discard(self.staged)
            return
        try:
            backend.publish(self.staged, self.overwrite)
        except PhemaError:
            raise
        except Exception as err:
            raise StorageError(
                f"publishing {', '.join(self.names)} to {self.store.url} failed, none was "
                f"published: {type(err).__name__}: {err}"
            ) from err
