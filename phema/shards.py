r"""Sharded snapshots: each rank writes its rows, a manifest published last makes them one snapshot.

A snapshot of a sharded EMA (FSDP2, or ``partition=True``) is written without any
gather: every rank writes the rows it holds of each tensor as one **shard file**,
``shards/<snapshot stem>/<id>-<rank>.safetensors``, a plain safetensors file whose
tensors are 1-D pieces: elements :math:`[b, e)` of the flattened tensor. When every
shard is durable, rank 0 publishes the **manifest** under the snapshot's usual name
(``phema-<t>-<std>.safetensors``): a safetensors file with no tensors whose metadata
(``phema.kind = "sharded"``) holds the snapshot's metadata, the logical layout and,
for each shard, its path, size, data offset and pieces. Only manifests are listed,
so a snapshot whose ranks did not all finish (a crash, a killed rank, a failed
write) is never seen, and name clashes and ``overwrite`` work as for one file.

The logical layout is the one a single-file snapshot of the same model has, so a
store may mix both kinds (a run resumed on another number of ranks) and the
streaming reconstruction reads logical byte ranges: each maps to pieces of shard
files (:func:`read_logical`), read once each. Before a reconstruction reads a
sharded snapshot, :func:`verify_shards` reads every shard's header and refuses a
missing shard, one of another snapshot (its ``phema.snapshot_id`` differs) or one
whose pieces differ from the manifest's, naming it.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import Tensor

from phema import _json
from phema.errors import FormatError, PhemaError, StorageError
from phema.format import Header, encode_header, fill_file, layout_hash, numel

if TYPE_CHECKING:
    from phema.store import ReconstructionInfo, SnapshotInfo, SnapshotStore

    Info = TypeVar("Info", bound=SnapshotInfo | ReconstructionInfo)

__all__ = [
    "Shard",
    "ShardPiece",
    "encode_manifest",
    "encode_shard",
    "read_logical",
    "verify_shards",
]

SHARD_FOLDER = "shards"


@dataclass(frozen=True)
class ShardPiece:
    """Elements ``[begin, end)`` of tensor ``name`` (flattened), at ``offset`` in a shard's data."""

    name: str
    begin: int
    end: int
    offset: int


@dataclass(frozen=True)
class Shard:
    """One shard file of a sharded snapshot, as its manifest records it."""

    name: str  # relative to the store root
    size: int
    data_start: int
    pieces: tuple[ShardPiece, ...]
    identity: str = ""  # set by verify_shards: the version whose header was checked
    path: str = ""  # the file's own path, where known (an official pickle: the one listed)


@dataclass(frozen=True)
class Segment:
    """Logical data bytes ``[start, stop)`` stored at ``at`` in shard ``shard``'s data."""

    start: int
    stop: int
    shard: int
    at: int


def shard_name(stem: str, snapshot_id: str, rank: int) -> str:
    """``shards/<stem>/<id>-<rank>.safetensors``: never listed, never shared by two writes."""
    return f"{SHARD_FOLDER}/{stem}/{snapshot_id}-{rank:05d}.safetensors"


def shard_header(
    pieces: Sequence[tuple[str, torch.dtype, int, int]],
    snapshot_id: str,
    meta: Mapping[str, str],
    *,
    keep_order: bool = False,
) -> tuple[bytes, Header, dict[str, object]]:
    """Prefix and header of a shard holding elements ``[begin, end)`` of each tensor.

    ``pieces`` are ``(name, dtype, begin, end)``. Returns the encoded prefix (8 bytes +
    header), the parsed header and the record the manifest keeps of the shard (size,
    data offset and each piece's offset in the data).
    """
    ranges = {n: [b, e] for n, _, b, e in pieces}
    metadata = dict(meta)
    metadata.update(
        {
            "phema.kind": "shard",
            "phema.snapshot_id": snapshot_id,
            "phema.pieces": json.dumps(ranges, separators=(",", ":")),
        }
    )
    specs = [(n, d, (e - b,)) for n, d, b, e in pieces]
    prefix, header = encode_header(specs, metadata, keep_order=keep_order)
    record = {
        "size": header.file_bytes,
        "data_start": header.data_start,
        "pieces": [[i.name, *ranges[i.name], i.begin] for i in header.tensors],
    }
    return prefix, header, record


