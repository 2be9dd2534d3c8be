"""Sharded EMA under torchrun (CPU, gloo): per-rank shadow memory, update time, snapshot writes.

The launcher (default mode) runs this file under ``python -m torch.distributed.run
--standalone --nproc_per_node=N`` for each N of ``--nprocs`` (default 1,2,4). Every rank
builds the same ~40M-parameter model, replicated and FSDP2-sharded, tracks K = 2 profiles
with ``PowerFunctionEMA(partition=True)`` and on the FSDP2 model, and measures: shadow
bytes (``ema.pieces``) against the unsharded EMA's; update ms against the unsharded EMA on
rank 0 and a gather-then-update; fp16 ``SnapshotWriter`` save + close (ms, peak RSS above
the start) against the rank-0 writer and a gather-then-write. Workers write per-rank JSON
files; the launcher prints one JSON line per figure and a summary line with a verdict per
target (``TARGETS``). What each line means: benchmarks/README.md.

Run::

    python3 benchmarks/sharded_ema.py > sharded_ema.jsonl   # 40M parameters, N = 1, 2, 4
    python3 benchmarks/sharded_ema.py --params 2e6 --repeats 3   # a smoke run
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _common import emit, fill_defaults, reset_peak_rss, sig
from torch import nn

import phema

BENCH = "sharded_ema"
STDS = (0.05, 0.10)
K = len(STDS)
T0 = 10_000.0
BYTES_TOLERANCE = 0.05  # the largest rank's shadow bytes within 5% of 1/N of the unsharded
UPDATE_FACTOR = 1.2  # the slowest rank's sharded update <= 1.2/N of the unsharded one
SHARDED = ("partitioned", "fsdp2")
SNAPSHOTS = (*SHARDED, "rank0_writer", "gather_then_write")
TARGETS = {
    "shadow_bytes": "largest rank's shadow bytes within 5% of 1/N of the unsharded EMA's",
    "update": "slowest rank's sharded update ms <= 1.2/N of the rank-0 unsharded update",
    "snapshot_peak": "every rank's peak RSS during save+close <= its shard files + its largest",
}
NOT_MEASURED = "CPU only: the step time an offloaded update (device='cpu') adds on a GPU is not"
NOT_MEASURED += " measured here"

Run = Callable[[str, int], float]  # (folder, step) -> seconds spent in save() itself


def build_model(params: int) -> nn.Sequential:
    """~``params`` fp32 parameters: 8 Linear layers of odd widths, a LayerNorm, a 3-row head."""
    torch.manual_seed(0)
    d = max(8, round((params / 8) ** 0.5))
    dims = [d, d + 3, d - 5, d + 7, d, d - 1, d + 1, d + 5, d]
    layers: list[nn.Module] = [nn.Linear(a, b) for a, b in itertools.pairwise(dims)]
    return nn.Sequential(*layers, nn.LayerNorm(d), nn.Linear(d, 3))


def fsdp2(model: nn.Sequential) -> nn.Sequential:
    """``fully_shard`` every layer, then the root (parameters become Shard(0) DTensors)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    return model


def proc_status(key: str) -> int:
    """A ``/proc/self/status`` figure in bytes (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(key + ":"))


class Stepper:
    """Updates one EMA at increasing times (the first, weight-copying call is done here)."""

    def __init__(self, ema: phema.PowerFunctionEMA) -> None:
        self.ema, self.t = ema, T0
        ema.update(self.t)

    def __call__(self) -> None:
        self.t += 1.0
        self.ema.update(self.t)


def shadow_bytes(ema: phema.PowerFunctionEMA) -> tuple[int, int]:
    """Bytes by ``ema.pieces`` (fp32, K profiles) and bytes the shadows really allocate."""
    by_pieces = sum(p.end - p.begin for p in ema.pieces) * 4 * K
    return by_pieces, sum(e.storage.nbytes for e in ema._shadows.entries)  # a cross-check


def rotations(names: list[str], rounds: int) -> list[tuple[int, str]]:
    """``(round, name)`` for every case in every round, the order rotating by one per round."""
    return [
        (r, n) for r in range(rounds) for n in names[r % len(names) :] + names[: r % len(names)]
    ]


def time_updates(cases: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median ms per case on this rank; a barrier before every call, cases interleaved."""
    samples: dict[str, list[float]] = {n: [] for n in cases}
    for r, n in rotations(list(cases), repeats + 1):  # round 0 is a warm-up
        dist.barrier()
        start = time.perf_counter()
        cases[n]()
        if r:
            samples[n].append(time.perf_counter() - start)
    return {n: sig(1e3 * statistics.median(s)) for n, s in samples.items()}


