"""Reconstructing many EMA profiles from stored snapshots: phema against its peers.

Snapshots of a synthetic ~43M-parameter model (the model of ``ema_update.py``:
309 tensors, no buffers), two stored profiles (stds 0.05 and 0.10), fp16, are
written to a local folder and to an S3 bucket on a moto server that this script
starts on 127.0.0.1 (fake credentials). Then 8 new profiles (stds between the
stored ones, at the last snapshot's time) are made by:

* ``phema``: ``phema.reconstruct`` with its default window (2 MiB), one pass
  over the store, outputs streamed window by window;
* ``reference``: the approach of the reference implementation's reconstruct
  tool, implemented here from its description (no code copied): one pass over
  all inputs per batch of up to 8 outputs; each snapshot is loaded whole
  (``SnapshotStore.load``) and converted to fp32, and every output is a full fp32
  state dict that it is added into (same coefficients as phema's plan);
* ``ema_pytorch``: ema-pytorch's ``PostHocEMA.synthesize_ema_model``, one output
  per call, over the same tensors written as ema-pytorch checkpoints in its own
  format and folder (``{profile}.{step}.pt``: the ``KarrasEMA`` state dict in
  fp16). It reads local folders only, so it is skipped on S3;
* two **plain reads** of the same files through the same filesystem object, as
  the reference for throughput: ``plain_read`` fetches every file whole
  (``fs.cat_file``, one after another) and ``plain_read_ranged`` reads the same
  bytes in window-sized ranges with as many reads in flight as phema
  (``SnapshotStore.read_range``, 8 threads).

Every engine writes its 8 outputs in fp16 (as the reference tool does) to a local
folder and syncs them to disk (phema does so itself, peers are made to).

Each measured run is a fresh ``python reconstruct.py --case ...`` subprocess, so
that its peak RSS is its own: right before the run (after imports) the child resets
its peak RSS (``/proc/self/clear_refs``), reads its RSS (``/proc/self/statm``) and
``ru_maxrss``; after the run it reads ``VmHWM`` and ``ru_maxrss`` again.
``peak_rss_mb`` is ``VmHWM`` after minus RSS before (``ru_maxrss`` is printed too,
but it cannot be reset and keeps the start-up peak). Runs are interleaved over
``--repeats`` rounds (rotating order) and files are read once, untimed, before the
first round, so every engine reads warm files (page cache locally; moto's spooled
temporary files on S3). Bytes read are counted by wrapping
``SnapshotStore.read_range`` / ``fs.cat_file`` (phema, reference, plain reads) and
from the files that ema-pytorch loads; locally they are cross-checked with
``rchar`` of ``/proc/self/io``. The outputs of each engine are compared with
phema's (sums of one tensor).

On S3 a probe first times ranged GETs of one window from a snapshot and from an
object of one window (``s3_range_probe``): a server whose cost per ranged GET
follows the object rather than the range (moto's) slows every ranged engine.

A scaling section runs phema alone at 3 model sizes and 2 snapshot counts and
prints its peak RSS each time (the target: flat, and below one fp32 model), once
as is and once with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_``), which
separates the engine's live memory from freed blocks the allocator keeps.

Output: JSON lines on stdout only (one per figure), ending with a summary line
that sets phema's figures against its targets.

Run::

    python3 benchmarks/reconstruct.py --threads 1            # full run, ~6 min on 2 cores
    python3 benchmarks/reconstruct.py --quick --threads 1    # ~2M parameters, < 1 min
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import device_name, emit, fill_defaults, reset_peak_rss, sig, summarize
from ema_update import FULL, QUICK, TINY, ModelSpec, build_model

import phema
from phema.format import serialize
from phema.store import snapshot_metadata, snapshot_name
from phema.streaming import WINDOW_BYTES

BENCH = "reconstruct"
#: Stored profiles (the reference's defaults).
STORED_STDS = (0.05, 0.10)
#: Snapshot times: every ``T_STEP`` steps (an integer, as ema-pytorch's file names need).
T_STEP = 1024
#: Engines compared side by side, and the plain reads they are measured against.
ENGINES = ("plain_read", "plain_read_ranged", "phema", "reference", "ema_pytorch")
#: The tensor whose output values are compared across engines (the largest one).
CHECK_TENSOR = "embed.weight"
#: Relative agreement required of each engine's outputs with phema's. The reference
#: uses phema's coefficients (only the fp32 summation order differs); ema-pytorch
#: solves exactly without rescaling the coefficients to sum to 1: with 8 snapshot
#: times they sum to 1.0007 (1.000003 with 32), so its outputs differ by as much.
#: A snapshot left out or counted twice moves an output by several percent.
CHECK_RTOL = {"reference": 1e-4, "ema_pytorch": 5e-3}
MARKER = "@@reconstruct-case@@"

TARGET_BYTES_READ_RATIO = 1.0
TARGET_PEAK_OVER_FP32_MODEL = 1.0
TARGET_THROUGHPUT_VS_PLAIN_READ = 0.8
#: Peak RSS counts as flat when the largest scaling peak is within this factor of the smallest.
FLAT_FACTOR = 1.25

#: glibc's mmap threshold fixed at 128 KiB (its initial value): freed large blocks go
#: back to the system instead of staying in the allocator's per-thread heaps.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}

#: ~10.7M parameters in 309 tensors.
SMALL = ModelSpec(320, 4096, 6, (32,) * 10 + (64,) * 10 + (80,) * 8, 500)
#: ~136M parameters in 359 tensors.
LARGE = ModelSpec(1024, 16384, 8, (96,) * 10 + (192,) * 10 + (256,) * 8, 1000)
SPECS: dict[str, ModelSpec] = {
    "tiny": TINY,
    "quick": QUICK,
    "small": SMALL,
    "full": FULL,
    "large": LARGE,
}


# --------------------------------------------------------------------------- measuring


def rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def hwm_bytes() -> int | None:
    """Peak RSS since start or since the last :func:`reset_peak_rss` (``VmHWM``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def maxrss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rchar() -> int | None:
    """Bytes this process has passed through read()/pread() so far, or None off Linux."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def fsync_path(path: str) -> None:
    """Flush a written file to the disk (phema syncs its outputs; peers are made to)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def counting_store(url: str) -> tuple[phema.SnapshotStore, list[int]]:
    """A store whose ``read_range`` and ``read_into`` add every byte they read to a counter."""
    store = phema.SnapshotStore(url)
    count = [0]
    inner = store.read_range

    def read_range(path: str, start: int, end: int, identity: str | None = None) -> bytes:
        data = inner(path, start, end, identity)
        count[0] += len(data)
        return data

    inner_into = store.read_into

    def read_into(path: str, start: int, out: memoryview, identity: str | None = None) -> None:
        inner_into(path, start, out, identity)
        count[0] += len(out)

    store.read_range = read_range  # type: ignore[method-assign]
    store.read_into = read_into  # type: ignore[method-assign]
    return store, count


def data_files(store: phema.SnapshotStore) -> list[tuple[str, int]]:
    """``(path, size)`` of every snapshot file in the store (a listing; no bytes read)."""
    entries = store.fs.ls(store.root, detail=True)
    return sorted(
        (str(e["name"]), int(e["size"]))
        for e in entries
        if e.get("type") == "file" and str(e["name"]).endswith(".safetensors")
    )


# --------------------------------------------------------------------------- engines (child side)


def run_plain_read(case: dict[str, Any]) -> dict[str, Any]:
    """Every snapshot file whole, one ``fs.cat_file`` after another."""
    start = time.perf_counter()
    store = phema.SnapshotStore(case["url"])
    n = 0
    for path, _ in data_files(store):
        n += len(store.fs.cat_file(path))
    return {"seconds": time.perf_counter() - start, "bytes_read": n}


def run_plain_read_ranged(case: dict[str, Any]) -> dict[str, Any]:
    """The same bytes in window-sized ranges, window by window, ``max_inflight`` reads ahead."""
    start = time.perf_counter()
    store, count = counting_store(case["url"])
    files = data_files(store)
    window, inflight = case["window_bytes"], case["max_inflight"]
    longest = max(size for _, size in files)
    jobs = iter(
        (path, lo, min(lo + window, size))
        for lo in range(0, longest, window)
        for path, size in files
        if lo < size
    )
    with ThreadPoolExecutor(max_workers=inflight) as pool:
        ahead: deque[Future[bytes]] = deque()
        while True:
            while len(ahead) < inflight and (job := next(jobs, None)) is not None:
                ahead.append(pool.submit(store.read_range, *job))
            if not ahead:
                break
            ahead.popleft().result()
    return {"seconds": time.perf_counter() - start, "bytes_read": count[0]}


def run_phema(case: dict[str, Any]) -> dict[str, Any]:
    """``phema.reconstruct`` of all stds in one pass, outputs in ``case["out"]``."""
    from phema.streaming import reconstruct

    start = time.perf_counter()
    store, count = counting_store(case["url"])
    results = reconstruct(
        store,
        case["stds"],
        case["out"],
        dtype=torch.float16,
        window_bytes=case["window_bytes"],
        max_inflight=case["max_inflight"],
    )
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes_read": count[0], "outputs": [r.path for r in results]}


def run_reference(case: dict[str, Any]) -> dict[str, Any]:
    """Reference-style: per batch of outputs, load every snapshot whole into fp32 and add it
    into one full fp32 state dict per output; write each output at the end of its batch."""
    from safetensors.torch import save_file

    from phema.streaming import plan

    start = time.perf_counter()
    store, count = counting_store(case["url"])
    the_plan = plan(store, case["stds"])  # the same coefficients as phema
    k = len(case["stds"])
    batches = np.array_split(np.arange(k), math.ceil(k / case["batch"]))
    os.makedirs(case["out"], exist_ok=True)
    outputs = []
    for batch in batches:
        accs: list[dict[str, torch.Tensor]] = []
        for r, info in enumerate(the_plan.inputs):
            loaded = store.load(info)  # the whole data section in one read
            x32 = {n: v.float() for n, v in loaded.items()}  # the whole model in fp32
            del loaded
            if not accs:
                accs = [{n: torch.zeros_like(v) for n, v in x32.items()} for _ in batch]
            for acc, j in zip(accs, batch, strict=True):
                c = the_plan.weights[r][int(j)]
                for n, v in x32.items():
                    acc[n].add_(v, alpha=c)
            del x32
        for acc, j in zip(accs, batch, strict=True):
            path = os.path.join(case["out"], f"reference-{int(j)}.safetensors")
            save_file({n: v.half() for n, v in acc.items()}, path)
            fsync_path(path)
            outputs.append(path)
        del accs
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes_read": count[0], "outputs": outputs, "passes": len(batches)}


def run_ema_pytorch(case: dict[str, Any]) -> dict[str, Any]:
    """ema-pytorch: ``synthesize_ema_model`` once per std over its checkpoint folder."""
    from ema_pytorch import PostHocEMA

    start = time.perf_counter()
    model = build_model(SPECS[case["spec"]], torch.device("cpu"))
    ema = PostHocEMA(
        model,
        sigma_rels=tuple(STORED_STDS),
        checkpoint_every_num_steps="manual",
        checkpoint_folder=case["url"],
    )
    setup = time.perf_counter() - start
    os.makedirs(case["out"], exist_ok=True)
    start = time.perf_counter()
    outputs = []
    for j, std in enumerate(case["stds"]):
        synth = ema.synthesize_ema_model(sigma_rel=std)
        state = {n: v.half() for n, v in synth.ema_model.state_dict().items()}
        path = os.path.join(case["out"], f"ema-pytorch-{j}.pt")
        torch.save(state, path)
        fsync_path(path)
        outputs.append(path)
        del synth, state
    seconds = time.perf_counter() - start
    # synthesize_ema_model loads every *.pt of the folder once per call.
    folder = sum(p.stat().st_size for p in Path(case["url"]).glob("*.pt"))
    return {
        "seconds": seconds,
        "setup_seconds": setup,
        "bytes_read": folder * len(case["stds"]),
        "outputs": outputs,
    }


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "plain_read": run_plain_read,
    "plain_read_ranged": run_plain_read_ranged,
    "phema": run_phema,
    "reference": run_reference,
    "ema_pytorch": run_ema_pytorch,
}


