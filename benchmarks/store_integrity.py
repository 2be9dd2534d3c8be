"""What the store's integrity checks cost: verified reads and no-replace writes, side by side.

The store checks every read against the version it listed (locally one ``fstat`` per
read, compared with the listing's device, inode, size and mtime; on S3 an
``If-Match: <ETag>`` on every ranged GET) and publishes every write without
replacing (locally: hidden temporary file, ``fsync``, ``link(2)`` to its name,
``unlink`` of the temporary name, ``fsync`` of the folder; on S3: a multipart upload
completed with ``If-None-Match: *``). This script measures both against the same
work without the checks, in one process, over interleaved rounds with a rotating
order:

* **Reconstruction reads** (``reconstruct`` section): one
  :func:`phema.write_plan` pass (8 output stds, fp16 outputs, the default
  2 MiB window, 8 reads in flight, 1 torch thread) over fp16 snapshots of the
  synthetic model of ``ema_update.py``, from one plan, with two source stores:
  ``checked`` (a plain :class:`phema.SnapshotStore`: every read names
  ``inputs[r].identity``) and ``unchecked`` (a subclass whose ``read_into`` ignores the
  identity: one ``os.preadv`` loop locally, ``fs.cat_file(path, start=, end=)`` on
  S3). On S3 a third store, ``unchecked_phema_get``, sends phema's own ranged GET
  without ``If-Match``: the code path of ``checked`` less the header. Outputs go to a
  tmpfs folder (``/dev/shm`` when there is one) so that the disk's write-back noise
  does not hide the reads' cost; every output of every run must be byte-identical to
  the first run's (sha256), or the script fails. Local snapshots are read warm (page
  cache); on S3 they live in a moto ``ThreadedMotoServer`` that this script starts on
  127.0.0.1 (port 0, fake credentials). A *read probe* then times single reads
  through each store (one window, and locally also 4 KiB) to give the check's own
  cost per read, which a whole pass cannot resolve on a busy machine;
  ``probe_ratio_bound`` adds that cost (+ 2 standard errors) for every read of a pass
  to the unchecked pass's time.
* **Snapshot writes** (``save`` and ``write`` sections):
  ``SnapshotWriter.save(ema)`` on the training thread (2 profiles, with an empty
  queue; the background write is drained, untimed, before the next call) against
  the training-thread code of ``save`` at 703f5cc (run on the same writer) and
  against the copies it makes (``ema.profile_state_dict(std)`` per profile); and the
  background write of one serialised fp16 snapshot file: ``SnapshotStore.write``
  (staged, no-replace publish, folder ``fsync``) against the old way,
  ``phema.store.atomic_write`` as it was up to 190d9f8 (temporary file, ``fsync``,
  ``os.replace``; copied into this script, as the library's has since changed), and
  the old way plus a folder ``fsync``, locally; on S3 ``SnapshotStore.write`` against
  ``fs.pipe_file`` (one ``PutObject`` below 100 MiB) on another s3fs instance,
  ``fs.pipe_file(mode="create")`` (one ``PutObject`` with ``If-None-Match: *``) and the
  store's write before (``with fs.transaction: fs.open(path, "wb")``, a multipart
  upload). Every write has a fresh name (a store never overwrites) and the file is
  deleted, untimed, after it; locally ``os.sync()`` runs, untimed, before each write.
  Files under 16 MiB get 3x the rounds (their times vary most).

Ratios are taken per round between adjacent runs (so that drift of the machine
cancels) and summarised by their median, with a standard error from the median
absolute deviation; the ratio of the medians is printed beside it. A target counts
as met (or missed) only when the ratio is more than 2 standard errors from it;
otherwise the verdict is ``null``: not resolved, run more rounds.

Targets (the summary line): checked reads keep >= 0.95 of the unchecked throughput;
a local snapshot write costs at most 1.05x the old write, ``save`` at most 1.05x its
code at 703f5cc. S3 write figures are reported without a target.

Output: JSON lines on stdout only (one per figure), ending with a summary line.

Run::

    python3 benchmarks/store_integrity.py > store_integrity.jsonl   # full run, ~3.5 min on 2 cores
    python3 benchmarks/store_integrity.py --quick                   # ~2M parameters, ~25 s
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from _common import device_name, emit, fill_defaults, sig, summarize
from ema_update import build_model, perturb
from reconstruct import (
    SPECS,
    STORED_STDS,
    T_STEP,
    _version,
    base_weights,
    check_space,
    data_files,
    moto_s3,
    snapshot_tensors,
    warm,
    write_local,
    write_s3,
)

import phema
from phema._local import fsync_dir
from phema.errors import ChangedError
from phema.format import serialize
from phema.store import snapshot_metadata, snapshot_name
from phema.streaming import WINDOW_BYTES, Plan, plan, write_plan

BENCH = "store_integrity"
#: Checked reads must keep at least this share of the unchecked throughput.
TARGET_READ_RATIO = 0.95
#: A local write (and ``save`` on the training thread) may cost at most this much more.
TARGET_WRITE_RATIO = 1.05
#: Size of the small reads of the local read probe.
SMALL_READ = 4096
#: Files smaller than this get 3x the write rounds.
SMALL_FILE = 16 << 20
#: How long to wait for the writer thread to drain before giving up.
DRAIN_TIMEOUT_S = 300.0
#: Snapshot times of the timed writes: every write gets a name never used before.
_NAMES = itertools.count(1)


# --------------------------------------------------------------------------- statistics


def rotating(variants: list[str], rounds: int) -> list[tuple[int, str]]:
    """``(round, variant)`` in the order they run: each round starts one variant later."""
    order = []
    for r in range(rounds):
        shift = r % len(variants)
        order += [(r, v) for v in variants[shift:] + variants[:shift]]
    return order


def median_se(values: list[float]) -> float | None:
    """Standard error of the median of ``values``, from their median absolute deviation.

    ``1.4826 * MAD`` estimates the standard deviation robustly (one disturbed round
    does not inflate it); the median of ``n`` normal samples has a standard error of
    ``1.2533 * sigma / sqrt(n)`` (as in ``train_throughput.py``). ``None`` below 2 values.
    """
    if len(values) < 2:
        return None
    mid = statistics.median(values)
    mad = statistics.median(abs(v - mid) for v in values)
    return 1.4826 * 1.2533 * mad / len(values) ** 0.5


def paired(num: list[float], den: list[float]) -> dict[str, Any]:
    """``num[r] / den[r]`` per round (adjacent runs, so drift cancels), summarised."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return {
        "median": statistics.median(ratios),
        "se": median_se(ratios),
        "per_round": [sig(x, 4) for x in ratios],
        "of_medians": statistics.median(num) / statistics.median(den),
    }