def time_alone(step: Callable[[], None], repeats: int, rank: int, size: int) -> float:
    """Median ms of this rank's calls while every other rank waits (no shared bandwidth)."""
    samples: list[float] = []
    for turn in range(size):
        dist.barrier()
        if turn == rank:
            for i in range(repeats + 1):  # call 0 is a warm-up
                start = time.perf_counter()
                step()
                if i:
                    samples.append(time.perf_counter() - start)
    dist.barrier()
    return sig(1e3 * statistics.median(samples))


def writer_run(ema: phema.PowerFunctionEMA | None) -> Run:
    """``SnapshotWriter(folder, fp16).save(ema)`` then ``close()``; nothing where ``ema`` is None."""

    def run(folder: str, step: int) -> float:
        if ema is None:
            return 0.0
        writer = phema.SnapshotWriter(folder, dtype=torch.float16)
        start = time.perf_counter()
        writer.save(ema, step=step)
        saved = time.perf_counter() - start
        writer.close()
        return saved

    return run


def gather_run(ema: phema.PowerFunctionEMA, rank: int) -> Run:
    """Every rank gathers each whole profile; rank 0 casts it to fp16 and saves one file."""

    def run(folder: str, step: int) -> float:
        start = time.perf_counter()
        store = phema.SnapshotStore(folder) if rank == 0 else None
        for std, gamma in zip(ema.stds, ema.gammas, strict=True):
            state = ema.profile_state_dict(std, full=True)
            if store is not None:
                half = {n: v.half() for n, v in state.items()}
                store.save(half, t=ema.t, std=std, gamma=gamma, step=step)
        return time.perf_counter() - start

    return run


def own_files(folder: str, rank: int, sharded: bool) -> list[int]:
    """Sizes of the files this rank wrote: its shard files, or rank 0's whole snapshots."""
    if not sharded:
        return [p.stat().st_size for p in Path(folder).glob("*.safetensors")] if rank == 0 else []
    return [p.stat().st_size for p in Path(folder).glob(f"shards/*/*-{rank:05d}.safetensors")]


def time_snapshots(
    cases: dict[str, tuple[Run, bool]], base: str, repeats: int, rank: int
) -> dict[str, dict[str, Any]]:
    """Per case on this rank: median save and write ms, max peak RSS delta, own file sizes."""
    out: dict[str, dict[str, Any]] = {n: {"save": [], "write": [], "peak": []} for n in cases}
    for r, name in rotations(list(cases), repeats + 1):  # round 0 is a warm-up
        (run, sharded), folder, row = cases[name], f"{base}/{name}-{r}", out[name]
        gc.collect()
        dist.barrier()
        row["hwm_reset"] = reset_peak_rss() and row.get("hwm_reset", True)
        before, start = proc_status("VmRSS"), time.perf_counter()
        saved = run(folder, r)
        wrote, peak = time.perf_counter() - start, proc_status("VmHWM") - before
        dist.barrier()  # every rank's files are complete
        sizes = own_files(folder, rank, sharded)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        if r:
            row["save"].append(1e3 * saved)
            row["write"].append(1e3 * wrote)
            row["peak"].append(peak)
            row.update(files_bytes=sum(sizes), max_file_bytes=max(sizes, default=0))
    for row in out.values():
        row["save_ms"] = sig(statistics.median(row.pop("save")))
        row["write_ms"] = sig(statistics.median(row.pop("write")))
        row["peak_bytes"] = max(row.pop("peak"))
    return out


