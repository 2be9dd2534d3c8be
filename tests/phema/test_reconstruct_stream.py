"""The streaming engine equals the in-memory solve, reads each byte once, and is atomic."""

import itertools
import json

import pytest
import safetensors.torch
import torch
from torch import nn

from phema import (
    PowerFunctionEMA,
    PowerProfile,
    Snapshot,
    SnapshotStore,
    SnapshotWriter,
    StorageError,
    reconstruct_in_memory,
)
from phema.streaming import plan, reconstruct

STDS = (0.075, 0.13)


def _net():
    torch.manual_seed(0)
    # 1031 is prime: windows split tensors at element boundaries, not block sizes.
    return nn.Sequential(nn.Linear(16, 1031), nn.BatchNorm1d(1031), nn.Linear(1031, 3))


def _write_run(url, dtype=None, steps=40, every=2):
    net = _net()
    ema = PowerFunctionEMA(net)
    gen = torch.Generator().manual_seed(1)
    with SnapshotWriter(url, dtype=dtype, t_unit="images") as writer:
        for step in range(1, steps + 1):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.01)
            net(torch.randn(8, 16, generator=gen))
            ema.update(step * 32)
            if step % every == 0:
                writer.save(ema, step=step)
    return net


class CountingStore(SnapshotStore):
    """Records every ranged read (path, start, end), whichever of the two calls made it."""

    def __init__(self, url):
        super().__init__(url)
        self.reads = []
        head = self.backend.head

        def counted_head(path, want):
            got = head(path, want)
            self.reads.append((path, 0, len(got.data)))
            return got

        self.backend.head = counted_head

    def read_range(self, path, start, end, identity=None):
        self.reads.append((path, start, end))
        return super().read_range(path, start, end, identity)

    def read_into(self, path, start, out, identity=None):
        self.reads.append((path, start, start + len(out)))
        return super().read_into(path, start, out, identity)


@pytest.fixture
def urls(store_root):
    return f"{store_root}/run", f"{store_root}/out"


@pytest.mark.parametrize("dtype", [None, torch.float16])
def test_stream_equals_in_memory_solve_and_reads_each_byte_once(urls, dtype):
    src_url, out_url = urls
    net = _write_run(src_url, dtype)
    src = CountingStore(src_url)
    infos = src.list()
    snaps = [Snapshot(i.t, i.std, src.load(i)) for i in infos]
    src.reads.clear()
    results = reconstruct(src, STDS, out_url, window_bytes=3000, max_inflight=3)
    # Every data byte of every snapshot used, exactly once (headers were read by list()).
    data_reads = [r for r in src.reads if r[1] > 8]
    per_file = {}
    for path, start, end in data_reads:
        per_file.setdefault(path, []).append((start, end))
    for info in infos:
        spans = sorted(per_file[info.path])
        assert spans[0][0] == info.header.data_start
        assert spans[-1][1] == info.size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert sum(e - s for _, s, e in data_reads) == sum(i.header.data_bytes for i in infos)

    targets = [PowerProfile(infos[-1].t, s) for s in STDS]
    expected, _ = reconstruct_in_memory(snaps, targets)
    out_store = SnapshotStore(out_url)
    for res, want in zip(results, expected, strict=True):
        got = safetensors.torch.load(out_store.fs.cat_file(res.path))
        for name, value in want.items():
            if name.endswith(("running_mean", "running_var", "num_batches_tracked")):
                continue  # copied, not averaged: taken from the latest snapshot
            # Both accumulate in float32 in the same order: agreement to fp32 rounding.
            torch.testing.assert_close(got[name], value.float(), rtol=1e-6, atol=1e-7)
        assert torch.equal(got["1.num_batches_tracked"], snaps[-1].tensors["1.num_batches_tracked"])
        net.load_state_dict(got)  # outputs load into the original module