def verdict(ratio: float, se: float | None, target: float, *, at_least: bool) -> bool | None:
    """Whether ``ratio`` meets ``target`` by more than 2 standard errors (True), misses it
    by more (False), or is within the noise of it (None: not resolved)."""
    if se is None:
        return None
    margin = ratio - target if at_least else target - ratio
    if margin >= 2 * se:
        return True
    if margin < -2 * se:
        return False
    return None


def ratio_fields(p: dict[str, Any], target: float | None, *, at_least: bool) -> dict[str, Any]:
    """The JSON fields of one paired ratio and its verdict."""
    se = p["se"]
    out: dict[str, Any] = {
        "ratio": sig(p["median"], 4),
        "ratio_se": sig(se, 3) if se is not None else None,
        "ratio_of_medians": sig(p["of_medians"], 4),
    }
    if target is not None:
        out["meets"] = verdict(p["median"], se, target, at_least=at_least)
        ok = p["median"] >= target if at_least else p["median"] <= target
        out["meets_point_estimate"] = bool(ok)
    return out


# --------------------------------------------------------------------------- stores


class UncheckedStore(phema.SnapshotStore):
    """A store whose reads skip the identity check: what every read did before it."""

    def read_into(
        self, path: str, start: int, out: memoryview, identity: str | None = None
    ) -> None:
        want = len(out)
        if self.is_local:
            fd = os.open(path, os.O_RDONLY)
            try:
                got = 0
                while got < want and (n := os.preadv(fd, [out[got:]], start + got)):
                    got += n
            finally:
                os.close(fd)
        else:
            data = self.fs.cat_file(path, start=start, end=start + want)
            got = len(data)
            out[:got] = data
        if got != want:
            raise RuntimeError(f"{path}: wanted {want} bytes at {start}, got {got}")


class UncheckedPhemaGetStore(phema.SnapshotStore):
    """S3 only: phema's own ranged GET (``S3Backend._get``) without ``If-Match``."""

    def read_into(
        self, path: str, start: int, out: memoryview, identity: str | None = None
    ) -> None:
        get = self.backend._get  # type: ignore[attr-defined]
        data, _, _ = get(path, start, start + len(out), None)
        if len(data) != len(out):
            raise RuntimeError(f"{path}: wanted {len(out)} bytes at {start}, got {len(data)}")
        out[:] = data


def count_reads(store: phema.SnapshotStore) -> tuple[Callable[[], None], list[int]]:
    """Count the reads that reach ``store``'s read primitive; returns (undo, [reads, bytes]).

    For a checked store the primitive is ``store.backend.read_into`` (the check, which
    must be given an identity); for the unchecked ones the store's own ``read_into``.
    """
    count = [0, 0]
    checked = type(store) is phema.SnapshotStore
    owner: Any = store.backend if checked else store
    inner = owner.read_into

    def read_into(path: str, start: int, out: memoryview, identity: str | None = None) -> None:
        if checked and not identity:
            raise AssertionError(f"a read of {path} named no identity: nothing was checked")
        inner(path, start, out, identity)
        count[0] += 1
        count[1] += len(out)

    owner.read_into = read_into

    def undo() -> None:
        del owner.read_into  # back to the class's method

    return undo, count


def output_hashes(folder: str) -> dict[str, str]:
    """sha256 of every file in ``folder`` (the reconstruction outputs)."""
    out = {}
    for p in sorted(Path(folder).iterdir()):
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        out[p.name] = h.hexdigest()
    return out


def fs_type(path: str) -> str:
    """The filesystem type ``path`` lives on (from ``/proc/mounts``), e.g. ``tmpfs``."""
    best, kind = "", "unknown"
    real = os.path.realpath(path)
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                mnt, typ = line.split()[1:3]
                inside = real == mnt or real.startswith(mnt.rstrip("/") + "/")
                if inside and len(mnt) > len(best):
                    best, kind = mnt, typ
    except OSError:
        pass
    return kind