def worker(args: argparse.Namespace) -> None:
    """One rank: build the EMAs, measure, write ``rank<r>.json`` into ``args.worker``."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(args.threads)
    replicated, sharded_model = build_model(args.params), fsdp2(build_model(args.params))
    part = phema.PowerFunctionEMA(replicated, STDS, partition=True)
    emas = {"partitioned": part, "fsdp2": phema.PowerFunctionEMA(sharded_model, STDS)}
    full = phema.PowerFunctionEMA(replicated, STDS) if rank == 0 else None  # rank 0 only
    full_step = Stepper(full) if full is not None else None
    targets = dict(replicated.named_parameters())

    def unsharded_rank0() -> None:
        if full_step is not None:
            full_step()

    def gather_then_update() -> None:
        with torch.no_grad():
            for name, p in sharded_model.named_parameters():
                whole = p.full_tensor()  # type: ignore[attr-defined]
                if rank == 0:
                    targets[name].copy_(whole)
        unsharded_rank0()

    updates: dict[str, Callable[[], None]] = {n: Stepper(e) for n, e in emas.items()}
    updates.update(unsharded_rank0=unsharded_rank0, gather_then_update=gather_then_update)
    update_ms = time_updates(updates, args.repeats)
    size = dist.get_world_size()
    alone = {n: time_alone(updates[n], args.repeats, rank, size) for n in emas}
    snapshots: dict[str, tuple[Run, bool]] = {
        n: (writer_run(e), e.sharded) for n, e in emas.items()
    }
    snapshots.update(
        rank0_writer=(writer_run(full), False),
        gather_then_write=(gather_run(emas["fsdp2"], rank), False),
    )
    sizes = {n: shadow_bytes(e) for n, e in emas.items()}
    record = {
        "params": sum(p.numel() for p in replicated.parameters()),
        "tensors": len(targets),
        "shadow_bytes": {n: b for n, (b, _) in sizes.items()},
        "allocated_bytes": {n: a for n, (_, a) in sizes.items()},
        "unsharded_bytes": shadow_bytes(full)[0] if full is not None else None,
        "update_ms": update_ms,
        "update_alone_ms": alone,
        "snapshots": time_snapshots(snapshots, f"{args.worker}/snap", args.snapshot_repeats, rank),
    }
    Path(args.worker, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------- launcher


def launch(args: argparse.Namespace, n: int, out: str) -> list[dict[str, Any]]:
    """Run the workers on ``n`` processes; their per-rank records."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={n}", str(Path(__file__).resolve()), "--worker", out]
    cmd += ["--params", str(args.params), "--repeats", str(args.repeats)]
    cmd += ["--snapshot-repeats", str(args.snapshot_repeats), "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MALLOC_MMAP_THRESHOLD_": "131072"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-2000:] + done.stderr[-6000:])
        raise SystemExit(f"workers for N={n} failed (exit {done.returncode})")
    return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(n)]


