"""Snapshot stores on file:// and memory://: round trip, atomicity, listing errors, writer."""

import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch
from torch import nn

from phema import (
    FormatError,
    PowerFunctionEMA,
    SnapshotStore,
    SnapshotWriter,
    StorageError,
)
from phema.store import check_layouts


@pytest.fixture
def store_url(store_root):
    return f"{store_root}/run"


def _trained_ema(steps=5):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 300), nn.BatchNorm1d(300), nn.Linear(300, 2))
    ema = PowerFunctionEMA(net, stds=(0.05, 0.10))
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * step)
        net(torch.randn(8, 4))
        ema.update(step * 64)
    return net, ema


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_writer_round_trip(store_url, dtype):
    net, ema = _trained_ema()
    with SnapshotWriter(store_url, dtype=dtype, t_unit="images") as writer:
        writer.save(ema, step=5)
    infos = SnapshotStore(store_url).list()
    assert [(i.t, i.std, i.step, i.t_unit) for i in infos] == [
        (320.0, 0.05, 5, "images"),
        (320.0, 0.10, 5, "images"),
    ]
    check_layouts(infos)
    store = SnapshotStore(store_url)
    for info in infos:
        assert info.gamma == ema.gammas[ema.index(info.std)]
        assert "1.running_mean" in info.copied
        got = store.load(info)
        want = ema.profile_state_dict(info.std)
        assert got.keys() == want.keys()
        for k, v in want.items():
            expected = v.to(dtype) if dtype is not None and v.is_floating_point() else v
            assert torch.equal(got[k], expected), k
        net.load_state_dict(got)  # a snapshot loads into the module as it is


def test_snapshot_files_are_plain_safetensors(tmp_path):
    _, ema = _trained_ema()
    with SnapshotWriter(str(tmp_path)) as writer:
        writer.save(ema)
    files = sorted(p for p in os.listdir(tmp_path))
    assert files == [
        "phema-000000000320-0.0500.safetensors",
        "phema-000000000320-0.1000.safetensors",
    ]
    loaded = safetensors.torch.load_file(tmp_path / files[0])
    assert torch.equal(loaded["0.weight"], ema.profile(0.05)["0.weight"])


def test_same_snapshot_again_is_accepted_other_bytes_are_refused(store_url):
    # What "nothing lost" means here: the first run's files keep their bytes, a resumed
    # run that writes the same snapshot again succeeds, and a different run's snapshot of
    # the same name is refused with an error naming each file, never written over it.
    _, ema = _trained_ema()
    with SnapshotWriter(store_url) as writer:
        writer.save(ema)
    store = SnapshotStore(store_url)
    before = {i.url: store.fs.cat_file(i.path) for i in store.list()}
    with SnapshotWriter(store_url) as writer:
        writer.save(ema)  # a resumed run: identical bytes, accepted
    assert {i.url: store.fs.cat_file(i.path) for i in store.list()} == before
    torch.manual_seed(1)
    other = PowerFunctionEMA(nn.Linear(4, 300), stds=(0.05, 0.10))
    other.update(ema.t)
    writer = SnapshotWriter(store_url)
    writer.save(other)
    with pytest.raises(StorageError, match=r"2 snapshots could not be written") as info:
        writer.close()
    for url in before:
        assert f"{url} (t=320, std=" in str(info.value)
    assert "exists with other bytes" in str(info.value)
    assert {i.url: store.fs.cat_file(i.path) for i in store.list()} == before


def test_background_failure_surfaces_at_next_save_and_later_saves_go_on(tmp_path, monkeypatch):
    _, ema = _trained_ema()
    writer = SnapshotWriter(str(tmp_path))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    writer.save(ema)
    deadline = time.time() + 30
    while len(writer._failures) < 2 and time.time() < deadline:
        time.sleep(0.01)
    monkeypatch.undo()
    ema.update(ema.t + 64)
    with pytest.raises(StorageError, match=r"phema-000000000320-0.0500.safetensors .*disk full"):
        writer.save(ema)  # reports t=320; its own snapshot (t=384) is queued all the same
    writer.close()
    # The failed writes left nothing, not even a temp file; the later snapshot is whole.
    assert sorted(os.listdir(tmp_path)) == [
        "phema-000000000384-0.0500.safetensors",
        "phema-000000000384-0.1000.safetensors",
    ]
    assert [i.t for i in SnapshotStore(str(tmp_path)).list()] == [384.0, 384.0]


_KILL_SCRIPT = r"""
import sys, os
from phema.store import SnapshotStore
store = SnapshotStore(sys.argv[1])
real_write = os.fsync
def slow_fsync(fd):
    print("writing", flush=True)
    import time; time.sleep(60)
os.fsync = slow_fsync
store.write("phema-000000000001-0.0500.safetensors", b"x" * (64 << 20))
"""


@pytest.mark.slow
def test_writer_killed_mid_snapshot_leaves_nothing_visible(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"  # bytes are in the temp file now
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    leftovers = os.listdir(tmp_path)
    assert all(name.startswith(".") for name in leftovers)  # only the hidden temp file
    store = SnapshotStore(str(tmp_path))
    assert store.list() == []
    assert [os.path.basename(p) for p in store.leftovers()] == leftovers
    assert store.leftovers(older_than=3600) == []  # young: maybe a writer still at work


def test_listing_names_bad_files(tmp_path):
    _, ema = _trained_ema()
    with SnapshotWriter(str(tmp_path)) as writer:
        writer.save(ema)
    store = SnapshotStore(str(tmp_path))
    victim = tmp_path / "phema-000000000320-0.1000.safetensors"
    data = victim.read_bytes()
    victim.write_bytes(data[:-10])
    with pytest.raises(FormatError, match=r"phema-000000000320-0.1000.safetensors: .*truncated"):
        store.list()
    victim.write_bytes(data)
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    with pytest.raises(FormatError, match=r"foreign.safetensors: not a phema snapshot"):
        store.list()


def test_mixed_layouts_are_named(tmp_path):
    _, ema = _trained_ema()
    with SnapshotWriter(str(tmp_path)) as writer:
        writer.save(ema)
    _, other = _trained_ema(steps=6)
    with SnapshotWriter(str(tmp_path), dtype=torch.float16) as writer:
        writer.save(other)
    with pytest.raises(
        StorageError, match=r"phema-000000000384-0.0500.safetensors has tensor layout"
    ):
        check_layouts(SnapshotStore(str(tmp_path)).list())


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StorageError, match="does not exist"):
        SnapshotStore(str(tmp_path / "nope")).list()
    with pytest.raises(StorageError, match="cannot open"):
        SnapshotStore("nosuchprotocol://x")


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    import phema.writer

    monkeypatch.setattr(phema.writer, "_rank", lambda: 1)
    _, ema = _trained_ema()
    with SnapshotWriter(str(tmp_path)) as writer:
        writer.save(ema)
    assert not os.path.exists(tmp_path / "phema-000000000320-0.0500.safetensors")


def test_atomic_write_without_overwrite_never_replaces(tmp_path):
    # Nothing lost: the file already there keeps its bytes, and no temporary file stays.
    from phema import ExistsError
    from phema.store import atomic_write

    path = tmp_path / "grid.png"
    path.write_bytes(b"first")
    with (
        pytest.raises(ExistsError, match=r"grid\.png exists"),
        atomic_write(str(path), overwrite=False) as f,
    ):
        f.write(b"second")
    assert path.read_bytes() == b"first"
    assert os.listdir(tmp_path) == ["grid.png"]
    with atomic_write(str(path)) as f:  # the default replaces, as before
        f.write(b"second")
    assert path.read_bytes() == b"second"