# --------------------------------------------------------------------------- reconstruct section


def reconstruct_section(
    storage: str,
    url: str,
    bytes_stored: int,
    args: argparse.Namespace,
    out_base: str,
) -> dict[str, Any]:
    """Checked against unchecked source stores, one ``write_plan`` pass per run."""
    stores: dict[str, phema.SnapshotStore] = {
        "checked": phema.SnapshotStore(url),
        "unchecked": UncheckedStore(url),
    }
    if storage == "s3":
        stores["unchecked_phema_get"] = UncheckedPhemaGetStore(url)
    variants = list(stores)
    the_plan: Plan = plan(stores["checked"], args.stds)
    if not all(i.identity for i in the_plan.inputs):
        raise AssertionError("the plan's inputs carry no identity: the reads would not be checked")
    to_read = the_plan.bytes_to_read

    def one_pass(store: phema.SnapshotStore) -> tuple[float, dict[str, str]]:
        out = os.path.join(out_base, f"out-{uuid.uuid4().hex[:8]}")
        try:
            start = time.perf_counter()
            write_plan(
                the_plan,
                store,
                out,
                dtype=torch.float16,
                window_bytes=args.window_bytes,
                max_inflight=args.max_inflight,
                threads=args.threads,
            )
            seconds = time.perf_counter() - start
            return seconds, output_hashes(out)
        finally:
            shutil.rmtree(out, ignore_errors=True)

    # An untimed pass per store first, counting the reads that reach the primitive.
    reference: dict[str, str] | None = None
    reads: dict[str, list[int]] = {}
    for v in variants:
        undo, count = count_reads(stores[v])
        try:
            _, hashes = one_pass(stores[v])
        finally:
            undo()
        reads[v] = count
        reference = reference or hashes
        if hashes != reference:
            raise AssertionError(f"{storage}: {v}'s outputs differ from checked's (warm-up)")
    if reference is None or len(reference) != len(args.stds):
        raise AssertionError(f"{storage}: expected {len(args.stds)} outputs, got {reference}")
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for r, v in rotating(variants, args.rounds if storage == "local" else args.s3_rounds):
        s, hashes = one_pass(stores[v])
        if hashes != reference:
            raise AssertionError(
                f"{storage}: {v}'s outputs in round {r} are not byte-identical to the first run's"
            )
        seconds[v].append(s)
        if args.verbose:
            print(f"[{BENCH}] {storage} reconstruct {v} round {r}: {s:.3f} s", file=sys.stderr)
    live = check_is_live(stores, the_plan)
    probe, probe_upper, probe_lower = read_probe(storage, stores, the_plan, args)
    med = {v: statistics.median(seconds[v]) for v in variants}
    for v in variants:
        emit(
            BENCH,
            f"{storage}_reconstruct_{v}",
            "cpu",
            section="reconstruct",
            storage=storage,
            variant=v,
            **summarize(seconds[v], "ms"),
            seconds_median=sig(med[v], 4),
            mb_per_s=sig(to_read / med[v] / 1e6, 4),
            bytes_read=to_read,
            bytes_stored=bytes_stored,
            reads_per_pass=reads[v][0],
            bytes_per_pass=reads[v][1],
            checked_reads_per_pass=reads[v][0] if v == "checked" else 0,
        )
    # Same bytes: the throughput ratio is the time ratio, unchecked over checked.
    pr = paired(seconds["unchecked"], seconds["checked"])
    rf = ratio_fields(pr, TARGET_READ_RATIO, at_least=True)
    fig: dict[str, Any] = {
        "ratio_checked_vs_unchecked": rf.pop("ratio"),
        **rf,
        "checked_s": sig(med["checked"], 4),
        "unchecked_s": sig(med["unchecked"], 4),
        "checked_mb_per_s": sig(to_read / med["checked"] / 1e6, 4),
        "unchecked_mb_per_s": sig(to_read / med["unchecked"] / 1e6, 4),
        "probe_overhead_us_per_read": sig(1e6 * probe, 4),
        "probe_overhead_upper_us_per_read": sig(1e6 * probe_upper, 4),
    }

    # From the probe: every read's extra cost added to the unchecked pass, none overlapped
    # with another read; with the overhead's upper figure (+ 2 standard errors) it is a
    # lower bound of the ratio, with its lower figure (- 2 standard errors) an upper one.
    def bound(cost: float) -> float:
        return med["unchecked"] / (med["unchecked"] + reads["checked"][0] * max(cost, 0.0))

    fig["probe_ratio_bound"] = sig(bound(probe_upper), 4)
    fig["meets_by_probe"] = (
        True
        if bound(probe_upper) >= TARGET_READ_RATIO
        else False
        if bound(probe_lower) < TARGET_READ_RATIO
        else None
    )
    if "unchecked_phema_get" in med:
        pg = paired(seconds["unchecked_phema_get"], seconds["checked"])
        fig["ratio_checked_vs_unchecked_phema_get"] = sig(pg["median"], 4)
        fig["ratio_checked_vs_unchecked_phema_get_se"] = (
            sig(pg["se"], 3) if pg["se"] is not None else None
        )
    emit(
        BENCH,
        f"{storage}_reconstruct_ratio",
        "cpu",
        section="reconstruct",
        storage=storage,
        **fig,
        ratio_per_round=pr["per_round"],
        target=TARGET_READ_RATIO,
        reads_per_pass=reads["checked"][0],
        outputs=len(reference),
        outputs_identical=True,  # asserted for every run above
        output_sha256_first=sorted(reference.values())[0][:16],
        checks_live=live,
        inputs=len(the_plan.inputs),
        window_bytes=args.window_bytes,
        max_inflight=args.max_inflight,
        out_dir_fs=fs_type(out_base),
    )
    return fig