def test_output_metadata_and_earlier_target_time(tmp_path):
    _write_run(str(tmp_path / "run"))
    src = CountingStore(str(tmp_path / "run"))
    the_plan = plan(src, [0.1], at=640.0)
    assert max(i.t for i in the_plan.inputs) == 640.0
    assert len(the_plan.inputs) < len(src.list())
    src.reads.clear()
    (res,) = reconstruct(src, [0.1], str(tmp_path / "out"), at=640.0)
    data_paths = {path for path, start, _ in src.reads if start > 8}  # not header reads
    assert data_paths == {i.path for i in the_plan.inputs}  # later snapshots' data unread
    with open(res.path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    assert meta["phema.kind"] == "reconstruction"
    assert float(meta["phema.t"]) == 640.0
    coefs = json.loads(meta["phema.coefficients"])
    assert sum(coefs.values()) == pytest.approx(1.0, abs=1e-12)
    assert json.loads(meta["phema.fit"])["rel_error"] == res.fit.rel_error
    # The store still lists its snapshots only, also with an output beside them.
    assert all(i.t <= 1280 for i in SnapshotStore(str(tmp_path / "run")).list())
    (listed,) = SnapshotStore(str(tmp_path / "out")).reconstructions()
    assert (listed.t, listed.std, listed.url) == (640.0, 0.1, res.url)
    assert listed.coefficients == res.coefficients
    assert listed.fit["rel_error"] == res.fit.rel_error
    assert SnapshotStore(str(tmp_path / "run")).reconstructions() == []


def test_never_overwrites_and_fails_atomically(urls):
    src_url, out = urls
    _write_run(src_url)
    reconstruct(src_url, [0.1], out)
    with pytest.raises(StorageError, match="exists; pass overwrite=True"):
        reconstruct(src_url, [0.1], out)

    class Failing(SnapshotStore):
        calls = 0

        def read_into(self, path, start, out, identity=None):
            Failing.calls += 1
            if Failing.calls > 20:
                raise OSError("connection reset")
            return super().read_into(path, start, out)

    out2 = out + "2"
    with pytest.raises(OSError, match="connection reset"):
        reconstruct(Failing(src_url), [0.05, 0.1], out2, window_bytes=2000)
    fs = SnapshotStore(out2).fs
    root = SnapshotStore(out2).root
    assert not fs.exists(root) or fs.ls(root) == []  # outputs appear together or not at all


def test_plan_curves_match_the_reported_fit(tmp_path):
    import numpy as np

    _write_run(str(tmp_path / "run"))
    the_plan = plan(SnapshotStore(str(tmp_path / "run")), [0.06, 0.075, 0.2])
    tau = np.linspace(0.0, the_plan.t, 400_001)
    target, achieved = the_plan.curves(tau)
    for j, fit in enumerate(the_plan.fits):
        # Both curves integrate to 1 (coefficients sum to 1) ...
        assert np.trapezoid(achieved[j], tau) == pytest.approx(1.0, abs=1e-6)
        # ... and their L2 distance, by quadrature here and from the Gram matrix in the
        # solver, agree: the trapezoid rule's error on 4e5 points is far below 1e-4.
        dist = np.sqrt(np.trapezoid((achieved[j] - target[j]) ** 2, tau))
        norm = np.sqrt(np.trapezoid(target[j] ** 2, tau))
        assert dist / norm == pytest.approx(fit.rel_error, rel=1e-4)


def test_bad_options_are_named_and_threads_are_restored(tmp_path):
    from phema import OptionError

    _write_run(str(tmp_path / "run"))
    for kwargs, name in (
        ({"window_bytes": 0}, "window_bytes"),
        ({"max_inflight": 0}, "max_inflight"),
        ({"threads": 0}, "threads"),
    ):
        with pytest.raises(OptionError, match=name):
            reconstruct(str(tmp_path / "run"), [0.1], str(tmp_path / "out"), **kwargs)
    assert not (tmp_path / "out").exists()  # refused before anything was written
    with pytest.raises(OptionError, match="window_bytes"):  # ... and before any listing
        reconstruct(str(tmp_path / "missing"), [0.1], str(tmp_path / "out"), window_bytes=0)
    before = torch.get_num_threads()
    seen = []

    def progress(n):
        seen.append(torch.get_num_threads())

    reconstruct(str(tmp_path / "run"), [0.1], str(tmp_path / "out"), threads=1, progress=progress)
    assert set(seen) == {1}  # the pass ran with one intra-op thread ...
    assert torch.get_num_threads() == before  # ... and the setting is back


def test_contents_lists_both_kinds_from_one_read_of_each_header(tmp_path):
    run = str(tmp_path / "run")
    _write_run(run)
    (res,) = reconstruct(run, [0.1], run)  # an output beside the snapshots
    store = CountingStore(run)
    snapshots, outputs = store.contents()
    assert snapshots == store.list()
    assert outputs == store.reconstructions()
    assert [o.url for o in outputs] == [res.url]
    files = len(snapshots) + len(outputs)
    store.reads.clear()
    store.contents()
    # Two exact reads per file: the length prefix, then the header; no tensor byte.
    assert len(store.reads) == 2 * files
    for info in snapshots:
        spans = sorted((s, e) for p, s, e in store.reads if p == info.path)
        assert spans == [(0, 8), (8, info.header.data_start)]
