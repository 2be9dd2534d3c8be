"""Storage integrity: nothing lost or overwritten under concurrency, collisions and crashes.

Real concurrency, not mocks: threads and processes writing to moto S3 (on 127.0.0.1)
and local disk at once, beside the user's own fsspec writes; processes racing for one
name; reconstructions racing for one output folder; a writer killed in the middle of a
group and resumed; a publish that fails at the k-th output; a snapshot replaced
between plan and read. Each test says what "nothing lost" means for it.
"""

import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid

import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from phema import (
    OptionError,
    PowerFunctionEMA,
    SnapshotStore,
    SnapshotWriter,
    StorageError,
)
from phema.errors import ChangedError, ExistsError
from phema.format import serialize
from phema.reconstruct import plan, reconstruct, write_plan
from phema.store import snapshot_metadata, snapshot_name

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _snapshot_bytes(seed, t=64.0, std=0.05, n=300):
    """A valid snapshot file's bytes, different for each seed."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"w": torch.randn(n, generator=g)}
    meta = snapshot_metadata(tensors, t=t, std=std, gamma=16.97, t_unit="steps", step=None)
    return serialize(tensors, meta)


def _ema(seed=0, stds=(0.05, 0.10), steps=3):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 2))
    ema = PowerFunctionEMA(net, stds=stds)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ema.update(step * 64)
    return net, ema


def _s3_env(endpoint):
    env = dict(os.environ)
    env["FSSPEC_S3_ENDPOINT_URL"] = endpoint
    env["PYTHONPATH"] = REPO
    return env


def _base_and_env(backend, tmp_path, request):
    """A base URL on ``backend`` ("file" or "s3") and the environment a child needs for it."""
    if backend == "s3":
        return request.getfixturevalue("s3_bucket"), _s3_env(request.getfixturevalue("s3_endpoint"))
    return str(tmp_path), dict(os.environ, PYTHONPATH=REPO)


def _uploads(store):
    bucket = store.root.split("/", 1)[0]
    return store.fs.list_multipart_uploads(bucket)


# -- names --------------------------------------------------------------------------


_positive = st.floats(min_value=1e-300, max_value=1e300, allow_nan=False, allow_infinity=False)


@given(t=st.one_of(_positive, st.integers(0, 10**15).map(float)), std=_positive)
def test_snapshot_names_read_back_exactly(t, std):
    # Injective because each name reads back as exactly its (t, std).
    name = snapshot_name(t, std)
    assert name.startswith("phema-")
    assert name.endswith(".safetensors")
    t_token, std_token = name.removeprefix("phema-").removesuffix(".safetensors").split("-")
    assert float(t_token) == t
    assert float(std_token) == std


@given(a=st.tuples(_positive, _positive), b=st.tuples(_positive, _positive))
def test_different_snapshots_never_share_a_name(a, b):
    assert (snapshot_name(*a) == snapshot_name(*b)) == (a == b)


def test_names_keep_their_readable_form_and_separate_close_values():
    assert snapshot_name(4096, 0.05) == "phema-000000004096-0.0500.safetensors"
    assert snapshot_name(4096, 0.10004) == "phema-000000004096-0.10004.safetensors"
    assert snapshot_name(1.0000000001, 0.1) != snapshot_name(1.0000000002, 0.1)
    assert snapshot_name(1e-05, 1e-05) == "phema-0.00001-0.00001.safetensors"
    for bad in (math.nan, math.inf, -1.0):
        with pytest.raises(ValueError, match="finite and >= 0"):
            snapshot_name(bad, 0.05)


def test_close_stds_are_separate_files_for_the_writer_and_reconstruct(store_root):
    # Nothing lost: every profile of every save is its own file, and both outputs exist.
    url = f"{store_root}/run"
    _, ema = _ema(stds=(0.1, 0.10004))
    with SnapshotWriter(url) as writer:
        writer.save(ema)
        ema.update(ema.t + 64)
        writer.save(ema)
    infos = SnapshotStore(url).list()
    assert sorted((i.t, i.std) for i in infos) == [
        (192.0, 0.1),
        (192.0, 0.10004),
        (256.0, 0.1),
        (256.0, 0.10004),
    ]
    results = reconstruct(url, [0.1, 0.10004], f"{store_root}/out")
    assert len({r.path for r in results}) == 2
    outputs = SnapshotStore(f"{store_root}/out").reconstructions()
    assert sorted(o.std for o in outputs) == [0.1, 0.10004]


# -- dtypes -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.bool])
def test_integer_storage_dtypes_are_refused_up_front(tmp_path, dtype):
    with pytest.raises(OptionError, match=r"dtype=torch\.\w+ cannot store averaged weights"):
        SnapshotWriter(str(tmp_path / "run"), dtype=dtype)
    _, ema = _ema()
    with SnapshotWriter(str(tmp_path / "run")) as writer:
        writer.save(ema)
    with pytest.raises(OptionError, match=r"use one of torch\.float64"):
        reconstruct(str(tmp_path / "run"), [0.07], str(tmp_path / "out"), dtype=dtype)
    assert not (tmp_path / "out").exists()  # refused before anything was written


# -- concurrency ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_writers_in_threads_beside_user_fsspec_writes(backend, tmp_path, request):
    # Four SnapshotWriters (a GAN's two nets, twice) and the user's own fsspec writes to
    # the same bucket or folder, all at once. Nothing lost: every file a writer reports
    # is there with the bytes of that snapshot, every user write succeeds with its bytes,
    # and no multipart upload or temporary file is left.
    import fsspec

    base = request.getfixturevalue("s3_bucket") if backend == "s3" else str(tmp_path)
    errors, emas, written = [], {}, {}

    def train(k):
        try:
            _, ema = _ema(seed=k)
            emas[k] = []
            with SnapshotWriter(f"{base}/net{k}") as writer:
                for _ in range(5):
                    ema.update(ema.t + 64)
                    emas[k].append({s: ema.profile_state_dict(s) for s in ema.stds})
                    writer.save(ema)
            written[k] = writer.written
        except BaseException as exc:
            errors.append(exc)

    def user():
        try:
            for i in range(30):
                with fsspec.open(f"{base}/user/file{i}.txt", "wb", auto_mkdir=True) as f:
                    f.write(f"user data {i}".encode() * 1000)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=train, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=user))
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    fs, _ = fsspec.url_to_fs(base, skip_instance_cache=True)
    for i in range(30):
        assert fs.cat_file(f"{base}/user/file{i}.txt") == f"user data {i}".encode() * 1000
    for k in range(4):
        store = SnapshotStore(f"{base}/net{k}")
        infos = store.list()
        assert sorted(i.path for i in infos) == sorted(written[k])
        assert len(infos) == 10
        for info in infos:
            saved = emas[k][round(info.t / 64) - 4][info.std]
            loaded = store.load(info)
            assert all(torch.equal(loaded[n], saved[n]) for n in saved)
        if backend == "file":
            assert store.leftovers() == []
    if backend == "s3":
        assert _uploads(SnapshotStore(f"{base}/net0")) == []


_PROC_WRITER = textwrap.dedent(
    """
    import os, sys, time
    import s3fs
    from phema.store import SnapshotStore
    sys.path.insert(0, sys.argv[4])

    def widen(publish):  # hold every racer inside its publish step at the same time
        def slow(*args, **kwargs):
            time.sleep(0.5)
            return publish(*args, **kwargs)
        return slow

    os.link, os.replace = widen(os.link), widen(os.replace)
    s3fs.core.S3File.commit = widen(s3fs.core.S3File.commit)
    from test_store_integrity import _snapshot_bytes
    url, name, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    start_at = float(sys.argv[5])
    store = SnapshotStore(url)
    data = _snapshot_bytes(seed)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        store.write(name, data)
    except FileExistsError as exc:
        print("LOST", type(exc).__name__, exc, flush=True)
    else:
        print("WON", flush=True)
    """
)


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_processes_racing_for_one_name_exactly_one_wins(backend, tmp_path, request):
    # Nothing lost or overwritten: exactly one process reports success, the file holds
    # that process's bytes, the others get a clear error naming the file. The racers
    # start together and each waits 0.5 s right before its publishing call (link,
    # rename or S3 completion), so all of them are past any existence check at once: a
    # check-then-replace publish fails this test (verified), a no-replace one cannot.
    here = os.path.dirname(os.path.abspath(__file__))
    base, env = _base_and_env(backend, tmp_path, request)
    url = f"{base}/run"
    for trial in range(2):
        name = f"phema-{trial:012d}-0.0500.safetensors"
        start_at = time.time() + 4.0  # after every process has imported torch
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _PROC_WRITER, url, name, str(seed), here, str(start_at)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
            for seed in range(4)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
        winners = [seed for seed, (out, _) in enumerate(outs) if out.startswith("WON")]
        assert len(winners) == 1, [o[0] for o in outs]
        for out, _ in outs:
            if out.startswith("LOST"):
                assert f"{name} exists; it is never overwritten" in out
        store = SnapshotStore(url)
        assert store.fs.cat_file(store.path_of(name)) == _snapshot_bytes(winners[0])
    if backend == "file":
        assert not [n for n in os.listdir(url) if n.startswith(".")]  # no temp file left
    else:
        assert _uploads(SnapshotStore(url)) == []


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_processes_writing_one_store_at_once_lose_nothing(backend, tmp_path, request):
    # Three processes each write 6 snapshots (distinct names) into one store at once,
    # each interleaving its own fsspec writes beside them. Nothing lost: all 18
    # snapshots and all 18 user files are there with their bytes.
    import fsspec

    base, env = _base_and_env(backend, tmp_path, request)
    url = f"{base}/run"
    script = textwrap.dedent(
        """
        import sys
        import fsspec
        from phema.store import SnapshotStore
        sys.path.insert(0, sys.argv[4])
        from test_store_integrity import _snapshot_bytes
        store, k, base = SnapshotStore(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
        for i in range(6):
            n = 100 * k + i
            store.write(f"phema-{n:012d}-0.0500.safetensors", _snapshot_bytes(n))
            with fsspec.open(f"{base}/user/{n}.txt", "wb", auto_mkdir=True) as f:
                f.write(str(n).encode() * 500)
        """
    )
    here = os.path.dirname(os.path.abspath(__file__))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, url, str(k), base, here],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(3)
    ]
    for p in procs:
        assert p.wait(timeout=180) == 0, p.stderr.read()
    store = SnapshotStore(url)
    fs, _ = fsspec.url_to_fs(base, skip_instance_cache=True)
    for k in range(3):
        for i in range(6):
            n = 100 * k + i
            name = f"phema-{n:012d}-0.0500.safetensors"
            assert store.backend.read_all(store.path_of(name)) == _snapshot_bytes(n)
            assert fs.cat_file(f"{base}/user/{n}.txt") == str(n).encode() * 500
    assert len(store.list()) == 18


def test_reconstructions_racing_for_one_out_folder(tmp_path):
    # Two `phema reconstruct` runs to one --out without --overwrite: exactly one exits 0;
    # the other exits 1 with a one-line error naming an output; the outputs are whole.
    run = str(tmp_path / "run")
    _, ema = _ema()
    with SnapshotWriter(run) as writer:
        for _ in range(6):
            ema.update(ema.t + 64)
            writer.save(ema)
    out = str(tmp_path / "out")
    phema_cli = [sys.executable, "-m", "phema_cli"]
    args = ["reconstruct", run, "--std", "0.06,0.07,0.08", "--out", out, "--window-mb", "0.001"]
    procs = [
        subprocess.Popen([*phema_cli, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read().decode()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    (loser,) = [err for code, err in results if code == 1]
    for word in ("error:", "exists", "--overwrite"):
        assert word in loser
    outputs = SnapshotStore(out).reconstructions()
    assert sorted(o.std for o in outputs) == [0.06, 0.07, 0.08]
    assert not [n for n in os.listdir(out) if n.startswith(".")]


# -- all-or-nothing outputs -------------------------------------------------------------


def _fail_second_publish(monkeypatch, backend):
    """Make the 2nd file of a multi-file publish fail, after the 1st is visible."""
    if type(backend).__name__ == "MemoryBackend":
        real = backend.fs.pipe_file
        calls = []

        def pipe_file(path, value, **kw):
            calls.append(path)
            if len(calls) == 2:
                raise OSError("injected: publishing output 2 failed")
            return real(path, value, **kw)

        monkeypatch.setattr(backend.fs, "pipe_file", pipe_file)
        return
    real_one = backend._publish_one
    calls = []

    def publish_one(s, overwrite):
        calls.append(s.name)
        if len(calls) == 2:
            raise OSError("injected: publishing output 2 failed")
        return real_one(s, overwrite)

    monkeypatch.setattr(backend, "_publish_one", publish_one)


@pytest.mark.parametrize("overwrite", [False, True])
def test_failing_kth_output_publishes_none_and_restores_replaced_ones(
    store_root, monkeypatch, overwrite
):
    # Nothing lost: after a failure at the 2nd of 3 outputs, the output folder holds
    # exactly what it held before (nothing, or the earlier outputs byte for byte, when
    # overwrite=True had replaced some), with no temporary file or upload left.
    run, out = f"{store_root}/run", f"{store_root}/out"
    _, ema = _ema()
    with SnapshotWriter(run) as writer:
        for _ in range(4):
            ema.update(ema.t + 64)
            writer.save(ema)
    stds = [0.06, 0.07, 0.08]
    out_store = SnapshotStore(out)
    before = {}
    if overwrite:
        # Earlier outputs of the same names (same t and stds) with other bytes (fp16).
        reconstruct(run, stds, out, dtype=torch.float16)
        before = _outputs(out)
        assert len(before) == 3
    if out_store.hub is not None:
        monkeypatch.setattr(out_store.hub, "commit", _failing_second_commit(out_store.hub.commit))
    else:
        _fail_second_publish(monkeypatch, out_store.backend)
    with pytest.raises(OSError, match="injected"):
        reconstruct(run, stds, out_store, overwrite=overwrite)
    monkeypatch.undo()
    assert _outputs(out) == before
    if out_store.is_local:
        assert not [n for n in os.listdir(out_store.root) if n.startswith(".")]
    if store_root.startswith("s3://"):
        assert _uploads(out_store) == []
        out_store.fs.invalidate_cache()
        left = out_store.fs.find(out_store.root)  # [] when nothing is under the prefix
        assert [p for p in left if "/." in p] == []  # no backup key left


def _outputs(url):
    """``{url: bytes}`` of every reconstruction in ``url`` ({} when the folder is absent)."""
    store = SnapshotStore(url)
    try:
        found = store.reconstructions()
    except StorageError as exc:
        if "does not exist" not in str(exc):
            raise
        return {}
    return {o.url: store.backend.read_all(o.path) for o in found}


def _failing_second_commit(commit):
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first commit publishes pending snapshots (none here)
            raise OSError("injected: the commit of the outputs failed")
        return commit(*args, **kwargs)

    return failing


# -- reads of a replaced snapshot -------------------------------------------------------


def test_snapshot_replaced_between_plan_and_read_is_refused(store_root):
    # Nothing mixed: a snapshot rewritten (same name, same size, other bytes) after the
    # plan was made fails the pass with an error naming it, and no output appears.
    run, out = f"{store_root}/run", f"{store_root}/out"
    _, ema = _ema()
    with SnapshotWriter(run) as writer:
        for _ in range(4):
            ema.update(ema.t + 64)
            writer.save(ema)
    src = SnapshotStore(run)
    the_plan = plan(src, [0.07])
    (reference,) = write_plan(the_plan, src, f"{store_root}/reference")
    victim = the_plan.inputs[0]
    data = bytearray(src.backend.read_all(victim.path))
    data[-4:] = bytes(4) if data[-4:] != bytes(4) else b"\x01\x00\x00\x00"
    src.write(os.path.basename(victim.path), bytes(data), overwrite=True)
    src.flush()
    assert len(data) == victim.size  # same size
    if src.hub is not None:
        # The Hub's listing pinned every read to the commit it saw: the pass reads the
        # planned version, not the new one, and gives the planned result.
        (res,) = write_plan(the_plan, src, out)
        assert src.backend.read_all(res.path) == src.backend.read_all(reference.path)
        return
    with pytest.raises(ChangedError, match=os.path.basename(victim.path)):
        write_plan(the_plan, src, out)
    assert _outputs(out) == {}


# -- crash and resume --------------------------------------------------------------------


_CRASHING_RUN = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[3])
    from test_store_integrity import _ema
    import phema.store
    from phema import SnapshotWriter
    url, crash_at = sys.argv[1], int(sys.argv[2])
    real, count = phema.store.SnapshotStore.write, [0]
    def write(self, name, data, **kw):
        if count[0] == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)  # killed between two files of one save
        count[0] += 1
        return real(self, name, data, **kw)
    phema.store.SnapshotStore.write = write
    _, ema = _ema(stds=(0.05, 0.10, 0.15))
    with SnapshotWriter(url) as writer:
        for _ in range(4):
            ema.update(ema.t + 64)
            writer.save(ema)
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_writer_killed_mid_group_resumes_and_loses_nothing(backend, tmp_path, request):
    # A run killed after 4 of the 12 files (in the middle of its 2nd save's 3 profiles)
    # is run again from the start (as a resume from a checkpoint would): the files it
    # already wrote are accepted as they are, the rest are written, and the store ends
    # equal, byte for byte, to an uninterrupted run's.
    here = os.path.dirname(os.path.abspath(__file__))
    base, env = _base_and_env(backend, tmp_path, request)
    url, clean = f"{base}/crashed", f"{base}/clean"

    def run(target, crash_at):
        return subprocess.run(
            [sys.executable, "-c", _CRASHING_RUN, target, str(crash_at), here],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    crashed = run(url, 4)
    assert crashed.returncode == -signal.SIGKILL
    assert len(SnapshotStore(url).list()) == 4  # one whole save and 1 file of the next
    resumed = run(url, -1)
    assert resumed.returncode == 0, resumed.stderr
    assert run(clean, -1).returncode == 0
    a, b = SnapshotStore(url), SnapshotStore(clean)
    files_a = {os.path.basename(i.path): a.backend.read_all(i.path) for i in a.list()}
    files_b = {os.path.basename(i.path): b.backend.read_all(i.path) for i in b.list()}
    assert len(files_a) == 12
    assert files_a == files_b


# -- the Hub: commits against the head they checked ---------------------------------------


def test_hub_commit_never_replaces_a_file_committed_meanwhile(fake_hub, hub_repo):
    # Two writers hold the same name pending; the second to commit finds it committed
    # at the head: other bytes -> ExistsError naming it, the first one's bytes stay;
    # the same bytes -> accepted silently (a resumed run).
    url = f"{hub_repo}/run"
    a, b = SnapshotStore(url, hub_batch_files=100), SnapshotStore(url, hub_batch_files=100)
    name = "phema-000000000064-0.0500.safetensors"
    a.write(name, _snapshot_bytes(1))
    b.write(name, _snapshot_bytes(2))
    a.flush()
    with pytest.raises(ExistsError, match=f"{name} already exist"):
        b.flush()
    assert SnapshotStore(url).backend.read_all(SnapshotStore(url).list()[0].path) == (
        _snapshot_bytes(1)
    )
    c = SnapshotStore(url, hub_batch_files=100)
    c.hub.add(name, _snapshot_bytes(1))  # same bytes, behind the existence check
    c.flush()


def test_hub_commit_is_prepared_again_when_the_branch_moves(fake_hub, hub_repo, monkeypatch):
    # Another commit lands between the existence check and this commit: the commit is
    # refused (parent moved) and prepared again against the new head, publishing both.
    url = f"{hub_repo}/run"
    a, b = SnapshotStore(url, hub_batch_files=100), SnapshotStore(url, hub_batch_files=100)
    a.write("phema-000000000064-0.0500.safetensors", _snapshot_bytes(1))
    real_present, sneaked = a.hub._present, []

    def present(sha, paths):
        found = real_present(sha, paths)
        if not sneaked:
            sneaked.append(1)
            b.write("phema-000000000128-0.0500.safetensors", _snapshot_bytes(2, t=128.0))
            b.flush()
        return found

    monkeypatch.setattr(a.hub, "_present", present)
    a.flush()
    assert sorted(i.t for i in SnapshotStore(url).list()) == [64.0, 128.0]


# -- other fsspec filesystems --------------------------------------------------------------


class _GenericFS(LocalFileSystem):
    """A filesystem phema has no special backend for (it checks, then commits)."""

    protocol = ("phemageneric",)

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(str(path).removeprefix("phemageneric://"))


def test_other_fsspec_filesystems_get_the_same_promises_but_races(tmp_path, monkeypatch):
    # On a filesystem without conditional writes phema still never replaces a file it
    # can see, publishes outputs all or none, and refuses a replaced snapshot; only two
    # writers racing for one name are not told apart (documented).
    import fsspec

    fsspec.register_implementation("phemageneric", _GenericFS, clobber=True)
    run, out = f"phemageneric://{tmp_path}/run", f"phemageneric://{tmp_path}/out"
    _, ema = _ema()
    with SnapshotWriter(run) as writer:
        for _ in range(3):
            ema.update(ema.t + 64)
            writer.save(ema)
    store = SnapshotStore(run)
    assert type(store.backend).__name__ == "Backend"
    infos = store.list()
    assert len(infos) == 6
    name = os.path.basename(infos[0].path)
    with pytest.raises(ExistsError, match=name):
        store.write(name, b"other bytes")
    out_store = SnapshotStore(out)
    _fail_second_publish(monkeypatch, out_store.backend)
    with pytest.raises(OSError, match="injected"):
        reconstruct(run, [0.06, 0.07, 0.08], out_store)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path / "out")) == []
    reconstruct(run, [0.06, 0.07, 0.08], out, dtype=torch.float16)
    before = _outputs(out)
    out_store = SnapshotStore(out)
    _fail_second_publish(monkeypatch, out_store.backend)
    with pytest.raises(OSError, match="injected"):
        reconstruct(run, [0.06, 0.07, 0.08], out_store, overwrite=True)
    monkeypatch.undo()
    assert _outputs(out) == before  # the replaced output is back, byte for byte
    assert not [n for n in os.listdir(tmp_path / "out") if n.startswith(".")]
    the_plan = plan(store, [0.07])
    victim = the_plan.inputs[-1]
    data = store.backend.read_all(victim.path)
    time.sleep(0.01)  # a later mtime
    store.write(os.path.basename(victim.path), data, overwrite=True)  # same bytes, new file
    with pytest.raises(ChangedError, match=os.path.basename(victim.path)):
        write_plan(the_plan, store, f"phemageneric://{tmp_path}/out2")


# -- stalled servers ----------------------------------------------------------------------


_MOTO = textwrap.dedent(
    """
    import logging, sys, time
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    time.sleep(3600)
    """
)


@pytest.fixture
def moto_process(s3_endpoint):
    """A moto server in its own process (so it can be frozen), with a bucket of 2 snapshots.

    Yields ``(endpoint, store url, freeze, thaw)``; ``freeze()`` SIGSTOPs the server: it
    keeps accepting connections and answers nothing, as a stalled endpoint does;
    ``thaw()`` lets it go on (it then answers what was queued meanwhile).
    """
    server = subprocess.Popen(
        [sys.executable, "-c", _MOTO], stdout=subprocess.PIPE, text=True, env=dict(os.environ)
    )
    try:
        endpoint = server.stdout.readline().strip()
        bucket = f"phema-{uuid.uuid4().hex[:12]}"
        store = SnapshotStore(f"s3://{bucket}/run", endpoint_url=endpoint)
        store.fs.mkdir(bucket)
        store.write("phema-000000000064-0.0500.safetensors", _snapshot_bytes(0))
        store.write("phema-000000000128-0.0500.safetensors", _snapshot_bytes(1, t=128.0))
        yield (
            endpoint,
            f"s3://{bucket}/run",
            lambda: os.kill(server.pid, signal.SIGSTOP),
            lambda: os.kill(server.pid, signal.SIGCONT),
        )
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait()


@pytest.fixture
def frozen_s3(moto_process):
    endpoint, url, freeze, thaw = moto_process
    freeze()
    return endpoint, url, thaw


def test_stalled_s3_server_fails_ls_in_well_under_a_minute(frozen_s3):
    endpoint, url, _ = frozen_s3
    env = _s3_env(endpoint)
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "phema_cli", "ls", url],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    took = time.monotonic() - start
    assert out.returncode == 1
    assert out.stderr.startswith("error: cannot list s3://")
    assert "Traceback" not in out.stderr
    # A bound on a hang, not a speed figure: 3 tries of up to 2 x 5 s each (the defaults),
    # short backoff, and the start of a Python process.
    assert took < 55


def test_stalled_s3_server_fails_writes_and_reconstruct_with_named_errors(frozen_s3, tmp_path):
    # Each failure names what it concerns, within the retry bound; once the server is
    # back, the snapshots reported as failed are absent (only the 2 written before are
    # listed) and no output was written.
    endpoint, url, thaw = frozen_s3
    opts = {"endpoint_url": endpoint, "timeout": 1.0, "retries": 2}
    start = time.monotonic()
    _, ema = _ema()
    writer = SnapshotWriter(SnapshotStore(url, **opts))
    writer.save(ema)
    with pytest.raises(StorageError, match=r"phema-000000000192-0.0500.safetensors .*t=192"):
        writer.close()
    with pytest.raises(StorageError, match=f"cannot list {url}"):
        reconstruct(SnapshotStore(url, **opts), [0.07], str(tmp_path / "out"))
    assert time.monotonic() - start < 60  # a bound on a hang, not a speed figure
    assert not (tmp_path / "out").exists()
    thaw()
    time.sleep(1.0)  # let the server answer what was queued while it was stopped
    listed = SnapshotStore(url, endpoint_url=endpoint).list()
    assert [(i.t, i.std) for i in listed] == [(64.0, 0.05), (128.0, 0.05)]


@pytest.mark.parametrize("when", ["part", "completion", "put"])
def test_s3_server_stalling_mid_upload_fails_the_write_within_a_bound(
    moto_process, monkeypatch, when
):
    # The server freezes while a part (a body, which botocore's read timeout does not
    # bound), the completion of a multipart upload, or a small file's single PUT is on
    # its way. The write fails within the call deadline and says what is known: a
    # stalled part means nothing was published (and, once the server is back, nothing
    # is listed); a stalled completion or PUT may still land, and the error says so
    # (once the server is back, the file is there whole, or absent).
    import s3fs

    from phema._s3 import S3Backend

    endpoint, url, freeze, thaw = moto_process
    block = {"default_block_size": 5 << 20} if when != "put" else {}
    store = SnapshotStore(url, endpoint_url=endpoint, timeout=1.0, retries=2, **block)
    owner, hook = {
        "part": (s3fs.core.S3File, "_upload_chunk"),
        "completion": (s3fs.core.S3File, "commit"),
        "put": (S3Backend, "_put"),
    }[when]
    real = getattr(owner, hook)

    def frozen_first(self, *args, **kwargs):
        freeze()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, hook, frozen_first)
    n = 300 if when == "put" else 2_000_000
    name, data = "phema-000000000192-0.0500.safetensors", _snapshot_bytes(3, t=192.0, n=n)
    start = time.monotonic()
    expected = "nothing was published" if when == "part" else "could not be asked whether it landed"
    with pytest.raises(StorageError, match=f"{name}.*{expected}|{expected}.*{name}"):
        store.write(name, data)
    # A bound on a hang: 2 tries x (2 x 1 s + 1 s + 8 MB at 1 MiB/s) for the part.
    assert time.monotonic() - start < 90
    monkeypatch.undo()
    thaw()
    time.sleep(1.0)  # the server answers what was queued while it was stopped
    after = SnapshotStore(url, endpoint_url=endpoint)
    listed = {(i.t, i.std): i for i in after.list()}
    if when == "part":
        assert sorted(listed) == [(64.0, 0.05), (128.0, 0.05)]
    elif (192.0, 0.05) in listed:
        assert after.backend.read_all(listed[(192.0, 0.05)].path) == data


def test_s3_server_stalling_mid_reconstruct_fails_it_with_a_named_error(moto_process, tmp_path):
    # The plan is made, then the server freezes: the pass fails within the retry bound
    # with an error naming a snapshot, and no output appears.
    endpoint, url, freeze, _ = moto_process
    src = SnapshotStore(url, endpoint_url=endpoint, timeout=1.0, retries=2)
    the_plan = plan(src, [0.05], at=128.0)
    freeze()
    start = time.monotonic()
    with pytest.raises(
        StorageError, match=r"reading s3://.*/phema-\d{12}-0\.0500\.safetensors failed"
    ):
        write_plan(the_plan, src, str(tmp_path / "out"))
    assert time.monotonic() - start < 40  # a bound on a hang: 2 tries of up to 2 x 1 s
    assert _outputs(str(tmp_path / "out")) == {}


#: The two ways an S3 file is published: one PutObject (under one block) or the
#: completion of a multipart upload (a 6.4 MB file with 5 MiB blocks: 2 parts).
_PUBLISH_CALLS = {"put": ("put_object", 300), "multipart": ("complete_multipart_upload", 1_600_000)}


def _lose_answers(store, monkeypatch, kind, answer):
    """Route ``kind``'s publishing call through ``answer(real, kwargs)`` (s3fs retries it)."""
    from fsspec.asyn import sync

    method, _ = _PUBLISH_CALLS[kind]
    client = sync(store.fs.loop, store.fs.set_session)
    real = getattr(client, method)

    async def call(**kwargs):
        return await answer(real, kwargs)

    call.__name__ = method  # s3fs looks the operation up by the function's name
    monkeypatch.setattr(client, method, call)


@pytest.mark.parametrize("kind", sorted(_PUBLISH_CALLS))
def test_s3_publish_retried_after_a_lost_answer_is_still_ours(s3_bucket, monkeypatch, kind):
    # The first conditional PutObject / CompleteMultipartUpload lands on the server but
    # its answer is lost (a read timeout); s3fs tries again and the retry is refused
    # with 412 because the object now exists (S3's answer to If-None-Match on an
    # existing key; moto would accept a repeated completion, so the test gives S3's
    # answer). Nothing misreported: the write is recognised as its own (by its ETag).
    from botocore.exceptions import ClientError, ReadTimeoutError

    store = SnapshotStore(f"{s3_bucket}/run", default_block_size=5 << 20)
    lost = []

    async def answer(real, kwargs):
        if lost:
            error = {
                "Code": "PreconditionFailed",
                "Message": "At least one of the pre-conditions you specified did not hold",
                "Condition": "If-None-Match",
            }
            raise ClientError({"Error": error}, "PutObject")
        await real(**kwargs)
        lost.append(kwargs["Key"])
        raise ReadTimeoutError(endpoint_url="answer lost")

    _lose_answers(store, monkeypatch, kind, answer)
    name, n = "phema-000000000064-0.0500.safetensors", _PUBLISH_CALLS[kind][1]
    store.write(name, _snapshot_bytes(7, n=n))
    assert lost == ["run/" + name]
    assert store.backend.read_all(store.path_of(name)) == _snapshot_bytes(7, n=n)
    with pytest.raises(ExistsError, match=name):  # a different writer is still refused
        store.write(name, _snapshot_bytes(8, n=n))
    assert _uploads(store) == []


@pytest.mark.parametrize("kind", sorted(_PUBLISH_CALLS))
def test_s3_publish_whose_answers_are_all_lost_but_landed_is_reported_written(
    s3_bucket, monkeypatch, kind
):
    # Every try of the publishing call times out on the client, but the first one
    # landed. The writer asks the store and reports the file as written (it is there,
    # whole), never "nothing was published".
    from botocore.exceptions import ReadTimeoutError

    store = SnapshotStore(f"{s3_bucket}/run", default_block_size=5 << 20)
    tries = []

    async def answer(real, kwargs):
        if not tries:
            await real(**kwargs)
        tries.append(1)
        raise ReadTimeoutError(endpoint_url="answer lost")

    _lose_answers(store, monkeypatch, kind, answer)
    name, n = "phema-000000000064-0.0500.safetensors", _PUBLISH_CALLS[kind][1]
    store.write(name, _snapshot_bytes(7, n=n))
    assert len(tries) == store.fs.retries  # every try failed on the client
    assert store.backend.read_all(store.path_of(name)) == _snapshot_bytes(7, n=n)


def test_s3_files_under_one_block_are_one_conditional_put(s3_bucket, monkeypatch):
    # A small file costs one request and no multipart upload; a large one is uploaded
    # in parts; both refuse to replace an existing key.
    store = SnapshotStore(f"{s3_bucket}/run", default_block_size=5 << 20)
    calls = []
    real = store.fs.call_s3

    def counted(method, *args, **kwargs):
        calls.append(method)
        return real(method, *args, **kwargs)

    monkeypatch.setattr(store.fs, "call_s3", counted)
    store.write("small.safetensors", _snapshot_bytes(1))
    assert calls == ["put_object"]
    calls.clear()
    store.write("large.safetensors", _snapshot_bytes(2, n=1_600_000))
    assert calls[0] == "create_multipart_upload"
    assert calls[-1] == "complete_multipart_upload"
    for name, seed, n in (("small.safetensors", 3, 300), ("large.safetensors", 4, 1_600_000)):
        with pytest.raises(ExistsError, match=name):
            store.write(name, _snapshot_bytes(seed, n=n))
    assert _uploads(store) == []


_HUB = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[1])
    import fakehub
    hub, server = fakehub.start()
    print(hub.endpoint, flush=True)
    time.sleep(3600)
    """
)


def test_stalled_hub_fails_listing_and_commits_with_named_errors():
    # huggingface_hub's own timeouts bound every request (10 s by default); a stalled
    # Hub fails listing and the commit of pending snapshots, naming the store and files.
    server = subprocess.Popen(
        [sys.executable, "-c", _HUB, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        endpoint = server.stdout.readline().strip()
        opts = {"endpoint": endpoint, "token": "hf_phema_fake"}
        url = f"hf://phema-test/stalled-{uuid.uuid4().hex[:8]}/run"
        store = SnapshotStore(url, hub_batch_files=100, **opts)
        store.write("phema-000000000064-0.0500.safetensors", _snapshot_bytes(0))
        store.flush()
        store.write("phema-000000000128-0.0500.safetensors", _snapshot_bytes(1, t=128.0))
        os.kill(server.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(StorageError, match=f"cannot list {url}"):
            SnapshotStore(url, **opts).list()
        with pytest.raises(StorageError, match=r"phema-000000000128-0.0500.safetensors"):
            store.flush()
        assert time.monotonic() - start < 60  # a bound on a hang, not a speed figure
        os.kill(server.pid, signal.SIGCONT)
        assert [i.t for i in SnapshotStore(url, **opts).list()] == [64.0]  # nothing half-made
    finally:
        os.kill(server.pid, signal.SIGCONT)
        server.kill()
        server.wait()