def read_probe(
    storage: str, stores: dict[str, phema.SnapshotStore], the_plan: Plan, args: argparse.Namespace
) -> tuple[float, float, float]:
    """The same reads through each store, back to back: the check's cost per read (s).

    Each round reads ``--probe-reads`` ranges of one input through each store in turn
    (rotating order); a read's time is the round's time over its reads, and the
    overhead the median over rounds of checked minus unchecked in the same round.
    Locally it is measured with windows of the pass's size and with 4 KiB reads, where
    the check's fixed cost is not lost in the noise of copying 2 MiB. Returns the larger
    overhead, and the larger of overhead + 2 and - 2 standard errors (seconds per read).
    """
    info = the_plan.inputs[0]
    sizes = [min(args.window_bytes, info.header.data_bytes)]
    if storage == "local":
        sizes.append(SMALL_READ)
    n = args.probe_reads if storage == "local" else args.s3_probe_reads
    variants = list(stores)
    overheads, uppers, lowers = [], [], []
    for size in sizes:
        span = max(info.header.data_bytes - size, 1)
        offsets = [info.header.data_start + (k * args.window_bytes) % span for k in range(n)]
        buf = memoryview(bytearray(size))
        seconds: dict[str, list[float]] = {v: [] for v in variants}
        for v in variants:  # warm-up
            stores[v].read_into(info.path, offsets[0], buf, info.identity)
        for _, v in rotating(variants, args.probe_rounds):
            read = stores[v].read_into
            start = time.perf_counter()
            for off in offsets:
                read(info.path, off, buf, info.identity)
            seconds[v].append((time.perf_counter() - start) / n)
        med = {v: statistics.median(seconds[v]) for v in variants}
        diffs = [c - u for c, u in zip(seconds["checked"], seconds["unchecked"], strict=True)]
        overhead, se = statistics.median(diffs), median_se(diffs)
        overheads.append(overhead)
        uppers.append(overhead + 2 * (se or 0.0))
        lowers.append(overhead - 2 * (se or 0.0))
        emit(
            BENCH,
            f"{storage}_read_probe_{size}",
            "cpu",
            section="reconstruct",
            storage=storage,
            read_bytes=size,
            reads_per_round=n,
            rounds=args.probe_rounds,
            **{f"{v}_us_per_read": sig(1e6 * med[v], 4) for v in variants},
            **{f"{v}_us_per_read_min": sig(1e6 * min(seconds[v]), 4) for v in variants},
            **{f"{v}_us_per_read_max": sig(1e6 * max(seconds[v]), 4) for v in variants},
            overhead_us_per_read=sig(1e6 * overhead, 4),
            overhead_se_us=sig(1e6 * se, 3) if se is not None else None,
            ratio_checked_vs_unchecked=sig(
                paired(seconds["unchecked"], seconds["checked"])["median"], 4
            ),
        )
    return max(overheads), max(uppers), max(lowers)


def check_is_live(stores: dict[str, phema.SnapshotStore], the_plan: Plan) -> dict[str, bool]:
    """Whether each store refuses a read that names a version other than the listed one.

    Fails the run unless ``checked`` refuses it and the unchecked stores do not.
    """
    info = the_plan.inputs[0]
    wrong = "0:0:0:0" if stores["checked"].is_local else '"00000000000000000000000000000000"'
    out = {}
    for v, store in stores.items():
        buf = memoryview(bytearray(64))
        try:
            store.read_into(info.path, info.header.data_start, buf, wrong)
            out[v] = False
        except ChangedError:
            out[v] = True
    if not out["checked"] or any(out[v] for v in out if v != "checked"):
        raise AssertionError(f"identity checks are not what this benchmark assumes: {out}")
    return out


# --------------------------------------------------------------------------- save section


