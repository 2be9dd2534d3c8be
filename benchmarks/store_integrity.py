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
  :func:`phema.reconstruct.write_plan` pass (8 output stds, fp16 outputs, the default
  2 MiB window, 8 reads in flight, 1 torch thread) over fp16 snapshots of the
  synthetic model of ``ema_update.py``, from the same plan, with two source stores:
  ``checked`` (a plain :class:`phema.SnapshotStore`: every read names
  ``inputs[r].identity``) and ``unchecked`` (a subclass whose ``read_into`` ignores the
  identity: one ``os.preadv`` loop locally, ``fs.cat_file(path, start=, end=)`` on
  S3). On S3 a third store, ``unchecked_phema_get``, sends phema's own ranged GET
  without ``If-Match``: the same code path as ``checked`` less the header. Outputs
  go to a tmpfs folder (``/dev/shm`` when there is one) so that the disk's write-back
  noise does not hide the reads' cost; every output of every run must be
  byte-identical to the first (sha256), or the script fails. Local snapshots are
  read warm (page cache); on S3 they live in a moto ``ThreadedMotoServer`` that this
  script starts on 127.0.0.1 (port 0, fake credentials).
* **Snapshot writes** (``save`` and ``write`` sections):
  ``SnapshotWriter.save(ema)`` on the training thread (2 profiles, with an empty
  queue; the background write is drained, untimed, before the next call) against
  the copies it makes (``ema.profile_state_dict(std)`` per profile); and the
  background write of one serialised fp16 snapshot file: ``SnapshotStore.write``
  (staged, no-replace publish, folder ``fsync``) against the old way,
  ``phema.store.atomic_write`` (temporary file, ``fsync``, ``os.replace``), locally,
  and on S3 ``SnapshotStore.write`` against ``fs.pipe_file`` (one ``PutObject`` below
  100 MiB) on another s3fs instance, and ``fs.pipe_file(mode="create")`` (one
  ``PutObject`` with ``If-None-Match: *``). Every write has a fresh name (a store
  never overwrites) and the file is deleted, untimed, after it; locally ``os.sync()``
  runs, untimed, before each timed write.

Targets (the summary line): checked reads keep >= 0.95 of the unchecked throughput;
a local snapshot write costs at most 1.05x the old write, ``save`` at most 1.05x its
copies. S3 write figures are reported without a target (a multipart upload completed
conditionally takes 3 requests where a small file takes one ``PutObject``).

Output: JSON lines on stdout only (one per figure), ending with a summary line.

Run::

    python3 benchmarks/store_integrity.py > store_integrity.jsonl   # full run, ~3 min on 2 cores
    python3 benchmarks/store_integrity.py --quick                   # ~2M parameters, < 1 min
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import device_name, emit, sig, summarize
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
from phema.reconstruct import WINDOW_BYTES, Plan, plan, write_plan
from phema.store import atomic_write, snapshot_metadata, snapshot_name

BENCH = "store_integrity"
#: Checked reads must keep at least this share of the unchecked throughput.
TARGET_READ_RATIO = 0.95
#: A local write (and ``save`` on the training thread) may cost at most this much more.
TARGET_WRITE_RATIO = 1.05
#: How long to wait for the writer thread to drain before giving up.
DRAIN_TIMEOUT_S = 300.0
#: Snapshot times of the timed writes: every write gets a name never used before.
_NAMES = itertools.count(1)


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
        data, _, _ = self.backend._get(path, start, start + len(out), None)  # type: ignore[attr-defined]
        if len(data) != len(out):
            raise RuntimeError(f"{path}: wanted {len(out)} bytes at {start}, got {len(data)}")
        out[:] = data


