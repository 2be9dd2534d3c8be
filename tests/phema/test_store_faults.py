"""Faults through the store, on every backend: each gives a clear error and leaves nothing visible.

Tampered and truncated files, missing stores, an S3 server that fails or dies in the
middle of a multipart upload, and leftovers of killed local writers.
"""

import json
import os
import struct
import time

import pytest
import torch

from phema import FormatError, SnapshotStore, StorageError
from phema.profiles import sigma_rel_to_gamma

NAME = "phema-000000000064-0.0500.safetensors"
BIG = 12 << 20  # three 5 MiB multipart-upload parts on S3


def _store_with_one(url):
    store = SnapshotStore(url)
    store.save(
        {"w": torch.arange(6, dtype=torch.float32)},
        t=64.0,
        std=0.05,
        gamma=float(sigma_rel_to_gamma(0.05)),
    )
    store.flush()
    return store


def _tamper_header(data, edit):
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    assert len(text) <= n  # keep the length field and the data where they were
    return data[:8] + text.ljust(n, b" ") + data[8 + n :]


def _edit_dtype(h):
    h["w"]["dtype"] = "F16"


def _edit_offsets(h):
    h["w"]["data_offsets"] = [4, 28]


def _edit_json(h):
    h["__metadata__"]["phema.t"] = "x64"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_edit_dtype, r"spans 24 bytes, but F16 \(6,\) needs 12"),
        (_edit_offsets, "starts at byte 4, expected 0"),
        (_edit_json, "metadata phema.t='x64' is not a finite number"),
    ],
)
def test_tampered_header_is_named(store_root, edit, message):
    url = f"{store_root}/run"
    store = _store_with_one(url)
    (info,) = store.list()
    data = store.fs.cat_file(info.path)
    store.write(NAME, _tamper_header(data, edit), overwrite=True)
    store.flush()
    with pytest.raises(FormatError, match=f"{NAME}: .*{message}"):
        SnapshotStore(url).list()


def test_truncated_file_is_named(store_root):
    url = f"{store_root}/run"
    store = _store_with_one(url)
    (info,) = store.list()
    store.write(NAME, store.fs.cat_file(info.path)[:-5], overwrite=True)
    store.flush()
    with pytest.raises(FormatError, match=f"{NAME}: .*truncated"):
        SnapshotStore(url).list()


def test_missing_store_is_named(store_root):
    with pytest.raises(StorageError, match="does not exist"):
        SnapshotStore(f"{store_root}/never-written").list()


def test_missing_s3_bucket_is_named(s3_endpoint):
    with pytest.raises(StorageError, match=r"s3://phema-no-such-bucket/run"):
        SnapshotStore("s3://phema-no-such-bucket/run").list()


def _fail_after_first_part(monkeypatch, action):
    """Run ``action()`` when the second multipart part is about to go up."""
    import s3fs

    real = s3fs.core.S3File._upload_chunk

    def upload_chunk(self, final=False):
        if len(self.parts or []) >= 1:
            action()
        return real(self, final)

    monkeypatch.setattr(s3fs.core.S3File, "_upload_chunk", upload_chunk)


def test_s3_failure_mid_upload_aborts_it(s3_bucket, monkeypatch):
    store = SnapshotStore(f"{s3_bucket}/run", default_block_size=5 << 20)

    def fail():
        raise ConnectionResetError("injected: connection reset during UploadPart")

    _fail_after_first_part(monkeypatch, fail)
    with pytest.raises(StorageError, match=f"writing .*{NAME} failed, nothing was published"):
        store.write(NAME, os.urandom(BIG))
    monkeypatch.undo()
    assert not store.fs.exists(store.path_of(NAME))
    bucket = s3_bucket.removeprefix("s3://")
    assert store.fs.list_multipart_uploads(bucket) == []  # the upload was aborted, not left


@pytest.mark.slow
def test_s3_server_dying_mid_upload_leaves_nothing_visible(s3_endpoint, s3_bucket, monkeypatch):
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    # A second server on the same (in-process) S3 state, which this test can kill.
    doomed = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    doomed.start()
    host, port = doomed.get_host_and_port()
    store = SnapshotStore(
        f"{s3_bucket}/run",
        endpoint_url=f"http://{host}:{port}",
        default_block_size=5 << 20,
        config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2},
        skip_instance_cache=True,
    )
    _fail_after_first_part(monkeypatch, doomed.stop)
    start = time.monotonic()
    with pytest.raises(StorageError, match="Could not connect"):  # after s3fs's retries
        store.write(NAME, os.urandom(BIG))
    assert time.monotonic() - start < 60
    monkeypatch.undo()
    survivor = SnapshotStore(f"{s3_bucket}/run", skip_instance_cache=True)
    assert not survivor.fs.exists(survivor.path_of(NAME))
    assert not survivor.fs.exists(survivor.root) or survivor.list() == []
    # The dead server could not be told to abort: the parts stay, invisible, until an
    # S3 lifecycle rule (AbortIncompleteMultipartUpload) removes them.
    assert len(survivor.fs.list_multipart_uploads(s3_bucket.removeprefix("s3://"))) == 1


def test_empty_file_is_named(store_root):
    url = f"{store_root}/run"
    store = _store_with_one(url)
    store.write("phema-000000000128-0.0500.safetensors", b"")
    store.flush()
    with pytest.raises(
        FormatError, match=r"phema-000000000128-0.0500.safetensors: file is 0 bytes"
    ):
        SnapshotStore(url).list()
