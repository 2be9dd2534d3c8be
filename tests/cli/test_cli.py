"""The ``phema`` command run as a user runs it: in a subprocess."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

import phema

pytestmark = pytest.mark.slow  # the console script in subprocesses


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


def _write_run(url, steps, width=64):
    """Snapshots of a small MLP's EMA every 4 steps (8 images a step) at ``url``."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 2))
    ema = phema.PowerFunctionEMA(net)
    with phema.SnapshotWriter(url, t_unit="images") as writer:
        for step in range(1, steps + 1):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.01)
            ema.update(step * 8)
            if step % 4 == 0:
                writer.save(ema, step=step)


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli") / "run"
    _write_run(str(root), steps=40)
    return root


def test_ls_and_plan(store_dir):
    out = _phema("ls", str(store_dir), "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 20
    assert {r["std"] for r in rows} == {0.05, 0.1}
    assert rows[-1]["t"] == 320.0
    out = _phema("plan", str(store_dir), "--std", "0.075,0.13", "--json")
    assert out.returncode == 0, out.stderr
    plans = [json.loads(line) for line in out.stdout.splitlines()]
    assert [p["std"] for p in plans] == [0.075, 0.13]
    assert all(abs(sum(p["coefficients"].values()) - 1) < 1e-9 for p in plans)
    out = _phema("ls", str(store_dir))
    assert "20 snapshots" in out.stdout


def test_reconstruct_writes_loadable_outputs(store_dir, tmp_path):
    import safetensors.torch

    out = _phema("reconstruct", str(store_dir), "--std", "0.075", "--out", str(tmp_path), "--json")
    assert out.returncode == 0, out.stderr
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    tensors = safetensors.torch.load_file(row["url"])
    assert set(tensors) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    again = _phema("reconstruct", str(store_dir), "--std", "0.075", "--out", str(tmp_path))
    assert again.returncode == 1
    assert "exists" in again.stderr
    assert "Traceback" not in again.stderr
    # Other window, reads in flight and threads give the same output (to fp32 rounding:
    # the snapshots are grouped differently in the sums).
    other = tmp_path / "other"
    out = _phema(
        "reconstruct", str(store_dir), "--std", "0.075", "--out", str(other),
        "--window-mb", "0.001", "--inflight", "1", "--threads", "0", "--json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    (row2,) = [json.loads(line) for line in out.stdout.splitlines()]
    for name, value in safetensors.torch.load_file(row2["url"]).items():
        torch.testing.assert_close(value, tensors[name], rtol=1e-6, atol=1e-7)
    # `ls` lists the outputs with their fit; the run's own folder lists snapshots only.
    listed = _phema("ls", str(tmp_path), "--json")
    assert listed.returncode == 0, listed.stderr
    (item,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert item["kind"] == "reconstruction"
    assert item["std"] == 0.075
    assert item["rel_error"] == row["rel_error"]
    table = _phema("ls", str(tmp_path))
    assert "1 reconstruction in" in table.stdout
    assert "snapshots" not in table.stdout
    kinds = {
        json.loads(line)["kind"]
        for line in _phema("ls", str(store_dir), "--json").stdout.splitlines()
    }
    assert kinds == {"snapshot"}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["ls", "/no/such/dir"], 1, "does not exist"),
        (["plan", "STORE", "--std", "5"], 2, "percentage"),
        (["plan", "STORE", "--std", "a,b"], 2, "comma-separated"),
        (["reconstruct", "STORE", "--std", "0.1"], 2, "--out"),
    ],
)
def test_store_errors_are_one_line(store_dir, args, code, message):
    out = _phema(*[str(store_dir) if a == "STORE" else a for a in args])
    assert out.returncode == code
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_s3_credentials_are_one_line(monkeypatch):
    pytest.importorskip("s3fs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_EC2_METADATA_DISABLED="true",
        AWS_SHARED_CREDENTIALS_FILE="/dev/null",
        AWS_CONFIG_FILE="/dev/null",
        BOTO_CONFIG="/dev/null",
        FSSPEC_S3_ENDPOINT_URL="http://127.0.0.1:9",  # never leaves this machine
    )
    exe = shutil.which("phema")
    cmd = [exe] if exe else [sys.executable, "-m", "phema_cli"]
    out = subprocess.run(
        [*cmd, "ls", "s3://some-bucket/run"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert out.returncode == 1
    assert "AWS_ACCESS_KEY_ID" in out.stderr
    assert "Traceback" not in out.stderr


def test_plan_plot_is_a_png_and_never_overwritten(store_dir, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "plan.png"
    out = _phema("plan", str(store_dir), "--std", "0.05,0.15", "--plot", str(png))
    assert out.returncode == 0, out.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # curves, axes and legend, not an empty canvas
    again = _phema("plan", str(store_dir), "--std", "0.05", "--plot", str(png))
    assert again.returncode == 1
    assert "exists" in again.stderr


def test_hub_round_trip_through_the_cli(fake_hub, hub_repo, tmp_path):
    url = f"{hub_repo}/snapshots"
    _write_run(url, steps=24, width=32)
    env = {**os.environ, "HF_ENDPOINT": fake_hub.endpoint, "HF_TOKEN": "hf_phema_fake"}
    exe = shutil.which("phema")
    cmd = [exe] if exe else [sys.executable, "-m", "phema_cli"]

    def run(*args):
        return subprocess.run(
            [*cmd, *args], capture_output=True, text=True, env=env, timeout=120, check=False
        )

    out = run("ls", url, "--json")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.splitlines()) == 12
    out = run("reconstruct", url, "--std", "0.07,0.12", "--out", f"{hub_repo}/ema", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["url"].rsplit("/", 2)[-2] for r in rows] == ["ema", "ema"]
    repo = fake_hub.repos[("model", hub_repo.removeprefix("hf://"))]
    assert sorted(repo.commits[-1]["files"]) == sorted(
        "ema/" + r["url"].rsplit("/", 1)[-1] for r in rows
    )
    missing = run("ls", "hf://phema-test/no-such-repo/snapshots")
    assert missing.returncode == 1
    assert "does not exist" in missing.stderr or "not found" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_clean_removes_only_old_leftovers(store_dir):
    old = store_dir / ".phema-000000000999-0.0500.safetensors.tmp-abc"
    young = store_dir / ".phema-000000000998-0.0500.safetensors.tmp-def"
    old.write_bytes(b"partial")
    young.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    out = _phema("ls", str(store_dir))
    assert out.returncode == 0
    assert "phema clean" in out.stderr
    dry = _phema("clean", str(store_dir), "--dry-run")
    assert dry.returncode == 0
    assert old.exists()
    assert f"would remove {old}" in dry.stdout
    out = _phema("clean", str(store_dir))
    assert out.returncode == 0
    assert not old.exists()
    assert young.exists()  # untouched for less than an hour: a writer may still own it
    young.unlink()
