"""``http://`` and ``https://`` stores: read-only, one ranged GET per read.

fsspec's HTTP filesystem lists a folder from its HTML index page and reads files; a
store on it only reads (official EDM2 snapshots published on a web server, say). Each
read is a single ``GET`` with ``Range: bytes=a-b`` whose reply must be ``206 Partial
Content``: a server that ignores ranges would send the whole file for every read, so it
is refused by name. The version check of a read (:mod:`phema._backends`) uses the same
reply's validator (``ETag``, else ``Last-Modified``) and the total size in its
``Content-Range``, so it costs no extra request. A server that sends neither validator
is checked by size only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fsspec.asyn import sync

from phema._backends import Backend, Staged
from phema.errors import FormatError, StorageError


def _identity(size: int | str | None, headers: Mapping[str, Any]) -> str:
    tag = headers.get("ETag") or headers.get("Last-Modified") or ""
    return f"{size}:{tag}"


class HTTPBackend(Backend):
    """Reads by exact ranged ``GET``; every write is refused (HTTP folders are read-only)."""

    def identity_of(self, path: str) -> tuple[int, str]:
        info = self.fs.info(path)
        if info.get("size") is None:
            raise StorageError(
                f"{self.where(path)}: the server gives no size (no Content-Length); phema "
                "reads files in ranges and needs it"
            )
        return int(info["size"]), _identity(info["size"], info)

    def read_into(self, path: str, start: int, out: memoryview, identity: str | None) -> None:
        if not len(out):
            return
        data, got = sync(self.fs.loop, self._get, path, start, start + len(out))
        if identity is not None and got != identity:
            raise self.changed(path)
        if len(data) != len(out):
            raise self.truncated(path, start, start + len(out), len(data))
        out[:] = data

    async def _get(self, path: str, start: int, end: int) -> tuple[bytes, str]:
        session = await self.fs.set_session()
        kwargs = dict(self.fs.kwargs)
        headers = dict(kwargs.pop("headers", {}))
        headers.update({"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"})
        async with session.get(self.fs.encode_url(path), headers=headers, **kwargs) as r:
            if r.status == 404:
                raise FileNotFoundError(path)
            if r.status == 416:  # the range starts past the end
                raise FormatError(
                    f"{self.where(path)}: wanted bytes [{start}, {end}), the server has none "
                    "of them: the file is truncated"
                )
            r.raise_for_status()
            if r.status != 206 or "Content-Range" not in r.headers:
                raise StorageError(
                    f"{self.where(path)}: the server ignored a ranged read (HTTP {r.status} "
                    "instead of 206 Partial Content); phema reads only the bytes it needs, "
                    "so serve the files from a server that supports Range requests (S3, "
                    "nginx, a CDN), or download them and use the local folder"
                )
            size = r.headers["Content-Range"].rpartition("/")[2]
            want, data = end - start, bytearray()
            while len(data) <= want and (chunk := await r.content.read(want + 1 - len(data))):
                data += chunk
            if len(data) > want:
                raise StorageError(
                    f"{self.where(path)}: the server sent more than the {want} bytes of "
                    f"range [{start}, {end})"
                )
            return bytes(data), _identity(size, r.headers)

    # -- writing: refused ---------------------------------------------------------------
    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(path))

    def stage(self, name: str, path: str, overwrite: bool) -> Staged:
        raise StorageError(
            f"{self.where(path)}: http(s) stores are read-only; write to a local folder, "
            "s3:// or hf:// instead"
        )

    def publish(self, staged: Sequence[Staged], overwrite: bool) -> None:  # pragma: no cover
        raise StorageError(f"{self.url}: http(s) stores are read-only")
