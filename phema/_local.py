"""Local disk: hidden temporary files, publish by hard link (no replace), reads by inode.

A staged file is ``.<name>.tmp-<uuid>`` in the target folder. Publishing it

* without ``overwrite`` hard-links it to its name: ``link(2)`` fails with ``EEXIST`` when
  the name exists, atomically, so of two writers racing for one name exactly one wins.
  Where hard links are not supported, ``renameat2(RENAME_NOREPLACE)`` does the same;
* with ``overwrite`` first hard-links the file it replaces to a hidden backup, then
  renames over it, so that a failure later in the same publish can put it back.

The folder is synced after a publish. Reads check the file's device, inode, size and
mtime (``fstat`` of the descriptor they read from) against the listing's.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import uuid
from typing import Any

from phema._backends import Backend, Head, Staged, _Undo
from phema.errors import StorageError

#: Errors of ``link(2)`` that mean "this filesystem has no hard links" (FAT, some FUSE/SMB).
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EMLINK}

_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def temp_name(name: str) -> str:
    """The hidden name a file is staged under (``phema clean`` removes stale ones)."""
    return f".{name}.tmp-{uuid.uuid4().hex}"


def link_noreplace(src: str, dst: str) -> bool:
    """Give ``src`` the name ``dst`` unless ``dst`` exists (then ``FileExistsError``).

    Returns whether ``src`` still exists (``True`` after a hard link, ``False`` after
    ``renameat2``, which moves it).
    """
    try:
        os.link(src, dst)
        return True
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
    _rename_noreplace(src, dst)
    return False


def _rename_noreplace(src: str, dst: str) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError) as exc:
        raise OSError(
            errno.ENOTSUP,
            f"{dst}: the filesystem supports neither hard links nor RENAME_NOREPLACE, so a "
            "file cannot be published without risking a replace; use another folder",
        ) from exc
    if fn(_AT_FDCWD, src.encode(), _AT_FDCWD, dst.encode(), _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def _identity(st: os.stat_result) -> str:
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


def fsync_dir(folder: str) -> None:
    """Make renames and links in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBackend(Backend):
    """A folder on local disk."""

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def stage(self, name: str, path: str, overwrite: bool) -> Staged:
        folder = os.path.dirname(path)
        created = []  # folders made here: their entries in their parents are synced too
        probe = folder
        while probe and not os.path.isdir(probe):
            created.append(probe)
            probe = os.path.dirname(probe)
        tmp = os.path.join(folder, temp_name(os.path.basename(path)))
        try:
            os.makedirs(folder, exist_ok=True)
            f = open(tmp, "wb")  # noqa: SIM115 (closed when published or discarded)
        except OSError as exc:  # named by the user's path, not the hidden temporary one
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
        return Staged(name, path, f, token=tmp, extra={"created": created})

    def _seal(self, s: Staged) -> None:
        if not s.file.closed:
            s.file.flush()
            os.fsync(s.file.fileno())
            s.extra["ino"] = os.fstat(s.file.fileno()).st_ino
            s.file.close()

    def publish(self, staged: Any, overwrite: bool) -> None:
        super().publish(staged, overwrite)
        folders = {os.path.dirname(s.path) for s in staged}
        for s in staged:
            folders.update(os.path.dirname(c) for c in s.extra.get("created", ()))
        for folder in folders:
            fsync_dir(folder or ".")

    def _publish_one(self, s: Staged, overwrite: bool) -> _Undo:
        tmp: str = s.token
        if not overwrite:
            try:
                kept = link_noreplace(tmp, s.path)
            except FileExistsError:
                raise self.exists_error(s) from None
            if kept:
                os.unlink(tmp)
            return _Undo(s, None)
        backup = None
        if os.path.exists(s.path):
            backup = os.path.join(os.path.dirname(s.path), temp_name(os.path.basename(s.path)))
            try:
                os.link(s.path, backup)
            except FileNotFoundError:
                backup = None  # removed meanwhile: nothing to keep
            except OSError as exc:
                if exc.errno not in _NO_LINKS:
                    raise
                os.rename(s.path, backup)
        os.replace(tmp, s.path)
        return _Undo(s, backup)

    def _undo(self, undo: _Undo) -> None:
        s = undo.staged
        if undo.backup is not None:
            os.replace(undo.backup, s.path)
        elif os.stat(s.path).st_ino == s.extra.get("ino"):  # still ours: remove it
            os.unlink(s.path)

    def _finish(self, undo: _Undo) -> None:
        if undo.backup is not None:
            os.unlink(undo.backup)

    def _discard_one(self, s: Staged) -> None:
        s.file.close()
        if os.path.exists(s.token):
            os.unlink(s.token)

    def identity_of(self, path: str) -> tuple[int, str]:
        st = os.stat(path)
        return st.st_size, _identity(st)

    def _open_file(self, path: str) -> int:
        """``path`` opened for reading if it is a regular file (never blocks on a FIFO)."""
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StorageError(
                f"{self.where(path)} is not a regular file; a store holds files only"
            )
        return fd

    def head(self, path: str, want: int) -> Head:
        fd = self._open_file(path)
        try:
            st = os.fstat(fd)
            data = os.pread(fd, min(want, st.st_size), 0)
        finally:
            os.close(fd)
        return Head(data, st.st_size, _identity(st))

    def read_into(self, path: str, start: int, out: memoryview, identity: str | None) -> None:
        """One ``preadv`` straight into ``out``, from the version listed (checked by ``fstat``)."""
        try:
            fd = self._open_file(path)
        except FileNotFoundError:
            raise self.changed(path) from None
        try:
            if identity is not None and _identity(os.fstat(fd)) != identity:
                raise self.changed(path)
            got = 0
            while got < len(out) and (n := os.preadv(fd, [out[got:]], start + got)):
                got += n
        finally:
            os.close(fd)
        if got != len(out):
            raise self.truncated(path, start, start + len(out), got)

    def read_all(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()
