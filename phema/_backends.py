"""How a store writes and reads on each kind of filesystem: stage, publish, verified reads.

Every write is *staged* first (invisible to readers) and then *published*. Publishing
never replaces an existing file unless asked, also when other writers race for the
same name; several staged files are published together or not at all: a failure part
way rolls back what was already published (restoring any file that ``overwrite``
replaced) and discards the rest.

A read may name the *identity* of the file version it expects, taken when the file's
header was read (local: device, inode, size and mtime; S3: the ETag; memory: the
object and its creation time; Hub: the commit the listing was made at). A read from
another version raises :class:`~phema.errors.ChangedError`; a read that names none
reads whatever is there, with no extra request.

Backends (one class each): local disk (:mod:`phema._local`), S3 (:mod:`phema._s3`),
``memory://`` and any other fsspec filesystem (here), the Hub (:mod:`phema.hub`), and
read-only ``http(s)://`` (:mod:`phema._http`).
"""

from __future__ import annotations

import contextlib
import io
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from phema.errors import ChangedError, ExistsError, FormatError


@dataclass(frozen=True)
class Head:
    """The first bytes of a file, its size and its identity, all of one version."""

    data: bytes
    size: int
    identity: str


@dataclass
class Staged:
    """A file being written that nobody can see yet."""

    name: str
    path: str
    file: IO[bytes]
    token: Any = None  # the backend's own handle (temporary path, S3 upload...)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Undo:
    """What one publish did, so that it can be rolled back or finished."""

    staged: Staged
    backup: str | None  # where the replaced file was kept, if any


class Backend:
    """Stage, publish and read files of one store; subclasses override the primitives."""

    #: The listing is a page the server wrote (HTTP): links into other folders are skipped.
    untrusted_listing = False

    def __init__(self, fs: Any, url: str) -> None:
        self.fs, self.url = fs, url.rstrip("/")
        self.root = ""  # the store's folder as the filesystem names it (set by the store)

    # -- names -----------------------------------------------------------------------
    def where(self, path: str) -> str:
        """``path`` as the user's URL (``shards/...`` kept), for messages."""
        path = path.rstrip("/")
        root = self.root.rstrip("/")
        rel = path[len(root) + 1 :] if root and path.startswith(root + "/") else None
        return f"{self.url}/{rel or path.rsplit('/', 1)[-1]}"

    def exists_error(self, staged: Staged) -> ExistsError:
        return ExistsError(
            f"{self.where(staged.path)} exists; it is never overwritten without being asked "
            "(delete it, or pass overwrite=True / --overwrite)"
        )

    # -- writing ---------------------------------------------------------------------
    def exists(self, path: str) -> bool:
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        return bool(self.fs.exists(path))

    def stage(self, name: str, path: str, overwrite: bool) -> Staged:
        with contextlib.suppress(Exception):  # folders exist on some filesystems only
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        return Staged(name, path, self.fs.open(path, "wb", autocommit=False))

    def publish(self, staged: Sequence[Staged], overwrite: bool) -> None:
        """Make every staged file visible, all or none; refuse to replace unless asked."""
        done: list[_Undo] = []
        try:
            for s in staged:
                self._seal(s)
            for s in staged:
                done.append(self._publish_one(s, overwrite))  # noqa: PERF401 (kept on failure)
        except BaseException as exc:
            for undo in reversed(done):
                try:
                    self._undo(undo)
                except Exception as undo_exc:  # pragma: no cover - reported, not hidden
                    exc.add_note(f"rolling back {self.where(undo.staged.path)} failed: {undo_exc}")
            self.discard(staged)
            raise
        for undo in done:
            self._finish(undo)

    def discard(self, staged: Sequence[Staged]) -> None:
        for s in staged:
            with contextlib.suppress(Exception):  # best effort: it was never visible
                self._discard_one(s)

    def _seal(self, s: Staged) -> None:
        s.file.close()

    def _publish_one(self, s: Staged, overwrite: bool) -> _Undo:
        """Publish one file; a file it replaces is first copied to a hidden backup."""
        backup = None
        if overwrite and self.exists(s.path):
            backup = f"{s.path.rsplit('/', 1)[0]}/.{s.name}.tmp-{uuid.uuid4().hex}"
            self.fs.copy(s.path, backup)
        try:
            self._commit(s, overwrite)
        except BaseException:
            self._drop(backup)
            raise
        return _Undo(s, backup)

    def _commit(self, s: Staged, overwrite: bool) -> None:
        # Generic filesystems have no conditional write: check, then commit (racy).
        if not overwrite and self.exists(s.path):
            raise self.exists_error(s)
        s.file.commit()  # type: ignore[attr-defined]

    def _undo(self, undo: _Undo) -> None:
        if undo.backup is not None:
            self.fs.copy(undo.backup, undo.staged.path)
            self._drop(undo.backup)
        else:
            self.fs.rm_file(undo.staged.path)

    def _finish(self, undo: _Undo) -> None:
        self._drop(undo.backup)

    def _drop(self, backup: str | None) -> None:
        if backup is not None:
            self.fs.rm_file(backup)

    def _discard_one(self, s: Staged) -> None:
        s.file.discard()  # type: ignore[attr-defined]

    # -- reading ---------------------------------------------------------------------
    def pin(self, root: str) -> str:
        """``root`` as it should be listed and read (the Hub pins it to a commit)."""
        return root

    def identity_of(self, path: str) -> tuple[int, str]:
        """``(size, identity)`` of the current version of ``path``."""
        self.fs.invalidate_cache(path.rsplit("/", 1)[0])
        info = self.fs.info(path)
        keys = ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "created")
        tag = next((str(info[k]) for k in keys if info.get(k) is not None), "")
        return int(info["size"]), f"{info['size']}:{tag}"

    def head(self, path: str, want: int) -> Head:
        size, identity = self.identity_of(path)
        data = bytes(self.fs.cat_file(path, start=0, end=min(want, size)))
        if self.identity_of(path)[1] != identity:
            raise self.changed(path)
        return Head(data, size, identity)

    def read_into(self, path: str, start: int, out: memoryview, identity: str | None) -> None:
        if identity is not None and self.identity_of(path)[1] != identity:
            raise self.changed(path)
        data = self.fs.cat_file(path, start=start, end=start + len(out))
        if len(data) != len(out):
            raise self.truncated(path, start, start + len(out), len(data))
        out[:] = data

    def read_all(self, path: str) -> bytes:
        return bytes(self.fs.cat_file(path))

    def changed(self, path: str) -> ChangedError:
        return ChangedError(
            f"{self.where(path)} changed after it was listed (replaced or rewritten by another "
            "writer); nothing was written: run the command again"
        )

    def truncated(self, path: str, start: int, end: int, got: int) -> FormatError:
        return FormatError(
            f"{self.where(path)}: wanted bytes [{start}, {end}), got {got}: the file is truncated"
        )


