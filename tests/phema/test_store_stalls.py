"""Remote stores that stall or lose answers: every wait ends, every error says what is known.

A moto server (and the fake Hub) in a process of its own, frozen with SIGSTOP at
chosen moments: before listing, between plan and read, while a part, a completion or
a PUT is on its way; and S3 publishes whose answers are lost. Each test checks the
failure comes within a stated bound, names what it concerns, and, once the server is
back, that what was reported as not published is absent (or, where the outcome cannot
be known, that the error says so and the file is whole if it is there).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import pytest
from test_store_integrity import _ema, _outputs, _s3_env, _snapshot_bytes, _uploads

from phema import SnapshotStore, SnapshotWriter, StorageError
from phema.errors import ExistsError
from phema.streaming import plan, reconstruct, write_plan

pytestmark = pytest.mark.slow  # stalled servers and their timeouts

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
