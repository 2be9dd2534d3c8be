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
from phema.profiles import sigma_rel_to_gamma
from phema.store import snapshot_metadata, snapshot_name
from phema.streaming import plan, reconstruct, write_plan

pytestmark = pytest.mark.slow  # racing processes and servers

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _snapshot_bytes(seed, t=64.0, std=0.05, n=300):
    """A valid snapshot file's bytes, different for each seed."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"w": torch.randn(n, generator=g)}
    meta = snapshot_metadata(
        tensors, t=t, std=std, gamma=float(sigma_rel_to_gamma(std)), t_unit="steps", step=None
    )
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


def _write_run(url, saves):
    """A store of ``saves`` snapshots (2 profiles each) of :func:`_ema`, one every 64 steps."""
    _, ema = _ema()
    with SnapshotWriter(url) as writer:
        for _ in range(saves):
            ema.update(ema.t + 64)
            writer.save(ema)


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
    assert float(t_token.replace("m", "-")) == t  # scientific past 40 chars: 5em324
    assert float(std_token.replace("m", "-")) == std
    assert len(name) <= 110  # any (t, std) makes a file name every filesystem accepts


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
    _write_run(run, saves=6)
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
    _write_run(run, saves=4)
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
    _write_run(run, saves=4)
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
    _write_run(run, saves=3)
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
