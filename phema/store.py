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

File names are for people (and injective in ``(t, std)``, see :func:`snapshot_name`);
listing reads every file's header (two exact ranged reads: its length, then the
header, both from the same version of the file) and trusts only the metadata. How each backend writes and reads is in
:mod:`phema._backends`; what a store promises on every backend:

* a file is complete or absent: it is staged invisibly and then published (local:
  hidden temporary file and hard link; S3: a multipart upload completed at the end;
  ``memory://``: one step under a lock; the Hub: batched commits, see
  :class:`~phema.hub.HubBatch`, so a snapshot is listed once its commit lands, every
  ``hub_batch_files`` files, on the next write after ``hub_batch_seconds``, and at
  :meth:`SnapshotStore.flush`, called by :meth:`phema.SnapshotWriter.close`);
* a file is never replaced unless ``overwrite`` is asked, also when writers race:
  local disk links without replacing, S3 completes with ``If-None-Match: *``, the Hub
  commits against the head it checked (``parent_commit``); ``memory://`` checks and
  publishes under one lock. Other fsspec filesystems check, then publish: there two
  writers racing for one name may both succeed;
* a read returns bytes of the version that was listed, or raises
  :class:`~phema.errors.ChangedError`;
* a store never shares a filesystem instance with other stores or with the user's own
  fsspec calls, and remote requests have timeouts and bounded retries.
