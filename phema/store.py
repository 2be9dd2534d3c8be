"""Snapshot stores: a folder of snapshot files at any fsspec URL, written atomically.

One file per (time, profile): ``phema-<t>-<std>.safetensors`` holding that
profile's full ``state_dict`` (see :mod:`phema.format`), with ``__metadata__``

================  =====================================================
``phema.format``  schema version (:data:`~phema.format.FORMAT_VERSION`)
``phema.kind``    ``"snapshot"``
``phema.std``     the profile's relative std (``repr`` of a float)
``phema.gamma``   its exponent
``phema.t``       training time of the snapshot, ``phema.t_unit`` its unit
``phema.step``    optimizer step, or ``""`` when unknown
``phema.layout``  :func:`~phema.format.layout_hash` of the tensors
``phema.copied``  JSON list of tensors copied from the live module, not averaged
================  =====================================================

File names are for people; listing reads every file's header (two exact ranged
reads) and trusts only the metadata. A file is either complete or absent: local
files are written to a hidden temporary name in the same folder, synced and
renamed; other filesystems write inside an fsspec transaction (an S3 multipart
upload is aborted on error); ``memory://`` stores the bytes in one step; the
Hugging Face Hub (``hf://user/repo/folder``) gets files in batched commits
(:class:`~phema.hub.HubBatch`): a file is listed once its commit lands, which
happens every ``hub_batch_files`` files, on the next write after
``hub_batch_seconds``, and at :meth:`SnapshotStore.flush` (called by
:meth:`phema.SnapshotWriter.close`).
"""

from __future__ import annotations

import builtins
import json
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Any

import fsspec
import torch
from torch import Tensor

from phema.errors import FormatError, StorageError
from phema.format import FORMAT_VERSION, Header, layout_hash, parse_header, parse_header_length
from phema.format import serialize as serialize_file
from phema.hub import HubBatch

