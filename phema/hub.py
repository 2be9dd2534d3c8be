"""Hugging Face Hub stores: snapshots spooled locally, published in few, atomic commits.

``HfFileSystem`` turns every written file into one commit and has no transactions,
so phema writes to the Hub through :class:`HubBatch` instead. Each added file is
spooled to a local temporary file (memory stays bounded), handed to
``HfApi.preupload_lfs_files`` at once (LFS/Xet content goes up while training runs,
and stays invisible), and a single ``HfApi.create_commit`` later publishes every
pending file. A Hub commit is atomic, so a snapshot is listed completely or not at
all; a failed commit raises :class:`~phema.errors.StorageError` naming the files it
did not publish.

The repository is created (private) on the first write when it does not exist.
Reads go through ``HfFileSystem`` with exact HTTP ranges (see
:meth:`phema.store.SnapshotStore.read_range`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from typing import Any

from phema.errors import StorageError

__all__ = ["HubBatch"]


class HubBatch:
    """Pending additions to one folder of one Hub repository.

    Args:
        fs: The store's ``HfFileSystem``.
        root: The folder, as ``HfFileSystem`` spells it (``user/repo/path``).
        url: The store's URL, for messages.
        max_files: Commit as soon as this many files are pending.
        max_seconds: Commit on the next write once the oldest pending file is this old.
    """

    def __init__(
        self, fs: Any, root: str, url: str, *, max_files: int = 32, max_seconds: float = 300.0
    ) -> None:
        if max_files < 1:
            raise ValueError(f"max_files must be >= 1, got {max_files}")
        self.fs, self.root, self.url = fs, root.rstrip("/"), url
        self.max_files, self.max_seconds = max_files, max_seconds
        self.commits = 0
        self._api: Any = None
        self._where: Any = None
        self._pending: list[tuple[str, Any]] = []  # (name, CommitOperationAdd)
        self._since = 0.0
        self._spool: str | None = None
        self._lock = threading.Lock()

    @property
    def pending(self) -> list[str]:
        """Names added but not yet committed."""
        return [name for name, _ in self._pending]

    def _target(self) -> Any:
        if self._where is None:
            from huggingface_hub import HfApi

            self._api = HfApi(endpoint=self.fs.endpoint, token=self.fs.token)
            try:
                self._where = self.fs.resolve_path(self.root)
            except FileNotFoundError:
                self._create_repo()
                self.fs.invalidate_cache()  # forget that the repository was missing
                self._where = self.fs.resolve_path(self.root)
        return self._where

    def _create_repo(self) -> None:
        parts = self.root.split("/")
        kind = "model"
        if parts[0] in ("datasets", "spaces"):
            kind, parts = parts[0][:-1], parts[1:]
        repo_id = "/".join(parts[:2]).split("@", 1)[0]
        try:
            self._api.create_repo(repo_id, repo_type=kind, private=True, exist_ok=True)
        except Exception as exc:
            raise StorageError(
                f"{self.url}: the Hub repository {repo_id!r} does not exist and could not be "
                f"created ({exc}); create it (`hf repo create {repo_id}`) or check HF_TOKEN"
            ) from exc

    def add(self, name: str, data: bytes | str, *, defer: bool = False) -> None:
        """Queue ``data`` (bytes, or a local file path that this batch takes over) as ``name``.

        Commits when the batch is due, unless ``defer`` (the caller commits).
        """
        from huggingface_hub import CommitOperationAdd

        where = self._target()
        with self._lock:
            if name in self.pending:
                raise StorageError(f"{self.url}/{name} is already waiting to be committed")
            if self._spool is None:
                self._spool = tempfile.mkdtemp(prefix="phema-hub-")
            local = os.path.join(self._spool, name)
            if isinstance(data, str):
                shutil.move(data, local)
            else:
                with open(local, "wb") as f:
                    f.write(data)
            in_repo = f"{where.path_in_repo.strip('/')}/{name}".lstrip("/")
            op = CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=local)
        try:
            self._api.preupload_lfs_files(
                where.repo_id, additions=[op], repo_type=where.repo_type, revision=where.revision
            )
        except Exception as exc:
            os.unlink(local)
            raise StorageError(f"uploading {self.url}/{name} to the Hub failed: {exc}") from exc
        with self._lock:
            if not self._pending:
                self._since = time.monotonic()
            self._pending.append((name, op))
            due = (
                len(self._pending) >= self.max_files
                or time.monotonic() - self._since >= self.max_seconds
            )
        if due and not defer:
            self.commit()

    def commit(self, message: str | None = None) -> None:
        """Publish every pending file in one commit (nothing happens when none is pending)."""
        with self._lock:
            batch, self._pending = self._pending, []
        if not batch:
            return
        where = self._target()
        names = [name for name, _ in batch]
        summary = message or f"phema: add {len(names)} file(s) ({names[0]} .. {names[-1]})"
        try:
            self._api.create_commit(
                where.repo_id,
                operations=[op for _, op in batch],
                commit_message=summary,
                repo_type=where.repo_type,
                revision=where.revision,
            )
        except Exception as exc:
            raise StorageError(
                f"committing {len(names)} file(s) to {self.url} failed, none was published "
                f"({', '.join(names)}): {exc}"
            ) from exc
        finally:
            _remove_spooled(batch)
            self.fs.invalidate_cache()
        self.commits += 1

    def discard(self) -> None:
        """Drop every pending file without publishing it."""
        with self._lock:
            batch, self._pending = self._pending, []
        _remove_spooled(batch)


def _remove_spooled(batch: list[tuple[str, Any]]) -> None:
    for _, op in batch:
        if isinstance(op.path_or_fileobj, str) and os.path.exists(op.path_or_fileobj):
            os.unlink(op.path_or_fileobj)