"""

from __future__ import annotations

import builtins
import io
import json
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import IO, Any

import fsspec
import numpy as np
import torch
from torch import Tensor

from phema._backends import Backend, Staged, backend_for, protocols
from phema._listing import (
    Listed,
    Problem,
    ReconstructionInfo,
    Scan,
    SnapshotInfo,
    check_layouts,
    scan_files,
)
from phema._local import fsync_dir, link_noreplace, temp_name
from phema._meta import gamma_disagrees
from phema._official import OFFICIAL_NAME, PICKLE_NAME, official_info
from phema._s3 import bound_calls, s3_options
from phema.errors import (
    ExistsError,
    FormatError,
    OptionError,
    PhemaError,
    ProfileError,
    StorageError,
)
from phema.format import (
    FORMAT_VERSION,
    Header,
    file_view,
    layout_hash,
    parse_header,
    parse_header_length,
)
from phema.hub import HubBackend, HubBatch
from phema.shards import SHARD_FOLDER, read_logical, verify_shards

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

#: Bytes read first when listing: the header's length. The header itself is a second
#: exact read, so that no tensor byte is read twice (once here, once by the pass).
HEADER_PROBE = 8
#: Official pickles indexed at once while listing (each index is sequential reads).
INDEX_THREADS = 8


def snapshot_metadata(
    tensors: Mapping[str, Tensor] | Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    *,
    t: float,
    std: float,
    gamma: float,
    t_unit: str,
    step: int | None,
    copied: tuple[str, ...] = (),
) -> dict[str, str]:
    """The ``__metadata__`` of a snapshot of ``tensors`` (see the module docstring).

    Raises:
        ProfileError: If ``gamma`` is not the exponent of ``std`` (readers refuse such
            a file), or ``t`` is not finite and ``>= 0``.
    """
    expected = gamma_disagrees(float(std), float(gamma))
    if expected is not None:
        raise ProfileError(
            f"gamma={gamma!r} is not the exponent of std={std!r} ({expected!r}); pass "
            "gamma=phema.sigma_rel_to_gamma(std)"
        )
    if not (math.isfinite(t) and t >= 0):
        raise ProfileError(f"snapshot time t must be finite and >= 0, got {t!r}")
    specs = (
        [(n, v.dtype, tuple(v.shape)) for n, v in tensors.items()]
        if isinstance(tensors, Mapping)
        else list(tensors)
    )
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


def _token(x: float, what: str) -> str:
    """A decimal spelling of ``x`` that reads back as exactly ``x``, with no ``-`` in it.

    Positional (``1234.5``) while that takes at most 40 characters, else scientific
    with ``m`` for the exponent's minus (``1e+300``, ``5em324``): the two never
    coincide, as only the second holds an ``e``.
    """
    x = float(x)
    if not math.isfinite(x) or x < 0:
        raise ProfileError(f"{what} must be finite and >= 0 to name a snapshot, got {x!r}")
    spelled = np.format_float_positional(x, unique=True, trim="-")
    if len(spelled) <= 40:
        return spelled
    return np.format_float_scientific(x, unique=True, trim="-").replace("-", "m")


def snapshot_name(t: float, std: float) -> str:
    """``phema-000000004096-0.0500.safetensors``: sortable by time, then std; injective.

    An integral ``t`` below ``1e40`` is written with 12 digits (more when needed), any
    other ``t`` in the shortest decimal that reads back exactly (``1234.5``; scientific,
    with ``m`` for a minus sign, past 40 characters: ``1e+300``, ``5em324``). ``std``
    is written with 4 decimals when that reads back exactly (``0.0500``), else in its
    shortest exact decimal (``0.10004``). Both tokens read back as exactly
    ``(t, std)`` and neither holds a ``-``, so two different ``(t, std)`` never share
    a name.
    """
    t, std = float(t), float(std)
    t_token = _token(t, "t")
    if t.is_integer() and t < 1e40:
        t_token = f"{int(t):012d}"
    four = f"{std:.4f}" if math.isfinite(std) else ""
    std_token = four if four and len(four) <= 40 and float(four) == std else None
    return f"phema-{t_token}-{std_token or _token(std, 'std')}{SUFFIX}"


class _Unreadable(Exception):
    """A file that exists but this process may not read (carries the ``PermissionError``)."""

    def __init__(self, cause: PermissionError) -> None:
        super().__init__(cause.strerror or str(cause))


@contextmanager
def _read_failures(source: str) -> Iterator[None]:
    """Failures reading one listed file, as a listing reports them.

    A missing file and phema's own errors pass; an unreadable one becomes
    :class:`_Unreadable`, any other (remote) failure a StorageError naming the file.
    """
    try:
        yield
    except (FileNotFoundError, PhemaError):
        raise
    except PermissionError as exc:
        raise _Unreadable(exc) from exc
    except Exception as exc:
        raise StorageError(f"cannot read {source}: {type(exc).__name__}: {exc}") from exc


def _problem(source: str, exc: Exception) -> FormatError | StorageError:
    """The error a listing reports for one bad file."""
    if isinstance(exc, _Unreadable):
        return StorageError(f"cannot read {source}: {exc}")
    assert isinstance(exc, FormatError)
    return exc


class SnapshotStore:
    """A folder of snapshots at ``url`` (local path, ``file://``, ``memory://``, ``s3://``...).

    Args:
        url: Where the snapshots live.
        hub_batch_files: Hub only: commit once this many files are pending.
        hub_batch_seconds: Hub only: commit on the next write once the oldest
            pending file is this many seconds old.
        timeout: S3 only: seconds a request may wait to connect, and again for each
            part of its answer, before it fails and is retried.
        retries: S3 only: tries of a request in all (with backoff). A stalled server
            (accepting connections, answering nothing) fails an operation after about
            ``2 * timeout * retries`` seconds: 30 s with the defaults.
        **storage_options: Passed to :func:`fsspec.url_to_fs` (credentials, endpoint).
            The store gets its own filesystem instance unless ``skip_instance_cache``
            is given, so that no state is shared with other stores or fsspec users.
    """

    def __init__(
        self,
        url: str,
        *,
        hub_batch_files: int = 32,
        hub_batch_seconds: float = 300.0,
        timeout: float = 5.0,
        retries: int = 3,
        **storage_options: Any,
    ) -> None:
        if not (timeout > 0 and math.isfinite(timeout)) or retries < 1:
            raise OptionError(
                f"timeout must be a positive number of seconds and retries >= 1, got "
                f"timeout={timeout!r}, retries={retries!r}"
            )
        self.url = url
        own = "skip_instance_cache" not in storage_options
        options = dict(storage_options)
        options.setdefault("skip_instance_cache", True)
        scheme = url.split("://", 1)[0] if "://" in url else ""
        if scheme in ("s3", "s3a"):
            options = s3_options(options, timeout)
        if scheme in ("http", "https") and "client_kwargs" not in options:
            try:
                from phema._http import client_kwargs
            except ImportError as exc:
                raise StorageError(
                    f"cannot open {url!r}: http(s) stores need aiohttp: pip install "
                    "'torch-phema[http]'"
                ) from exc
            options["client_kwargs"] = client_kwargs(timeout)
        try:
            self.fs, self.root = fsspec.url_to_fs(url, **options)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open {url!r}: {exc}") from exc
        if own and "s3" in protocols(self.fs):  # our own instance: bound its calls
            self.fs.retries = retries  # s3fs's retry loop
            bound_calls(self.fs, timeout, retries)
        self.is_local = "file" in protocols(self.fs)
        self.hub: HubBatch | None = None
        self.backend: Backend
        if "hf" in protocols(self.fs):
            self.hub = HubBatch(
                self.fs,
                self.root,
                url,
                max_files=hub_batch_files,
                max_seconds=hub_batch_seconds,
            )
            self.backend = HubBackend(self.fs, url, self.hub)
        else:
            self.backend = backend_for(self.fs, url)
        self.backend.root = self.root
        #: Official pickles indexed by this store, by ``(path, identity)``: each version
        #: of a file is indexed once, however often the store is listed.
        self._pickles: dict[tuple[str, str], SnapshotInfo] = {}

    def path_of(self, name: str) -> str:
        """Path of file ``name`` inside the store, for the store's filesystem."""
        return f"{self.root.rstrip('/')}/{name}"

    def exists(self, name: str) -> bool:
        """Whether file ``name`` is in the store (or waiting for its Hub commit).

        Raises:
            StorageError: If the store cannot be reached, naming it.
        """
        try:
            return self.backend.exists(self.path_of(name))
        except PhemaError:
            raise
        except Exception as exc:  # botocore/httpx errors are not all OSErrors
            raise StorageError(
                f"cannot check {self.url.rstrip('/')}/{name}: {type(exc).__name__}: {exc}"
            ) from exc

    def write(
        self,
        name: str,
        data: bytes | bytearray | memoryview,
        *,
        overwrite: bool = False,
        exist_ok: bool = False,
    ) -> str:
        """Write ``data`` as file ``name``: it appears whole, or not at all.

        Without ``overwrite`` an existing ``name`` is never replaced, also when another
        writer (thread, process or machine) publishes it at the same moment: exactly one
        of them wins, the others get :class:`~phema.errors.ExistsError`. With
        ``exist_ok``, an existing file that holds exactly ``data`` is accepted instead
        (a resumed run writing the same snapshot again).
        """
        path = self.path_of(name)
        if self.hub is not None:  # checked again against races when the batch commits
            if not overwrite and self.backend.exists(path):
                if exist_ok and name not in self.hub.pending and self._holds(path, data):
                    return path
                if exist_ok:
                    raise self._other_bytes(name)
                raise self.backend.exists_error(Staged(name, path, io.BytesIO()))
            self.hub.add(name, data, overwrite=overwrite)
            return path
        try:
            staged = self.backend.stage(name, path, overwrite)
            try:
                staged.file.write(data)
            except BaseException:
                self.backend.discard([staged])
                raise
            self.backend.publish([staged], overwrite)
        except ExistsError:
            if not exist_ok:
                raise
            if self._holds(path, data):
                return path
            raise self._other_bytes(name) from None
        except PhemaError:
            raise
        except Exception as exc:  # botocore/aiohttp errors are not all OSErrors
            raise StorageError(
                f"writing {self.url}/{name} failed, nothing was published: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return path

    def _other_bytes(self, name: str) -> ExistsError:
        return ExistsError(
            f"{self.url}/{name} exists with other bytes than this snapshot (another run, "
            "or another model or settings, wrote it); move it away or write to a new store"
        )

    def _holds(self, path: str, data: bytes | bytearray | memoryview) -> bool:
        try:
            return self.backend.read_all(path) == data
        except FileNotFoundError:
            return False

    def flush(self) -> None:
        """Publish files still waiting for a Hub commit; a no-op on other stores."""
        if self.hub is not None:
            self.hub.commit()

    def leftovers(self, older_than: float = 0.0) -> builtins.list[str]:
        """Files that interrupted writes left behind (local stores only).

        Hidden temporary files of writers killed mid-write, and shard files that no
        listed snapshot or output uses (a sharded snapshot that some rank did not finish). Only
        files last modified more than ``older_than`` seconds ago are returned, so that
        a writer still at work is not disturbed. They are never listed as snapshots.
        """
        if not self.is_local or not os.path.isdir(self.root):
            return []
        now = time.time()

        def old(path: str) -> bool:
            return now - os.path.getmtime(path) > older_than

        found = [
            self.path_of(n)
            for n in os.listdir(self.root)
            if n.startswith(".phema-") and f"{SUFFIX}.tmp-" in n and old(self.path_of(n))
        ]
        shard_root = self.path_of(SHARD_FOLDER)
        if os.path.isdir(shard_root):
            snapshots, outputs = self.contents()
            used = {self.path_of(sh.name) for i in snapshots for sh in i.shards}
            used |= {self.path_of(sh.name) for o in outputs for sh in o.shards}
            for folder, _, files in os.walk(shard_root):
                paths = (os.path.join(folder, n) for n in files)
                found += [p for p in paths if p not in used and old(p)]
        return sorted(found)

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
        exist_ok: bool = True,
    ) -> str:
        """Serialise one profile's tensors with their metadata and write it atomically.

        An existing snapshot of the same name is accepted when its bytes are the same
        (``exist_ok``, the default: a resumed run saves it again); other bytes raise
        :class:`~phema.errors.ExistsError` naming the file.
        """
        meta = snapshot_metadata(
            tensors, t=t, std=std, gamma=gamma, t_unit=t_unit, step=step, copied=copied
        )
        return self.write(snapshot_name(t, std), file_view(tensors, meta), exist_ok=exist_ok)

    def read_range(self, path: str, start: int, end: int, identity: str | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``path``, by one exact ranged read.

        With ``identity`` (:attr:`SnapshotInfo.identity`), the read fails with
        :class:`~phema.errors.ChangedError` unless the file is still the version listed;
        without, it reads what is there now (no extra request).
        """
        out = bytearray(end - start)
        self.backend.read_into(path, start, memoryview(out), identity)
        return bytes(out)

    def read_into(
        self, path: str, start: int, out: memoryview, identity: str | None = None
    ) -> None:
        """Fill ``out`` with bytes ``[start, start + len(out))`` of ``path``.

        One exact ranged read; local files are read straight into ``out`` (``preadv``),
        so a caller that reuses its buffers allocates nothing per read. ``identity`` as
        in :meth:`read_range`.
        """
        self.backend.read_into(path, start, out, identity)

    def list(self) -> list[SnapshotInfo]:
        """Every snapshot in the store, sorted by (t, std); raises on a foreign or bad file.

        Outputs of :func:`phema.reconstruct` beside them are skipped (see
        :meth:`reconstructions`).
        """
        found = self.scan()
        found.raise_first(skip="output")
        return found.snapshots

    def reconstructions(self) -> builtins.list[ReconstructionInfo]:
        """Every output of :func:`phema.reconstruct` in the folder, sorted by (t, std)."""
        found = self.scan()
        found.raise_first(skip="snapshot")
        return found.outputs

    def contents(self) -> tuple[builtins.list[SnapshotInfo], builtins.list[ReconstructionInfo]]:
        """:meth:`list` and :meth:`reconstructions` from one read of every header."""
        found = self.scan()
        found.raise_first()
        return found.snapshots, found.outputs

    def scan(self) -> Scan:
        """Every file of the folder read as a snapshot or an output, or as a problem.

        Unlike :meth:`contents` it does not stop at a file that is not a valid phema
        file: :attr:`Scan.problems` names each such file with its
        :class:`~phema.errors.FormatError`, and the valid files are listed. Failures to
        reach the store still raise :class:`~phema.errors.StorageError`.
        """
        problems: builtins.list[Problem] = []
        return scan_files(self._headers(problems), problems)

    def _headers(self, problems: builtins.list[Problem]) -> Iterator[Listed | SnapshotInfo]:
        """``(path, url, size, header, identity)`` of every safetensors file in the folder.

        Official EDM2 snapshots (``network-snapshot-<kimg>-<std>.pkl``) come as the
        :class:`SnapshotInfo` that indexing them gives (:mod:`phema._official`).

        Each file's size, header and identity come from one version of it (one ``fstat``
        locally, the ETag of the first GET sent as ``If-Match`` with the second on S3, one
        commit on the Hub). Remote failures
        (unreachable or stalled servers, timeouts) become :class:`StorageError`; a file
        that is not valid safetensors goes to ``problems``.
        """
        try:
            root = self.backend.pin(self.root)
            self.fs.invalidate_cache(root)  # see files other processes wrote since
            entries = self.fs.ls(root, detail=True)  # one request first: fails fast if stalled
        except FileNotFoundError:
            raise StorageError(
                f"{self.url} does not exist or is not a folder of snapshots"
            ) from None
        except PermissionError as exc:
            raise StorageError(f"cannot list {self.url}: {exc}") from exc
        except PhemaError:
            raise
        except Exception as exc:
            raise StorageError(f"cannot list {self.url}: {type(exc).__name__}: {exc}") from exc
        if [str(e["name"]).rstrip("/") for e in entries] == [root.rstrip("/")] and (
            entries[0].get("type") == "file"
        ):
            raise StorageError(f"{self.url} is a file, not a folder of snapshots")
        base = root.rstrip("/")
        files = []
        for entry in entries:
            path = str(entry["name"])
            name = os.path.basename(path.rstrip("/"))
            official = OFFICIAL_NAME.fullmatch(name) is not None
            wanted = name.endswith(SUFFIX) or official
            if self.backend.untrusted_listing and path.rstrip("/").rsplit("/", 1)[0] != base:
                continue  # an index page's link into another folder
            if entry.get("type") == "file" and not name.startswith(".") and wanted:
                files.append((path, f"{self.url.rstrip('/')}/{name}", official))
        # an index takes one round trip per tensor: several pickles are indexed at once
        pickles = [(p, src) for p, src, official in files if official]
        pool = ThreadPoolExecutor(min(len(pickles), INDEX_THREADS) or 1)
        try:
            indexed = {p: pool.submit(self._official, p, src) for p, src in pickles}
            for path, source, official in files:
                try:
                    found = indexed[path].result() if official else self._listed(path, source)
                except FileNotFoundError:
                    continue  # removed since the folder was listed
                except (FormatError, _Unreadable) as exc:
                    problems.append(Problem(source, _problem(source, exc), "file"))
                    continue
                yield found
        finally:  # an error or an early stop does not wait for the other indexes
            pool.shutdown(wait=False, cancel_futures=True)

    def _listed(self, path: str, source: str) -> Listed:
        """``(path, url, size, header, identity)`` of one file; remote failures named."""
        with _read_failures(source):
            return (path, source, *self._read_header(path, source))

    def _official(self, path: str, source: str) -> SnapshotInfo:
        """The entry of an official pickle (indexed once per version); failures named."""
        backend = self.backend
        with _read_failures(source):
            version = backend.identity_of(path)
            if (found := self._pickles.get((path, version[1]))) is not None:
                return found
            info = official_info(
                path,
                source,
                os.path.basename(path),
                version,
                lambda offset, n: self.read_range(path, offset, offset + n),
                lambda: backend.identity_of(path)[1],
            )
        self._pickles[(path, version[1])] = info
        return info

    def info(self, name: str) -> SnapshotInfo | ReconstructionInfo:
        """The listing entry of one file, ``name`` in the store, read from its header alone.

        An official EDM2 pickle (``<prefix>-<kimg>-<std>.pkl``: a training snapshot, or an
        output of the official reconstruction tool) is indexed instead
        (:mod:`phema._official`), and reads as a snapshot.

        Raises:
            StorageError: If the file does not exist or cannot be read.
            FormatError: If it is not a valid phema snapshot or output.
        """
        root = self.backend.pin(self.root)
        path, source = f"{root.rstrip('/')}/{name}", f"{self.url.rstrip('/')}/{name}"
        try:
            if PICKLE_NAME.fullmatch(name):
                return self._official(path, source)
            listed = self._listed(path, source)
        except FileNotFoundError:
            raise StorageError(f"{source} does not exist") from None
        except _Unreadable as exc:
            raise _problem(source, exc) from exc
        found = scan_files([listed], [])
        found.raise_first()
        return (found.snapshots or found.outputs)[0]

    def _read_header(self, path: str, source: str) -> tuple[int, Header, str]:
        head = self.backend.head(path, HEADER_PROBE)
        n = parse_header_length(head.data[:8], source)
        if 8 + n > head.size:
            raise FormatError(f"{source}: header of {n} bytes does not fit the file; truncated")
        raw = head.data[8 : 8 + n]
        if len(raw) < n:  # a header longer than the first read
            raw = self.read_range(path, 8, 8 + n, head.identity)
        return head.size, parse_header(raw, source, file_size=head.size), head.identity

    def load(self, info: SnapshotInfo | ReconstructionInfo) -> dict[str, Tensor]:
        """All tensors of a snapshot or output (data read once; shards verified first)."""
        info = verify_shards(self, info)
        assert info.header is not None
        data = bytearray(info.header.data_bytes)
        read_logical(self, info, 0, memoryview(data))
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
def atomic_write(path: str, *, overwrite: bool = True) -> Iterator[IO[bytes]]:
    """A local file at ``path`` that appears whole, or not at all.

    Writes go to a hidden ``.<name>.tmp-<uuid>`` beside ``path``, which is synced and
    renamed over ``path`` when the block ends without error, and removed otherwise.
    With ``overwrite=False`` it is linked to ``path`` instead, which fails with
    :class:`~phema.errors.ExistsError` when ``path`` exists, also under races.
    """
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, temp_name(name))
    try:
        f = open(tmp, "wb")  # noqa: SIM115 (closed below, after the caller's block)
    except OSError as exc:  # named by the user's path, not the hidden temporary one
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        try:
            if overwrite:
                os.replace(tmp, path)
            else:
                link_noreplace(tmp, path)
        except FileExistsError:
            raise ExistsError(
                f"{path} exists; it is never overwritten without being asked"
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from exc
        fsync_dir(folder or ".")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