def output_checksums(paths: list[str]) -> list[float]:
    """Sum of |x| over :data:`CHECK_TENSOR` in every output file (float64)."""
    sums = []
    for path in paths:
        if path.endswith(".pt"):
            state = torch.load(path, mmap=True, weights_only=True)
            t = state[CHECK_TENSOR]
        else:
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                t = f.get_tensor(CHECK_TENSOR)
        sums.append(float(t.double().abs().sum()))
    return sums


def child_main(case: dict[str, Any]) -> None:
    """Run one case in this (fresh) process and print its figures as one marked JSON line."""
    if case.get("threads"):
        torch.set_num_threads(case["threads"])
    if case.get("endpoint"):
        import fsspec

        fsspec.config.conf["s3"] = {"endpoint_url": case["endpoint"]}
    import phema.streaming  # noqa: F401  (imports stay out of the measured window)

    if case["engine"] == "ema_pytorch":
        import ema_pytorch  # noqa: F401
    if case["engine"] == "reference":
        import safetensors.torch  # noqa: F401
    if str(case["url"]).startswith("s3://"):
        import s3fs  # noqa: F401
    gc.collect()
    reset = reset_peak_rss()
    rss0, max0, io0 = rss_bytes(), maxrss_bytes(), rchar()
    load = os.getloadavg()[0]
    result = RUNNERS[case["engine"]](case)
    max1, hwm1, io1 = maxrss_bytes(), hwm_bytes(), rchar()
    # The run's peak: VmHWM after a reset, else ru_maxrss (may include start-up's peak).
    peak = (hwm1 if reset and hwm1 is not None else max1) - rss0
    result.update(
        rss_before=rss0,
        maxrss_before=max0,
        peak_reset=reset,
        threads=torch.get_num_threads(),
        maxrss_after=max1,
        hwm_after=hwm1,
        peak=peak,
        load_1m=load,
        rchar=None if io0 is None or io1 is None else io1 - io0,
        checksums=output_checksums(result.get("outputs", [])),
    )
    result.pop("outputs", None)
    sys.stdout.write(MARKER + json.dumps(result) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- data (parent side)


@dataclass
class Dataset:
    """Snapshots of one model in one place, and what the engines need to find them."""

    storage: str  # "local" or "s3"
    spec: str
    params: int
    times: int  # snapshot times; files = times * len(STORED_STDS)
    url: str  # the phema store
    bytes_stored: int
    ema_folder: str | None = None  # ema-pytorch's checkpoint folder (local only)
    ema_bytes: int = 0
    paths: list[str] = field(default_factory=list)


def snapshot_tensors(base: dict[str, torch.Tensor], i: int, p: int) -> dict[str, torch.Tensor]:
    """fp16 tensors of snapshot ``i`` of profile ``p``: the base weights scaled by
    ``1 + 0.01 i + 0.05 p``, so that every output is a different combination."""
    scale = 1.0 + 0.01 * i + 0.05 * p
    return {n: (v * scale).half() for n, v in base.items()}


def base_weights(spec: str) -> tuple[dict[str, torch.Tensor], int]:
    """The fp32 weights of the synthetic model ``spec`` and its parameter count."""
    model = build_model(SPECS[spec], torch.device("cpu"))
    state = {n: v.detach().clone() for n, v in model.state_dict().items()}
    return state, sum(v.numel() for v in state.values())


def write_local(folder: str, spec: str, times: int, ema_folder: str | None) -> Dataset:
    """Write a local phema store (and optionally ema-pytorch's folder) of ``times`` x 2 snapshots.

    Files are written without a sync each and synced once at the end, so that no
    write-back runs during the timed reads.
    """
    base, params = base_weights(spec)
    gammas = [float(g) for g in phema.sigma_rel_to_gamma(list(STORED_STDS))]
    os.makedirs(folder, exist_ok=True)
    if ema_folder:
        os.makedirs(ema_folder, exist_ok=True)
    for i in range(times):
        t = T_STEP * (i + 1)
        for p, (std, gamma) in enumerate(zip(STORED_STDS, gammas, strict=True)):
            tensors = snapshot_tensors(base, i, p)
            meta = snapshot_metadata(tensors, t=t, std=std, gamma=gamma, t_unit="steps", step=t)
            with open(os.path.join(folder, snapshot_name(t, std)), "wb") as f:
                f.write(serialize(tensors, meta))
            if ema_folder:
                # ema-pytorch's checkpoint(): the KarrasEMA state dict, every entry in fp16.
                pkg = {"initted": torch.tensor(True).half(), "step": torch.tensor(t).half()}
                pkg.update({f"ema_model.{n}": v for n, v in tensors.items()})
                torch.save(pkg, os.path.join(ema_folder, f"{p}.{t}.pt"))
            del tensors
    os.sync()
    return local_dataset(folder, spec, params, times, ema_folder)


def local_dataset(
    folder: str, spec: str, params: int, times: int, ema_folder: str | None
) -> Dataset:
    """Describe a local store (and ema-pytorch folder) that already exists."""
    paths = sorted(str(p) for p in Path(folder).glob("*.safetensors"))
    ema_bytes = sum(p.stat().st_size for p in Path(ema_folder).glob("*.pt")) if ema_folder else 0
    return Dataset(
        "local",
        spec,
        params,
        times,
        folder,
        sum(os.path.getsize(p) for p in paths),
        ema_folder,
        ema_bytes,
        paths,
    )


def link_subset(src: Dataset, folder: str, times: int) -> Dataset:
    """A store holding the first ``times`` snapshot times of ``src`` (hard links, no copies)."""
    os.makedirs(folder, exist_ok=True)
    keep = {snapshot_name(T_STEP * (i + 1), s) for i in range(times) for s in STORED_STDS}
    for path in src.paths:
        if os.path.basename(path) in keep:
            os.link(path, os.path.join(folder, os.path.basename(path)))
    return local_dataset(folder, src.spec, src.params, times, None)


def warm(paths: list[str], reader: Callable[[str], bytes]) -> None:
    """Read every file once, untimed, so that the timed runs all read warm files."""
    for path in paths:
        reader(path)


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (ephemeral port) with fake credentials; yields its URL."""
    import logging

    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    env = {
        "AWS_ACCESS_KEY_ID": "phema-bench",
        "AWS_SECRET_ACCESS_KEY": "phema-bench",
        "AWS_EC2_METADATA_DISABLED": "true",
        "BOTO_CONFIG": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_CONFIG_FILE": "/dev/null",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE"]}
    os.environ.update(env)  # inherited by the child processes
    os.environ.pop("AWS_PROFILE", None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import fsspec

    endpoint = f"http://{host}:{port}"
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint}
    try:
        yield endpoint
    finally:
        fsspec.config.conf.pop("s3", None)
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def write_s3(spec: str, times: int) -> Dataset:
    """Upload ``times`` x 2 snapshots to a fresh bucket through ``SnapshotStore.save``."""
    import s3fs

    bucket = f"phema-bench-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(bucket)
    url = f"s3://{bucket}/run"
    store = phema.SnapshotStore(url)
    base, params = base_weights(spec)
    gammas = [float(g) for g in phema.sigma_rel_to_gamma(list(STORED_STDS))]
    for i in range(times):
        t = T_STEP * (i + 1)
        for p, (std, gamma) in enumerate(zip(STORED_STDS, gammas, strict=True)):
            store.save(snapshot_tensors(base, i, p), t=t, std=std, gamma=gamma, step=t)
    files = data_files(store)
    return Dataset(
        "s3", spec, params, times, url, sum(s for _, s in files), paths=[p for p, _ in files]
    )


# --------------------------------------------------------------------------- running cases


@dataclass
class Outcome:
    """Every run of one engine on one dataset."""

    engine: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None

    @property
    def seconds(self) -> list[float]:
        return [r["seconds"] for r in self.runs]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def peak_rss(self) -> int:
        """Largest peak over the runs: the highest RSS during a run above the RSS before it."""
        return max(r["peak"] for r in self.runs)


def run_case(case: dict[str, Any], out_root: str) -> dict[str, Any]:
    """Run one case in a fresh interpreter; return its figures (raises if it failed)."""
    case = dict(case, out=os.path.join(out_root, f"out-{uuid.uuid4().hex[:8]}"))
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
    env = dict(os.environ, **case.get("env", {}))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    finally:
        shutil.rmtree(case["out"], ignore_errors=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            result: dict[str, Any] = json.loads(line[len(MARKER) :])
            return result
    tail = (proc.stderr or proc.stdout)[-2000:]
    raise RuntimeError(
        f"case {case['engine']} on {case['url']} failed (rc {proc.returncode}):\n{tail}"
    )


def peer_skip_reason(engine: str, data: Dataset) -> str | None:
    """Why ``engine`` cannot run on ``data``, or None."""
    if engine != "ema_pytorch":
        return None
    if data.ema_folder is None:
        return "ema-pytorch reads checkpoints from a local folder only (Path.glob); no S3"
    try:
        import ema_pytorch  # noqa: F401
    except ImportError as e:
        return f"ema_pytorch cannot be imported: {e}"
    return None


def measure(
    data: Dataset,
    engines: list[str],
    repeats: dict[str, int],
    args: argparse.Namespace,
    out_root: str,
    endpoint: str | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Outcome]:
    """Run every engine on ``data`` over interleaved rounds with a rotating order.

    ``env``: extra environment variables of the child processes.
    """
    outcomes = {e: Outcome(e) for e in engines}
    for e in engines:
        outcomes[e].skipped = peer_skip_reason(e, data)
    active = [e for e in engines if outcomes[e].skipped is None]
    for r in range(max((repeats[e] for e in active), default=0)):
        shift = r % len(active)
        for engine in active[shift:] + active[:shift]:
            if r >= repeats[engine]:
                continue
            case = {
                "engine": engine,
                "url": data.ema_folder if engine == "ema_pytorch" else data.url,
                "spec": data.spec,
                "stds": list(args.stds),
                "window_bytes": args.window_bytes,
                "max_inflight": args.max_inflight,
                "batch": args.batch,
                "endpoint": endpoint,
                "threads": args.threads,
                "env": env or {},
            }
            outcomes[engine].runs.append(run_case(case, out_root))
            if args.verbose:
                run = outcomes[engine].runs[-1]
                print(
                    f"[{BENCH}] {data.storage} {data.spec} x{data.times * 2} {engine} "
                    f"round {r}: {run['seconds']:.2f} s, "
                    f"peak {run['peak'] / 2**20:.0f} MiB, load {run['load_1m']:.1f}",
                    file=sys.stderr,
                )
    return outcomes


def fp32_model_bytes(data: Dataset) -> int:
    return 4 * data.params


def report(data: Dataset, outcomes: dict[str, Outcome], section: str) -> dict[str, Any]:
    """One JSON line per engine with its figures and its ratios to the others; returns phema's."""

    def median(engine: str) -> float | None:
        o = outcomes.get(engine)
        return o.median_s if o is not None and o.runs else None

    plain, ranged = median("plain_read"), median("plain_read_ranged")
    ref, emp = median("reference"), median("ema_pytorch")
    common = {
        "section": section,
        "storage": data.storage,
        "model": data.spec,
        "params": data.params,
        "snapshots": data.times * len(STORED_STDS),
        "fp32_model_mb": sig(fp32_model_bytes(data) / 2**20, 4),
    }
    phema_fig: dict[str, Any] = {}
    for engine, o in outcomes.items():
        name = f"{data.storage}_{engine}"
        if o.skipped is not None:
            emit(BENCH, name, "cpu", **common, engine=engine, skipped=o.skipped)
            continue
        stored = data.ema_bytes if engine == "ema_pytorch" else data.bytes_stored
        runs = o.runs
        bytes_read = max(r["bytes_read"] for r in runs)
        io = [r["rchar"] for r in runs if r.get("rchar") is not None]
        fields: dict[str, Any] = {
            **common,
            "engine": engine,
            "outputs": 0 if engine.startswith("plain") else len(runs[0]["checksums"]),
            **summarize(o.seconds, "ms"),
            "bytes_stored": stored,
            "bytes_read": bytes_read,
            "bytes_read_ratio": sig(bytes_read / stored, 6),
        }
        if data.storage == "local" and io:
            fields["rchar_ratio"] = sig(max(io) / stored, 4)
        fields["gb_per_s"] = sig(stored / o.median_s / 1e9, 4)
        peak = o.peak_rss
        fields.update(
            peak_rss_mb=sig(peak / 2**20, 4),
            peak_rss_mb_per_run=[sig(r["peak"] / 2**20, 4) for r in runs],
            rss_before_mb=[sig(r["rss_before"] / 2**20, 4) for r in runs],
            vmhwm_after_mb=[sig((r["hwm_after"] or 0) / 2**20, 4) for r in runs],
            ru_maxrss_before_mb=[sig(r["maxrss_before"] / 2**20, 4) for r in runs],
            ru_maxrss_after_mb=[sig(r["maxrss_after"] / 2**20, 4) for r in runs],
            peak_reset=all(r["peak_reset"] for r in runs),
            peak_rss_over_fp32_model=sig(peak / fp32_model_bytes(data), 4),
            child_threads=runs[0]["threads"],
            load_1m_per_run=[round(r["load_1m"], 2) for r in runs],
        )
        if "setup_seconds" in runs[0]:
            fields["setup_ms_median"] = sig(
                1e3 * statistics.median(r["setup_seconds"] for r in runs)
            )
        if "passes" in runs[0]:
            fields["passes"] = runs[0]["passes"]
        if plain is not None and not engine.startswith("plain"):
            # Same stored bytes: the throughput ratio is the ratio of the times.
            fields["throughput_vs_plain_read"] = sig(plain / o.median_s, 4)
            if ranged is not None:
                fields["throughput_vs_plain_read_ranged"] = sig(ranged / o.median_s, 4)
            # The stricter of the two: against whichever plain read was faster here.
            fields["throughput_vs_faster_plain_read"] = sig(
                min(plain, ranged if ranged is not None else plain) / o.median_s, 4
            )
        if engine == "phema":
            if ref is not None:
                fields["speedup_vs_reference"] = sig(ref / o.median_s, 4)
            if emp is not None:
                fields["speedup_vs_ema_pytorch"] = sig(emp / o.median_s, 4)
            phema_fig = fields
        if (
            engine in ("reference", "ema_pytorch")
            and "phema" in outcomes
            and outcomes["phema"].runs
        ):
            fields["peak_rss_over_phema"] = sig(peak / max(outcomes["phema"].peak_rss, 1), 4)
        fields["peer_version"] = {
            "ema_pytorch": _version("ema-pytorch"),
            "phema": phema.__version__,
        }.get(engine)
        emit(BENCH, name, "cpu", **fields)
    return phema_fig


def check_outputs(data: Dataset, outcomes: dict[str, Outcome]) -> bool:
    """Emit whether all engines made the same outputs (sums of |x| of one tensor); return it."""
    sums = {
        e: o.runs[0]["checksums"]
        for e, o in outcomes.items()
        if o.runs and not e.startswith("plain") and o.runs[0]["checksums"]
    }
    if "phema" not in sums or len(sums) < 2:
        return True
    ref = np.asarray(sums["phema"])
    diffs = {
        e: sig(float(np.max(np.abs(np.asarray(s) - ref) / np.abs(ref))), 3)
        for e, s in sums.items()
        if e != "phema"
    }
    agree = all(d <= CHECK_RTOL[e] for e, d in diffs.items())
    emit(
        BENCH,
        f"{data.storage}_check",
        "cpu",
        tensor=CHECK_TENSOR,
        max_rel_diff_vs_phema=diffs,
        rtol={e: CHECK_RTOL[e] for e in diffs},
        agree=agree,
    )
    return agree


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------- sections


def check_space(folder: str, need: int, what: str) -> None:
    """Refuse to start when the disk cannot hold ``need`` bytes (with a 20% margin)."""
    free = shutil.disk_usage(folder).free
    if free < 1.2 * need:
        raise SystemExit(
            f"{what} needs ~{need / 1e9:.1f} GB in {folder}, only {free / 1e9:.1f} GB free: "
            "use --snapshots/--tmpdir or --quick"
        )


def mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def engines_section(
    args: argparse.Namespace, base: str, spec: str, params: int
) -> tuple[Dataset, dict[str, Any]]:
    """Local store: all engines side by side."""
    need = 2 * params * 2 * args.snapshots * len(STORED_STDS)  # phema + ema-pytorch copies
    check_space(base, need, "the local section")
    t0 = time.perf_counter()
    data = write_local(
        os.path.join(base, "local", "snapshots"),
        spec,
        args.snapshots,
        None if args.no_ema_pytorch else os.path.join(base, "local", "ema-pytorch"),
    )
    setup_s = time.perf_counter() - t0
    warm(data.paths, lambda p: Path(p).read_bytes())
    if data.ema_folder:
        warm([str(p) for p in Path(data.ema_folder).glob("*.pt")], lambda p: Path(p).read_bytes())
    emit(
        BENCH,
        "local_data",
        "cpu",
        model=spec,
        params=params,
        snapshots=data.times * len(STORED_STDS),
        stored_stds=list(STORED_STDS),
        dtype="float16",
        bytes_stored=data.bytes_stored,
        ema_pytorch_bytes=data.ema_bytes,
        write_s=sig(setup_s, 4),
        warm=True,
        mem_available_gb=sig(mem_available() / 1e9, 4),
        device_name=device_name(torch.device("cpu")),
    )
    engines = [e for e in ENGINES if not (args.no_ema_pytorch and e == "ema_pytorch")]
    repeats = dict.fromkeys(engines, args.repeats)
    repeats["reference"] = args.reference_repeats
    repeats["ema_pytorch"] = args.peer_repeats
    outcomes = measure(data, engines, repeats, args, base)
    fig = report(data, outcomes, "engines")
    check_outputs(data, outcomes)
    if data.ema_folder:  # not needed any more: keep the page cache for the next stores
        shutil.rmtree(data.ema_folder)
    return data, fig


def scaling_section(args: argparse.Namespace, base: str, main: Dataset) -> list[dict[str, Any]]:
    """phema alone: peak RSS at 2 snapshot counts and 2-3 model sizes.

    Each point is run twice: as is, and with glibc's mmap threshold fixed at 128 KiB
    (``MALLOC_MMAP_THRESHOLD_``), so that every large buffer goes back to the system
    when freed. The first is what a user gets; the second is the engine's live
    memory, without what the allocator keeps of freed blocks.
    """
    points: list[dict[str, Any]] = []

    def point(data: Dataset, origin: str) -> None:
        one = {"phema": 1}
        o = measure(data, ["phema"], one, args, base)["phema"]
        fixed = measure(data, ["phema"], one, args, base, env=FIXED_MMAP_THRESHOLD)["phema"]
        peak, live = o.peak_rss, fixed.peak_rss
        p = {
            "model": data.spec,
            "params": data.params,
            "snapshots": data.times * len(STORED_STDS),
            "peak_rss_mb": sig(peak / 2**20, 4),
            "peak_rss_over_fp32_model": sig(peak / fp32_model_bytes(data), 4),
            "peak_rss_mb_fixed_mmap_threshold": sig(live / 2**20, 4),
        }
        points.append(p)
        emit(
            BENCH,
            f"scaling_{data.spec}_{data.times * len(STORED_STDS)}",
            "cpu",
            section="scaling",
            engine="phema",
            **p,
            fp32_model_mb=sig(fp32_model_bytes(data) / 2**20, 4),
            fixed_mmap_threshold_over_fp32_model=sig(live / fp32_model_bytes(data), 4),
            **summarize(o.seconds, "ms"),
            ms_fixed_mmap_threshold=sig(1e3 * fixed.median_s),
            gb_per_s=sig(data.bytes_stored / o.median_s / 1e9, 4),
            bytes_stored=data.bytes_stored,
            bytes_read_ratio=sig(max(r["bytes_read"] for r in o.runs) / data.bytes_stored, 6),
            window_bytes=args.window_bytes,
            store=origin,
        )

    # Snapshot counts: the main store, and a subset of it made of hard links.
    point(main, "engines section's store")
    subset = link_subset(main, os.path.join(base, "subset"), args.scaling_snapshots)
    warm(subset.paths, lambda p: Path(p).read_bytes())
    point(subset, "hard-linked subset of the engines section's store")
    shutil.rmtree(os.path.join(base, "subset"))
    # Model sizes, at the smaller snapshot count.
    for spec in args.scaling_models:
        if spec == main.spec:
            continue
        folder = os.path.join(base, f"scaling-{spec}")
        _, params = base_weights(spec)
        check_space(base, 2 * params * args.scaling_snapshots * 2, f"scaling at {spec}")
        data = write_local(folder, spec, args.scaling_snapshots, None)
        warm(data.paths, lambda p: Path(p).read_bytes())
        point(data, "own store")
        shutil.rmtree(folder)
    return points


def s3_section(args: argparse.Namespace, base: str, spec: str) -> dict[str, Any]:
    """The same engines on a moto S3 server (ema-pytorch cannot read S3)."""
    try:
        import s3fs  # noqa: F401
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer  # noqa: F401
    except ImportError as e:
        for engine in ENGINES:
            emit(BENCH, f"s3_{engine}", "cpu", section="engines", skipped=f"no S3 test server: {e}")
        return {}
    with moto_s3() as endpoint:
        t0 = time.perf_counter()
        data = write_s3(spec, args.s3_snapshots)
        setup_s = time.perf_counter() - t0
        import fsspec

        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        warm(data.paths, fs.cat_file)
        emit(
            BENCH,
            "s3_data",
            "cpu",
            model=spec,
            params=data.params,
            snapshots=data.times * len(STORED_STDS),
            bytes_stored=data.bytes_stored,
            write_s=sig(setup_s, 4),
            server="moto ThreadedMotoServer on 127.0.0.1 (this process)",
            moto=_version("moto"),
            s3fs=_version("s3fs"),
            warm=True,
        )
        range_probe(fs, data.paths[0], args.window_bytes)
        repeats = dict.fromkeys(ENGINES, args.repeats)
        repeats["reference"] = args.reference_repeats
        outcomes = measure(data, list(ENGINES), repeats, args, base, endpoint)
        fig = report(data, outcomes, "engines")
        check_outputs(data, outcomes)
    return fig


def range_probe(fs: Any, big: str, window: int, reads: int = 16) -> None:
    """Time ranged GETs of one window from a snapshot and from an object of one window.

    If a server's cost per ranged GET grows with the object rather than the range
    (moto reads the whole object for each), every ranged engine pays for it; this
    line shows how much, so the S3 ratios can be read for what they are.
    """
    small = f"{big.rsplit('/', 1)[0]}/.range-probe"
    fs.pipe_file(small, os.urandom(window))
    size = fs.size(big)

    def per_get_ms(path: str, span: int) -> float:
        start = time.perf_counter()
        for i in range(reads):
            lo = (i * window) % max(span - window, 1)
            fs.cat_file(path, start=lo, end=lo + window)
        return (time.perf_counter() - start) / reads * 1e3

    per_get_ms(big, size)  # warm the connection
    big_ms, small_ms = per_get_ms(big, size), per_get_ms(small, window)
    fs.rm_file(small)
    emit(
        BENCH,
        "s3_range_probe",
        "cpu",
        window_bytes=window,
        object_bytes=size,
        ms_per_get_from_snapshot=sig(big_ms, 4),
        ms_per_get_from_window_sized_object=sig(small_ms, 4),
        ratio=sig(big_ms / small_ms, 4),
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="~2M-parameter model, few snapshots")
    p.add_argument(
        "--snapshots", type=int, default=None, help="local snapshot times (x2 profiles; default 32)"
    )
    p.add_argument(
        "--s3-snapshots", type=int, default=None, help="S3 snapshot times (x2; default 8, 0: no S3)"
    )
    p.add_argument(
        "--repeats", type=int, default=None, help="runs of phema and the plain reads (default 3)"
    )
    p.add_argument(
        "--reference-repeats", type=int, default=None, help="runs of the reference (default 2)"
    )
    p.add_argument("--peer-repeats", type=int, default=None, help="runs of ema-pytorch (default 1)")
    p.add_argument("--outputs", type=int, default=8, help="stds to reconstruct (default 8)")
    p.add_argument("--batch", type=int, default=8, help="reference: outputs per pass (default 8)")
    p.add_argument("--window-bytes", type=int, default=None, help="phema window (default: phema's)")
    p.add_argument(
        "--max-inflight", type=int, default=8, help="phema and ranged read: reads in flight"
    )
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling section")
    p.add_argument("--no-ema-pytorch", action="store_true", help="skip ema-pytorch (the slowest)")
    p.add_argument(
        "--tmpdir", default=None, help="where the data goes (default: the system's temp)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every run")
    p.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.case is not None:
        return args
    quick = {
        "snapshots": 8,
        "s3_snapshots": 4,
        "repeats": 2,
        "reference_repeats": 1,
        "peer_repeats": 1,
    }
    full = {
        "snapshots": 32,
        "s3_snapshots": 8,
        "repeats": 3,
        "reference_repeats": 2,
        "peer_repeats": 1,
    }
    fill_defaults(args, quick if args.quick else full)
    if args.window_bytes is None:
        args.window_bytes = WINDOW_BYTES
    args.spec = "quick" if args.quick else "full"
    args.scaling_models = ["tiny", "quick"] if args.quick else ["small", "full", "large"]
    args.scaling_snapshots = min(args.snapshots, 4 if args.quick else 8)
    if (
        min(args.snapshots, args.repeats, args.reference_repeats, args.peer_repeats, args.outputs)
        < 1
    ):
        p.error(
            "--snapshots, --repeats, --reference-repeats, --peer-repeats, --outputs must be >= 1"
        )
    lo, hi = STORED_STDS
    # Targets strictly between the stored stds: interpolation, a well-posed fit.
    args.stds = [round(float(s), 6) for s in np.linspace(lo, hi, args.outputs + 2)[1:-1]]
    return args


def main(argv: list[str] | None = None) -> None:
    """Write the data, run every case in its own process, print JSON lines."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.case is not None:
        child_main(json.loads(args.case))
        return
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if torch.get_num_threads() > 1 and load >= cores:
        print(
            f"[{BENCH}] warning: load average {load:.1f} on {cores} cores: with "
            f"{torch.get_num_threads()} torch threads, every parallel op may wait for a "
            "descheduled thread and runs can be 10-50x slower; consider --threads 1",
            file=sys.stderr,
        )
    start = time.perf_counter()
    base = tempfile.mkdtemp(prefix="phema-bench-reconstruct-", dir=args.tmpdir)
    try:
        _, params = base_weights(args.spec)
        main_data, local_fig = engines_section(args, base, args.spec, params)
        scaling: list[dict[str, Any]] = []
        if not args.no_scaling:
            scaling = scaling_section(args, base, main_data)
        shutil.rmtree(os.path.join(base, "local"), ignore_errors=True)
        s3_fig = s3_section(args, base, args.spec) if args.s3_snapshots > 0 else {}
    finally:
        shutil.rmtree(base, ignore_errors=True)
    summary(args, local_fig, s3_fig, scaling, time.perf_counter() - start)


def summary(
    args: argparse.Namespace,
    local: dict[str, Any],
    s3: dict[str, Any],
    scaling: list[dict[str, Any]],
    wall_s: float,
) -> None:
    """The last line: phema's figures against its targets."""

    def spread(key: str) -> float | None:
        values = [p[key] for p in scaling]
        return sig(max(values) / min(values), 4) if values else None

    flat, flat_live = spread("peak_rss_mb"), spread("peak_rss_mb_fixed_mmap_threshold")
    figs = [f for f in (local, s3) if f]
    emit(
        BENCH,
        "summary",
        "cpu",
        quick=args.quick,
        stds=args.stds,
        local_bytes_read_ratio=local.get("bytes_read_ratio"),
        s3_bytes_read_ratio=s3.get("bytes_read_ratio"),
        target_bytes_read_ratio=TARGET_BYTES_READ_RATIO,
        meets_bytes_read=bool(figs)
        and all(f["bytes_read_ratio"] <= TARGET_BYTES_READ_RATIO for f in figs),
        local_peak_rss_mb=local.get("peak_rss_mb"),
        local_peak_rss_over_fp32_model=local.get("peak_rss_over_fp32_model"),
        s3_peak_rss_over_fp32_model=s3.get("peak_rss_over_fp32_model"),
        target_peak_rss_over_fp32_model=TARGET_PEAK_OVER_FP32_MODEL,
        meets_peak_rss=bool(figs)
        and all(f["peak_rss_over_fp32_model"] < TARGET_PEAK_OVER_FP32_MODEL for f in figs),
        scaling_peak_rss_mb=[p["peak_rss_mb"] for p in scaling],
        scaling_peak_max_over_min=flat,
        scaling_peak_rss_mb_fixed_mmap_threshold=[
            p["peak_rss_mb_fixed_mmap_threshold"] for p in scaling
        ],
        scaling_peak_max_over_min_fixed_mmap_threshold=flat_live,
        target_flat_max_over_min=FLAT_FACTOR,
        meets_flat_peak=flat is not None and flat <= FLAT_FACTOR,
        local_throughput_vs_plain_read=local.get("throughput_vs_plain_read"),
        local_throughput_vs_plain_read_ranged=local.get("throughput_vs_plain_read_ranged"),
        s3_throughput_vs_plain_read=s3.get("throughput_vs_plain_read"),
        s3_throughput_vs_plain_read_ranged=s3.get("throughput_vs_plain_read_ranged"),
        target_throughput_vs_plain_read=TARGET_THROUGHPUT_VS_PLAIN_READ,
        # Per store, against each way of "simply reading the same files": whole files
        # one after another, and phema's own ranged requests without the arithmetic.
        local_meets_throughput_vs_plain_read=_meets(local, "throughput_vs_plain_read"),
        local_meets_throughput_vs_plain_read_ranged=_meets(
            local, "throughput_vs_plain_read_ranged"
        ),
        s3_meets_throughput_vs_plain_read=_meets(s3, "throughput_vs_plain_read"),
        s3_meets_throughput_vs_plain_read_ranged=_meets(s3, "throughput_vs_plain_read_ranged"),
        local_speedup_vs_reference=local.get("speedup_vs_reference"),
        local_speedup_vs_ema_pytorch=local.get("speedup_vs_ema_pytorch"),
        s3_speedup_vs_reference=s3.get("speedup_vs_reference"),
        wall_s=sig(wall_s, 4),
    )


def _meets(fig: dict[str, Any], key: str) -> bool | None:
    """Whether ``fig[key]`` reaches the throughput target (None without the figure)."""
    value = fig.get(key)
    return None if value is None else bool(value >= TARGET_THROUGHPUT_VS_PLAIN_READ)


if __name__ == "__main__":
    main()