def save_section(args: argparse.Namespace, base: str) -> dict[str, Any]:
    """``SnapshotWriter.save(ema)`` on the training thread against the copies it makes."""
    model = build_model(SPECS[args.spec], torch.device("cpu"))
    ema = phema.PowerFunctionEMA(model, stds=STORED_STDS)
    folder = os.path.join(base, "save")
    writer = phema.SnapshotWriter(folder, dtype=torch.float16)
    t = [0]
    saves = [0]

    def advance() -> None:  # a new time, so every save has fresh names (untimed)
        perturb(model)
        t[0] += T_STEP
        ema.update(t[0])

    def drain() -> None:  # wait for the background writes, then delete the files
        want = len(ema.stds) * saves[0]
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while len(writer.written) < want:
            if time.monotonic() > deadline or writer._failures:
                writer.close()  # raises the writer's failure, if any
                raise RuntimeError("the snapshot writer did not finish in time")
            time.sleep(0.002)
        for p in writer.written:
            if os.path.exists(p):
                os.unlink(p)

    def do_save() -> object:
        writer.save(ema, step=t[0])
        saves[0] += 1
        return None

    def do_save_before() -> object:
        # The training-thread part of save() at 703f5cc, on this writer: check for an
        # earlier failure, copy every profile, queue them (no lock, no report after).
        if writer._failures:
            raise RuntimeError("an earlier snapshot failed")
        if writer._closed:
            raise RuntimeError("closed")
        averaged = set(ema.names)
        jobs = []
        for std, gamma in zip(ema.stds, ema.gammas, strict=True):
            state = ema.profile_state_dict(std)
            copied = tuple(n for n in state if n not in averaged)
            jobs.append((state, ema.t, std, gamma, copied, t[0]))
        writer._queue.put(jobs)
        saves[0] += 1
        return None

    def do_copies() -> object:  # kept until the clock stops, as save's are (in the queue)
        return [ema.profile_state_dict(std) for std in ema.stds]

    cases = {"save": do_save, "save_703f5cc": do_save_before, "copies": do_copies}
    advance()
    do_save()  # warm-up, untimed
    drain()
    seconds: dict[str, list[float]] = {c: [] for c in cases}
    for r, c in rotating(list(cases), args.save_rounds):
        advance()
        start = time.perf_counter()
        kept = cases[c]()
        seconds[c].append(time.perf_counter() - start)
        del kept
        drain()
        if args.verbose:
            print(f"[{BENCH}] save {c} round {r}: {seconds[c][-1] * 1e3:.1f} ms", file=sys.stderr)
    writer.close()
    params = sum(p.numel() for p in model.parameters())
    what = {
        "save": "SnapshotWriter.save(ema), training thread, empty queue",
        "save_703f5cc": "the training-thread code of save() at 703f5cc, on the same writer",
        "copies": "ema.profile_state_dict(std) for both profiles (what save copies)",
    }
    for c in cases:
        emit(
            BENCH,
            f"save_{c}",
            "cpu",
            section="save",
            what=what[c],
            model=args.spec,
            params=params,
            profiles=len(ema.stds),
            **summarize(seconds[c], "ms"),
        )
    ps = paired(seconds["save"], seconds["save_703f5cc"])
    fig = {
        "save_ms": sig(1e3 * statistics.median(seconds["save"])),
        "save_703f5cc_ms": sig(1e3 * statistics.median(seconds["save_703f5cc"])),
        "copies_ms": sig(1e3 * statistics.median(seconds["copies"])),
        **ratio_fields(ps, TARGET_WRITE_RATIO, at_least=False),
        "ratio_vs_copies": sig(paired(seconds["save"], seconds["copies"])["median"], 4),
    }
    emit(
        BENCH,
        "save_ratio",
        "cpu",
        section="save",
        ratio_of="save / save_703f5cc",
        **fig,
        ratio_per_round=ps["per_round"],
        target=TARGET_WRITE_RATIO,
        snapshots_written=len(writer.written),
    )
    return fig


# --------------------------------------------------------------------------- write section


def snapshot_bytes(spec: str) -> bytes:
    """One serialised fp16 snapshot of model ``spec``, as the writer thread makes it."""
    base, _ = base_weights(spec)
    tensors = snapshot_tensors(base, 0, 0)
    gamma = float(phema.sigma_rel_to_gamma([STORED_STDS[0]])[0])
    meta = snapshot_metadata(
        tensors, t=T_STEP, std=STORED_STDS[0], gamma=gamma, t_unit="steps", step=T_STEP
    )
    return serialize(tensors, meta)


@contextmanager
def atomic_write_before(path: str) -> Iterator[IO[bytes]]:
    """``phema.store.atomic_write`` as it was up to 190d9f8 (the old way of writing a file):
    a hidden temporary file, ``fsync``, ``os.replace`` over ``path``; no folder ``fsync``.

    Copied here because the library's ``atomic_write`` has since changed (it syncs the
    folder too, and can publish by link), so it no longer measures the old way.
    """
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_rounds(rounds: int, data: bytes) -> int:
    """Rounds for writes of ``data``: 3x as many for files under 16 MiB (cheap, and their
    times vary more from one write to the next)."""
    return rounds * (3 if len(data) < SMALL_FILE else 1)


def time_writes(
    cases: dict[str, Callable[[str], Callable[[], None]]],
    rounds: int,
    before: Callable[[], None],
    tag: str,
    verbose: bool,
) -> dict[str, list[float]]:
    """Run every case ``rounds`` times (rotating order), each on a fresh name.

    ``cases[c](name)`` writes one file ``name`` and returns a cleanup that deletes it
    (untimed); ``before`` runs, untimed, before each write.
    """
    seconds: dict[str, list[float]] = {c: [] for c in cases}
    for c in cases:  # warm-up, untimed
        cases[c](snapshot_name(T_STEP * next(_NAMES), STORED_STDS[0]))()
    for r, c in rotating(list(cases), rounds):
        name = snapshot_name(T_STEP * next(_NAMES), STORED_STDS[0])
        before()
        start = time.perf_counter()
        cleanup = cases[c](name)
        seconds[c].append(time.perf_counter() - start)
        cleanup()
        if verbose:
            print(f"[{BENCH}] {tag} {c} round {r}: {seconds[c][-1] * 1e3:.1f} ms", file=sys.stderr)
    return seconds


