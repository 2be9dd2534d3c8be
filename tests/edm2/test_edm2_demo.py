"""``bash scripts/edm2_demo.sh --quick``: the demo's commands run end to end, so they cannot rot.

The quick run trains for 2Ki images, so its numbers mean nothing; what is checked is that every
phase runs, writes what the README says (the sweep plot, the best/worst grid, the sample grid,
the table) and reports its wall time per phase.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "edm2_demo.sh")

pytest.importorskip("matplotlib")


def test_quick_demo_runs_every_phase(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(
        ["bash", SCRIPT, "--quick", "--no-install", "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("sweep.png", "sweep-grid.png", "samples-std0.10.png", "classifier.safetensors"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "ema").glob("phema-ema-*.safetensors"))) == 3
    # the table: one row per EMA std and the raw weights, then the real-vs-real baseline
    for label in ("ema std 0.050", "ema std 0.100", "ema std 0.200", "raw weights", "real"):
        assert label in proc.stdout, label
    m = re.search(
        r"wall time: train (\d+) s reconstruct (\d+) s sample (\d+) s evaluate (\d+) s; "
        r"total (\d+) s",
        proc.stderr,
    )
    assert m is not None, proc.stderr[-2000:]
    parts = [int(g) for g in m.groups()]
    assert sum(parts[:4]) == parts[4]


def _defaults(script: list[str]) -> dict[str, str]:
    """The ``name=value`` defaults of the script's settings lines (from ``out=`` on)."""
    first = next(i for i, ln in enumerate(script) if ln.startswith("out="))
    lines = script[first : script.index("install=1")]
    return dict(tok.split("=", 1) for ln in lines for tok in ln.split())


def test_the_readme_lists_the_demo_script_commands():
    """The README's commands are the script's phases with its defaults filled in."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(SCRIPT) as f:
        script = f.read().splitlines()
    values = _defaults(script)
    duration = values["duration"]
    values["last"] = f"{int(duration.removesuffix('Ki')) * 1024:012d}"
    phases = []
    for ln in script:
        if ln.startswith("phase "):
            cmd = ln.split(" ", 2)[2]
            for k, v in values.items():
                cmd = cmd.replace(f'"${k}"', v).replace(f"${k}", v)
            phases.append(cmd.replace('"', ""))
    block = readme.split("bash scripts/edm2_demo.sh\n```\n\nwhich runs\n\n```bash\n", 1)[1]
    listed = [ln.replace('"', "") for ln in block.split("```", 1)[0].splitlines()]
    assert listed == phases
