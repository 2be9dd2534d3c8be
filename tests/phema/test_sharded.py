"""Sharded EMA under torchrun (CPU, gloo): FSDP2 shards and partitioned DDP against one process.

``sharded_worker.py`` trains one trajectory through an FSDP2 model, a replicated model
with ``partition=True`` and a plain model, on 2 and 4 processes; the tests read what
each rank found and the stores it wrote. Bitwise equality is the claim throughout:
every shard applies the same elementwise lerp to the same fp32 values as the
unsharded EMA, so no rounding differs.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from launch import run_torchrun
from safetensors.torch import load_file

from phema import SnapshotStore, StorageError
from phema.streaming import plan, reconstruct

pytestmark = pytest.mark.slow  # torchrun with 2 and 4 processes

WORKER = Path(__file__).with_name("sharded_worker.py")


def _make() -> torch.nn.Module:
    """The worker's model, unsharded."""
    spec = importlib.util.spec_from_file_location("sharded_worker", WORKER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make()  # type: ignore[no-any-return]


def torchrun(
    mode: str,
    out: Path,
    n: int,
    *,
    check: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    done = run_torchrun([str(WORKER), mode, str(out)], n, env=env, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stderr[-4000:]
    return done


def results(out: Path, mode: str, n: int) -> list[dict[str, object]]:
    return [json.loads((out / f"{mode}-{n}-rank{r}.json").read_text()) for r in range(n)]


@pytest.fixture(scope="module", params=[2, 4])
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    n = request.param
    out = tmp_path_factory.mktemp(f"train{n}")
    torchrun("train", out, n)
    return n, out, results(out, "train", n)


@pytest.mark.slow
@pytest.mark.parametrize(
    "key",
    [
        "fsdp_profiles_bitwise",
        "fsdp_profile_is_dtensor",
        "fsdp_full_state_bitwise",
        "partition_profiles_bitwise",
        "partition_copy_module_bitwise",
        "fsdp_swapped_holds_profile",
        "fsdp_swapped_restores",
        "fsdp_swapped_forward_equal",
        "partition_swapped_holds_profile",
        "dcp_resume_same_size_bitwise",
        "unsharded_state_loads_into_partition",
        "zero_d_dtensor_loads_unsharded_state",
    ],
)
def test_every_rank_agrees_with_the_unsharded_ema(trained, key):
    n, _, res = trained
    assert [r[key] for r in res] == [True] * n


@pytest.mark.slow
def test_each_element_is_held_once_and_ranks_are_balanced(trained):
    n, _, res = trained
    total = res[0]["elements_total"]
    assert res[0]["elements_held_partition"] == total  # no element on two ranks
    assert res[0]["elements_held_fsdp"] == total
    # torch.chunk rows: a rank holds at most ceil(rows / n) rows of each tensor.
    per_rank = [r["rank_shadow_elements"] for r in res]
    assert sum(per_rank) == total
    bound = sum(-(-p.shape[0] // n) * (p.numel() // p.shape[0]) for p in _make().parameters())
    assert max(per_rank) <= bound


@pytest.mark.slow
def test_ema_made_before_fully_shard_raises(trained):
    _, _, res = trained
    for r in res:
        assert "no longer the one this EMA tracks" in r["ema_before_fully_shard"]
        assert "'0.weight'" in r["ema_before_fully_shard"]


def _stores(out: Path) -> dict[str, SnapshotStore]:
    return {k: SnapshotStore(str(out / k)) for k in ("fsdp", "partition", "plain")}


@pytest.mark.slow
def test_sharded_snapshots_equal_single_file_ones(trained):
    n, out, _ = trained
    stores = _stores(out)
    assert stores["fsdp"].leftovers() == []  # every shard belongs to a listed snapshot
    plain = stores["plain"].list()
    assert len(plain) == 8  # 4 saves x 2 stds
    for kind in ("fsdp", "partition"):
        infos = stores[kind].list()
        assert [(i.t, i.std) for i in infos] == [(i.t, i.std) for i in plain]
        for i, p in zip(infos, plain, strict=True):
            assert len(i.shards) == n  # every rank held rows of some tensor
            assert i.header.tensors == p.header.tensors
            assert i.layout == p.layout
            a, b = stores[kind].load(i), stores["plain"].load(p)
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_reconstruction_from_shards_is_byte_identical_and_loads_strict(trained, tmp_path):
    _, out, _ = trained
    stores = _stores(out)
    made = {
        kind: reconstruct(stores[kind], [0.07, 0.09], str(tmp_path / kind), threads=1)
        for kind in stores
    }
    for j in range(2):
        ref = Path(made["plain"][j].path).read_bytes()
        for kind in ("fsdp", "partition"):
            assert Path(made[kind][j].path).read_bytes() == ref
    _make().load_state_dict(load_file(made["fsdp"][0].path), strict=True)


@pytest.mark.slow
def test_a_missing_foreign_or_altered_shard_is_named(trained, tmp_path):
    _, out, _ = trained
    root = tmp_path / "copy"
    shutil.copytree(out / "fsdp", root)
    store = SnapshotStore(str(root))
    first, second = store.list()[:2]
    victim = root / first.shards[1].name
    saved = victim.read_bytes()
    victim.unlink()
    # The first snapshot's own profile: it alone is read.
    target = {"stds": [first.std], "at": first.t}
    with pytest.raises(StorageError, match=rf"shard .*{victim.name} is missing"):
        reconstruct(store, out=str(tmp_path / "o1"), **target)
    with pytest.raises(StorageError, match="is missing"):
        store.load(first)
    shutil.copy(root / second.shards[1].name, victim)  # a shard of another snapshot
    with pytest.raises(StorageError, match=rf"{victim.name} belongs to another snapshot"):
        reconstruct(store, out=str(tmp_path / "o2"), **target)
    shutil.copy(root / first.shards[0].name, victim)  # rank 0's shard in rank 1's place
    with pytest.raises(StorageError, match=rf"{victim.name} differs from what its manifest"):
        reconstruct(store, out=str(tmp_path / "o3"), **target)
    victim.write_bytes(saved[:-1])  # truncated
    with pytest.raises(StorageError, match=rf"{victim.name} cannot be read: .*truncated"):
        reconstruct(store, out=str(tmp_path / "o4"), **target)
    victim.write_bytes(saved)
    reconstruct(store, out=str(tmp_path / "o5"), **target)  # restored: reads again
    for k in range(1, 5):  # nothing was written by the refused passes
        assert not (tmp_path / f"o{k}").exists() or not any((tmp_path / f"o{k}").iterdir())


@pytest.mark.slow
def test_dcp_state_of_2_ranks_resumes_on_4_bitwise(tmp_path):
    torchrun("train", tmp_path, 2)
    torchrun("resume", tmp_path, 4)
    for r in results(tmp_path, "resume", 4):
        assert r["t"] == r["saved_t"] == 100.0
        assert r["fsdp_bitwise"] is True
        assert r["partition_bitwise"] is True


@pytest.mark.slow
def test_a_rank_killed_mid_snapshot_leaves_nothing_listed(tmp_path):
    done = torchrun("kill", tmp_path, 2, check=False)
    assert done.returncode != 0
    store = SnapshotStore(str(tmp_path / "killed"))
    assert store.list() == []
    files = sorted(str(p) for p in (tmp_path / "killed").rglob("*") if p.is_file())
    # Rank 0's shards only (it went on to the next profile once the gather failed).
    assert files
    assert all(f.endswith("-00000.safetensors") and "/shards/" in f for f in files)
    assert store.leftovers() == files  # what `phema clean` removes
    assert store.leftovers(older_than=3600.0) == []  # a writer may still be at work


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["s3", "hf"])
def test_ranks_write_shards_to_s3_and_the_hub(backend, request, tmp_path):
    if backend == "s3":
        url = request.getfixturevalue("s3_bucket") + "/run"
        env = {"FSSPEC_S3_ENDPOINT_URL": request.getfixturevalue("s3_endpoint")}
    else:
        url = request.getfixturevalue("hub_repo")
        hub = request.getfixturevalue("fake_hub")
        env = {"FSSPEC_HF_ENDPOINT": hub.endpoint, "FSSPEC_HF_TOKEN": "hf_phema_fake"}
    torchrun("remote", tmp_path, 2, env={**env, "PHEMA_REMOTE_URL": url})
    remote, local = SnapshotStore(url), SnapshotStore(str(tmp_path / "plain"))
    got, want = remote.list(), local.list()
    assert [(i.t, i.std, len(i.shards)) for i in got] == [(i.t, i.std, 2) for i in want]
    for i, j in zip(got, want, strict=True):
        a, b = remote.load(i), local.load(j)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "fsdp"])
def test_reconstruction_by_n_processes_equals_one_and_splits_the_reads(trained, kind, tmp_path):
    n, out, _ = trained
    src = str(out / kind)
    one = reconstruct(src, [0.07, 0.09], str(tmp_path / "one"), window_bytes=64, threads=1)
    torchrun("reconstruct", tmp_path, n, env={"PHEMA_SRC": src})
    res = results(tmp_path, "reconstruct", n)
    for j, ref in enumerate(one):  # the same files, byte for byte
        assert Path(res[0]["urls"][j]).read_bytes() == Path(ref.path).read_bytes()
    plan_bytes = plan(SnapshotStore(src), [0.07, 0.09]).bytes_to_read  # the inputs used
    read = [r["bytes_read"] for r in res]
    assert sum(read) == plan_bytes  # every byte of them once, over all ranks
    # Each rank reads the windows starting in its 1/n of the data: at most 1/n of the
    # bytes plus one window (64 bytes) per snapshot.
    per_snapshot_extra = 64 * len(SnapshotStore(src).list())
    assert max(read) <= plan_bytes // n + per_snapshot_extra
    assert not list((tmp_path / "parallel").rglob("*.part"))  # parts removed
    assert sorted(p.name for p in (tmp_path / "parallel").iterdir()) == sorted(
        Path(r.path).name for r in one
    )
    before = {p: p.read_bytes() for p in (tmp_path / "parallel").iterdir()}
    again = torchrun("reconstruct", tmp_path, n, env={"PHEMA_SRC": src}, check=False)
    assert again.returncode != 0
    assert "exists; pass overwrite=True" in again.stderr
    assert {p: p.read_bytes() for p in (tmp_path / "parallel").iterdir()} == before


@pytest.mark.slow
def test_phema_reconstruct_under_torchrun(trained, tmp_path):
    n, out, _ = trained
    phema_cli = shutil.which("phema")
    assert phema_cli is not None
    args = ["reconstruct", str(out / "partition"), "--std", "0.08", "--out", str(tmp_path / "o")]
    done = run_torchrun([phema_cli, *args, "--json"], n)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 1  # rank 0 reports
    single = reconstruct(str(out / "plain"), [0.08], str(tmp_path / "single"), threads=1)
    assert Path(rows[0]["url"]).read_bytes() == Path(single[0].path).read_bytes()


@pytest.mark.slow
def test_reconstruction_by_2_processes_into_s3(trained, s3_bucket, s3_endpoint, tmp_path):
    n, out, _ = trained
    src = str(out / "fsdp")
    one = reconstruct(src, [0.07, 0.09], str(tmp_path / "one"), window_bytes=64, threads=1)
    url = f"{s3_bucket}/ema"
    env = {"PHEMA_SRC": src, "PHEMA_OUT": url, "FSSPEC_S3_ENDPOINT_URL": s3_endpoint}
    torchrun("reconstruct", tmp_path, n, env=env)
    store = SnapshotStore(url)
    assert store.fs.find(store.root) == sorted(store.path_of(Path(r.path).name) for r in one)
    for ref in one:  # the same bytes; the parts are gone
        name = Path(ref.path).name
        assert store.fs.cat_file(store.path_of(name)) == Path(ref.path).read_bytes()


@pytest.mark.slow
def test_a_rank_that_cannot_plan_stops_every_rank_at_once(trained, tmp_path):
    n, out, _ = trained
    env = {"PHEMA_SRC": str(out / "plain"), "PHEMA_SRC_RANK1": str(tmp_path / "missing")}
    # Without the shared check the other ranks would wait in a collective for 30 minutes.
    done = torchrun("reconstruct", tmp_path, n, env=env, check=False, timeout=120)
    assert done.returncode != 0
    assert "parallel reconstruction stopped: rank 1: StorageError" in done.stderr
    assert "missing does not exist" in done.stderr
    assert not (tmp_path / "parallel").exists()


@pytest.mark.slow
def test_sharded_outputs_list_as_reconstructions_and_load_whole(trained, tmp_path):
    n, out, _ = trained
    src = str(out / "partition")
    one = reconstruct(src, [0.07, 0.09], str(tmp_path / "one"), window_bytes=64, threads=1)
    env = {"PHEMA_SRC": src, "PHEMA_SHARDED_OUT": "1"}
    torchrun("reconstruct", tmp_path, n, env=env)
    store = SnapshotStore(str(tmp_path / "parallel"))
    assert store.list() == []  # outputs, not snapshots
    outputs = store.reconstructions()
    assert [(r.t, r.std) for r in outputs] == [(100.0, 0.07), (100.0, 0.09)]
    for info, ref in zip(outputs, one, strict=True):
        assert len(info.shards) == n  # each rank's windows, one shard each
        assert info.coefficients == ref.coefficients
        got, want = store.load(info), load_file(ref.path)
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
    _make().load_state_dict(store.load(outputs[0]), strict=True)
    assert store.leftovers() == []  # every shard belongs to a listed output
    ls = subprocess.run(
        [shutil.which("phema") or "phema", "ls", "--json", str(tmp_path / "parallel")],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [json.loads(line) for line in ls.stdout.splitlines()]
    assert [(r["kind"], r["shards"]) for r in rows] == [("reconstruction", n)] * 2


def test_sharded_outputs_need_ranks(tmp_path):
    from phema import OptionError, PowerFunctionEMA, SnapshotWriter

    net = torch.nn.Linear(3, 2)
    ema = PowerFunctionEMA(net, stds=(0.05, 0.1))
    with SnapshotWriter(str(tmp_path / "s")) as writer:
        for t in (1.0, 2.0, 4.0, 8.0):
            ema.update(t)
            writer.save(ema)
    with pytest.raises(OptionError, match="pass parallel=True"):
        reconstruct(str(tmp_path / "s"), [0.08], str(tmp_path / "o"), sharded=True)
    assert not (tmp_path / "o").exists()
