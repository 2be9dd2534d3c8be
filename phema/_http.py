"""``http://`` and ``https://`` stores: read-only, one ranged GET per read.

fsspec's HTTP filesystem lists a folder from its HTML index page; a store on it only
reads (official EDM2 snapshots published on a web server, say). Each read is a single
``GET`` with ``Range: bytes=a-b`` whose reply must be ``206 Partial Content`` for exactly
that range (``Content-Range: bytes a-b/size``), uncompressed: a server that ignores
ranges would send the whole file for every read, and one that answers another range or
a compressed body would give wrong bytes, so each is refused by name. The version check
of a read (:mod:`phema._backends`) uses the same reply's validator (``ETag``, else
``Last-Modified``) and the size in its ``Content-Range``, so it costs no extra request;
a server that sends neither validator is checked by size only. ``HEAD`` gives a file's
size and version; only 404 and 410 mean "no such file": any other failure is a
:class:`~phema.errors.StorageError`, so that a file the server fails to describe is never
silently left out of a listing.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from fsspec.asyn import sync

from phema._backends import Backend, Staged
from phema.errors import FormatError, StorageError

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)")
_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


def client_kwargs(timeout: float) -> dict[str, Any]:
    """aiohttp session options of a store: no decompression, ``timeout`` per connect and read."""
    return {
        "auto_decompress": False,
        "timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
    }


def _identity(size: int | str, headers: Mapping[str, Any]) -> str:
    tag = headers.get("ETag") or headers.get("Last-Modified") or ""
    return f"{size}:{tag}"


class HTTPBackend(Backend):
    """Reads by exact ranged ``GET``; every write is refused (HTTP folders are read-only)."""

    untrusted_listing = True

    def _run(self, path: str, coro: Any, *args: Any) -> Any:
        try:
            return sync(self.fs.loop, coro, path, *args)
        except _ERRORS as exc:
            raise StorageError(
                f"cannot read {self.where(path)}: {type(exc).__name__}: {exc}"
            ) from exc

    def identity_of(self, path: str) -> tuple[int, str]:
        size, identity = self._run(path, self._head)
        return int(size), str(identity)

    async def _head(self, path: str) -> tuple[int, str]:
        session = await self.fs.set_session()
        headers = {"Accept-Encoding": "identity"}
        async with session.head(self.fs.encode_url(path), headers=headers) as r:
            if r.status in (404, 410):
                raise FileNotFoundError(path)
            if r.status != 200:
                raise StorageError(f"{self.where(path)}: HEAD answered HTTP {r.status} {r.reason}")
            self._check_encoding(path, r.headers)
            size = r.headers.get("Content-Length", "")
            if not size.isdigit():
                raise StorageError(
                    f"{self.where(path)}: the server gives no size (no Content-Length); phema "
                    "reads files in ranges and needs it"
                )
            return int(size), _identity(int(size), r.headers)

    def read_into(self, path: str, start: int, out: memoryview, identity: str | None) -> None:
        if not len(out):
            return
        data, got = self._run(path, self._get, start, start + len(out))
        if identity is not None and got != identity:
            raise self.changed(path)
        if len(data) != len(out):
            raise self.truncated(path, start, start + len(out), len(data))
        out[:] = data

    async def _get(self, path: str, start: int, end: int) -> tuple[bytes, str]:
        session = await self.fs.set_session()
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        async with session.get(self.fs.encode_url(path), headers=headers) as r:
            if r.status in (404, 410):
                raise FileNotFoundError(path)
            if r.status == 416:  # the range starts past the end
                raise FormatError(
                    f"{self.where(path)}: wanted bytes [{start}, {end}), the server has none "
                    "of them: the file is truncated"
                )
            if r.status != 206:
                raise StorageError(
                    f"{self.where(path)}: the server ignored a ranged read (HTTP {r.status} "
                    "instead of 206 Partial Content); phema reads only the bytes it needs, "
                    "so serve the files from a server that supports Range requests (S3, "
                    "nginx, a CDN), or download them and use the local folder"
                )
            self._check_encoding(path, r.headers)
            m = _CONTENT_RANGE.fullmatch(r.headers.get("Content-Range", ""))
            if m is None or int(m[1]) != start or int(m[2]) > end - 1:
                raise StorageError(
                    f"{self.where(path)}: asked for bytes {start}-{end - 1}, the server "
                    f"answered Content-Range {r.headers.get('Content-Range')!r}"
                )
            want, data = int(m[2]) + 1 - start, bytearray()
            while len(data) <= want and (chunk := await r.content.read(want + 1 - len(data))):
                data += chunk
            if len(data) > want:
                raise StorageError(
                    f"{self.where(path)}: the server sent more than the {want} bytes of its "
                    f"Content-Range {r.headers['Content-Range']}"
                )
            return bytes(data), _identity(int(m[3]), r.headers)

    def _check_encoding(self, path: str, headers: Mapping[str, Any]) -> None:
        encoding = headers.get("Content-Encoding", "identity") or "identity"
        if encoding.lower() != "identity":
            raise StorageError(
                f"{self.where(path)}: the server sends it {encoding}-encoded although asked "
                "for identity; phema reads byte ranges of the file itself: serve it "
                "uncompressed"
            )

    # -- writing: refused ---------------------------------------------------------------
    def exists(self, path: str) -> bool:
        try:
            self.identity_of(path)
        except FileNotFoundError:
            return False
        return True

    def stage(self, name: str, path: str, overwrite: bool) -> Staged:
        raise StorageError(
            f"{self.where(path)}: http(s) stores are read-only; write to a local folder, "
            "s3:// or hf:// instead"
        )

    def publish(self, staged: Sequence[Staged], overwrite: bool) -> None:  # pragma: no cover
        raise StorageError(f"{self.url}: http(s) stores are read-only")