#: One lock for every ``memory://`` publish of this process: check-and-publish is atomic.
_MEMORY_LOCK = threading.Lock()


class MemoryBackend(Backend):
    """``memory://``: files are objects in a process-wide dict; publish under one lock."""

    def stage(self, name: str, path: str, overwrite: bool) -> Staged:
        return Staged(name, path, io.BytesIO())

    def _seal(self, s: Staged) -> None:
        if not s.file.closed:
            s.token = s.file.getvalue()  # type: ignore[attr-defined]
            s.file.close()

    def publish(self, staged: Sequence[Staged], overwrite: bool) -> None:
        for s in staged:
            self._seal(s)
        with _MEMORY_LOCK:
            if not overwrite:
                for s in staged:
                    if self.fs.exists(s.path):
                        raise self.exists_error(s)
            keys = [self.fs._strip_protocol(s.path) for s in staged]
            before = {k: self.fs.store.get(k) for k in keys}
            try:
                for s in staged:
                    self.fs.pipe_file(s.path, s.token)
            except BaseException:
                for k, old in before.items():  # put back what was there
                    if old is None:
                        self.fs.store.pop(k, None)
                    else:
                        self.fs.store[k] = old
                raise

    def _discard_one(self, s: Staged) -> None:
        s.file.close()

    def _object(self, path: str) -> Any:
        obj = self.fs.store.get(self.fs._strip_protocol(path))
        if obj is None:
            raise FileNotFoundError(path)
        return obj

    @staticmethod
    def _identity(obj: Any) -> tuple[int, str]:
        size = len(obj.getbuffer())
        return size, f"{id(obj)}:{obj.created.isoformat()}:{size}"

    def identity_of(self, path: str) -> tuple[int, str]:
        return self._identity(self._object(path))

    def head(self, path: str, want: int) -> Head:
        obj = self._object(path)
        size, identity = self._identity(obj)
        return Head(bytes(obj.getbuffer()[:want]), size, identity)

    def read_into(self, path: str, start: int, out: memoryview, identity: str | None) -> None:
        obj = self._object(path)
        if identity is not None and self._identity(obj)[1] != identity:
            raise self.changed(path)
        data = obj.getbuffer()[start : start + len(out)]
        if len(data) != len(out):
            raise self.truncated(path, start, start + len(out), len(data))
        out[:] = data


def protocols(fs: Any) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)


def backend_for(fs: Any, url: str) -> Backend:
    """The backend that writes and reads ``fs`` best."""
    protos = protocols(fs)
    if "file" in protos:
        from phema._local import LocalBackend

        return LocalBackend(fs, url)
    if "memory" in protos:
        return MemoryBackend(fs, url)
    if "s3" in protos or "s3a" in protos:
        from phema._s3 import S3Backend

        return S3Backend(fs, url)
    if "http" in protos or "https" in protos:
        from phema._http import HTTPBackend

        return HTTPBackend(fs, url)
    return Backend(fs, url)
