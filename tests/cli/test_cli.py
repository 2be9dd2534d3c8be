"""The ``phema`` command run as a user runs it: in a subprocess."""

import json
import shutil
import subprocess
import sys

import pytest

import phema


def _phema(*args):
    exe = shutil.which("phema")
    cmd = [exe, *args] if exe else [sys.executable, "-m", "phema_cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)


def test_help_and_version():
    out = _phema("--help")
    assert out.returncode == 0
    assert "demo" in out.stdout
    out = _phema("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"phema {phema.__version__}"


def test_bad_usage_exits_2_without_traceback():
    out = _phema("demo", "--steps", "10")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "--steps" in out.stderr
    out = _phema("no-such-command")
    assert out.returncode == 2


@pytest.mark.slow
def test_demo_reconstructs_close_to_tracked():
    out = _phema("demo", "--steps", "600", "--snapshot-every", "50", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["std"] for r in rows] == [0.03, 0.05, 0.075, 0.1, 0.15, 0.2]
    for r in rows:
        # Stored profiles come back exactly; others within the Cauchy-Schwarz bound implied
        # by the reported fit error (plus fp32 shadow rounding, ~1e-6 relative).
        if r["std"] in (0.05, 0.1):
            assert r["param_rel_diff"] < 1e-6
        else:
            assert 0 < r["param_rel_diff"] <= r["rel_bound"] + 1e-5
        assert r["val_loss_posthoc"] == pytest.approx(r["val_loss_tracked"], rel=0.02)