def local_write_section(
    args: argparse.Namespace, base: str, data: bytes, spec: str
) -> dict[str, Any]:
    """``SnapshotStore.write`` against the old ``atomic_write`` (temp, fsync, os.replace)."""
    folder = os.path.join(base, f"write-{spec}")
    os.makedirs(folder, exist_ok=True)
    store = phema.SnapshotStore(folder)

    def store_write(name: str) -> Callable[[], None]:
        path = store.write(name, data)
        return lambda: os.unlink(path)

    def atomic_replace(name: str) -> Callable[[], None]:
        path = os.path.join(folder, name)
        with atomic_write_before(path) as f:
            f.write(data)
        return lambda: os.unlink(path)

    def atomic_replace_fsync_dir(name: str) -> Callable[[], None]:
        path = os.path.join(folder, name)
        with atomic_write_before(path) as f:
            f.write(data)
        fsync_dir(folder)
        return lambda: os.unlink(path)

    cases = {
        "store_write": store_write,
        "atomic_write_replace": atomic_replace,
        "atomic_write_replace_fsync_dir": atomic_replace_fsync_dir,
    }
    seconds = time_writes(
        cases, write_rounds(args.write_rounds, data), os.sync, f"local write {spec}", args.verbose
    )
    if leftovers := os.listdir(folder):
        raise AssertionError(f"files left behind by the writes: {leftovers}")
    return report_writes("local", spec, data, seconds, "atomic_write_replace", fs_type(folder))


def s3_write_section(args: argparse.Namespace, url: str, data: bytes, spec: str) -> dict[str, Any]:
    """On S3: ``SnapshotStore.write`` against ``pipe_file``, a conditional ``pipe_file`` and
    the store's write before (a transaction around ``fs.open(path, "wb")``)."""
    import s3fs

    store = phema.SnapshotStore(f"{url}/write-{spec}")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    prefix = store.root.rstrip("/")

    def store_write(name: str) -> Callable[[], None]:
        path = store.write(name, data)
        return lambda: fs.rm_file(path)

    def pipe_file(name: str) -> Callable[[], None]:
        path = f"{prefix}/{name}"
        fs.pipe_file(path, data)
        return lambda: fs.rm_file(path)

    def pipe_file_create(name: str) -> Callable[[], None]:
        path = f"{prefix}/{name}"
        fs.pipe_file(path, data, mode="create")
        return lambda: fs.rm_file(path)

    def transaction_open_wb(name: str) -> Callable[[], None]:
        path = f"{prefix}/{name}"
        with fs.transaction, fs.open(path, "wb") as f:
            f.write(data)
        return lambda: fs.rm_file(path)

    cases = {
        "store_write": store_write,
        "pipe_file": pipe_file,
        "pipe_file_create": pipe_file_create,
        "transaction_open_wb": transaction_open_wb,
    }
    # Does this server refuse a conditional PutObject over an existing key? If not, the
    # conditional case would not be what it says: leave it out.
    probe = f"{prefix}/.create-probe-{uuid.uuid4().hex[:8]}"
    try:
        fs.pipe_file(probe, b"x", mode="create")
        try:
            fs.pipe_file(probe, b"y", mode="create")
            refuses = False
        except (FileExistsError, OSError):
            refuses = True
        fs.rm_file(probe)
    except Exception:  # the server does not take the header at all
        refuses = False
    if not refuses:
        del cases["pipe_file_create"]
    seconds = time_writes(
        cases,
        write_rounds(args.s3_write_rounds, data),
        lambda: None,
        f"s3 write {spec}",
        args.verbose,
    )
    return report_writes(
        "s3", spec, data, seconds, "pipe_file", None, conditional_put_refuses_existing=refuses
    )


WRITE_WHAT = {
    "store_write": "SnapshotStore.write(name, data)",
    "atomic_write_replace": "phema.store.atomic_write up to 190d9f8: temp, fsync, os.replace",
    "atomic_write_replace_fsync_dir": "the same, then an fsync of the folder (as the store does)",
    "pipe_file": "s3fs pipe_file(path, data) on another instance (PutObject below 100 MiB)",
    "pipe_file_create": "s3fs pipe_file(path, data, mode='create'): PutObject, If-None-Match",
    "transaction_open_wb": "the store's write before: with fs.transaction: fs.open(path, 'wb')",
}


def report_writes(
    storage: str,
    spec: str,
    data: bytes,
    seconds: dict[str, list[float]],
    old: str,
    dir_fs: str | None,
    **extra: Any,
) -> dict[str, Any]:
    """One line per case, then the ratio line (``store_write`` over each other case)."""
    for c, s in seconds.items():
        emit(
            BENCH,
            f"{storage}_write_{spec}_{c}",
            "cpu",
            section="write",
            storage=storage,
            variant=c,
            what=WRITE_WHAT[c],
            bytes=len(data),
            **summarize(s, "ms"),
            mb_per_s=sig(len(data) / statistics.median(s) / 1e6, 4),
            **({"dir_fs": dir_fs} if dir_fs else {}),
        )
    local = storage == "local"
    pw = paired(seconds["store_write"], seconds[old])
    fig: dict[str, Any] = {
        "bytes": len(data),
        **ratio_fields(pw, TARGET_WRITE_RATIO if local else None, at_least=False),
    }
    fig.update({f"{c}_ms": sig(1e3 * statistics.median(s)) for c, s in seconds.items()})
    for c in seconds:
        if c != "store_write":
            fig[f"ratio_vs_{c}"] = sig(paired(seconds["store_write"], seconds[c])["median"], 4)
    emit(
        BENCH,
        f"{storage}_write_{spec}_ratio",
        "cpu",
        section="write",
        storage=storage,
        ratio_of=f"store_write / {old}",
        **fig,
        ratio_per_round=pw["per_round"],
        target=TARGET_WRITE_RATIO if local else None,
        **extra,
    )
    return fig


