"""Small helpers shared by the benchmark scripts: timing, summary statistics, JSON output.

Every figure a benchmark prints goes through :func:`emit`, which writes one JSON
object per line to stdout with the benchmark name, the case, the metric fields and
the context the figure was measured in (torch version, device, thread count, the
1-minute load average of the machine), so that the output can be collected with
``> results.jsonl`` and compared across runs.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch

__all__ = [
    "device_name",
    "emit",
    "fill_defaults",
    "sig",
    "summarize",
    "synchronize",
    "time_call",
]


def fill_defaults(args: Any, defaults: dict[str, Any]) -> None:
    """Set each ``args.<key>`` that the command line left as ``None`` to ``defaults[key]``."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU, where ops run eagerly)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of one call of ``fn``, with the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def sig(x: float, digits: int = 5) -> float:
    """``x`` rounded to ``digits`` significant digits, for readable JSON."""
    if x == 0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def summarize(seconds: Iterable[float], unit: str = "ms") -> dict[str, float]:
    """Median, min and max of durations given in seconds, in ``unit`` ("ms" or "us")."""
    scale = {"ms": 1e3, "us": 1e6}[unit]
    values = [s * scale for s in seconds]
    return {
        f"{unit}_median": sig(statistics.median(values)),
        f"{unit}_min": sig(min(values)),
        f"{unit}_max": sig(max(values)),
        "samples": len(values),
    }


def device_name(device: torch.device) -> str:
    """A human-readable name of the hardware behind ``device``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def emit(bench: str, case: str, device: torch.device | str = "cpu", **fields: Any) -> None:
    """Print one JSON object on one line: ``bench``, ``case``, ``fields`` and the run context."""
    record: dict[str, Any] = {"bench": bench, "case": case}
    record.update(fields)
    record["device"] = str(device)
    record["torch"] = torch.__version__
    record["threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):  # other processes competing for the cores skew timings
        record["load_1m"] = round(os.getloadavg()[0], 2)
    sys.stdout.write(json.dumps(record) + "\n")
    sys.stdout.flush()


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS; False if refused.

    The interpreter's start-up (imports) leaves a peak above the RSS it settles at,
    which would hide a smaller peak of the measured run. ``ru_maxrss`` cannot be
    reset: it also keeps the peak recorded when any thread exited (Linux folds the
    high-water mark into it at every thread exit), so it stays at the start-up peak
    when the run's peak is lower. It is reported next to ``VmHWM``.
    """
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        return False
    return True