def count_reads(store: phema.SnapshotStore) -> tuple[Callable[[], None], list[int]]:
    """Count the reads that reach ``store``'s read primitive; returns (undo, [reads, bytes]).

    For a checked store the primitive is ``store.backend.read_into`` (the check); for
    the unchecked ones it is the store's own ``read_into``.
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


# --------------------------------------------------------------------------- reconstruct section


def rotating(variants: list[str], rounds: int) -> list[tuple[int, str]]:
    """``(round, variant)`` in the order they run: each round starts one variant later."""
    order = []
    for r in range(rounds):
        shift = r % len(variants)
        order += [(r, v) for v in variants[shift:] + variants[:shift]]
    return order


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

    # Untimed warm-up pass per store, counting the reads that reach the primitive.
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
    probe = read_probe(storage, stores, the_plan, args)
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
    per_round = [u / c for c, u in zip(seconds["checked"], seconds["unchecked"], strict=True)]
    ratio = med["unchecked"] / med["checked"]
    fig: dict[str, Any] = {
        "ratio_checked_vs_unchecked": sig(ratio, 4),
        "checked_s": sig(med["checked"], 4),
        "unchecked_s": sig(med["unchecked"], 4),
        "checked_mb_per_s": sig(to_read / med["checked"] / 1e6, 4),
        "unchecked_mb_per_s": sig(to_read / med["unchecked"] / 1e6, 4),
    }
    fig["probe_overhead_us_per_read"] = probe["overhead_us"]
    # From the probe: every read's extra cost added up, none overlapped with another.
    fig["probe_ratio_bound"] = sig(
        med["unchecked"] / (med["unchecked"] + reads["checked"][0] * probe["overhead_s"]), 4
    )
    if "unchecked_phema_get" in med:
        fig["ratio_checked_vs_unchecked_phema_get"] = sig(
            med["unchecked_phema_get"] / med["checked"], 4
        )
    emit(
        BENCH,
        f"{storage}_reconstruct_ratio",
        "cpu",
        section="reconstruct",
        storage=storage,
        **fig,
        ratio_per_round=[sig(x, 4) for x in per_round],
        ratio_per_round_median=sig(statistics.median(per_round), 4),
        target=TARGET_READ_RATIO,
        meets=bool(ratio >= TARGET_READ_RATIO),
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
) -> dict[str, Any]:
    """The same single read through each store, many times: the check's cost per read.

    Each round reads one window at ``args.probe_reads`` offsets of one input, back to
    back, through each store in turn (rotating order); a read's time is the round's
    time over its reads, and the figure the median over rounds.
    """
    info = the_plan.inputs[0]
    window = min(args.window_bytes, info.header.data_bytes)
    span = max(info.header.data_bytes - window, 1)
    n = args.probe_reads if storage == "local" else args.s3_probe_reads
    offsets = [info.header.data_start + (k * window) % span for k in range(n)]
    buf = memoryview(bytearray(window))
    variants = list(stores)
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
    overhead = med["checked"] - med["unchecked"]
    emit(
        BENCH,
        f"{storage}_read_probe",
        "cpu",
        section="reconstruct",
        storage=storage,
        window_bytes=window,
        reads_per_round=n,
        rounds=args.probe_rounds,
        **{f"{v}_us_per_read": sig(1e6 * med[v], 4) for v in variants},
        **{f"{v}_us_per_read_min": sig(1e6 * min(seconds[v]), 4) for v in variants},
        **{f"{v}_us_per_read_max": sig(1e6 * max(seconds[v]), 4) for v in variants},
        overhead_us_per_read=sig(1e6 * overhead, 4),
        ratio_checked_vs_unchecked=sig(med["unchecked"] / med["checked"], 4),
    )
    return {"overhead_s": overhead, "overhead_us": sig(1e6 * overhead, 4)}


def check_is_live(stores: dict[str, phema.SnapshotStore], the_plan: Plan) -> dict[str, bool]:
    """Whether each store refuses a read that names a version other than the listed one."""
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


def fs_type(path: str) -> str:
    """The filesystem type ``path`` lives on (from ``/proc/mounts``), e.g. ``tmpfs``."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                mnt = parts[1]
                if os.path.realpath(path).startswith(mnt) and len(mnt) > len(best):
                    best, kind = mnt, parts[2]
    except OSError:
        pass
    return kind


# --------------------------------------------------------------------------- save section


