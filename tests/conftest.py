"""Shared test configuration: hypothesis profiles, a local S3 server and a local fake Hub."""

import functools
import logging
import os
import sys
import threading
import uuid

# huggingface_hub reads these at import: no Xet transfers, telemetry or update checks in tests.
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_UPDATE_CHECK", "1")

import pytest
from hypothesis import settings

settings.register_profile("default", max_examples=50, deadline=None)
# CI runs the same examples every time; local runs explore new ones.
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True)
# `pytest --hypothesis-profile=thorough` before a release.
settings.register_profile("thorough", max_examples=2000, deadline=None)
settings.load_profile("ci" if os.environ.get("CI") else "default")


def _atomic_conditional_writes():
    """Make moto's conditional writes atomic, as S3's are; returns an undo function.

    moto checks ``If-None-Match: *`` and then stores the object in two steps without a
    lock, so two racing conditional writes can both succeed on moto (never on S3). The
    race tests need the server to keep S3's promise, so PutObject and
    CompleteMultipartUpload run one at a time in the test server.
    """
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    saved = {}
    for name in ("put_object", "_key_response_post"):
        real = saved[name] = getattr(S3Response, name)

        @functools.wraps(real)
        def locked(self, *args, _real=real, **kwargs):
            with lock:
                return _real(self, *args, **kwargs)

        setattr(S3Response, name, locked)

    def undo():
        for name, real in saved.items():
            setattr(S3Response, name, real)

    return undo


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on 127.0.0.1 (ephemeral port), with fake credentials only."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.moto_server.threaded_moto_server")
    env = {
        "AWS_ACCESS_KEY_ID": "phema-test",
        "AWS_SECRET_ACCESS_KEY": "phema-test",
        "AWS_EC2_METADATA_DISABLED": "true",
        "BOTO_CONFIG": "/dev/null",
        "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
        "AWS_CONFIG_FILE": "/dev/null",
    }
    saved = {k: os.environ.get(k) for k in [*env, "AWS_PROFILE"]}
    os.environ.update(env)
    os.environ.pop("AWS_PROFILE", None)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    undo_atomic = _atomic_conditional_writes()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    import fsspec

    fsspec.config.conf["s3"] = {"endpoint_url": f"http://{host}:{port}"}
    try:
        yield f"http://{host}:{port}"
    finally:
        fsspec.config.conf.pop("s3", None)
        server.stop()
        undo_atomic()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_endpoint):
    """A fresh bucket URL on the local S3 server."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    name = f"phema-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def fake_hub():
    """The fake Hub of tests/fakehub.py on 127.0.0.1; ``hf://`` URLs reach it with a fake token."""
    sys.path.insert(0, os.path.dirname(__file__))
    import fakehub
    import fsspec

    hub, server = fakehub.start()
    fsspec.config.conf["hf"] = {"endpoint": hub.endpoint, "token": "hf_phema_fake"}
    try:
        yield hub
    finally:
        fsspec.config.conf.pop("hf", None)
        server.shutdown()
        server.server_close()


@pytest.fixture
def hub_repo(fake_hub):
    """A URL for a fresh (not yet created) repository on the fake Hub."""
    return f"hf://phema-test/run-{uuid.uuid4().hex[:12]}"


# Local servers (moto, the fake Hub) make the remote backends the slow ones.
_SLOW = pytest.mark.slow


@pytest.fixture(
    params=["file", "memory", pytest.param("s3", marks=_SLOW), pytest.param("hf", marks=_SLOW)]
)
def store_root(request, tmp_path):
    """A base URL under which a test may create stores: one run per backend."""
    if request.param == "file":
        yield str(tmp_path)
    elif request.param == "memory":
        import fsspec

        base = f"memory://phema-{uuid.uuid4().hex}"
        yield base
        fs = fsspec.filesystem("memory")
        if fs.exists(base):
            fs.rm(base, recursive=True)
    elif request.param == "s3":
        yield request.getfixturevalue("s3_bucket")
    else:
        yield request.getfixturevalue("hub_repo")
