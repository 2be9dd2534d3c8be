"""Sharded snapshot manifests without torchrun: the map from logical bytes to shard pieces.

Shards are written here by hand (``encode_shard`` / ``encode_manifest``, as the ranks of
``phema._sharded_write`` do), so that every malformed manifest can be tried.
"""

from __future__ import annotations

import json

import pytest
import torch

from phema import FormatError, SnapshotStore, StorageError
from phema.profiles import sigma_rel_to_gamma
from phema.shards import encode_manifest, encode_shard, shard_name
from phema.store import snapshot_metadata, snapshot_name

TENSORS = {"a": torch.arange(12.0).reshape(4, 3), "b": torch.arange(5, dtype=torch.float16)}


def _write(store: SnapshotStore, cuts: dict[str, list[int]], sid: str = "id0001") -> None:
    """One snapshot whose tensor ``n`` is cut at flat elements ``cuts[n]`` into shards."""
    specs = [(n, v.dtype, tuple(v.shape)) for n, v in TENSORS.items()]
    meta = snapshot_metadata(
        specs, t=10.0, std=0.1, gamma=float(sigma_rel_to_gamma(0.1)), t_unit="steps", step=1
    )
    name = snapshot_name(10.0, 0.1)
    records = []
    ranks = max(len(c) - 1 for c in cuts.values())
    for r in range(ranks):
        pieces = []
        for n, v in TENSORS.items():
            c = cuts[n]
            if r + 1 < len(c) and c[r] < c[r + 1]:
                pieces.append((n, c[r], c[r + 1], v.reshape(-1)[c[r] : c[r + 1]].clone()))
        data, record = encode_shard(pieces, sid, meta)
        shard = shard_name(name.removesuffix(".safetensors"), sid, r)
        store.write(shard, data)
        records.append((shard, record))
    store.write(name, encode_manifest(specs, meta, sid, records))


@pytest.mark.parametrize(
    "cuts",
    [
        {"a": [0, 12], "b": [0, 5]},  # one shard
        {"a": [0, 5, 12], "b": [0, 0, 5]},  # uneven, an empty piece
        {"a": [0, 1, 2, 12], "b": [0, 4, 4, 5]},
    ],
)
def test_any_cut_loads_the_same_tensors(tmp_path, cuts):
    store = SnapshotStore(str(tmp_path))
    _write(store, cuts)
    (info,) = store.list()
    got = store.load(info)
    assert got.keys() == TENSORS.keys()
    assert all(torch.equal(got[n], TENSORS[n]) for n in TENSORS)
    assert info.size == sum(p.stat().st_size for p in tmp_path.rglob("*.safetensors"))


def _tamper(tmp_path, edit) -> None:
    """Rewrite the manifest's phema.shards through ``edit`` (keeping the header valid)."""
    path = next(tmp_path.glob("phema-*.safetensors"))
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    body = json.loads(raw[8 : 8 + n])
    shards = json.loads(body["__metadata__"]["phema.shards"])
    edit(shards)
    body["__metadata__"]["phema.shards"] = json.dumps(shards)
    text = json.dumps(body).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda s: s[1]["pieces"].pop(0), "do not cover the snapshot's bytes exactly once"),
        (lambda s: s[1]["pieces"][0].__setitem__(1, 4), "do not cover"),  # overlap
        (lambda s: s[0]["pieces"][0].__setitem__(0, "zz"), "unknown piece"),
        (lambda s: s[0]["pieces"][0].__setitem__(2, 99), "unknown piece"),  # past the end
        (lambda s: s[0].pop("size"), r"shard record lacks \['size'\]"),
        (lambda s: s[0].__setitem__("name", "../../etc/passwd"), "not of the form"),
        (lambda s: s[0].__setitem__("name", "shards/../x/y.safetensors"), "not of the form"),
        (lambda s: s[0].__setitem__("size", 1.5), "must be an integer"),
        (lambda s: s[0]["pieces"][0].__setitem__(1, True), "must be an integer"),
    ],
)
def test_a_manifest_that_does_not_tile_the_tensors_is_refused(tmp_path, edit, message):
    store = SnapshotStore(str(tmp_path))
    _write(store, {"a": [0, 5, 12], "b": [0, 2, 5]})
    _tamper(tmp_path, edit)
    with pytest.raises(FormatError, match=message):
        store.list()


def test_a_shard_whose_pieces_differ_from_the_manifest_is_named(tmp_path):
    store = SnapshotStore(str(tmp_path))
    _write(store, {"a": [0, 5, 12], "b": [0, 2, 5]})
    (info,) = store.list()
    # Swap the two shards' files: each is a valid shard of this snapshot, in the wrong place.
    first, second = (tmp_path / s.name for s in info.shards)
    a, b = first.read_bytes(), second.read_bytes()
    first.write_bytes(b)
    second.write_bytes(a)
    with pytest.raises(StorageError, match=rf"{first.name} differs from what its manifest"):
        store.load(info)


def _rewrite_meta(path, key, value):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    body = json.loads(raw[8 : 8 + n])
    body["__metadata__"][key] = value
    text = json.dumps(body).encode()
    text += b" " * (-(8 + len(text)) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])


def test_malformed_tensor_lists_and_shard_pieces_are_named(tmp_path):
    store = SnapshotStore(str(tmp_path))
    _write(store, {"a": [0, 5, 12], "b": [0, 2, 5]})
    (info,) = store.list()
    shard = tmp_path / info.shards[0].name
    _rewrite_meta(shard, "phema.pieces", "[" * 100_000)  # deep nesting in a shard
    with pytest.raises(StorageError, match=f"{shard.name} has no valid phema.pieces"):
        store.load(info)
    manifest = tmp_path / snapshot_name(10.0, 0.1)
    _rewrite_meta(manifest, "phema.tensors", '[["a", [[1]], [4, 3]]]')  # a list for a dtype
    with pytest.raises(FormatError, match="is not \\[name, dtype, shape\\]"):
        store.list()


def test_huge_manifest_shapes_and_special_shard_files_are_named(tmp_path):
    import os

    store = SnapshotStore(str(tmp_path))
    _write(store, {"a": [0, 5, 12], "b": [0, 2, 5]})
    (info,) = store.list()
    shard = tmp_path / info.shards[1].name
    shard.unlink()
    os.mkfifo(shard)  # opening a FIFO for reading would block until a writer comes
    with pytest.raises(StorageError, match=f"{shard.name} .*is not a regular file"):
        store.load(info)
    manifest = tmp_path / snapshot_name(10.0, 0.1)
    dims = [2**64 - 1] * 5000
    _rewrite_meta(manifest, "phema.tensors", json.dumps([["a", "F32", dims]]))
    with pytest.raises(FormatError, match="2\\*\\*64 elements or more"):
        store.list()


def test_messages_name_shards_by_their_path_in_the_store(tmp_path):
    store = SnapshotStore(str(tmp_path))
    name = "shards/phema-000000000010-0.1000/id0001-00001.safetensors"
    assert store.backend.where(store.path_of(name)) == f"{tmp_path}/{name}"
    _write(store, {"a": [0, 5, 12], "b": [0, 2, 5]})
    (info,) = store.list()
    from phema.streaming import plan, write_plan

    the_plan = plan(store, [0.1])  # pins every shard's version
    shard = tmp_path / the_plan.inputs[0].shards[1].name
    shard.write_bytes(shard.read_bytes()[:-1])  # truncated after the plan
    with pytest.raises(StorageError, match=r"shards/phema-000000000010-0\.1000/id0001-00001"):
        write_plan(the_plan, store, str(tmp_path / "out"))
    assert info.shards
