"""The training loop: it learns, resumes exactly, agrees across process counts, and snapshots."""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from launch import run_torchrun
from rich.console import Console
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from edm2_reference.checkpoint import (
    CheckpointError,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    load_sharded_parts,
    save_sharded_checkpoint,
    sharded_folder,
)
from edm2_reference.distributed import World
from edm2_reference.train import TrainSettings, _snapshot_due, train
from phema import SnapshotStore, SnapshotWriter
from phema.store import snapshot_name

pytestmark = pytest.mark.slow  # training runs, several under torchrun

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
    """The latest checkpoint, whole: one process's file, or several's with their DCP parts."""
    state = torch.load(latest_checkpoint(str(outdir)), map_location="cpu", weights_only=True)
    if "sharded" in state:
        with tempfile.TemporaryDirectory() as tmp:
            whole = os.path.join(tmp, "whole.pt")
            dcp_to_torch_save(os.path.join(outdir, state["sharded"]), whole)
            state.update(torch.load(whole, map_location="cpu", weights_only=True))
    return state


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


def test_runs_from_before_the_held_out_split_resume_with_held_out_zero(tmp_path):
    """Checkpoints without the held_out setting trained on all the data: --held-out 0."""
    train(_settings(tmp_path, duration=512, held_out=0.0))
    path = latest_checkpoint(str(tmp_path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["settings"].pop("held_out") == 0.0
    torch.save(state, path)  # as written before the setting existed
    with pytest.raises(CheckpointError, match=r"held_out: checkpoint 0.0 vs now 0.5"):
        train(_settings(tmp_path, duration=1024, held_out=0.5))
    assert train(_settings(tmp_path, duration=1024, held_out=0.0)).nimg == 1024


def test_gradient_accumulation_does_not_change_the_maths(tmp_path):
    train(_settings(tmp_path / "a", duration=512))
    train(_settings(tmp_path / "b", duration=512, batch_gpu=16))
    a, b = _state(tmp_path / "a"), _state(tmp_path / "b")
    for key in a["net"]:
        # Same images and noise; only the summation order of the gradient differs (fp32
        # rounding, amplified at most ~lr-fold per Adam step over 8 steps).
        torch.testing.assert_close(a["net"][key], b["net"][key], rtol=1e-4, atol=1e-5)


def test_sharded_checkpoint_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    # Without a process group DCP runs in one process: the same code path as rank 0's.
    run = str(tmp_path)
    meta = {"nimg": 64, "settings": {"seed": 0}}
    save_sharded_checkpoint(run, 64, meta, {"x": torch.arange(4.0)})
    assert latest_checkpoint(run) == checkpoint_path(run, 64)

    import edm2_reference.checkpoint as ckpt

    real_save = ckpt.dcp_save

    def crash(parts, checkpoint_id):  # dies half-way through writing the parts
        os.makedirs(checkpoint_id, exist_ok=True)
        Path(checkpoint_id, "__0_0.distcp").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "dcp_save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_sharded_checkpoint(run, 128, {**meta, "nimg": 128}, {"x": torch.ones(4)})
    assert latest_checkpoint(run) == checkpoint_path(run, 64)  # the crash is never picked up
    monkeypatch.setattr(ckpt, "dcp_save", real_save)
    # A crash between the rename and the file left a folder of the final name, too.
    os.makedirs(os.path.join(run, sharded_folder(128)))
    Path(run, sharded_folder(128), "__0_0.distcp").write_bytes(b"stale")
    save_sharded_checkpoint(run, 128, {**meta, "nimg": 128}, {"x": torch.ones(4)})
    assert sorted(os.listdir(run)) == sorted(
        [
            sharded_folder(64),
            sharded_folder(128),
            *(f"training-state-{n:012d}.pt" for n in (64, 128)),
        ]
    )
    state = load_checkpoint(checkpoint_path(run, 128), {"seed": 0})
    parts = {"x": torch.zeros(4)}
    load_sharded_parts(checkpoint_path(run, 128), state, parts)
    assert torch.equal(parts["x"], torch.ones(4))
    with pytest.raises(CheckpointError, match=r"seed: checkpoint 0 vs now 1"):
        load_checkpoint(checkpoint_path(run, 128), {"seed": 1})
    shutil.rmtree(os.path.join(run, sharded_folder(128)))
    with pytest.raises(CheckpointError, match="is missing"):
        load_sharded_parts(checkpoint_path(run, 128), state, parts)


class _Rank0Of2(World):
    """Rank 0 of two, without a process group (nothing to broadcast to)."""

    def from_main(self, value):
        return value


def test_a_partly_written_sharded_snapshot_set_is_skipped_with_a_warning(tmp_path):
    writer = SnapshotWriter(str(tmp_path))
    console = Console(record=True, width=200)
    world = _Rank0Of2(0, 2, torch.device("cpu"))
    try:
        assert _snapshot_due(writer, world, console, 512, (0.05, 0.1))
        writer.store.write(snapshot_name(512, 0.05), b"published before the crash")
        assert not _snapshot_due(writer, world, console, 512, (0.05, 0.1))
        assert snapshot_name(512, 0.1) in console.export_text()
        writer.store.write(snapshot_name(512, 0.1), b"published before the crash")
        assert not _snapshot_due(writer, world, console, 512, (0.05, 0.1))
    finally:
        writer.close()


# Two-process runs: 8 steps of 64 images, checkpoints at 256 and 512 images. The FSDP2 run
# also accumulates gradients (two rounds of 16 images per rank and step).
_RUN = {**FAST, "checkpoint": 256, "duration": 512}
_MODE_FLAGS = {"ddp": [], "fsdp": ["--fsdp", "--batch-gpu=16"]}


def _torchrun(outdir, *extra):
    flags = [f"--{k}={v}" for k, v in _RUN.items()]
    proc = run_torchrun(["-m", "edm2_reference.train", f"--outdir={outdir}", *flags, *extra], 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process in-process, and two under torchrun with DDP and with FSDP2 (2 launches)."""
    root = tmp_path_factory.mktemp("runs")
    for mode, flags in _MODE_FLAGS.items():
        _torchrun(root / mode, *flags)
    train(TrainSettings(outdir=str(root / "one"), **_RUN))
    return root


def _snapshots(outdir):
    store = SnapshotStore(str(outdir / "snapshots"))
    return store, store.list()


def _close(a, b, what):
    assert a.keys() == b.keys(), what
    for key in a:
        # Same global batch and noise; the gradient is summed in another order (gloo's
        # all-reduce or reduce-scatter, accumulation rounds: fp32 rounding), which Adam
        # amplifies ~lr-fold per step over 8 steps (seen: < 4e-6). The EMA is a fixed
        # combination of the weights after each step, so it inherits the same differences,
        # and float32 snapshots store it exactly.
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{what} {key}")


def _same(a, b, what):
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what} {key}"


@pytest.mark.slow
def test_two_processes_equal_one(runs):
    one, two = _state(runs / "one"), _state(runs / "ddp")
    assert "sharded" not in one
    assert two["sharded"] == sharded_folder(512)
    assert two["world_size"] == 2
    assert not two["fsdp"]
    _close(one["net"], two["net"], "net")
    assert one["ema"]["t"] == two["ema"]["t"] == 512
    _close(one["ema"]["shadows"], two["ema"]["shadows"], "ema")
    # The partitioned EMA's snapshots are written in shards, listed and loaded as whole ones.
    (store_1, infos_1), (store_2, infos_2) = _snapshots(runs / "one"), _snapshots(runs / "ddp")
    assert [(i.t, i.std) for i in infos_2] == [
        (256.0, 0.05),
        (256.0, 0.1),
        (512.0, 0.05),
        (512.0, 0.1),
    ]
    assert [(i.t, i.std, i.step) for i in infos_1] == [(i.t, i.std, i.step) for i in infos_2]
    assert all(not i.shards for i in infos_1)
    assert all(len(i.shards) == 2 for i in infos_2)  # one per rank
    for i1, i2 in zip(infos_1, infos_2, strict=True):
        _close(store_1.load(i1), store_2.load(i2), i2.url)


@pytest.mark.slow
def test_fsdp_agrees_with_ddp(runs):
    ddp, fsdp = _state(runs / "ddp"), _state(runs / "fsdp")
    assert fsdp["fsdp"]
    assert fsdp["sharded"] == sharded_folder(512)
    _close(ddp["net"], fsdp["net"], "net")
    assert ddp["ema"]["t"] == fsdp["ema"]["t"] == 512
    assert ddp["ema"]["num_updates"] == fsdp["ema"]["num_updates"] == 8
    _close(ddp["ema"]["shadows"], fsdp["ema"]["shadows"], "ema")
    (store_d, infos_d), (store_f, infos_f) = _snapshots(runs / "ddp"), _snapshots(runs / "fsdp")
    assert [(i.t, i.std, i.step) for i in infos_d] == [(i.t, i.std, i.step) for i in infos_f]
    assert all(len(i.shards) == 2 for i in infos_f)
    for i_d, i_f in zip(infos_d, infos_f, strict=True):
        _close(store_d.load(i_d), store_f.load(i_f), i_f.url)


@pytest.mark.slow
def test_resume_of_a_sharded_run_with_other_settings_is_refused(runs):
    with pytest.raises(CheckpointError, match=r"seed: checkpoint 0 vs now 1"):
        train(TrainSettings(outdir=str(runs / "ddp"), **{**_RUN, "seed": 1}))


def _crash_after_256(src, dst, leftover):
    """``dst``: ``src`` as a run that crashed after its checkpoint at 256 images would be.

    The checkpoint at 512 is gone but leaves its parts behind: under the temporary name
    (``"tmp"``: the crash came while they were written) or the final one (``"final"``: it
    came before the file was written). The snapshots at 512 were not published: the
    manifests are gone, their shard files stay as orphans.
    """
    shutil.copytree(src, dst)
    os.remove(checkpoint_path(str(dst), 512))
    if leftover == "tmp":
        os.rename(dst / sharded_folder(512), dst / f".{sharded_folder(512)}.tmp")
    for std in (0.05, 0.1):
        os.remove(dst / "snapshots" / snapshot_name(512, std))
    assert latest_checkpoint(str(dst)) == checkpoint_path(str(dst), 256)


@pytest.mark.slow
@pytest.mark.parametrize(("mode", "leftover"), [("ddp", "tmp"), ("fsdp", "final")])
def test_two_process_run_resumed_equals_uninterrupted(runs, tmp_path, mode, leftover):
    _crash_after_256(runs / mode, tmp_path / mode, leftover)
    log = " ".join(_torchrun(tmp_path / mode, *_MODE_FLAGS[mode]).split())
    assert "resumed from" in log
    assert "at 256 images" in log
    a, b = _state(runs / mode), _state(tmp_path / mode)
    assert (a["nimg"], a["step"]) == (b["nimg"], b["step"]) == (512, 8)
    _same(a["net"], b["net"], "net")
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for name, value in a["optimizer"]["state"].items():
        _same(value, b["optimizer"]["state"][name], f"adam {name}")
    assert a["ema"]["t"] == b["ema"]["t"] == 512
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 8
    _same(a["ema"]["shadows"], b["ema"]["shadows"], "ema")
    assert not (tmp_path / mode / f".{sharded_folder(512)}.tmp").exists()
    (store_a, infos_a), (store_b, infos_b) = _snapshots(runs / mode), _snapshots(tmp_path / mode)
    assert [(i.t, i.std, i.step) for i in infos_a] == [(i.t, i.std, i.step) for i in infos_b]
    for ia, ib in zip(infos_a, infos_b, strict=True):
        _same(store_a.load(ia), store_b.load(ib), ib.url)