# --------------------------------------------------------------------------- sections


def local_section(args: argparse.Namespace, base: str, out_base: str) -> dict[str, Any]:
    """Local disk: data, reconstruction reads, then (the store deleted) the writes."""
    _, params = base_weights(args.spec)
    check_space(base, 2 * params * args.snapshots * len(STORED_STDS), "the local store")
    t0 = time.perf_counter()
    data = write_local(os.path.join(base, "local"), args.spec, args.snapshots, None)
    write_s = time.perf_counter() - t0
    warm(data.paths, lambda p: Path(p).read_bytes())
    emit(
        BENCH,
        "local_data",
        "cpu",
        model=args.spec,
        params=params,
        snapshots=len(data.paths),
        dtype="float16",
        bytes_stored=data.bytes_stored,
        write_s=sig(write_s, 4),
        warm=True,
        store_fs=fs_type(data.url),
        out_dir_fs=fs_type(out_base),
        device_name=device_name(torch.device("cpu")),
        cores=os.cpu_count(),
    )
    figs: dict[str, Any] = {
        "reconstruct": reconstruct_section("local", data.url, data.bytes_stored, args, out_base)
    }
    shutil.rmtree(data.url, ignore_errors=True)
    figs["save"] = save_section(args, base)
    figs["write"] = {}
    for spec in args.write_specs:
        figs["write"][spec] = local_write_section(args, base, snapshot_bytes(spec), spec)
    return figs


