"""The snapshot file format: golden bytes, safetensors interoperability, validation."""

import struct

import pytest
import safetensors.torch
import torch

from phema import FormatError
from phema.format import (
    encode_header,
    layout_hash,
    parse_header,
    parse_header_length,
    serialize,
)


def _tensors():
    return {
        "b.half": torch.arange(3, dtype=torch.float16),
        "a.float": torch.tensor([[1.0, 2.0]], dtype=torch.float32),
        "steps": torch.tensor(7, dtype=torch.int64),
        "bf": torch.tensor([0.5, -2.0], dtype=torch.bfloat16),
    }


def test_golden_bytes():
    data = serialize({"w": torch.zeros(2, dtype=torch.float32)}, {"phema.format": "1"})
    header = b'{"__metadata__":{"phema.format":"1"},"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'
    padded = header + b" " * (-(8 + len(header)) % 8)
    assert data == struct.pack("<Q", len(padded)) + padded + bytes(8)
    assert (8 + len(padded)) % 8 == 0


def test_safetensors_reads_what_we_write():
    tensors = _tensors()
    data = serialize(tensors, {"phema.std": "0.05"})
    loaded = safetensors.torch.load(data)
    assert loaded.keys() == tensors.keys()
    for k, v in tensors.items():
        assert torch.equal(loaded[k], v), k
        assert loaded[k].dtype == v.dtype


def test_we_parse_what_safetensors_writes():
    tensors = _tensors()
    data = safetensors.torch.save(tensors, metadata={"k": "v"})
    n = parse_header_length(data[:8], "x.safetensors")
    header = parse_header(data[8 : 8 + n], "x.safetensors", file_size=len(data))
    assert header.metadata == {"k": "v"}
    assert {i.name for i in header.tensors} == set(tensors)
    for info in header.tensors:
        raw = bytearray(data[header.data_start + info.begin : header.data_start + info.end])
        got = torch.frombuffer(raw, dtype=info.dtype).reshape(info.shape) if raw else None
        if got is not None:
            assert torch.equal(got, tensors[info.name])


def test_layout_is_fixed_by_names_dtypes_shapes_and_aligned():
    specs = [(n, t.dtype, tuple(t.shape)) for n, t in _tensors().items()]
    _, header = encode_header(specs, {"a": "1"})
    _, other = encode_header(specs, {"a": "a much longer metadata value"})
    assert [(i.name, i.begin) for i in header.tensors] == [(i.name, i.begin) for i in other.tensors]
    assert header.data_start % 8 == 0
    for info in header.tensors:
        assert info.begin % info.dtype.itemsize == 0
    # File order is widest dtype first, then the caller's order among equal widths.
    assert layout_hash([specs[1], specs[0], *specs[2:]]) == layout_hash(specs)
    assert layout_hash([specs[3], *specs[1:3], specs[0]]) != layout_hash(specs)
    changed = [*specs[:-1], ("bf", torch.float16, (2,))]
    assert layout_hash(changed) != layout_hash(specs)


def _parse(data, name="snap.safetensors"):
    n = parse_header_length(data[:8], name)
    return parse_header(data[8 : 8 + n], name, file_size=len(data))


def test_truncated_and_tampered_files_are_named():
    data = serialize(_tensors(), {})
    with pytest.raises(FormatError, match=r"snap.safetensors: .* the file truncated"):
        _parse(data[:-3])
    with pytest.raises(FormatError, match="trailing bytes"):
        _parse(data + b"\0")
    with pytest.raises(FormatError, match="too short"):
        _parse(data[:5])
    with pytest.raises(FormatError, match="header length"):
        _parse(struct.pack("<Q", 10**12) + data[8:])
    tampered = data.replace(b'"shape":[3]', b'"shape":[4]')
    with pytest.raises(FormatError, match=r"tensor 'b.half' spans 6 bytes"):
        _parse(tampered)
    broken = data[:8] + b"[" + data[9:]
    with pytest.raises(FormatError, match=r"not valid JSON|not a JSON object"):
        _parse(broken)


def test_bad_input_to_the_writer():
    with pytest.raises(FormatError, match="str to str"):
        serialize({"w": torch.zeros(1)}, {"k": 1})
    with pytest.raises(FormatError, match="cannot be stored"):
        serialize({"w": torch.zeros(1, dtype=torch.complex64)}, {})