def encode_shard(
    pieces: list[tuple[str, int, int, Tensor]], snapshot_id: str, meta: Mapping[str, str]
) -> tuple[memoryview, dict[str, object]]:
    """The bytes of one shard file and the record the manifest keeps of it.

    ``pieces`` are ``(name, begin, end, values)`` with ``values`` the 1-D elements. The
    list is emptied: each piece's memory is released once it is in the file, so a
    shard is held about once while it is encoded.
    """
    tensors = {n: v.detach().reshape(-1).to("cpu").contiguous() for n, _, _, v in pieces}
    prefix, header, record = shard_header(
        [(n, tensors[n].dtype, b, e) for n, b, e, _ in pieces], snapshot_id, meta
    )
    pieces.clear()
    return fill_file(prefix, header, tensors, consume=True), record


def encode_manifest(
    specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    meta: Mapping[str, str],
    snapshot_id: str,
    shards: Sequence[tuple[str, Mapping[str, object]]],
    *,
    content: str = "snapshot",
    keep_order: bool = False,
) -> bytes:
    """The manifest: ``meta`` plus the logical layout and every ``(shard name, record)``.

    ``content`` is what the shards make up (``"snapshot"``, or ``"reconstruction"``
    for sharded outputs of :func:`phema.reconstruct`); ``keep_order`` keeps ``specs``'
    order as the logical layout (outputs follow their inputs' order).
    """
    from phema.format import dtype_name

    _, logical = encode_header(specs, {}, keep_order=keep_order)
    metadata = dict(meta)
    metadata.update(
        {
            "phema.kind": "sharded",
            "phema.content": content,
            "phema.layout": meta.get("phema.layout") or layout_hash(specs),
            "phema.snapshot_id": snapshot_id,
            "phema.tensors": json.dumps(
                [[i.name, dtype_name(i.dtype), list(i.shape)] for i in logical.tensors]
            ),
            "phema.shards": json.dumps([{"name": n, **r} for n, r in shards]),
        }
    )
    prefix, _ = encode_header([], metadata)
    return prefix


#: A shard's name as manifests record it: a file two folders down in the store.
_SHARD_NAME = re.compile(rf"{SHARD_FOLDER}/[A-Za-z0-9._=+-]+/[A-Za-z0-9._=+-]+\.safetensors")


def _tree(meta: Mapping[str, str], key: str, where: str) -> object:
    """The JSON value of metadata ``key``, strictly parsed."""
    if key not in meta:
        raise FormatError(f"{where} lacks {key}")
    return _json.loads(meta[key], f"{where}: {key}")


def parse_manifest(
    header: Header, source: str
) -> tuple[Header, tuple[Shard, ...], tuple[Segment, ...]]:
    """The logical header, the shards and the logical-to-shard map of a manifest.

    Raises:
        FormatError: If the manifest is malformed or its shards do not tile every
            tensor exactly once.
    """
    from phema.format import _FROM_NAME

    meta = header.metadata
    where = f"{source}: sharded manifest"
    specs = []
    for entry in _json.array(_tree(meta, "phema.tensors", where), f"{where}: phema.tensors"):
        ok = isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], str)
        if not (ok and entry[1] in _FROM_NAME):
            raise FormatError(
                f"{where}: tensor entry {_json.short(entry)} is not [name, dtype, shape]"
            )
        name, dtype, shape = entry
        dims = tuple(
            _json.uint(x, f"{where}: shape of {_json.short(name)}")
            for x in _json.array(shape, where)
        )
        if numel(dims) is None:
            raise FormatError(f"{where}: tensor {_json.short(name)} has 2**64 elements or more")
        specs.append((_json.text(name, f"{where}: tensor name"), _FROM_NAME[dtype], dims))
    shards = []
    for rec in _json.array(_tree(meta, "phema.shards", where), f"{where}: phema.shards"):
        rec = _json.obj(rec, f"{where}: shard record")
        missing = {"name", "size", "data_start", "pieces"} - rec.keys()
        if missing:
            raise FormatError(f"{where}: a shard record lacks {sorted(missing)}")
        name = _json.text(rec["name"], f"{where}: shard name")
        if not _SHARD_NAME.fullmatch(name) or ".." in name:
            raise FormatError(
                f"{where}: shard name {_json.short(name)} is not of the form "
                f"{SHARD_FOLDER}/<stem>/<id>-<rank>.safetensors inside the store"
            )
        pieces = []
        for piece in _json.array(rec["pieces"], f"{where}: pieces of {name}"):
            if not (isinstance(piece, list) and len(piece) == 4):
                raise FormatError(f"{where}: piece {_json.short(piece)} of {name} is malformed")
            n, *nums = piece
            b, e, o = (_json.uint(x, f"{where}: piece of {name}") for x in nums)
            pieces.append(ShardPiece(_json.text(n, f"{where}: piece name"), b, e, o))
        size = _json.uint(rec["size"], f"{where}: size of {name}")
        data_start = _json.uint(rec["data_start"], f"{where}: data_start of {name}")
        shards.append(Shard(name, size, data_start, tuple(pieces)))
    try:
        _, logical = encode_header(specs, {}, keep_order=True)
    except FormatError as exc:
        raise FormatError(f"{where}: {exc}") from None
    logical = Header(logical.tensors, meta, 0)
    by_name = {t.name: t for t in logical.tensors}
    segments = []
    for j, shard in enumerate(shards):
        for p in shard.pieces:
            info = by_name.get(p.name)
            if info is None or not 0 <= p.begin < p.end <= info.numel:
                raise FormatError(f"{source}: shard {shard.name} holds an unknown piece {p}")
            item = info.dtype.itemsize
            segments.append(
                Segment(info.begin + p.begin * item, info.begin + p.end * item, j, p.offset)
            )
    segments.sort(key=lambda s: s.start)
    pos = 0
    for seg in segments:
        if seg.start != pos:
            raise FormatError(
                f"{source}: its shards do not cover the snapshot's bytes exactly once "
                f"(gap or overlap at logical byte {pos}); the manifest is corrupt"
            )
        pos = seg.stop
    if pos != logical.data_bytes:
        raise FormatError(f"{source}: its shards cover {pos} of {logical.data_bytes} bytes")
    return logical, tuple(shards), tuple(segments)


