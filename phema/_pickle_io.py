"""Where the pickle VM's bytes come from: the file in growing windows, or a blob's header.

:class:`FileSource` reads the outer pickle sequentially through ``read_at`` and counts every
byte fetched (``bytes_read``); skipping a large value costs nothing. :class:`MemSource` holds
the first bytes of a nested storage blob and raises :class:`NeedMore` when a parse runs past
them but not past the blob. A bytes value of the file is a :class:`FileBytes`: its data when
small, else only where it lies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from phema.errors import PickleError

ReadAt = Callable[[int, int], bytes]

MIN_WINDOW, MAX_WINDOW = 1024, 1 << 16  # read-ahead: back to MIN after a skip, doubling


class NeedMore(Exception):
    """A blob header parse ran past the bytes fetched so far (but not past the blob)."""


@dataclass(eq=False)
class FileBytes:
    """A bytes value of the file: ``data`` when read, else only where it lies (and ``head``)."""

    offset: int
    length: int
    data: bytes | None
    head: bytes = b""
    used: bool = False  # taken by a storage or an array: torch and numpy never share one


class FileSource:
    """Sequential reads through ``read_at`` in growing windows; skips cost nothing."""

    def __init__(self, read_at: ReadAt, size: int, where: str) -> None:
        self.read_at, self.size, self.where = read_at, size, where
        self.pos = 0
        self.bytes_read = 0
        self._buf, self._buf_pos, self._window = b"", 0, MIN_WINDOW

    def fetch(self, offset: int, n: int) -> bytes:
        data = self.read_at(offset, n) if n else b""
        if len(data) != n:
            raise PickleError(f"{self.where}: byte {offset}: read {len(data)} of {n} bytes")
        self.bytes_read += n
        return bytes(data)

    def _short(self, n: int) -> PickleError:
        return PickleError(
            f"{self.where}: byte {self.pos}: truncated: {n} more bytes needed, "
            f"the file has {self.size - self.pos}"
        )

    def read(self, n: int, ahead: bool = True) -> bytes:
        if n > self.size - self.pos:
            raise self._short(n)
        start = self.pos - self._buf_pos
        if start + n > len(self._buf):
            keep = self._buf[start:] if 0 <= start <= len(self._buf) else b""
            begin = self.pos + len(keep)
            want = min(max(n - len(keep), self._window if ahead else 0), self.size - begin)
            self._buf = keep + self.fetch(begin, want)
            self._buf_pos, start = self.pos, 0
            self._window = min(2 * self._window, MAX_WINDOW)
        self.pos += n
        return self._buf[start : start + n]

    def skip(self, n: int) -> None:
        if n > self.size - self.pos:
            raise self._short(n)
        self.pos += n
        if self.pos > self._buf_pos + len(self._buf):
            self._window = MIN_WINDOW


class MemSource:
    """The first bytes of a storage blob; reading past them asks for more (NeedMore)."""

    def __init__(self, data: bytes, base: int, limit: int, where: str) -> None:
        self.data, self.base, self.limit, self.where = data, base, limit, where
        self.pos = base
        self.size = base + limit

    def read(self, n: int, ahead: bool = True) -> bytes:
        start = self.pos - self.base
        if start + n > self.limit:
            raise PickleError(f"{self.where}: byte {self.pos}: storage blob truncated")
        if start + n > len(self.data):
            raise NeedMore
        self.pos += n
        return self.data[start : start + n]

    def skip(self, n: int) -> None:
        if self.pos - self.base + n > self.limit:
            raise PickleError(f"{self.where}: byte {self.pos}: storage blob truncated")
        self.pos += n
