"""The training loop: it learns, resumes exactly, agrees across process counts, and snapshots."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from edm2_reference.checkpoint import CheckpointError, latest_checkpoint
from edm2_reference.train import TrainSettings, train
from phema import SnapshotStore

# A small, fast configuration of the digits8 preset: 64 images per step.
FAST = {
    "preset": "digits8",
    "data": "digits",
    "batch": 64,
    "rampup": 512,
    "snapshot": 256,
    "checkpoint": 512,
    "status": 256,
}


def _settings(outdir, **kw):
    return TrainSettings(outdir=str(outdir), **{**FAST, **kw})


def _state(outdir):
    return torch.load(latest_checkpoint(str(outdir)), map_location="cpu", weights_only=True)


def test_short_run_lowers_the_loss_and_snapshots_appear(tmp_path):
    result = train(_settings(tmp_path, duration=40 * 64))
    losses = [loss for _, loss in result.losses]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    # Untrained, the weighted error is ~ lambda * sigma_data^2 per pixel (hundreds per image);
    # 40 steps must bring it down several-fold.
    assert last < first / 3, (first, last)
    infos = SnapshotStore(str(tmp_path / "snapshots")).list()
    assert sorted({i.t for i in infos}) == [256.0 * k for k in range(1, 11)]
    assert {i.std for i in infos} == {0.05, 0.10}
    assert {i.t_unit for i in infos} == {"images"}
    assert [i.step for i in infos if i.std == 0.05] == [4 * k for k in range(1, 11)]


def test_interrupted_and_resumed_equals_uninterrupted(tmp_path):
    train(_settings(tmp_path / "a", duration=24 * 64))
    train(_settings(tmp_path / "b", duration=24 * 64, stop_at=8 * 64))
    assert latest_checkpoint(str(tmp_path / "b")).endswith("000000000512.pt")
    resumed = train(_settings(tmp_path / "b", duration=24 * 64))
    assert resumed.losses[0][0] == 9 * 64  # it went on from the checkpoint
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    for key in a["net"]:
        assert torch.equal(a["net"][key], b["net"][key]), key
    assert a["ema"]["t"] == b["ema"]["t"] == 24 * 64
    for key, value in a["ema"]["shadows"].items():
        assert torch.equal(value, b["ema"]["shadows"][key]), key
    store_a = SnapshotStore(str(tmp_path / "a" / "snapshots"))
    store_b = SnapshotStore(str(tmp_path / "b" / "snapshots"))
    infos_a, infos_b = store_a.list(), store_b.list()
    assert [(i.t, i.std) for i in infos_a] == [(i.t, i.std) for i in infos_b]
    for ia, ib in zip(infos_a, infos_b, strict=True):
        ta, tb = store_a.load(ia), store_b.load(ib)
        assert all(torch.equal(ta[k], tb[k]) for k in ta), ia.url


def test_resume_with_other_settings_is_refused(tmp_path):
    train(_settings(tmp_path, duration=512))
    with pytest.raises(CheckpointError, match=r"seed: checkpoint 0 vs now 1"):
        train(_settings(tmp_path, duration=1024, seed=1))


def test_gradient_accumulation_does_not_change_the_maths(tmp_path):
    train(_settings(tmp_path / "a", duration=512))
    train(_settings(tmp_path / "b", duration=512, batch_gpu=16))
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    for key in a["net"]:
        # Same images and noise; only the summation order of the gradient differs (fp32
        # rounding, amplified at most ~lr-fold per Adam step over 8 steps).
        torch.testing.assert_close(a["net"][key], b["net"][key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path):
    torchrun = shutil.which("torchrun")
    cmd = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    flags = [
        "--preset=digits8",
        "--data=digits",
        "--batch=64",
        "--rampup=512",
        "--snapshot=256",
        "--checkpoint=512",
        "--status=256",
        "--duration=512",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            *cmd,
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "edm2_reference.train",
            f"--outdir={tmp_path / 'two'}",
            *flags,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    train(_settings(tmp_path / "one", duration=512))
    a, b = _state(tmp_path / "one"), _state(tmp_path / "two")
    for key in a["net"]:
        # Same global batch and noise; gloo's all-reduce sums in another order (fp32 rounding).
        torch.testing.assert_close(a["net"][key], b["net"][key], rtol=1e-4, atol=1e-5)
    infos = SnapshotStore(str(tmp_path / "two" / "snapshots")).list()
    assert [(i.t, i.std) for i in infos] == [
        (256.0, 0.05),
        (256.0, 0.1),
        (512.0, 0.05),
        (512.0, 0.1),
    ]
