"""Reconstructing EMA profiles straight from official EDM2 snapshot pickles: phema vs the official way.

Snapshots of a ~40M-parameter EDM2 Config G network (``Precond`` at 64x64, 72 channels,
39.6M parameters, 80 MB per fp16 pickle) are written in the official pickle structure
(``tests/official_pickles.py``: ``dnnlib.util.EasyDict`` around persistent objects, each
tensor a nested legacy storage blob), named ``network-snapshot-<kimg>-<std>.pkl`` for two
stored stds at ``--times`` kimg. Then 8 new stds at the last time are made by:

* ``phema_local``: ``phema.reconstruct`` on the folder of pickles: each is indexed without
  running anything (its pickle structure read, payloads skipped), then one streaming pass
  reads each tensor's bytes once;
* ``phema_http``: the same over ``http://127.0.0.1`` from a range-capable static server
  (``tests/rangeserver.py``, started by this script in its own process), exact ranged GETs;
* ``official``: the official reconstruction tool's approach, written here from its
  description (no code copied): per batch of up to 8 outputs, every input pickle is loaded
  whole with ``pickle.load`` (here with a persistence function of our own, since the
  fixtures are ours), its network converted to fp32; the first input is deep-copied per
  output with zeroed parameters; each output accumulates ``coef * input`` in fp32, buffers
  are copied from the input; the outputs are converted to fp16 and pickled. It uses phema's
  coefficients, so the outputs can be compared.

Each run is a fresh subprocess (its peak RSS is its own, measured from after the imports by
resetting ``VmHWM``); files are read once untimed before the first round (warm page cache).
Bytes read: counted in phema's store (local), from the server's log (HTTP), and from the
whole files the official approach loads, cross-checked with ``rchar``. Every output is
compared with phema_local's (max abs difference; the fp32 sums differ only in order).

Output: JSON lines, one per figure, ending with ratios of official / phema.

Run::

    python3 benchmarks/official_pickles.py              # 40M params, 10 pickles, ~3 min on 2 cores
    python3 benchmarks/official_pickles.py --quick      # a 2M-parameter net, < 1 min
"""

from __future__ import annotations

import argparse
import collections
import copy
import gc
import importlib.util
import json
import multiprocessing
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from typing import Any

import torch
from _common import emit, reset_peak_rss, sig
from reconstruct import counting_store, fsync_path, hwm_bytes, maxrss_bytes, rchar, rss_bytes

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.join(os.path.dirname(HERE), "tests")
sys.path.append(TESTS)


def _fixtures() -> Any:
    """``tests/official_pickles.py`` (this script has its name, so it is loaded by path)."""
    name = "phema_tests_official_pickles"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(TESTS, "official_pickles.py")
        )
        assert spec is not None
        assert spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


MARKER = "@@official-pickles-case@@"
STORED = ("0.050", "0.100")
TARGETS = [0.03, 0.045, 0.06, 0.075, 0.09, 0.11, 0.13, 0.15]
SIZES = {  # Precond(64, 3, 1000, model_channels=..., channel_mult=[1, 2, 3, 4])
    "40M": {"model_channels": 72},
    "quick": {"model_channels": 16},
}


# ----------------------------------------------------------------------------- the engines
def run_phema(case: dict[str, Any]) -> dict[str, Any]:
    import phema

    store, count = counting_store(case["url"])
    start = time.perf_counter()
    infos = store.list()
    index_s = time.perf_counter() - start
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", phema.errors.IllPosedWarning)
        out = phema.reconstruct(store, TARGETS, case["out"], dtype=torch.float16, threads=1)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "index_seconds": index_s,
        "index_bytes": sum(i.index_bytes for i in infos),
        "store_bytes_read": count[0],
        "outputs": [r.path for r in out],
    }


class _Module:
    """What ``_reconstruct_persistent_obj`` returns here: a plain holder of the module state."""

    def __init__(self, meta: dict[str, Any]) -> None:
        self.class_name = meta["class_name"]
        self.__dict__.update(meta["state"])


def _load_whole(path: str) -> Any:
    with _fixtures().official_modules(reconstruct=_Module), open(path, "rb") as f:
        return pickle.load(f)  # our own fixtures: the official tool runs pickle.load here