def save_section(args: argparse.Namespace, base: str) -> dict[str, Any]:
    """``SnapshotWriter.save(ema)`` on the training thread against the copies it makes."""
    model = build_model(SPECS[args.spec], torch.device("cpu"))
    ema = phema.PowerFunctionEMA(model, stds=STORED_STDS)
    folder = os.path.join(base, "save")
    writer = phema.SnapshotWriter(folder, dtype=torch.float16)
    t = [0]

    def advance() -> None:  # a new time, so every save has fresh names (untimed)
        perturb(model)
        t[0] += T_STEP
        ema.update(t[0])

    def drain() -> None:  # wait for the background writes, then delete the files
        want = 2 * saves[0]
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

    def do_copies() -> object:  # kept until the clock stops, as save's are (in the queue)
        return [ema.profile_state_dict(std) for std in ema.stds]

    saves = [0]
    cases = {"save": do_save, "copies": do_copies}
    advance()
    do_save()  # warm-up, untimed
    drain()
    seconds: dict[str, list[float]] = {c: [] for c in cases}
    for _, c in rotating(list(cases), args.write_rounds):
        advance()
        start = time.perf_counter()
        kept = cases[c]()
        seconds[c].append(time.perf_counter() - start)
        del kept
        drain()
    writer.close()
    params = sum(p.numel() for p in model.parameters())
    ratio = statistics.median(seconds["save"]) / statistics.median(seconds["copies"])
    for c in cases:
        emit(
            BENCH,
            f"save_{c}",
            "cpu",
            section="save",
            what={
                "save": "SnapshotWriter.save(ema), training thread, empty queue",
                "copies": "ema.profile_state_dict(std) for both profiles (what save copies)",
            }[c],
            model=args.spec,
            params=params,
            profiles=len(ema.stds),
            **summarize(seconds[c], "ms"),
        )
    fig = {
        "save_ms": sig(1e3 * statistics.median(seconds["save"])),
        "ratio_vs_copies": sig(ratio, 4),
    }
    emit(
        BENCH,
        "save_ratio",
        "cpu",
        section="save",
        **fig,
        target=TARGET_WRITE_RATIO,
        meets=bool(ratio <= TARGET_WRITE_RATIO),
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


def time_writes(
    cases: dict[str, Callable[[str], Callable[[], None]]],
    rounds: int,
    before: Callable[[], None],
    verbose_tag: str,
    verbose: bool,
) -> dict[str, list[float]]:
    """Run every case ``rounds`` times (rotating order).

    ``cases[c](name)`` prepares one write of a fresh file ``name`` and returns a
    cleanup that deletes it (untimed); ``before`` runs untimed before each write.
    """
    seconds: dict[str, list[float]] = {c: [] for c in cases}
    for c in cases:  # warm-up, untimed
        cases[c](f"warmup-{uuid.uuid4().hex[:8]}")()
    for r, c in rotating(list(cases), rounds):
        name = snapshot_name(T_STEP * next(_NAMES), STORED_STDS[0])
        before()
        start = time.perf_counter()
        cleanup = cases[c](name)
        seconds[c].append(time.perf_counter() - start)
        cleanup()
        if verbose:
            print(
                f"[{BENCH}] {verbose_tag} {c} round {r}: {seconds[c][-1] * 1e3:.1f} ms",
                file=sys.stderr,
            )
    return seconds


def local_write_section(
    args: argparse.Namespace, base: str, data: bytes, spec: str
) -> dict[str, Any]:
    """``SnapshotStore.write`` against ``atomic_write`` + write (temp, fsync, os.replace)."""
    folder = os.path.join(base, f"write-{spec}")
    os.makedirs(folder, exist_ok=True)
    store = phema.SnapshotStore(folder)

    def store_write(name: str) -> Callable[[], None]:
        path = store.write(name, data)
        return lambda: os.unlink(path)

    def atomic_replace(name: str) -> Callable[[], None]:
        path = os.path.join(folder, name)
        with atomic_write(path) as f:
            f.write(data)
        return lambda: os.unlink(path)

    def atomic_replace_fsync_dir(name: str) -> Callable[[], None]:
        path = os.path.join(folder, name)
        with atomic_write(path) as f:
            f.write(data)
        fsync_dir(folder)
        return lambda: os.unlink(path)

    cases = {
        "store_write": store_write,
        "atomic_write_replace": atomic_replace,
        "atomic_write_replace_fsync_dir": atomic_replace_fsync_dir,
    }
    seconds = time_writes(cases, args.write_rounds, os.sync, f"local write {spec}", args.verbose)
    leftovers = os.listdir(folder)
    if leftovers:
        raise AssertionError(f"files left behind by the writes: {leftovers}")
    return report_writes(
        "local", spec, data, seconds, "store_write", "atomic_write_replace", folder
    )


def s3_write_section(args: argparse.Namespace, url: str, data: bytes, spec: str) -> dict[str, Any]:
    """On S3: ``SnapshotStore.write`` against ``pipe_file`` and ``pipe_file(mode="create")``."""
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

    cases = {
        "store_write": store_write,
        "pipe_file": pipe_file,
        "pipe_file_create": pipe_file_create,
    }
    try:  # does this server refuse a conditional PutObject over an existing key?
        probe = f"{prefix}/.create-probe-{uuid.uuid4().hex[:8]}"
        fs.pipe_file(probe, b"x", mode="create")
        try:
            fs.pipe_file(probe, b"y", mode="create")
            create_ok = False
        except (FileExistsError, OSError):
            create_ok = True
        fs.rm_file(probe)
    except Exception:  # reported below: the case is left out
        create_ok = False
    if not create_ok:
        del cases["pipe_file_create"]
    seconds = time_writes(
        cases, args.s3_write_rounds, lambda: None, f"s3 write {spec}", args.verbose
    )
    fig = report_writes("s3", spec, data, seconds, "store_write", "pipe_file", None)
    fig["conditional_put_refuses_existing"] = create_ok
    return fig


def report_writes(
    storage: str,
    spec: str,
    data: bytes,
    seconds: dict[str, list[float]],
    new: str,
    old: str,
    folder: str | None,
) -> dict[str, Any]:
    """One line per case, then the ratio line; returns the figures for the summary."""
    what = {
        "store_write": "SnapshotStore.write(name, data): staged, no-replace publish"
        + (", folder fsync" if storage == "local" else ", multipart completed with If-None-Match"),
        "atomic_write_replace": "phema.store.atomic_write(path) + write: temp, fsync, os.replace",
        "atomic_write_replace_fsync_dir": "the same, then an fsync of the folder (as the store does)",
        "pipe_file": "s3fs pipe_file(path, data) on another instance (PutObject below 100 MiB)",
        "pipe_file_create": "s3fs pipe_file(path, data, mode='create'): PutObject with If-None-Match",
    }
    for c, s in seconds.items():
        emit(
            BENCH,
            f"{storage}_write_{spec}_{c}",
            "cpu",
            section="write",
            storage=storage,
            variant=c,
            what=what[c],
            bytes=len(data),
            **summarize(s, "ms"),
            mb_per_s=sig(len(data) / statistics.median(s) / 1e6, 4),
            **({"dir_fs": fs_type(folder)} if folder else {}),
        )
    med = {c: statistics.median(s) for c, s in seconds.items()}
    ratio = med[new] / med[old]
    per_round = [a / b for a, b in zip(seconds[new], seconds[old], strict=True)]
    fig: dict[str, Any] = {"bytes": len(data), "ratio": sig(ratio, 4)}
    fig.update({f"{c}_ms": sig(1e3 * m) for c, m in med.items()})
    fig.update({f"ratio_vs_{c}": sig(med[new] / m, 4) for c, m in med.items() if c != new})
    emit(
        BENCH,
        f"{storage}_write_{spec}_ratio",
        "cpu",
        section="write",
        storage=storage,
        **fig,
        ratio_per_round_median=sig(statistics.median(per_round), 4),
        target=TARGET_WRITE_RATIO if storage == "local" else None,
        meets=bool(ratio <= TARGET_WRITE_RATIO) if storage == "local" else None,
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
        out_dir=out_base,
        out_dir_fs=fs_type(out_base),
        device_name=device_name(torch.device("cpu")),
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
    p.add_argument("--snapshots", type=int, default=None, help="local snapshot times (x2 profiles)")
    p.add_argument(
        "--s3-snapshots", type=int, default=None, help="S3 snapshot times (x2; 0: no S3)"
    )
    p.add_argument("--rounds", type=int, default=None, help="local reconstruct rounds")
    p.add_argument("--s3-rounds", type=int, default=None, help="S3 reconstruct rounds")
    p.add_argument("--write-rounds", type=int, default=None, help="rounds of save and local writes")
    p.add_argument("--s3-write-rounds", type=int, default=None, help="rounds of S3 writes")
    p.add_argument("--probe-rounds", type=int, default=None, help="rounds of the read probe")
    p.add_argument("--probe-reads", type=int, default=256, help="local reads per probe round")
    p.add_argument("--s3-probe-reads", type=int, default=32, help="S3 reads per probe round")
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
        "write_rounds": 5,
        "s3_write_rounds": 3,
        "probe_rounds": 5,
    }
    full = {
        "snapshots": 16,
        "s3_snapshots": 8,
        "rounds": 9,
        "s3_rounds": 5,
        "write_rounds": 9,
        "s3_write_rounds": 7,
        "probe_rounds": 9,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.spec = "quick" if args.quick else "full"
    args.s3_spec = "quick" if args.quick else "small"
    args.write_specs = ["quick", "tiny"] if args.quick else ["full", "quick"]
    if min(args.snapshots, args.rounds, args.s3_rounds, args.write_rounds, args.outputs) < 1:
        p.error("--snapshots, --rounds, --s3-rounds, --write-rounds, --outputs must be >= 1")
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
        local_read_ratio_checked_vs_unchecked=lr.get("ratio_checked_vs_unchecked"),
        local_checked_mb_per_s=lr.get("checked_mb_per_s"),
        local_unchecked_mb_per_s=lr.get("unchecked_mb_per_s"),
        local_probe_overhead_us_per_read=lr.get("probe_overhead_us_per_read"),
        local_probe_ratio_bound=lr.get("probe_ratio_bound"),
        s3_read_ratio_checked_vs_unchecked=sr.get("ratio_checked_vs_unchecked"),
        s3_probe_overhead_us_per_read=sr.get("probe_overhead_us_per_read"),
        s3_probe_ratio_bound=sr.get("probe_ratio_bound"),
        s3_read_ratio_checked_vs_unchecked_phema_get=sr.get("ratio_checked_vs_unchecked_phema_get"),
        s3_checked_mb_per_s=sr.get("checked_mb_per_s"),
        s3_unchecked_mb_per_s=sr.get("unchecked_mb_per_s"),
        target_read_ratio=TARGET_READ_RATIO,
        local_meets_read=None
        if not lr
        else bool(lr["ratio_checked_vs_unchecked"] >= TARGET_READ_RATIO),
        s3_meets_read=None
        if not sr
        else bool(sr["ratio_checked_vs_unchecked"] >= TARGET_READ_RATIO),
        save_ms=save.get("save_ms"),
        save_ratio_vs_copies=save.get("ratio_vs_copies"),
        local_write_ms={k: v["store_write_ms"] for k, v in lw.items()},
        local_write_ratio_vs_atomic_replace={k: v["ratio"] for k, v in lw.items()},
        local_write_ratio_vs_atomic_replace_fsync_dir={
            k: v.get("ratio_vs_atomic_write_replace_fsync_dir") for k, v in lw.items()
        },
        s3_write_ms={k: v["store_write_ms"] for k, v in sw.items()},
        s3_write_ratio_vs_pipe_file={k: v["ratio"] for k, v in sw.items()},
        s3_write_ratio_vs_pipe_file_create={
            k: v.get("ratio_vs_pipe_file_create") for k, v in sw.items()
        },
        target_write_ratio=TARGET_WRITE_RATIO,
        meets_save=None if not save else bool(save["ratio_vs_copies"] <= TARGET_WRITE_RATIO),
        local_meets_write={k: bool(v["ratio"] <= TARGET_WRITE_RATIO) for k, v in lw.items()},
        wall_s=sig(wall_s, 4),
    )


if __name__ == "__main__":
    main()