def s3_section(args: argparse.Namespace, out_base: str) -> dict[str, Any]:
    """The same reads and writes against a moto S3 server on 127.0.0.1."""
    try:
        import s3fs  # noqa: F401
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer  # noqa: F401
    except ImportError as e:
        emit(BENCH, "s3", "cpu", skipped=f"no S3 test server: {e}")
        return {}
    figs: dict[str, Any] = {}
    with moto_s3():
        import fsspec

        t0 = time.perf_counter()
        data = write_s3(args.s3_spec, args.s3_snapshots)
        write_s = time.perf_counter() - t0
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        warm(data.paths, fs.cat_file)
        emit(
            BENCH,
            "s3_data",
            "cpu",
            model=args.s3_spec,
            params=data.params,
            snapshots=len(data.paths),
            bytes_stored=data.bytes_stored,
            write_s=sig(write_s, 4),
            server="moto ThreadedMotoServer on 127.0.0.1 (this process)",
            moto=_version("moto"),
            s3fs=_version("s3fs"),
        )
        figs["reconstruct"] = reconstruct_section("s3", data.url, data.bytes_stored, args, out_base)
        for path, _ in data_files(phema.SnapshotStore(data.url)):
            fs.rm_file(path)  # free moto's memory before the writes
        bucket = data.url.split("/")[2]
        figs["write"] = {}
        for spec in args.write_specs:
            figs["write"][spec] = s3_write_section(
                args, f"s3://{bucket}", snapshot_bytes(spec), spec
            )
    return figs


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="~2M-parameter model, few rounds")
    p.add_argument("--snapshots", type=int, default=None, help="local snapshot times (x2)")
    p.add_argument("--s3-snapshots", type=int, default=None, help="S3 snapshot times (0: no S3)")
    p.add_argument("--rounds", type=int, default=None, help="local reconstruct rounds")
    p.add_argument("--s3-rounds", type=int, default=None, help="S3 reconstruct rounds")
    p.add_argument("--probe-rounds", type=int, default=None, help="rounds of the read probe")
    p.add_argument("--probe-reads", type=int, default=256, help="local reads per probe round")
    p.add_argument("--s3-probe-reads", type=int, default=32, help="S3 reads per probe round")
    p.add_argument("--save-rounds", type=int, default=None, help="rounds of save")
    p.add_argument("--write-rounds", type=int, default=None, help="rounds of local writes")
    p.add_argument("--s3-write-rounds", type=int, default=None, help="rounds of S3 writes")
    p.add_argument("--outputs", type=int, default=8, help="stds to reconstruct (default 8)")
    p.add_argument("--window-bytes", type=int, default=WINDOW_BYTES, help="reconstruct window")
    p.add_argument("--max-inflight", type=int, default=8, help="reconstruct reads in flight")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--tmpdir", default=None, help="where the stores go (default: system temp)")
    p.add_argument(
        "--out-tmpdir",
        default=None,
        help="where reconstruction outputs go (default: /dev/shm if it exists, else --tmpdir)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    args = p.parse_args(argv)
    quick = {
        "snapshots": 8,
        "s3_snapshots": 4,
        "rounds": 5,
        "s3_rounds": 3,
        "probe_rounds": 5,
        "save_rounds": 5,
        "write_rounds": 5,
        "s3_write_rounds": 3,
    }
    full = {
        "snapshots": 16,
        "s3_snapshots": 8,
        "rounds": 11,
        "s3_rounds": 7,
        "probe_rounds": 11,
        "save_rounds": 11,
        "write_rounds": 21,
        "s3_write_rounds": 7,
    }
    fill_defaults(args, quick if args.quick else full)
    args.spec = "quick" if args.quick else "full"
    args.s3_spec = "quick" if args.quick else "small"
    args.write_specs = ["quick", "tiny"] if args.quick else ["full", "quick"]
    counts = (args.snapshots, args.rounds, args.probe_rounds, args.save_rounds, args.outputs)
    if min(counts) < 1 or min(args.write_rounds, args.s3_rounds, args.s3_write_rounds) < 1:
        p.error("snapshot, round and output counts must be >= 1")
    lo, hi = STORED_STDS
    args.stds = [round(float(s), 6) for s in np.linspace(lo, hi, args.outputs + 2)[1:-1]]
    return args


def main(argv: list[str] | None = None) -> None:
    """Write the data, run every section in this process, print JSON lines."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    base = tempfile.mkdtemp(prefix="phema-bench-integrity-", dir=args.tmpdir)
    out_parent = args.out_tmpdir or ("/dev/shm" if os.path.isdir("/dev/shm") else base)
    out_base = tempfile.mkdtemp(prefix="phema-bench-integrity-out-", dir=out_parent)
    try:
        local = local_section(args, base, out_base)
        s3 = s3_section(args, out_base) if args.s3_snapshots > 0 else {}
    finally:
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(out_base, ignore_errors=True)
    summary(args, local, s3, time.perf_counter() - start)


def summary(
    args: argparse.Namespace, local: dict[str, Any], s3: dict[str, Any], wall_s: float
) -> None:
    """The last line: every figure against its target."""
    lr, sr = local.get("reconstruct", {}), s3.get("reconstruct", {})
    lw, sw = local.get("write", {}), s3.get("write", {})
    save = local.get("save", {})
    emit(
        BENCH,
        "summary",
        "cpu",
        quick=args.quick,
        model=args.spec,
        s3_model=args.s3_spec,
        target_read_ratio=TARGET_READ_RATIO,
        local_read_ratio_checked_vs_unchecked=lr.get("ratio_checked_vs_unchecked"),
        local_read_ratio_se=lr.get("ratio_se"),
        local_read_ratio_of_medians=lr.get("ratio_of_medians"),
        local_checked_s=lr.get("checked_s"),
        local_unchecked_s=lr.get("unchecked_s"),
        local_checked_mb_per_s=lr.get("checked_mb_per_s"),
        local_unchecked_mb_per_s=lr.get("unchecked_mb_per_s"),
        local_probe_overhead_us_per_read=lr.get("probe_overhead_us_per_read"),
        local_probe_ratio_bound=lr.get("probe_ratio_bound"),
        local_meets_read=lr.get("meets"),
        local_meets_read_by_probe=lr.get("meets_by_probe"),
        s3_read_ratio_checked_vs_unchecked=sr.get("ratio_checked_vs_unchecked"),
        s3_read_ratio_se=sr.get("ratio_se"),
        s3_read_ratio_of_medians=sr.get("ratio_of_medians"),
        s3_read_ratio_checked_vs_unchecked_phema_get=sr.get("ratio_checked_vs_unchecked_phema_get"),
        s3_checked_s=sr.get("checked_s"),
        s3_unchecked_s=sr.get("unchecked_s"),
        s3_checked_mb_per_s=sr.get("checked_mb_per_s"),
        s3_unchecked_mb_per_s=sr.get("unchecked_mb_per_s"),
        s3_probe_overhead_us_per_read=sr.get("probe_overhead_us_per_read"),
        s3_probe_ratio_bound=sr.get("probe_ratio_bound"),
        s3_meets_read=sr.get("meets"),
        s3_meets_read_by_probe=sr.get("meets_by_probe"),
        target_write_ratio=TARGET_WRITE_RATIO,
        save_ms=save.get("save_ms"),
        save_ratio_vs_703f5cc=save.get("ratio"),
        save_ratio_se=save.get("ratio_se"),
        save_ratio_vs_copies=save.get("ratio_vs_copies"),
        meets_save=save.get("meets"),
        local_write_ms={k: v["store_write_ms"] for k, v in lw.items()},
        local_write_ratio_vs_atomic_replace={k: v["ratio"] for k, v in lw.items()},
        local_write_ratio_se={k: v["ratio_se"] for k, v in lw.items()},
        local_write_ratio_vs_atomic_replace_fsync_dir={
            k: v["ratio_vs_atomic_write_replace_fsync_dir"] for k, v in lw.items()
        },
        local_meets_write={k: v["meets"] for k, v in lw.items()},
        s3_write_ms={k: v["store_write_ms"] for k, v in sw.items()},
        s3_write_ratio_vs_pipe_file={k: v["ratio"] for k, v in sw.items()},
        s3_write_ratio_vs_pipe_file_create={
            k: v.get("ratio_vs_pipe_file_create") for k, v in sw.items()
        },
        s3_write_ratio_vs_transaction_open_wb={
            k: v.get("ratio_vs_transaction_open_wb") for k, v in sw.items()
        },
        wall_s=sig(wall_s, 4),
    )


if __name__ == "__main__":
    main()