def _tensors(module: Any, kind: str, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """``kind`` ("_parameters" or "_buffers") of a loaded module tree, in state_dict order."""
    out = [(prefix + k, v) for k, v in getattr(module, kind, {}).items() if v is not None]
    for name, child in getattr(module, "_modules", {}).items():
        if child is not None:
            out += _tensors(child, kind, f"{prefix}{name}.")
    return out


def run_official(case: dict[str, Any]) -> dict[str, Any]:
    """The official tool's approach (one batch: 8 outputs), with phema's coefficients."""
    start = time.perf_counter()
    inputs, weights = case["inputs"], case["weights"]  # [input][output]
    outputs: list[Any] = []
    bytes_read = 0
    for r, path in enumerate(inputs):
        bytes_read += os.path.getsize(path)
        data = _load_whole(path)
        params = _tensors(data["ema"], "_parameters")
        for _, p in params:
            p.data = p.data.float()
        if not outputs:
            for _ in TARGETS:
                out = copy.deepcopy(data)
                for _, p in _tensors(out["ema"], "_parameters"):
                    p.data.zero_()
                outputs.append(out)
        for j, out in enumerate(outputs):
            coef = weights[r][j]
            for (_, dst), (_, src) in zip(_tensors(out["ema"], "_parameters"), params, strict=True):
                dst.data.add_(src.data, alpha=coef)
            for (_, dst), (_, src) in zip(
                _tensors(out["ema"], "_buffers"), _tensors(data["ema"], "_buffers"), strict=True
            ):
                dst.data.copy_(src.data)
        del data, params
    os.makedirs(case["out"], exist_ok=True)
    for j, out in enumerate(outputs):
        for _, p in _tensors(out["ema"], "_parameters") + _tensors(out["ema"], "_buffers"):
            p.data = p.data.half()
        path = os.path.join(case["out"], f"phema-{j}.pkl")
        with _fixtures().official_modules(), open(path, "wb") as f:
            pickle.dump(out, f)  # the whole snapshot structure, as the official tool writes it
        fsync_path(path)
    seconds = time.perf_counter() - start
    tensors = [
        dict(_tensors(o["ema"], "_parameters") + _tensors(o["ema"], "_buffers")) for o in outputs
    ]
    return {"seconds": seconds, "store_bytes_read": bytes_read, "tensors": tensors}


RUNNERS = {"phema_local": run_phema, "phema_http": run_phema, "official": run_official}


def child_main(case: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    import phema
    import phema.streaming  # imports stay out of the measured window

    gc.collect()
    reset = reset_peak_rss()
    rss0, io0 = rss_bytes(), rchar()
    result = RUNNERS[case["engine"]](case)
    hwm1, max1, io1 = hwm_bytes(), maxrss_bytes(), rchar()
    result["peak"] = (hwm1 if reset and hwm1 is not None else max1) - rss0
    result["rchar"] = None if io0 is None or io1 is None else io1 - io0
    if "tensors" in result:
        outs = result.pop("tensors")
    else:
        outs = [phema.load(p) for p in result.pop("outputs")]
    torch.save(outs, os.path.join(case["cmp"], f"{case['engine']}-{uuid.uuid4().hex[:6]}.pt"))
    sys.stdout.write(MARKER + json.dumps(result) + "\n")


# ----------------------------------------------------------------------------- the parent
def write_pickles(folder: str, size: str, times: int) -> tuple[int, int]:
    """Official-structure pickles of one network, distinct weights per file; (params, bytes)."""
    from edm2_reference.network import Precond

    official_snapshot = _fixtures().official_snapshot

    kwargs = {"img_resolution": 64, "img_channels": 3, "label_dim": 1000}
    kwargs.update(channel_mult=[1, 2, 3, 4], **SIZES[size])
    torch.manual_seed(0)
    net = Precond(**kwargs).half()
    params = sum(p.numel() for p in net.parameters())
    base = {k: v.detach().clone() for k, v in net.named_parameters()}
    total = 0
    for i in range(times):
        kimg = 2048 * (i + 1)
        for j, std in enumerate(STORED):
            g = torch.Generator().manual_seed(100 * i + j)
            with torch.no_grad():
                for k, v in net.named_parameters():  # buffers stay (the official EMA copies them)
                    noise = torch.randn(v.shape, generator=g).mul_(0.01)
                    v.copy_(base[k].float().add_(noise).half())
            path = os.path.join(folder, f"network-snapshot-{kimg:07d}-{std}.pkl")
            with open(path, "wb") as f:
                f.write(official_snapshot(net, kwargs))
            total += os.path.getsize(path)
    return params, total


def _serve(folder: str, port: Any, stop: Any, sent: Any) -> None:
    from rangeserver import serve

    with serve(folder) as (url, log):
        port.value = int(url.rsplit(":", 1)[1])
        while not stop.wait(0.05):
            sent.value = log.bytes_sent()
        sent.value = log.bytes_sent()


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, os.path.abspath(__file__), "--case", json.dumps(case)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    shutil.rmtree(case["out"], ignore_errors=True)
    for line in proc.stdout.splitlines():
        if line.startswith(MARKER):
            result: dict[str, Any] = json.loads(line[len(MARKER) :])
            return result
    raise RuntimeError(
        f"case {case['engine']} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 2M-parameter net")
    ap.add_argument("--times", type=int, default=5, help="snapshot times (2 pickles each)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of the three engines")
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        child_main(json.loads(args.case))
        return
    import phema

    size = "quick" if args.quick else "40M"
    base = tempfile.mkdtemp(prefix="phema-official-bench-")
    try:
        folder, cmp_dir = os.path.join(base, "run"), os.path.join(base, "cmp")
        os.makedirs(folder)
        os.makedirs(cmp_dir)
        params, stored = write_pickles(folder, size, args.times)
        for name in os.listdir(folder):  # warm the page cache: every engine reads warm files
            with open(os.path.join(folder, name), "rb") as f:
                while f.read(1 << 24):
                    pass
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", phema.errors.IllPosedWarning)
            the_plan = phema.plan(phema.SnapshotStore(folder), TARGETS, dtype=torch.float16)
        inputs = [i.path for i in the_plan.inputs]
        ctx = multiprocessing.get_context("spawn")
        port, sent, stop = ctx.Value("i", 0), ctx.Value("q", 0), ctx.Event()
        server = ctx.Process(target=_serve, args=(folder, port, stop, sent), daemon=True)
        server.start()
        while not port.value:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port.value}/"
        results: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
        engines = ["phema_local", "phema_http", "official"]
        for rnd in range(args.repeats):
            for engine in engines[rnd % 3 :] + engines[: rnd % 3]:
                case = {
                    "engine": engine,
                    "url": url if engine == "phema_http" else folder,
                    "out": os.path.join(base, f"out-{uuid.uuid4().hex[:8]}"),
                    "cmp": cmp_dir,
                    "inputs": inputs,
                    "weights": the_plan.weights,
                }
                before = sent.value
                time.sleep(0.1)
                r = run_case(case)
                time.sleep(0.2)  # the server's counter is polled every 50 ms
                if engine == "phema_http":
                    r["store_bytes_read"] = sent.value - before  # what the server sent
                results[engine].append(r)
        stop.set()
        server.join(5)
        report(results, params, stored, len(inputs), args.times * 2, cmp_dir)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def report(
    results: dict[str, list[dict[str, Any]]],
    params: int,
    stored: int,
    used: int,
    files: int,
    cmp_dir: str,
) -> None:
    bench = "official_pickles"
    ref = None
    diffs = {}
    for name in sorted(os.listdir(cmp_dir)):  # every output against phema_local's first
        outs = torch.load(os.path.join(cmp_dir, name), weights_only=True)
        if ref is None and name.startswith("phema_local"):
            ref = outs
    assert ref is not None
    for name in sorted(os.listdir(cmp_dir)):
        outs = torch.load(os.path.join(cmp_dir, name), weights_only=True)
        worst = max(
            float((o[k].detach().float() - r[k].float()).abs().max())
            for o, r in zip(outs, ref, strict=True)
            for k in r
        )
        engine = name.rsplit("-", 1)[0]
        diffs[engine] = max(diffs.get(engine, 0.0), worst)
    fig: dict[str, dict[str, float]] = {}
    for engine, runs in results.items():
        secs = [r["seconds"] for r in runs]
        read = runs[0]["store_bytes_read"]
        fig[engine] = {
            "seconds": statistics.median(secs),
            "peak_mb": statistics.median(r["peak"] for r in runs) / 2**20,
            "read_ratio": read / stored,
        }
        emit(
            bench,
            engine,
            params=params,
            pickles=files,
            pickles_used=used,
            outputs=len(TARGETS),
            bytes_stored=stored,
            bytes_read=read,
            bytes_read_over_stored=sig(read / stored),
            index_bytes=runs[0].get("index_bytes"),
            index_seconds=sig(statistics.median(r["index_seconds"] for r in runs))
            if "index_seconds" in runs[0]
            else None,
            index_fraction=sig(runs[0]["index_bytes"] / stored)
            if "index_bytes" in runs[0]
            else None,
            rchar=runs[0]["rchar"],
            seconds_median=sig(statistics.median(secs)),
            seconds_min=sig(min(secs)),
            seconds_max=sig(max(secs)),
            peak_rss_mb=sig(fig[engine]["peak_mb"]),
            max_abs_diff_vs_phema_local=sig(diffs.get(engine, float("nan"))),
        )
    off = fig["official"]
    for engine in ("phema_local", "phema_http"):
        emit(
            bench,
            f"official_over_{engine}",
            params=params,
            wall_time_ratio=sig(off["seconds"] / fig[engine]["seconds"]),
            peak_rss_ratio=sig(off["peak_mb"] / fig[engine]["peak_mb"]),
            bytes_read_ratio=sig(off["read_ratio"] / fig[engine]["read_ratio"]),
        )


if __name__ == "__main__":
    main()
