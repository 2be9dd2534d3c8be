"""The snapshot file format: safetensors with phema's metadata, written and parsed by phema.

A snapshot file is a plain safetensors file (loadable by ``safetensors.torch``):

* bytes 0-7: ``N``, the header length, unsigned 64-bit little endian;
* bytes 8 .. 8+N: a JSON object, padded with spaces so that the data starts at a
  multiple of 8: ``{name: {"dtype", "shape", "data_offsets": [begin, end]}}`` plus
  ``"__metadata__"``, a flat string -> string map;
* then the tensors' bytes, little endian, C order, contiguous in header order.

phema writes tensors in a fixed order (widest dtype first, then the caller's
order) so that every snapshot of a run shares one byte layout: the streaming
reconstruction relies on it, and ``__metadata__["phema.layout"]`` records a hash
of that layout (names, dtypes, shapes in file order). Headers are built and parsed
here, never by unpickling, so that the data section can be streamed window by
window.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import Tensor

from phema import _json
from phema.errors import FormatError, OptionError

__all__ = [
    "FORMAT_VERSION",
    "MAX_HEADER_BYTES",
    "STORAGE_DTYPES",
    "Header",
    "TensorInfo",
    "check_storage_dtype",
    "encode_header",
    "file_view",
    "fill_file",
    "layout_hash",
    "parse_header",
    "parse_header_length",
    "serialize",
]

#: Version of phema's metadata schema, stored as ``phema.format``.
FORMAT_VERSION = "1"
#: Largest header accepted, as in the safetensors reference implementation.
MAX_HEADER_BYTES = 100_000_000

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Where one tensor lives in the data section: ``[begin, end)`` bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A parsed header: tensors in data order, metadata, and where the data starts."""

    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str]
    data_start: int  # 8 + N

    @property
    def data_bytes(self) -> int:
        """Length of the data section."""
        return self.tensors[-1].end if self.tensors else 0

    @property
    def file_bytes(self) -> int:
        """Length of the whole file."""
        return self.data_start + self.data_bytes


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (``torch.float16`` -> ``"F16"``)."""
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise FormatError(
            f"dtype {dtype} cannot be stored; supported: {sorted(_FROM_NAME)}"
        ) from None


#: Dtypes that averaged weights may be stored in.
STORAGE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_storage_dtype(dtype: object, option: str) -> None:
    """Refuse a storage dtype for averaged weights that is not a float type phema writes.

    An integer or boolean dtype would silently truncate the weights.
    """
    if dtype not in STORAGE_DTYPES:
        names = ", ".join(f"torch.{str(d).removeprefix('torch.')}" for d in STORAGE_DTYPES)
        raise OptionError(
            f"{option}={dtype!r} cannot store averaged weights (an integer or bool dtype "
            f"would truncate them); use one of {names}"
        )


def _order(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> list[int]:
    # Widest dtype first keeps every tensor aligned to its element size.
    return sorted(range(len(specs)), key=lambda i: -specs[i][1].itemsize)


def layout_hash(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]]) -> str:
    """SHA-256 (hex, 16 chars) of the names, dtypes and shapes in file order."""
    ordered = [specs[i] for i in _order(specs)]
    text = json.dumps([[n, dtype_name(d), list(s)] for n, d, s in ordered])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_header(
    specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    metadata: Mapping[str, str],
    *,
    keep_order: bool = False,
) -> tuple[bytes, Header]:
    """The first ``8 + N`` bytes of a file holding ``specs``, and the parsed header.

    Args:
        specs: ``(name, dtype, shape)`` per tensor; names must be unique.
        metadata: String -> string pairs for ``__metadata__``.
        keep_order: Lay tensors out in the given order instead of widest dtype first
            (a streamed output follows its inputs' order; readers accept any order).

    Returns:
        The encoded prefix and the :class:`Header` it describes (tensors in file order).
    """
    names = [n for n, _, _ in specs]
    if len(set(names)) != len(names):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise FormatError(f"tensor names must be unique, got {_json.short(name)} twice")
            seen.add(name)
    for key, value in metadata.items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise FormatError(f"metadata must map str to str, got {key!r}: {value!r}")
    body: dict[str, object] = {"__metadata__": dict(metadata)}
    infos, pos = [], 0
    for i in range(len(specs)) if keep_order else _order(specs):
        name, dtype, shape = specs[i]
        size = math.prod(shape) * dtype.itemsize
        body[name] = {
            "dtype": dtype_name(dtype),
            "shape": list(shape),
            "data_offsets": [pos, pos + size],
        }
        infos.append(TensorInfo(name, dtype, tuple(shape), pos, pos + size))
        pos += size
    text = json.dumps(body, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, Header(tuple(infos), dict(metadata), len(prefix))


def serialize(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """A whole safetensors file for ``tensors`` (CPU copies are made as needed)."""
    return bytes(file_view(tensors, metadata))


def file_view(
    tensors: Mapping[str, Tensor], metadata: Mapping[str, str], *, consume: bool = False
) -> memoryview:
    """:func:`serialize` into one buffer, returned as a view (no final copy).

    With ``consume`` (``tensors`` a dict), each tensor is removed from ``tensors`` once
    copied into the file, so that memory is released while the file fills.
    """
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    prefix, header = encode_header(specs, metadata)
    return fill_file(prefix, header, tensors, consume=consume)


def fill_file(
    prefix: bytes, header: Header, tensors: Mapping[str, Tensor], *, consume: bool = False
) -> memoryview:
    """The file ``prefix`` + ``tensors``' bytes where ``header`` puts them, in one buffer.

    ``prefix`` and ``header`` come from :func:`encode_header`; each tensor needs the
    element count its entry has (any shape). ``consume`` as in :func:`file_view`.
    """
    # Filled in place; its pages become resident only as they are written, so with
    # ``consume`` the file grows while the tensors it takes are released.
    view = torch.empty(header.file_bytes, dtype=torch.uint8)
    view[: len(prefix)].copy_(torch.frombuffer(bytearray(prefix), dtype=torch.uint8))
    for info in header.tensors:
        t = tensors[info.name].detach().reshape(-1)
        if info.end > info.begin:
            dst = view[header.data_start + info.begin : header.data_start + info.end]
            dst.view(t.dtype).copy_(t)
        if consume:
            del tensors[info.name]  # type: ignore[attr-defined]
        del t
    return view.numpy().data


def parse_header_length(first8: bytes, source: str) -> int:
    """``N`` from the first 8 bytes, checked against :data:`MAX_HEADER_BYTES`."""
    if len(first8) < 8:
        raise FormatError(f"{source}: file is {len(first8)} bytes, too short for safetensors")
    (n,) = struct.unpack("<Q", first8[:8])
    if not 2 <= n <= MAX_HEADER_BYTES:
        raise FormatError(
            f"{source}: header length {n} is outside [2, {MAX_HEADER_BYTES}]; "
            "not a safetensors file, or a corrupt one"
        )
    return int(n)


_KEYS = {"data_offsets", "dtype", "shape"}


def numel(shape: Sequence[int]) -> int | None:
    """The product of ``shape``, or None once it reaches 2**64 (stops early: linear time)."""
    n = 1
    for d in shape:
        n *= d
        if n >= _json.UINT_LIMIT:
            return None
    return n


def _tensor_info(name: str, entry: object) -> TensorInfo | None:
    """The entry as a :class:`TensorInfo`, or None if any check fails (no message: fast)."""
    if type(entry) is not dict or entry.keys() != _KEYS:
        return None
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if type(dtype) is not str or dtype not in _FROM_NAME:
        return None
    if type(shape) is not list or not all(map(_json.is_uint, shape)):
        return None
    if type(offsets) is not list or len(offsets) != 2 or not all(map(_json.is_uint, offsets)):
        return None
    dt = _FROM_NAME[dtype]
    begin, end = offsets
    count = numel(shape)
    if count is None or end - begin != count * dt.itemsize:
        return None
    return TensorInfo(name, dt, tuple(shape), begin, end)


def _entry_error(name: str, entry: object, where: str) -> NoReturn:
    """Raise the :class:`FormatError` that says why ``entry`` is not a valid tensor entry."""
    if not isinstance(entry, dict) or entry.keys() != _KEYS:
        got = _json.short(entry)
        raise FormatError(f"{where} must have exactly dtype, shape and data_offsets, got {got}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str) or dtype not in _FROM_NAME:
        got = _json.short(dtype)
        raise FormatError(f"{where} has dtype {got}; supported: {sorted(_FROM_NAME)}")
    shape = [
        _json.uint(d, f"{where}: shape entry")
        for d in _json.array(entry["shape"], f"{where}: shape")
    ]
    offsets = _json.array(entry["data_offsets"], f"{where}: data_offsets")
    if len(offsets) != 2:
        got = _json.short(offsets)
        raise FormatError(f"{where}: data_offsets must be [begin, end], got {got}")
    begin, end = (_json.uint(x, f"{where}: data offset") for x in offsets)
    count = numel(shape)
    if count is None:
        raise FormatError(f"{where} has shape {_json.short(shape)}: 2**64 elements or more")
    need = count * _FROM_NAME[dtype].itemsize
    raise FormatError(
        f"{where} spans {end - begin} bytes, but {dtype} {_json.short(tuple(shape))} needs {need}"
    )


def parse_header(header: bytes, source: str, file_size: int | None = None) -> Header:
    """Parse and validate the JSON header (bytes ``8 .. 8+N``) of file ``source``.

    As strict as the safetensors reference parser, and stricter where phema writes
    less: strict JSON (:mod:`phema._json`: no duplicate keys, no ``NaN``, bounded
    integers and depth, valid UTF-8); ``__metadata__`` maps strings to strings; each
    tensor entry has exactly ``dtype``, ``shape`` (non-negative integers) and
    ``data_offsets`` (two integers); offsets are contiguous from 0 and each tensor's
    byte count equals its elements times its dtype size; given ``file_size``, the file
    ends exactly at the last tensor (a truncated file is named as such).

    Raises:
        FormatError: Naming ``source`` and what is wrong; never any other error.
    """
    body = _json.obj(_json.loads(header, f"{source}: header"), f"{source}: header")
    metadata = body.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FormatError(f"{source}: __metadata__ must map strings to strings")
    infos = []
    for name, entry in body.items():
        info = _tensor_info(name, entry)
        if info is None:  # the fast checks failed: say exactly what is wrong
            _entry_error(name, entry, f"{source}: tensor {_json.short(name)}")
        infos.append(info)
    infos.sort(key=lambda i: (i.begin, i.end))
    pos = 0
    for info in infos:
        if info.begin != pos:
            raise FormatError(
                f"{source}: tensor {_json.short(info.name)} starts at byte {info.begin}, "
                f"expected {pos} (overlapping or missing data)"
            )
        pos = info.end
    parsed = Header(tuple(infos), metadata, 8 + len(header))
    if file_size is not None and file_size != parsed.file_bytes:
        what = "truncated" if file_size < parsed.file_bytes else "has trailing bytes"
        raise FormatError(
            f"{source}: file is {file_size} bytes but its header describes "
            f"{parsed.file_bytes}: the file {what}"
        )
    return parsed