def verify_shards(store: SnapshotStore, info: Info) -> Info:
    """``info`` with each shard's header checked against the manifest, and pinned.

    Raises:
        StorageError: Naming a shard that is missing, belongs to another snapshot, or
            differs from what the manifest records.
    """
    if all(shard.identity for shard in info.shards):  # none, or checked when listed
        return info
    assert info.header is not None
    snapshot_id = info.header.metadata.get("phema.snapshot_id", "")
    checked = []
    for shard in info.shards:
        url = f"{store.url.rstrip('/')}/{shard.name}"
        fix = f"; the snapshot {info.url} is incomplete: restore the shard or remove the snapshot"
        try:
            size, header, identity = store._read_header(store.path_of(shard.name), url)
        except FileNotFoundError:
            raise StorageError(f"shard {url} is missing{fix}") from None
        except PhemaError as exc:
            raise StorageError(f"shard {url} cannot be read: {exc}{fix}") from exc
        except Exception as exc:
            raise StorageError(f"shard {url} cannot be read: {type(exc).__name__}: {exc}") from exc
        got = header.metadata.get("phema.snapshot_id")
        if got != snapshot_id:
            raise StorageError(
                f"shard {url} belongs to another snapshot (id {got!r}, the manifest {info.url} "
                f"has {snapshot_id!r}){fix}"
            )
        try:
            ranges = _json.obj(_tree(header.metadata, "phema.pieces", url), url)
            pieces = tuple(
                ShardPiece(
                    t.name,
                    _json.uint(ranges[t.name][0], url),
                    _json.uint(ranges[t.name][1], url),
                    t.begin,
                )
                for t in header.tensors
            )
        except (KeyError, TypeError, IndexError, FormatError):
            raise StorageError(f"shard {url} has no valid phema.pieces metadata{fix}") from None
        if size != shard.size or header.data_start != shard.data_start or pieces != shard.pieces:
            raise StorageError(f"shard {url} differs from what its manifest records{fix}")
        checked.append(replace(shard, identity=identity))
    return replace(info, shards=tuple(checked))


def read_logical(
    store: SnapshotStore, info: SnapshotInfo | ReconstructionInfo, offset: int, out: memoryview
) -> None:
    """Fill ``out`` with the snapshot's logical data bytes from ``offset`` (any kind)."""
    assert info.header is not None
    if not info.shards:
        store.read_into(info.path, info.header.data_start + offset, out, info.identity or None)
        return
    segs = info.segments
    i = bisect.bisect_right(segs, offset, key=lambda s: s.start) - 1
    pos, stop = offset, offset + len(out)
    while pos < stop:
        seg = segs[i]
        n = min(stop, seg.stop) - pos
        shard = info.shards[seg.shard]
        start = shard.data_start + seg.at + (pos - seg.start)
        dst = out[pos - offset : pos - offset + n]
        path = shard.path or store.path_of(shard.name)
        store.read_into(path, start, dst, shard.identity or None)
        pos += n
        i += 1
