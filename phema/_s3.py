"""S3 (s3fs): uploads committed with ``If-None-Match: *``, reads pinned by ``If-Match: <ETag>``.

A staged file is an s3fs multipart upload that is not completed (``autocommit=False``):
its parts go up while it is written, nothing is visible. Publishing completes it, with
``If-None-Match: *`` unless ``overwrite``: S3 (and servers that implement conditional
writes) refuses the completion when the key exists, so of two racing writers exactly
one wins. A file smaller than one block never started an upload: it is published by
one ``PutObject`` with the same condition (one request instead of three). A failed or discarded upload is aborted (best effort: a server that is gone
cannot be told; an ``AbortIncompleteMultipartUpload`` lifecycle rule on the bucket
removes such parts). With ``overwrite``, a file about to be replaced is first copied to
a hidden backup key so that a failure later in the same publish can restore it.

Reads are ranged ``GetObject`` calls with ``If-Match`` on the ETag seen when the header
was read, so a replaced object fails the read (HTTP 412) instead of mixing versions.

The store's filesystem is its own instance (never shared through fsspec's instance
cache, so no transaction or cache state leaks between stores or into the user's own
fsspec use) with timeouts and bounded retries (:func:`s3_options`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from fsspec.asyn import sync

from phema._backends import Backend, Head, Staged
from phema.errors import StorageError


def s3_options(options: dict[str, Any], timeout: float) -> dict[str, Any]:
    """``options`` with phema's defaults for a store's S3 requests: timeouts and retries.

    Every request gives up after ``timeout`` seconds without progress (connecting or
    waiting for the answer). botocore's own retries are turned off so that they do not
    multiply s3fs's (the store sets ``fs.retries``). The caller's ``config_kwargs`` win.
    """
    out = dict(options)
    config = {
        "connect_timeout": timeout,
        "read_timeout": timeout,
        "retries": {"max_attempts": 1, "mode": "standard"},
    }
    config.update(out.get("config_kwargs") or {})
    out["config_kwargs"] = config
    return out


#: An upload slower than this many bytes per second counts as stalled.
MIN_UPLOAD_RATE = 1 << 20


def bound_calls(fs: Any, timeout: float, retries: int) -> None:
    """Give every S3 API call of ``fs`` (a store's own instance) a deadline.

    botocore's timeouts bound waiting for an answer, but not sending a body: an upload
    (``PutObject``, ``UploadPart``, sent with ``Expect: 100-continue``) to a server that
    accepts the connection and then stalls waits forever. Each call, retries included,
    is cancelled after ``retries * (2 * timeout + 1 s + body / MIN_UPLOAD_RATE)``.
    """

    def call_s3(method: str, *args: Any, **kwargs: Any) -> Any:
        body = kwargs.get("Body")
        size = len(body) if isinstance(body, bytes | bytearray | memoryview) else 0
        deadline = retries * (2 * timeout + 1.0 + size / MIN_UPLOAD_RATE)
        return sync(fs.loop, fs._call_s3, method, *args, timeout=deadline, **kwargs)

    fs.call_s3 = call_s3


def _unsatisfiable(exc: BaseException) -> bool:
    """A ranged read past the end (HTTP 416): an empty object has no byte 0."""
    return "not satisfiable" in str(exc) or "InvalidRange" in str(exc)


def _is_precondition(exc: BaseException) -> bool:
    return "pre-condition" in str(exc) or "PreconditionFailed" in str(exc)


class S3Backend(Backend):
    """A prefix of an S3 bucket."""

    def _split(self, path: str) -> tuple[str, str]:
        bucket, key, _ = self.fs.split_path(path)
        return bucket, key

    def stage(self, name: str, path: str, overwrite: bool) -> Staged:
        mode = "wb" if overwrite else "xb"
        return Staged(name, path, self.fs.open(path, mode, autocommit=False))

    def _seal(self, s: Staged) -> None:
        f: Any = s.file
        if f.closed:
            return
        if f.offset is None and f.mpu is None:  # nothing sent: the file is all in the buffer
            s.token = f.buffer.getvalue()
            f.closed = True  # published by _put, never by s3fs
            return
        f.close()  # uploads the last part; the upload stays open

    def _put(self, s: Staged, overwrite: bool) -> None:
        bucket, key = self._split(s.path)
        match = {} if overwrite else {"IfNoneMatch": "*"}
        self.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=s.token, **match)
        self.fs.invalidate_cache(s.path.rsplit("/", 1)[0])

    def _commit(self, s: Staged, overwrite: bool) -> None:
        try:
            if isinstance(s.token, bytes):
                self._put(s, overwrite)  # If-None-Match: * unless overwrite
            else:
                s.file.commit()  # type: ignore[attr-defined]  # the same condition
        except FileExistsError:
            if not self._is_ours(s):
                raise self.exists_error(s) from None
            # A retried completion whose first try succeeded (its answer was lost): the
            # object there is the one this upload made.
        except Exception as exc:
            # The completion may have landed although its answer did not: ask.
            try:
                landed = self._is_ours(s)
            except Exception:
                raise StorageError(
                    f"completing the upload of {self.where(s.path)} failed ({exc}) and the "
                    "server could not be asked whether it landed; list the store "
                    "(phema ls) before relying on it"
                ) from exc
            if not landed:
                raise

    def _is_ours(self, s: Staged) -> bool:
        r"""Whether the object at ``s.path`` is the one ``s``'s upload made, by its ETag.

        A single ``PutObject``'s ETag is the MD5 of its bytes; a multipart object's is
        :math:`\mathrm{md5}(m_1 \| \dots \| m_n)` followed by ``-n``, where :math:`m_i`
        are the parts' binary MD5s (their ETags). (Buckets with SSE-KMS use other
        ETags: there this check answers no, and the original error stands.)
        """
        if isinstance(s.token, bytes):
            expected = hashlib.md5(s.token, usedforsecurity=False).hexdigest()
        else:
            parts = getattr(s.file, "parts", None) or []
            if not parts:
                return False
            digest = hashlib.md5(
                b"".join(bytes.fromhex(str(p["ETag"]).strip('"')) for p in parts),
                usedforsecurity=False,
            ).hexdigest()
            expected = f"{digest}-{len(parts)}"
        try:
            there = self.identity_of(s.path)[1]
        except FileNotFoundError:
            return False
        return there.strip('"') == expected

    def _discard_one(self, s: Staged) -> None:
        if isinstance(s.token, bytes):
            return  # nothing was sent
        try:
            s.file.discard()  # type: ignore[attr-defined]  # aborts the multipart upload
        finally:
            s.file.closed = True  # type: ignore[misc]  # nothing left to flush

    def _get(self, path: str, start: int, end: int, etag: str | None) -> tuple[bytes, str, int]:
        """Bytes ``[start, end)``, the object's ETag and its full size, in one GET."""
        bucket, key = self._split(path)
        match = {"IfMatch": etag} if etag else {}

        async def get() -> tuple[bytes, str, int]:
            resp = await self.fs._call_s3(
                "get_object", Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}", **match
            )
            body = resp["Body"]
            try:
                data = await body.read()
            finally:
                body.close()
            total = str(resp.get("ContentRange", "")).rsplit("/", 1)[-1]
            size = int(total) if total.isdigit() else len(data)
            return bytes(data), str(resp.get("ETag", "")), size

        try:
            got: tuple[bytes, str, int] = sync(self.fs.loop, get)
            return got
        except OSError as exc:
            if etag and _is_precondition(exc):
                raise self.changed(path) from None
            if isinstance(exc, FileNotFoundError) or _unsatisfiable(exc):
                raise
            raise self.failed(path, exc) from exc
        except Exception as exc:  # botocore/aiohttp errors that s3fs did not translate
            raise self.failed(path, exc) from exc

    def failed(self, path: str, exc: BaseException) -> StorageError:
        return StorageError(
            f"reading {self.where(path)} failed (after {self.fs.retries} tries): "
            f"{type(exc).__name__}: {exc}"
        )

    def identity_of(self, path: str) -> tuple[int, str]:
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        info = self.fs.info(path)
        return int(info["size"]), str(info["ETag"])

    def head(self, path: str, want: int) -> Head:
        try:
            data, etag, size = self._get(path, 0, want, None)
        except OSError as exc:
            if not _unsatisfiable(exc):
                raise
            size, etag = self.identity_of(path)  # an empty object has no byte 0
            return Head(b"", size, etag)
        return Head(data, size, etag)

    def read_into(self, path: str, start: int, out: memoryview, identity: str | None) -> None:
        data, _, _ = self._get(path, start, start + len(out), identity)
        if len(data) != len(out):
            raise self.truncated(path, start, start + len(out), len(data))
        out[:] = data