__all__ = [
    "ReconstructionInfo",
    "SnapshotInfo",
    "SnapshotStore",
    "atomic_write",
    "check_layouts",
    "snapshot_metadata",
    "snapshot_name",
]

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot file as listed: where it is, what it holds, and its parsed header."""

    path: str
    url: str
    t: float
    std: float
    gamma: float
    t_unit: str
    step: int | None
    layout: str
    size: int
    copied: tuple[str, ...]
    header: Header


#: One file as listed: ``(path, url, size, parsed header)``.
_Listed = tuple[str, str, int, Header]


@dataclass(frozen=True)
class ReconstructionInfo:
    """One output of :func:`phema.reconstruct` as listed: its target and how it was made."""

    path: str
    url: str
    t: float
    std: float
    t_unit: str
    size: int
    coefficients: dict[str, float]  # input file name -> coefficient
    fit: dict[str, float]  # rel_error, l1_norm, condition


def snapshot_metadata(
    tensors: Mapping[str, Tensor],
    *,
    t: float,
    std: float,
    gamma: float,
    t_unit: str,
    step: int | None,
    copied: tuple[str, ...] = (),
) -> dict[str, str]:
    """The ``__metadata__`` of a snapshot of ``tensors`` (see the module docstring)."""
    specs = [(n, v.dtype, tuple(v.shape)) for n, v in tensors.items()]
    return {
        "phema.format": FORMAT_VERSION,
        "phema.kind": "snapshot",
        "phema.std": repr(float(std)),
        "phema.gamma": repr(float(gamma)),
        "phema.t": repr(float(t)),
        "phema.t_unit": t_unit,
        "phema.step": "" if step is None else str(int(step)),
        "phema.layout": layout_hash(specs),
        "phema.copied": json.dumps(list(copied)),
    }


def snapshot_name(t: float, std: float) -> str:
    """``phema-000000004096-0.0500.safetensors``: sortable by time, then std."""
    t_token = f"{int(t):012d}" if float(t).is_integer() else f"{t:.9e}"
    return f"phema-{t_token}-{std:.4f}{SUFFIX}"


class SnapshotStore:
    """A folder of snapshots at ``url`` (local path, ``file://``, ``memory://``, ``s3://``...).

    Args:
        url: Where the snapshots live.
        hub_batch_files: Hub only: commit once this many files are pending.
        hub_batch_seconds: Hub only: commit on the next write once the oldest
            pending file is this many seconds old.
        **storage_options: Passed to :func:`fsspec.url_to_fs` (credentials, endpoint).
    """

    def __init__(
        self,
        url: str,
        *,
        hub_batch_files: int = 32,
        hub_batch_seconds: float = 300.0,
        **storage_options: Any,
    ) -> None:
        self.url = url
        try:
            self.fs, self.root = fsspec.url_to_fs(url, **storage_options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open {url!r}: {exc}") from exc
        self.is_local = "file" in _protocols(self.fs)
        self.hub: HubBatch | None = None
        if "hf" in _protocols(self.fs):
            self.hub = HubBatch(
                self.fs,
                self.root,
                url,
                max_files=hub_batch_files,
                max_seconds=hub_batch_seconds,
            )

    def path_of(self, name: str) -> str:
        """Path of file ``name`` inside the store, for the store's filesystem."""
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        """Whether file ``name`` is in the store (or waiting for its Hub commit)."""
        if self.hub is not None:
            if name in self.hub.pending:
                return True
            try:
                self.fs.invalidate_cache(self.root)
                return bool(self.fs.exists(self.path_of(name)))
            except FileNotFoundError:
                return False  # the repository does not exist yet
        return bool(self.fs.exists(self.path_of(name)))

    def write(self, name: str, data: bytes, *, overwrite: bool = False) -> str:
        """Write ``data`` as file ``name`` atomically; refuses to replace unless asked."""
        path = self.path_of(name)
        if not overwrite and self.exists(name):
            raise StorageError(
                f"{self.url}/{name} exists; snapshots are never overwritten (delete it first)"
            )
        if self.hub is not None:
            self.hub.add(name, data)
        elif self.is_local:
            os.makedirs(self.root, exist_ok=True)
            with atomic_write(path) as f:
                f.write(data)
        elif "memory" in _protocols(self.fs):
            self.fs.pipe_file(path, data)
        else:
            try:
                with self.fs.transaction, self.fs.open(path, "wb") as f:
                    f.write(data)
            except Exception as exc:  # botocore/aiohttp errors are not OSErrors
                raise StorageError(
                    f"writing {self.url}/{name} failed, nothing was published: {exc}"
                ) from exc
        return path

    def flush(self) -> None:
        """Publish files still waiting for a Hub commit; a no-op on other stores."""
        if self.hub is not None:
            self.hub.commit()

    def leftovers(self, older_than: float = 0.0) -> list[str]:
        """Hidden temporary files of writers that were killed mid-write (local stores only).

        Only files last modified more than ``older_than`` seconds ago are returned, so
        that a writer still at work is not disturbed. They are never listed as snapshots.
        """
        if not self.is_local or not os.path.isdir(self.root):
            return []
        now = time.time()
        return sorted(
            self.path_of(n)
            for n in os.listdir(self.root)
            if n.startswith(".phema-")
            and f"{SUFFIX}.tmp-" in n
            and now - os.path.getmtime(self.path_of(n)) > older_than
        )

    def save(
        self,
        tensors: Mapping[str, Tensor],
        *,
        t: float,
        std: float,
        gamma: float,
        t_unit: str = "steps",
        step: int | None = None,
        copied: tuple[str, ...] = (),
    ) -> str:
        """Serialise one profile's tensors with their metadata and write it atomically."""
        meta = snapshot_metadata(
            tensors, t=t, std=std, gamma=gamma, t_unit=t_unit, step=step, copied=copied
        )
        return self.write(snapshot_name(t, std), serialize_file(tensors, meta))

    def read_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of ``path``, by one exact ranged read."""
        return self._fetch(path, start, end)

    def read_into(self, path: str, start: int, out: memoryview) -> None:
        """Fill ``out`` with bytes ``[start, start + len(out))`` of ``path``.

        One exact ranged read; local files are read straight into ``out`` (``preadv``),
        so a caller that reuses its buffers allocates nothing per read.
        """
        if not self.is_local:
            out[:] = self._fetch(path, start, start + len(out))
            return
        fd = os.open(path, os.O_RDONLY)
        try:
            got = 0
            while got < len(out) and (n := os.preadv(fd, [out[got:]], start + got)):
                got += n
        finally:
            os.close(fd)
        if got != len(out):
            raise self._truncated(path, start, start + len(out), got)

    def _fetch(self, path: str, start: int, end: int) -> bytes:
        # The Hub's file objects read ahead 5 MiB unless told not to cache.
        opts = {"cache_type": "none"} if self.hub is not None else {}
        data: bytes = self.fs.cat_file(path, start=start, end=end, **opts)
        if len(data) != end - start:
            raise self._truncated(path, start, end, len(data))
        return data

    def _truncated(self, path: str, start: int, end: int, got: int) -> FormatError:
        return FormatError(
            f"{self.url}/{os.path.basename(path)}: wanted bytes [{start}, {end}), got "
            f"{got}: the file is truncated"
        )

    def list(self) -> list[SnapshotInfo]:
        """Every snapshot in the store, sorted by (t, std); raises on a foreign or bad file.

        Outputs of :func:`phema.reconstruct` beside them are skipped (see
        :meth:`reconstructions`).
        """
        return self._snapshots(self._headers())

    def reconstructions(self) -> builtins.list[ReconstructionInfo]:
        """Every output of :func:`phema.reconstruct` in the folder, sorted by (t, std)."""
        return self._reconstructions(self._headers())

    def contents(self) -> tuple[builtins.list[SnapshotInfo], builtins.list[ReconstructionInfo]]:
        """:meth:`list` and :meth:`reconstructions` from one read of every header."""
        headers = builtins.list(self._headers())
        return self._snapshots(headers), self._reconstructions(headers)

    def _snapshots(self, headers: Iterable[_Listed]) -> builtins.list[SnapshotInfo]:
        infos = [
            self._info(*entry)
            for entry in headers
            if entry[3].metadata.get("phema.kind") != "reconstruction"
        ]
        return sorted(infos, key=lambda i: (i.t, i.std))

    def _reconstructions(self, headers: Iterable[_Listed]) -> builtins.list[ReconstructionInfo]:
        found = []
        for path, source, size, header in headers:
            meta = header.metadata
            if meta.get("phema.kind") != "reconstruction":
                continue
            try:
                found.append(
                    ReconstructionInfo(
                        path=path,
                        url=source,
                        t=float(meta["phema.t"]),
                        std=float(meta["phema.std"]),
                        t_unit=meta["phema.t_unit"],
                        size=size,
                        coefficients=json.loads(meta["phema.coefficients"]),
                        fit=json.loads(meta["phema.fit"]),
                    )
                )
            except (KeyError, ValueError, TypeError) as exc:
                raise FormatError(
                    f"{source}: metadata entry is missing or malformed ({exc})"
                ) from None
        return sorted(found, key=lambda i: (i.t, i.std))

    def _headers(self) -> Iterator[_Listed]:
        """``(path, url, size, header)`` of every safetensors file in the folder."""
        self.fs.invalidate_cache(self.root)  # see files other processes wrote since
        try:
            if not self.fs.isdir(self.root):
                raise StorageError(f"{self.url} does not exist or is not a folder of snapshots")
            entries = self.fs.ls(self.root, detail=True)
        except (FileNotFoundError, PermissionError) as exc:
            raise StorageError(f"cannot list {self.url}: {exc}") from exc
        for entry in entries:
            path, size = str(entry["name"]), int(entry["size"])
            name = os.path.basename(path.rstrip("/"))
            if entry.get("type") != "file" or not name.endswith(SUFFIX) or name.startswith("."):
                continue
            source = f"{self.url.rstrip('/')}/{name}"
            n = parse_header_length(self.read_range(path, 0, min(8, size)), source)
            if 8 + n > size:
                raise FormatError(f"{source}: header of {n} bytes does not fit the file; truncated")
            yield (
                path,
                source,
                size,
                parse_header(self.read_range(path, 8, 8 + n), source, file_size=size),
            )

    def _info(self, path: str, source: str, size: int, header: Header) -> SnapshotInfo:
        meta = header.metadata
        if meta.get("phema.format") != FORMAT_VERSION or meta.get("phema.kind") != "snapshot":
            raise FormatError(
                f"{source}: not a phema snapshot of format {FORMAT_VERSION} "
                f"(phema.format={meta.get('phema.format')!r}); move it out of the store"
            )
        try:
            step_text = meta["phema.step"]
            return SnapshotInfo(
                path=path,
                url=source,
                t=float(meta["phema.t"]),
                std=float(meta["phema.std"]),
                gamma=float(meta["phema.gamma"]),
                t_unit=meta["phema.t_unit"],
                step=int(step_text) if step_text else None,
                layout=meta["phema.layout"],
                size=size,
                copied=tuple(json.loads(meta["phema.copied"])),
                header=header,
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(f"{source}: metadata entry is missing or malformed ({exc})") from None

    def load(self, info: SnapshotInfo) -> dict[str, Tensor]:
        """All tensors of one snapshot (reads the data section once)."""
        data = bytearray(self.read_range(info.path, info.header.data_start, info.size))
        out = {}
        for ti in info.header.tensors:
            raw = data[ti.begin : ti.end]
            out[ti.name] = (
                torch.frombuffer(raw, dtype=ti.dtype).reshape(ti.shape).clone()
                if raw
                else torch.empty(ti.shape, dtype=ti.dtype)
            )
        return out


@contextmanager
def atomic_write(path: str) -> Iterator[IO[bytes]]:
    """A local file at ``path`` that appears whole, or not at all.

    Writes go to a hidden ``.<name>.tmp-<uuid>`` beside ``path``, which is synced and
    renamed over ``path`` when the block ends without error, and removed otherwise.
    """
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_layouts(infos: list[SnapshotInfo]) -> None:
    """Raise :class:`StorageError` naming the first file whose layout differs from the rest."""
    if not infos:
        return
    ref = infos[0]
    for info in infos[1:]:
        if info.layout != ref.layout or info.header.tensors != ref.header.tensors:
            raise StorageError(
                f"{info.url} has tensor layout {info.layout}, but {ref.url} has {ref.layout}: "
                "the store mixes snapshots of different models or dtypes"
            )


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    proto = fs.protocol
    return (proto,) if isinstance(proto, str) else tuple(proto)