def report(n: int, ranks: list[dict[str, Any]], verdicts: dict[str, dict[str, bool]]) -> None:
    """The JSON lines of one world size; each target's verdicts go into ``verdicts``."""
    mb = float(1 << 20)
    emit(BENCH, "model", nprocs=n, params=ranks[0]["params"], tensors=ranks[0]["tensors"])
    full = ranks[0]["unsharded_bytes"]
    for kind in SHARDED:
        per_rank = [r["shadow_bytes"][kind] for r in ranks]
        ratio = max(per_rank) / full
        ok = verdicts["shadow_bytes"][f"{kind}_n{n}"] = abs(ratio * n - 1) <= BYTES_TOLERANCE
        allocated = [r["allocated_bytes"][kind] for r in ranks]
        emit(BENCH, f"shadow_bytes_{kind}", nprocs=n, bytes_per_rank=per_rank,
             allocated_per_rank=allocated, unsharded_bytes=full, ratio=sig(ratio, 4),
             target_ratio=sig(1 / n, 4), meets=ok)  # fmt: skip
    ms = {c: [r["update_ms"][c] for r in ranks] for c in ranks[0]["update_ms"]}
    unsharded, gathered = ms["unsharded_rank0"][0], max(ms["gather_then_update"])
    for case in ("unsharded_rank0", "gather_then_update"):
        emit(BENCH, f"update_{case}", nprocs=n, ms=max(ms[case]), ms_per_rank=ms[case])
    for kind in SHARDED:
        ratio = max(ms[kind]) / unsharded
        ok = verdicts["update"][f"{kind}_n{n}"] = ratio <= UPDATE_FACTOR / n
        emit(BENCH, f"update_{kind}", nprocs=n, ms=max(ms[kind]), ms_per_rank=ms[kind],
             unsharded_rank0_ms=unsharded, ratio_vs_unsharded=sig(ratio, 4),
             target_ratio=sig(UPDATE_FACTOR / n, 4), meets=ok, gather_then_update_ms=gathered,
             ratio_vs_gather_then_update=sig(max(ms[kind]) / gathered, 4))  # fmt: skip
    for kind in SHARDED:  # each rank alone: its own work, without sharing memory bandwidth
        solo = [r["update_alone_ms"][kind] for r in ranks]
        emit(BENCH, f"update_{kind}_alone", nprocs=n, ms=max(solo), ms_per_rank=solo,
             ratio_vs_unsharded=sig(max(solo) / unsharded, 4), ideal_ratio=sig(1 / n, 4))  # fmt: skip
    snap = {c: [r["snapshots"][c] for r in ranks] for c in SNAPSHOTS}
    peak = {c: max(s["peak_bytes"] for s in snap[c]) for c in SNAPSHOTS}
    write = {c: max(s["write_ms"] for s in snap[c]) for c in SNAPSHOTS}
    for case in SNAPSHOTS:
        rows, fig = snap[case], {}
        if case in SHARDED:
            budget = [s["files_bytes"] + s["max_file_bytes"] for s in rows]
            over = max(s["peak_bytes"] / max(b, 1) for s, b in zip(rows, budget, strict=True))
            per_file = max(s["peak_bytes"] / max(s["max_file_bytes"], 1) for s in rows)
            verdicts["snapshot_peak"][f"{case}_n{n}"] = over <= 1.0
            fig = {"budget_mb_per_rank": [sig(b / mb, 4) for b in budget],
                   "peak_over_budget": sig(over, 4), "meets": over <= 1.0,
                   "peak_over_largest_file": sig(per_file, 4)}  # fmt: skip
            for peer in SNAPSHOTS[2:]:
                fig[f"peak_ratio_vs_{peer}"] = sig(peak[case] / peak[peer], 4)
                fig[f"write_ratio_vs_{peer}"] = sig(write[case] / write[peer], 4)
        emit(BENCH, f"snapshot_{case}", nprocs=n, write_ms=write[case],
             write_ms_per_rank=[s["write_ms"] for s in rows],
             save_ms_per_rank=[s["save_ms"] for s in rows],
             peak_mb_per_rank=[sig(s["peak_bytes"] / mb, 4) for s in rows],
             files_mb_per_rank=[sig(s["files_bytes"] / mb, 4) for s in rows],
             hwm_reset=all(s["hwm_reset"] for s in rows), **fig)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (``--worker DIR`` is the per-rank mode the launcher starts)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="~2M parameters, few repeats")
    p.add_argument("--params", type=lambda s: int(float(s)), default=None, help="model size")
    p.add_argument("--repeats", type=int, default=None, help="timed updates per case")
    p.add_argument("--snapshot-repeats", type=int, default=None, help="timed saves per case")
    p.add_argument("--nprocs", default="1,2,4", help="world sizes, comma-separated")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per torchrun")
    p.add_argument("--tmpdir", default=None, help="where snapshots go (default: system temp)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    full = {"params": 40_000_000, "repeats": 10, "snapshot_repeats": 3}
    fill_defaults(
        args, {"params": 2_000_000, "repeats": 3, "snapshot_repeats": 2} if args.quick else full
    )
    if min(args.params, args.repeats, args.snapshot_repeats) < 1:
        p.error("--params and the repeat counts must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    """Launch the workers for every N, print their figures and the summary line."""
    args = parse_args(argv)
    if args.worker is not None:
        worker(args)
        return
    torch.set_num_threads(args.threads)
    start, sizes = time.perf_counter(), [int(s) for s in args.nprocs.split(",")]
    verdicts: dict[str, dict[str, bool]] = {k: {} for k in TARGETS}
    for n in sizes:
        out = tempfile.mkdtemp(prefix=f"phema-bench-sharded-{n}-", dir=args.tmpdir)
        try:
            print(f"N={n}: running {n} process(es)", file=sys.stderr)
            report(n, launch(args, n, out), verdicts)
        finally:
            shutil.rmtree(out, ignore_errors=True)
    cores = os.cpu_count() or 1
    emit(BENCH, "summary", params=args.params, nprocs=sizes, cores=cores,
         oversubscribed=[n for n in sizes if n > cores], targets=TARGETS,
         verdicts={k: "met" if all(v.values()) else "not met" for k, v in verdicts.items()},
         details=verdicts, not_measured=NOT_MEASURED,
         wall_s=sig(time.perf_counter() - start, 4))  # fmt: skip


if __name__ == "__main__":
    main()
