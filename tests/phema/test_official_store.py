"""Folders of official EDM2 snapshot pickles as stores: ls, plan, reconstruct and load in place.

The pickles are written in the official structure by ``tests/official_pickles.py`` around an
``edm2_reference`` Precond (fp16, random weights, distinct per file); the oracle for every
reconstruction is the same reconstruction from those tensors after ``phema convert`` put them in
a phema store, which must agree bitwise. Remote folders: HTTP from a local range-capable server
(``tests/rangeserver.py``) whose log shows each tensor byte read once; S3 (moto) and the fake Hub.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sys
import warnings

import fsspec
import pytest
import torch

import phema
from edm2_reference.network import Precond
from edm2_reference.official import precond_kwargs
from phema.convert import convert
from phema.errors import ChangedError, FormatError, StorageError

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from clirun import run_cli
from official_pickles import DIGITS8_KWARGS, official_snapshot
from rangeserver import serve

KWARGS = DIGITS8_KWARGS
KIMGS = (0, 1024, 2048, 3072, 4096)
STDS = ("0.050", "0.100")
TARGETS = [0.04, 0.07, 0.12]
BUFFERS = {
    "unet.emb_fourier.freqs",
    "unet.emb_fourier.phases",
    "logvar_fourier.freqs",
    "logvar_fourier.phases",
}

pytestmark = pytest.mark.filterwarnings("ignore::phema.errors.IllPosedWarning")


def _net(seed: int) -> Precond:
    torch.manual_seed(seed)
    net = Precond(**precond_kwargs(KWARGS))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for b in net.buffers():  # the buffers too differ per file: copied, not averaged
            b.add_(0.01 * seed)
    return net.half()


@pytest.fixture(scope="module")
def official_run(tmp_path_factory):
    """A folder of official pickles (and other files a run folder holds); the nets by name."""
    root = tmp_path_factory.mktemp("official") / "run"
    root.mkdir()
    nets = {}
    for i, kimg in enumerate(KIMGS):
        for j, std in enumerate(STDS):
            net = _net(10 * i + j)
            name = f"network-snapshot-{kimg:07d}-{std}.pkl"
            (root / name).write_bytes(official_snapshot(net, KWARGS))
            nets[name] = net.state_dict()
    (root / "log.txt").write_text("not a snapshot\n")
    (root / "training-state-0004096.pt").write_bytes(b"not a snapshot either")
    return root, nets


@pytest.fixture(scope="module")
def oracle(official_run, tmp_path_factory):
    """The reconstructions of TARGETS from the same tensors converted into a phema store."""
    root, _ = official_run
    base = tmp_path_factory.mktemp("oracle")
    convert(str(root), str(base / "store"))
    phema.reconstruct(str(base / "store"), TARGETS, str(base / "out"))
    out = phema.SnapshotStore(str(base / "out"))
    return {r.std: out.load(r) for r in out.reconstructions()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(
            a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)
        ), k


def _outputs(url: str) -> dict[float, dict[str, torch.Tensor]]:
    store = phema.SnapshotStore(url)
    return {r.std: store.load(r) for r in store.reconstructions()}


def test_a_folder_of_pickles_lists_as_a_store(official_run):
    root, nets = official_run
    infos = phema.SnapshotStore(str(root)).list()
    assert [os.path.basename(i.url) for i in infos] == sorted(
        nets, key=lambda n: (int(n.split("-")[2]), n)
    )
    for info in infos:
        kimg, std = info.url.rsplit("/", 1)[1][len("network-snapshot-") : -4].split("-")
        assert info.t == (int(kimg) * 1000 + 999) // 1024 * 1024  # the official kimg rule
        assert info.std == float(std)
        assert info.gamma == float(phema.sigma_rel_to_gamma(float(std)))
        assert (info.t_unit, info.step) == ("images", None)
        assert set(info.copied) == BUFFERS  # the official EMA copies buffers
        assert info.size == os.path.getsize(info.path)
        # indexing reads the pickle structure only: under 5% of even this tiny net's file
        assert 0 < info.index_bytes < 0.05 * info.size
    assert len({i.layout for i in infos}) == 1


def test_loading_a_pickle_gives_its_tensors_bitwise(official_run):
    root, nets = official_run
    store = phema.SnapshotStore(str(root))
    for info in store.list():
        _same(store.load(info), nets[os.path.basename(info.path)])


def test_reconstruction_from_pickles_equals_reconstruction_from_a_phema_store(
    official_run, oracle, tmp_path
):
    root, nets = official_run
    phema.reconstruct(str(root), TARGETS, str(tmp_path / "out"))
    outputs = _outputs(str(tmp_path / "out"))
    assert sorted(outputs) == sorted(oracle)
    last = nets[f"network-snapshot-{KIMGS[-1]:07d}-0.050.pkl"]
    for std, tensors in outputs.items():
        _same(tensors, oracle[std])
        for name in BUFFERS:  # copied from the latest input, not averaged
            assert torch.equal(tensors[name], last[name].float()), name
        net = Precond(**precond_kwargs(KWARGS))
        net.load_state_dict(tensors, strict=True)  # the official state_dict names


def test_http_folder_reads_each_tensor_byte_once(official_run, oracle, tmp_path):
    root, _ = official_run
    with serve(str(root)) as (url, log):
        store = phema.SnapshotStore(url + "/")
        infos = store.list()
        listed = log.bytes_sent()
        assert listed == sum(i.index_bytes for i in infos)  # what the index reports
        assert listed < 0.05 * sum(i.size for i in infos)
        the_plan = phema.plan(store, TARGETS)
        assert log.bytes_sent() == listed  # planning reuses the indexes
        before = len(log.gets)
        phema.write_plan(the_plan, store, str(tmp_path / "out"))
        pass_gets = log.gets[before:]
    outputs = _outputs(str(tmp_path / "out"))
    for std, tensors in outputs.items():
        _same(tensors, oracle[std])
    # every tensor byte of every input read exactly once, nothing else
    assert sum(e - s for _, s, e in pass_gets) == the_plan.bytes_to_read
    by_file: dict[str, list[tuple[int, int]]] = {}
    for path, s, e in pass_gets:
        by_file.setdefault(path.rsplit("/", 1)[1], []).append((s, e))
    assert sorted(by_file) == sorted(os.path.basename(i.path) for i in the_plan.inputs)
    for info in the_plan.inputs:
        ranges = sorted(by_file[os.path.basename(info.path)])
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(ranges))  # no overlap
        covered = sum(e - s for s, e in ranges)
        tensors = sorted((seg.at, seg.at + seg.stop - seg.start) for seg in info.segments)
        assert covered == sum(e - s for s, e in tensors) == info.header.data_bytes
        for s, e in ranges:  # each read lies inside one tensor's bytes
            assert any(ts <= s and e <= te for ts, te in tensors), (s, e)


def test_http_server_without_ranges_is_refused_by_name(official_run, tmp_path):
    root, _ = official_run
    with (
        serve(str(root), ranges=False) as (url, _),
        pytest.raises(StorageError, match="Range requests") as info,
    ):
        phema.SnapshotStore(url + "/").list()
    assert "network-snapshot-" in str(info.value)


def test_http_stores_are_read_only(official_run):
    root, _ = official_run
    with serve(str(root)) as (url, _), pytest.raises(StorageError, match="read-only"):
        phema.reconstruct(url + "/", [0.07], url + "/out")


def test_a_pickle_that_changes_after_listing_is_not_mixed_in(official_run, tmp_path):
    root, _ = official_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    store = phema.SnapshotStore(str(run))
    the_plan = phema.plan(store, [0.07])
    victim = the_plan.inputs[-1].path
    data = open(victim, "rb").read()  # noqa: SIM115
    os.unlink(victim)  # replaced by another writer: a new file of the same size
    with open(victim, "wb") as f:
        f.write(data)
    with pytest.raises(ChangedError, match="changed after it was listed"):
        phema.write_plan(the_plan, store, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out") or not os.listdir(tmp_path / "out")


def test_a_hostile_pickle_is_named_and_nothing_runs(official_run, tmp_path, capsys):
    root, _ = official_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    marker = tmp_path / "pwned"
    bad = run / "network-snapshot-0005120-0.050.pkl"
    # REDUCE of os.system: a plain pickle gadget (protocol 2 opcodes)
    bad.write_bytes(
        b"\x80\x02cos\nsystem\nq\x00X"
        + len(f"touch {marker}").to_bytes(4, "little")
        + f"touch {marker}".encode()
        + b"q\x01\x85q\x02Rq\x03."
    )
    with pytest.raises(FormatError, match=r"os\.system"):
        phema.plan(phema.SnapshotStore(str(run)), [0.07])
    code, _, err = run_cli(capsys, "ls", run)
    assert code == 1
    assert any("network-snapshot-0005120-0.050.pkl" in e and "os.system" in e for e in err), err
    assert not marker.exists()


def test_official_tool_outputs_load_but_are_not_listed(official_run, tmp_path):
    root, nets = official_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    src = run / f"network-snapshot-{KIMGS[-1]:07d}-0.100.pkl"
    out = run / f"phema-{KIMGS[-1]:07d}-0.070.pkl"  # the official tool's output name
    shutil.copy(src, out)
    infos = phema.SnapshotStore(str(run)).list()
    assert out.name not in {os.path.basename(i.path) for i in infos}
    net = Precond(**precond_kwargs(KWARGS)).half()
    tensors = phema.load(str(out), net)
    _same(tensors, nets[src.name])
    _same(net.state_dict(), nets[src.name])


def test_cli_ls_plan_reconstruct_on_pickles(official_run, oracle, tmp_path, capsys):
    root, _ = official_run
    code, out, err = run_cli(capsys, "ls", root)
    assert code == 0
    assert "network-snapshot-0004096-0.100.pkl" in out
    assert any("10 official EDM2 pickle(s), indexed without running anything" in e for e in err)
    code, out, _ = run_cli(capsys, "ls", root, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0
    assert len(rows) == 10
    assert all(r["t_unit"] == "images" and r["index_bytes"] for r in rows)
    stds = ",".join(map(str, TARGETS))
    code, _, err = run_cli(capsys, "reconstruct", root, "--std", stds, "--out", tmp_path / "out")
    assert code == 0, err
    for std, tensors in _outputs(str(tmp_path / "out")).items():
        _same(tensors, oracle[std])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["s3", "hf"])
def test_remote_folders_of_pickles(official_run, oracle, request, tmp_path, kind):
    root, nets = official_run
    if kind == "s3":
        url = request.getfixturevalue("s3_bucket") + "/run"
        fs, path = fsspec.core.url_to_fs(url, skip_instance_cache=True)
        for name in sorted(os.listdir(root)):
            fs.pipe_file(f"{path}/{name}", (root / name).read_bytes())
    else:
        url = request.getfixturevalue("hub_repo")
        store = phema.SnapshotStore(url)
        for name in sorted(os.listdir(root)):
            store.write(name, (root / name).read_bytes())
        store.flush()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", phema.errors.IllPosedWarning)
        phema.reconstruct(url, TARGETS, str(tmp_path / "out"))
    for std, tensors in _outputs(str(tmp_path / "out")).items():
        _same(tensors, oracle[std])
    if kind == "hf":  # a listed pickle reads as listed after a commit replaces it
        store = phema.SnapshotStore(url)
        info = store.list()[-1]
        name = os.path.basename(info.path)
        store.write(
            name, (root / "network-snapshot-0001024-0.050.pkl").read_bytes(), overwrite=True
        )
        store.flush()
        _same(store.load(info), nets[name])


# -- hostile or broken servers and files (each found in review) --------------------------------
@pytest.mark.parametrize(
    ("faults", "match"),
    [
        ({"shift": True}, "answered Content-Range 'bytes 0-"),
        ({"gzip": True}, "gzip-encoded"),
        ({"get_status": {"network-snapshot-0002048-0.050.pkl": 500}}, "HTTP 500"),
    ],
)
def test_http_wrong_or_failed_reads_are_storage_errors(official_run, tmp_path, faults, match):
    root, _ = official_run
    live: dict[str, object] = {}
    with serve(str(root), faults=live) as (url, _):
        store = phema.SnapshotStore(url + "/")
        the_plan = phema.plan(store, [0.07])
        live.update(faults)  # after listing: the pass's reads go wrong
        with pytest.raises(StorageError, match=match):
            phema.write_plan(the_plan, store, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_http_file_the_server_fails_to_describe_is_not_left_out(official_run):
    root, _ = official_run
    faults = {"head_status": {"network-snapshot-0002048-0.050.pkl": 500}}
    with (
        serve(str(root), faults=faults) as (url, _),
        pytest.raises(StorageError, match=r"0002048-0\.050\.pkl: HEAD answered HTTP 500"),
    ):
        phema.SnapshotStore(url + "/").list()


def test_http_links_into_other_folders_are_not_listed(official_run, tmp_path):
    root, _ = official_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    (run / "sub").mkdir()
    name = "network-snapshot-0004096-0.050.pkl"
    shutil.copy(run / name, run / "sub" / name)
    page = f'<a href="sub/{name}">a</a> <a href="../x/{name}">b</a> <a href="{name}">c</a>'
    with serve(str(run), faults={"listing": page}) as (url, _):
        infos = phema.SnapshotStore(url + "/").list()
    assert [i.url.rsplit("/", 2)[1:] for i in infos] == [[url.rsplit("/", 1)[1], name]]


def test_tensors_sharing_bytes_are_refused(tmp_path):
    """A tiny file whose tensor records all view one storage would claim far more data."""
    import collections
    import pickle

    from official_pickles import Persistent, official_modules

    with warnings.catch_warnings():  # a typed storage pickles as official files hold them
        warnings.simplefilter("ignore", UserWarning)
        storage = torch.zeros(1 << 16, dtype=torch.float16).storage()

    class View:
        def __reduce__(self):
            args = (storage, 0, (1 << 16,), (1,), False, collections.OrderedDict())
            return torch._utils._rebuild_tensor_v2, args

    with official_modules():
        state = {
            "_parameters": collections.OrderedDict((f"w{i}", View()) for i in range(100)),
            "_buffers": collections.OrderedDict(),
            "_modules": collections.OrderedDict(),
            "_init_args": (),
            "_init_kwargs": {},
        }
        blob = pickle.dumps({"ema": Persistent("Precond", state)}, protocol=4)
    path = tmp_path / "network-snapshot-0001024-0.100.pkl"
    path.write_bytes(blob)
    assert len(blob) < 200_000  # 100 x 128 KiB claimed
    with pytest.raises(FormatError, match="tensors w0 and w1 share bytes"):
        phema.SnapshotStore(str(tmp_path)).list()


def test_two_files_of_one_profile_are_named(official_run, tmp_path):
    root, _ = official_run
    run = tmp_path / "run"
    shutil.copytree(root, run)
    shutil.copy(
        run / "network-snapshot-0004096-0.100.pkl", run / "network-snapshot-004096-0.100.pkl"
    )
    with pytest.raises(FormatError, match=r"network-snapshot-004096-0\.100\.pkl and .*one profile"):
        phema.plan(phema.SnapshotStore(str(run)), [0.07])
