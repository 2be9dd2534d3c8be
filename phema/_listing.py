"""What listing a store finds: snapshots, outputs of reconstructions, and files that are neither.

:func:`scan_files` turns each listed file's parsed header into a
:class:`SnapshotInfo` or a :class:`ReconstructionInfo` (metadata checked by
:mod:`phema._meta`, sharded manifests by :mod:`phema.shards`), or records why it is
not a valid phema file. :func:`mixing` finds the snapshots that do not belong with
the rest of a store (another model, dtype, time unit or copied set);
:func:`check_layouts` refuses such a store before a reconstruction.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from phema._meta import output_fields, snapshot_fields
from phema.errors import FormatError, StorageError
from phema.format import FORMAT_VERSION, Header
from phema.shards import Segment, Shard, parse_manifest

__all__ = [
    "Listed",
    "Problem",
    "ReconstructionInfo",
    "Scan",
    "SnapshotInfo",
    "check_layouts",
    "mixing",
    "scan_files",
]

#: One file as listed: ``(path, url, size, parsed header, identity)``.
Listed = tuple[str, str, int, Header, str]


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
    identity: str = ""  # the version listed (see phema._backends); "" = not pinned
    shards: tuple[Shard, ...] = ()  # a sharded snapshot's shard files (phema.shards)
    segments: tuple[Segment, ...] = ()  # where its logical bytes lie in them
    index_bytes: int = 0  # an official pickle (phema._official): bytes read to index it


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
    header: Header | None = None  # its (logical) header: SnapshotStore.load reads it
    identity: str = ""
    shards: tuple[Shard, ...] = ()  # sharded outputs (reconstruct(..., sharded=True))
    segments: tuple[Segment, ...] = ()


@dataclass(frozen=True)
class Problem:
    """A file of the folder that is not a valid phema file, and why."""

    url: str
    error: FormatError | StorageError
    kind: Literal["file", "snapshot", "output"]  # what it claimed to be, if it got that far


@dataclass(frozen=True)
class Scan:
    """Everything in a folder: valid snapshots and outputs (sorted by ``(t, std)``), problems."""

    snapshots: list[SnapshotInfo]
    outputs: list[ReconstructionInfo]
    problems: list[Problem] = field(default_factory=list)

    def raise_first(self, skip: Literal["snapshot", "output", ""] = "") -> None:
        """Raise the first problem's error, ignoring files that claim to be ``skip``."""
        for problem in self.problems:
            if problem.kind != skip:
                raise problem.error


def _is_output(header: Header) -> bool:
    """Whether a listed file is an output of :func:`phema.reconstruct` (whole or sharded)."""
    meta = header.metadata
    kind, content = meta.get("phema.kind"), meta.get("phema.content")
    return kind == "reconstruction" or (kind == "sharded" and content == "reconstruction")


def scan_files(listed: Iterable[Listed | SnapshotInfo], problems: list[Problem]) -> Scan:
    """Sort listed files into snapshots and outputs; ``problems`` gets the invalid ones.

    Entries already read as snapshots (official pickles, :mod:`phema._official`) are taken
    as they are.
    """
    snapshots, outputs = [], []
    for entry in listed:
        if isinstance(entry, SnapshotInfo):
            snapshots.append(entry)
            continue
        output = _is_output(entry[3])
        try:
            if output:
                outputs.append(_output(*entry))
            else:
                snapshots.append(_snapshot(*entry))
        except FormatError as exc:
            problems.append(Problem(entry[1], exc, "output" if output else "snapshot"))
    snapshots.sort(key=lambda i: (i.t, i.std))
    outputs.sort(key=lambda i: (i.t, i.std))
    return Scan(snapshots, outputs, problems)


def _located(path: str, source: str, size: int, header: Header, identity: str) -> dict[str, Any]:
    """Where a listed file's tensors lie: in the file itself, or in a manifest's shards."""
    shards: tuple[Shard, ...] = ()
    segments: tuple[Segment, ...] = ()
    if header.metadata.get("phema.kind") == "sharded":
        header, shards, segments = parse_manifest(header, source)
    return {
        "path": path,
        "url": source,
        "size": size + sum(sh.size for sh in shards),
        "header": header,
        "identity": identity,
        "shards": shards,
        "segments": segments,
    }


def _snapshot(path: str, source: str, size: int, header: Header, identity: str) -> SnapshotInfo:
    meta = header.metadata
    if meta.get("phema.format") != FORMAT_VERSION or meta.get("phema.kind") not in (
        "snapshot",
        "sharded",
    ):
        raise FormatError(
            f"{source}: not a phema snapshot of format {FORMAT_VERSION} "
            f"(phema.format={str(meta.get('phema.format'))[:40]!r}); move it out of the store"
        )
    where = _located(path, source, size, header, identity)
    names = {t.name for t in where["header"].tensors}
    return SnapshotInfo(**where, **snapshot_fields(meta, source, names))


def _output(path: str, source: str, size: int, header: Header, identity: str) -> ReconstructionInfo:
    where = _located(path, source, size, header, identity)
    return ReconstructionInfo(**where, **output_fields(header.metadata, source))


def mixing(infos: list[SnapshotInfo]) -> list[tuple[SnapshotInfo, str]]:
    """Snapshots that differ from most of the store, each with what differs.

    Every snapshot of one run has the same tensors (names, dtypes, shapes, in file
    order), time unit and set of copied tensors; the group most snapshots share is
    taken as the store's, and each other snapshot is returned with a reason.
    """
    if not infos:
        return []

    def key(i: SnapshotInfo) -> tuple[object, ...]:
        return (i.header.tensors, i.t_unit, frozenset(i.copied))

    common = Counter(map(key, infos)).most_common(1)[0][0]
    ref = next(i for i in infos if key(i) == common)
    found = []
    for info in infos:
        if key(info) == common:
            continue
        if info.header.tensors != ref.header.tensors:
            why = f"tensor layout {info.layout}, but {ref.url} has {ref.layout}"
        elif info.t_unit != ref.t_unit:
            why = f"time unit {info.t_unit!r}, but {ref.url} has {ref.t_unit!r}"
        else:
            extra = sorted(set(info.copied) ^ set(ref.copied))[:3]
            why = f"other copied (not averaged) tensors than {ref.url}: {extra} differ"
        found.append((info, why))
    return found


def check_layouts(infos: list[SnapshotInfo]) -> None:
    """Refuse a store whose snapshots do not all belong to one run (see :func:`mixing`).

    Raises:
        StorageError: Naming the first file that differs from most of the store.
    """
    odd = mixing(infos)
    if odd:
        info, why = odd[0]
        more = f" (and {len(odd) - 1} more files)" if len(odd) > 1 else ""
        raise StorageError(
            f"{info.url} has {why}{more}: the store mixes snapshots of different runs, models "
            "or settings; move one run's files to another folder (`phema ls` shows which)"
        )
