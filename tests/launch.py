"""Run a program under torchrun on the CPU (gloo), as the multi-process tests do."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence


def run_torchrun(
    args: Sequence[str],
    nproc: int,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node=nproc *args`` with one thread per process.

    Uses the ``torchrun`` on PATH, else ``python -m torch.distributed.run``; ``env`` is
    added to this process's environment. Output is captured; the caller checks it.
    """
    exe = shutil.which("torchrun")
    cmd = [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]
    return subprocess.run(
        [*cmd, "--standalone", f"--nproc_per_node={nproc}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        check=False,
    )
