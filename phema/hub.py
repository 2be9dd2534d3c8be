"""Hugging Face Hub stores: snapshots spooled locally, published in few, atomic commits.

``HfFileSystem`` turns every written file into one commit and has no transactions,
so phema writes to the Hub through :class:`HubBatch` instead. Each added file is
spooled to a local temporary file (memory stays bounded), handed to
``HfApi.preupload_lfs_files`` at once (LFS/Xet content goes up while training runs,
and stays invisible), and a single ``HfApi.create_commit`` later publishes every
pending file. A Hub commit is atomic, so a snapshot is listed completely or not at
all; a failed commit raises :class:`~phema.errors.StorageError` naming the files it
did not publish.

Commits never replace a file unless asked: each names the branch head it was checked
against (``parent_commit``), so a commit that lands meanwhile makes it fail and it is
checked again and retried. A pending file whose name exists at that head is left out
of the commit: accepted when its bytes are the same (a resumed run), reported as
:class:`~phema.errors.ExistsError` otherwise. Since files are committed in batches,
that error surfaces at the commit (the next due write, or :meth:`HubBatch.commit`).

The repository is created (private) on the first write when it does not exist, never
by a read. Listing pins every read to the head commit it saw (:class:`HubBackend`), so
a listing and the reads after it see one version of the folder. Reads go through
``HfFileSystem`` with exact HTTP ranges.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from phema._backends import Backend, Head, Staged
from phema.errors import ExistsError, StorageError

__all__ = ["HubBackend", "HubBatch"]

#: Tries of a commit whose parent moved meanwhile (another writer committed first).
_COMMIT_ATTEMPTS = 5


class _NoAnswer(StorageError):
    """A Hub call did not answer in time (it goes on in the background)."""


class _MayLand(StorageError):
    """A commit did not answer in time: it may still be published."""


def _within(seconds: float, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or :class:`_NoAnswer` once ``seconds`` have passed.

    huggingface_hub's HTTP client waits forever by default, so a stalled Hub would hang
    training. The call runs on a daemon thread; one that does not answer in time is
    left to finish (or not) on its own and never keeps the process from exiting.
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, name="phema-hub-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise _NoAnswer(f"{what}: the Hub did not answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class HubBatch:
    """Pending additions to one folder of one Hub repository.

    Args:
        fs: The store's ``HfFileSystem``.
        root: The folder, as ``HfFileSystem`` spells it (``user/repo/path``).
        url: The store's URL, for messages.
        max_files: Commit as soon as this many files are pending.
        max_seconds: Commit on the next write once the oldest pending file is this old.
        timeout: Seconds a small Hub request (repository and path metadata) may take.
        upload_timeout: Seconds an upload or a commit may take before it is reported as
            failed; a commit reported so may still land, and the error says so.
    """

    def __init__(
        self,
        fs: Any,
        root: str,
        url: str,
        *,
        max_files: int = 32,
        max_seconds: float = 300.0,
        timeout: float = 10.0,
        upload_timeout: float = 600.0,
    ) -> None:
        if max_files < 1:
            raise ValueError(f"max_files must be >= 1, got {max_files}")
        self.fs, self.root, self.url = fs, root.rstrip("/"), url
        self.max_files, self.max_seconds = max_files, max_seconds
        self.timeout, self.upload_timeout = timeout, upload_timeout
        self.commits = 0
        self._api: Any = None
        self._where: Any = None
        self._pending: list[tuple[str, Any]] = []  # (name, CommitOperationAdd)
        self._replace: set[str] = set()  # pending names added with overwrite=True
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
            _within(
                self.timeout,
                f"creating {repo_id}",
                self._api.create_repo,
                repo_id,
                repo_type=kind,
                private=True,
                exist_ok=True,
            )
        except Exception as exc:
            raise StorageError(
                f"{self.url}: the Hub repository {repo_id!r} does not exist and could not be "
                f"created ({exc}); create it (`hf repo create {repo_id}`) or check HF_TOKEN"
            ) from exc

    def add(
        self,
        name: str,
        data: bytes | bytearray | memoryview | str,
        *,
        defer: bool = False,
        overwrite: bool = False,
    ) -> None:
        """Queue ``data`` (bytes, or a local file path that this batch takes over) as ``name``.

        Commits when the batch is due, unless ``defer`` (the caller commits). ``overwrite``
        lets this file replace one of the same name (see :meth:`commit`).
        """
        from huggingface_hub import CommitOperationAdd

        where = self._target()
        with self._lock:
            if name in self.pending:
                raise StorageError(f"{self.url}/{name} is already waiting to be committed")
            if self._spool is None:
                self._spool = tempfile.mkdtemp(prefix="phema-hub-")
            local = os.path.join(self._spool, name.replace("/", "%2F"))  # shards/...: flat
            if isinstance(data, str):
                shutil.move(data, local)
            else:
                with open(local, "wb") as f:
                    f.write(data)
            in_repo = f"{where.path_in_repo.strip('/')}/{name}".lstrip("/")
            op = CommitOperationAdd(path_in_repo=in_repo, path_or_fileobj=local)
        try:
            _within(
                self.upload_timeout,
                f"uploading {self.url}/{name}",
                self._api.preupload_lfs_files,
                where.repo_id,
                additions=[op],
                repo_type=where.repo_type,
                revision=where.revision,
            )
        except Exception as exc:
            os.unlink(local)
            raise StorageError(f"uploading {self.url}/{name} to the Hub failed: {exc}") from exc
        with self._lock:
            if not self._pending:
                self._since = time.monotonic()
            self._pending.append((name, op))
            if overwrite:
                self._replace.add(name)
            due = (
                len(self._pending) >= self.max_files
                or time.monotonic() - self._since >= self.max_seconds
            )
        if due and not defer:
            self.commit()

    def head(self, where: Any = None) -> str:
        """The commit the branch points at now (of ``where``, a resolved path; default: ours)."""
        where = where or self._target()
        if self._api is None:
            from huggingface_hub import HfApi

            self._api = HfApi(endpoint=self.fs.endpoint, token=self.fs.token)
        info = self._api.repo_info(
            where.repo_id, repo_type=where.repo_type, revision=where.revision, timeout=self.timeout
        )
        return str(info.sha)

    def pinned(self, path_in_repo: str, sha: str, where: Any = None) -> str:
        """``path_in_repo`` at commit ``sha``, as ``HfFileSystem`` spells it (immutable)."""
        where = where or self._target()
        prefix = "" if where.repo_type == "model" else f"{where.repo_type}s/"
        return f"{prefix}{where.repo_id}@{sha}/{path_in_repo}".rstrip("/")

    def _present(self, sha: str, paths: list[str]) -> set[str]:
        where = self._target()
        found = _within(
            self.timeout,
            f"checking {self.url}",
            self._api.get_paths_info,
            where.repo_id,
            paths,
            repo_type=where.repo_type,
            revision=sha,
        )
        return {str(f.path) for f in found}

    def commit(
        self, message: str | None = None, *, overwrite: bool = False, whole: bool = False
    ) -> None:
        """Publish every pending file in one commit (nothing happens when none is pending).

        The commit names the branch head it was prepared against (``parent_commit``), so a
        concurrent commit makes it fail and it is prepared again (optimistic concurrency).
        Without ``overwrite``, a pending file whose name exists at that head is not
        committed: with the same bytes it is taken as already published (a resumed run);
        with other bytes it is a conflict, raised as :class:`~phema.errors.ExistsError`
        after the others are published, or before anything is published when ``whole``.
        """
        with self._lock:
            batch, self._pending = self._pending, []
            replace, self._replace = self._replace, set()
        if not batch:
            return
        where = self._target()
        names = [name for name, _ in batch]
        summary = message or f"phema: add {len(names)} file(s) ({names[0]} .. {names[-1]})"
        conflicts: list[str] = []
        try:
            for attempt in range(_COMMIT_ATTEMPTS):
                head = self.head()
                ops = [op for _, op in batch]
                if not overwrite:
                    checked = [(n, op) for n, op in batch if n not in replace]
                    present = self._present(head, [op.path_in_repo for _, op in checked])
                    conflicts = [
                        name
                        for name, op in checked
                        if op.path_in_repo in present and (whole or not self._same(op, head))
                    ]
                    if conflicts and whole:
                        raise self._conflict(conflicts, published=False)
                    ops = [op for n, op in batch if n in replace or op.path_in_repo not in present]
                if not ops:
                    break
                try:
                    _within(
                        self.upload_timeout,
                        f"committing {len(ops)} file(s) to {self.url}",
                        self._api.create_commit,
                        where.repo_id,
                        operations=ops,
                        commit_message=summary,
                        repo_type=where.repo_type,
                        revision=where.revision,
                        parent_commit=head,
                    )
                except _NoAnswer as exc:
                    raise _MayLand(
                        f"{exc}; the commit of {', '.join(names)} may still land: list the "
                        "store before relying on it"
                    ) from exc
                except Exception as exc:
                    status = getattr(getattr(exc, "response", None), "status_code", None)
                    if status in (409, 412) and attempt + 1 < _COMMIT_ATTEMPTS:
                        continue  # the branch moved: prepare against the new head
                    raise
                self.commits += 1
                break
        except (ExistsError, _MayLand):
            raise
        except Exception as exc:
            raise StorageError(
                f"committing {len(names)} file(s) to {self.url} failed, none was published "
                f"({', '.join(names)}): {exc}"
            ) from exc
        finally:
            _remove_spooled(batch)
            self.fs.invalidate_cache()
        if conflicts:
            raise self._conflict(conflicts, published=True)

    def _same(self, op: Any, sha: str) -> bool:
        """Whether the file at ``sha`` holds exactly the bytes of the pending ``op``."""
        with open(op.path_or_fileobj, "rb") as f:
            mine = f.read()
        there = self.fs.cat_file(self.pinned(op.path_in_repo, sha))
        return bool(there == mine)

    def _conflict(self, names: list[str], *, published: bool) -> ExistsError:
        rest = (
            "the other files of the commit were published" if published else "nothing was published"
        )
        return ExistsError(
            f"{', '.join(f'{self.url}/{n}' for n in names)} already exist(s) on the Hub with "
            f"other content; {rest} (delete them, or pass overwrite=True / --overwrite)"
        )

    def discard(self) -> None:
        """Drop every pending file without publishing it."""
        with self._lock:
            batch, self._pending = self._pending, []
            self._replace.clear()
        _remove_spooled(batch)


def _remove_spooled(batch: list[tuple[str, Any]]) -> None:
    for _, op in batch:
        if isinstance(op.path_or_fileobj, str) and os.path.exists(op.path_or_fileobj):
            os.unlink(op.path_or_fileobj)


class HubBackend(Backend):
    """A folder of a Hub repository: writes go through :class:`HubBatch`, reads are pinned.

    Listing resolves the branch head once (:meth:`pin`) and reads every file at that
    commit, which no later commit can change, so the identity of a file is the commit.
    """

    def __init__(self, fs: Any, url: str, batch: HubBatch) -> None:
        super().__init__(fs, url)
        self.batch = batch

    def exists(self, path: str) -> bool:
        """Whether ``path`` is committed at the head, or waiting in the batch."""
        if path.rsplit("/", 1)[-1] in self.batch.pending:
            return True
        try:
            self.fs.invalidate_cache()
            return bool(self.fs.exists(path))
        except FileNotFoundError:
            return False  # the repository does not exist yet

    def pin(self, root: str) -> str:
        """``root`` at the current head commit (never creates the repository)."""
        try:
            where = self.fs.resolve_path(root)
        except FileNotFoundError:
            return root  # no repository: listing reports it
        return self.batch.pinned(where.path_in_repo, self.batch.head(where), where)

    def stage(self, name: str, path: str, overwrite: bool) -> Staged:
        """A local spool file, committed by :meth:`publish`."""
        spool = tempfile.mkdtemp(prefix="phema-out-")
        local = os.path.join(spool, os.path.basename(name))
        return Staged(name, path, open(local, "wb"), token=local)

    def publish(self, staged: Sequence[Staged], overwrite: bool) -> None:
        """All staged files in one commit (after the files still pending, in their own)."""
        try:
            for s in staged:
                s.file.close()
            self.batch.commit()
            for s in staged:
                self.batch.add(s.name, s.token, defer=True)
            names = ", ".join(s.name for s in staged)
            self.batch.commit(f"phema: publish {names}", overwrite=overwrite, whole=True)
        except BaseException:
            self.batch.discard()
            self.discard(staged)
            raise
        self.discard(staged)  # removes the emptied spool folders

    def _discard_one(self, s: Staged) -> None:
        s.file.close()
        shutil.rmtree(os.path.dirname(s.token), ignore_errors=True)

    def head(self, path: str, want: int) -> Head:
        """The first ``want`` bytes of ``path`` (pinned by :meth:`pin`)."""
        size = int(self.fs.info(path)["size"])
        return Head(self._fetch(path, 0, min(want, size)), size, path)

    def read_into(self, path: str, start: int, out: memoryview, identity: str | None) -> None:
        """One exact HTTP range of ``path`` (pinned to a commit by :meth:`pin`) into ``out``."""
        data = self._fetch(path, start, start + len(out))
        if len(data) != len(out):
            raise self.truncated(path, start, start + len(out), len(data))
        out[:] = data

    def _fetch(self, path: str, start: int, end: int) -> bytes:
        # The Hub's file objects read ahead 5 MiB unless told not to cache.
        return bytes(self.fs.cat_file(path, start=start, end=end, cache_type="none"))
