r"""An offline image-quality measure: a small classifier's feature space, FD and KID.

No Inception or DINOv2 weights install offline, so the feature space is that of a
small CNN classifier trained here on the labelled training part of the data with a fixed
seed (:func:`train_classifier`, seconds on a CPU). Its penultimate layer (pre-activation,
standardised by the training split's per-unit mean and std, which are stored with the
weights) gives features :math:`f \in \mathbb{R}^d`, in which

* the Fréchet distance between Gaussians fitted to two sets is

  .. math::

      \mathrm{FD} = \lVert m_1 - m_2 \rVert^2 + \operatorname{tr}\big(C_1 + C_2
                    - 2\,(C_1^{1/2} C_2 C_1^{1/2})^{1/2}\big),

  with :math:`C^{1/2}` from a symmetric eigendecomposition (round-off negatives
  clipped to 0) and the outer root's trace as the nuclear norm of
  :math:`C_1^{1/2} C_2^{1/2}` (:func:`frechet_distance`);
* the kernel distance (KID) is the unbiased estimate of the squared MMD with the cubic
  polynomial kernel :math:`k(x, y) = (x \cdot y / d + 1)^3`,

  .. math::

      \widehat{\mathrm{MMD}}^2_u = \frac{1}{m(m-1)} \sum_{i \ne j} k(x_i, x_j)
          + \frac{1}{m(m-1)} \sum_{i \ne j} k(y_i, y_j)
          - \frac{2}{m^2} \sum_{i, j} k(x_i, y_j),

  averaged over random subsets of size :math:`m` from each set.

Both estimates are biased by the sample size (FD upward, KID only by its noise), so
:func:`evaluate` always reports the same numbers for two disjoint real sets of the same
size beside the generated set's: the real-vs-real baseline a model cannot beat. The real
sets should be held out of the diffusion model's training data and of the classifier's
(:func:`edm2_reference.data.holdout_split`), so that memorising training images cannot
pass for quality.

Uncertainty: :mod:`edm2_reference.bootstrap`.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import safetensors
import torch
from numpy.typing import NDArray
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from edm2_reference.data import DataError, ImageDataset

__all__ = [
    "FeatureClassifier",
    "QualityReport",
    "accuracy",
    "cached_classifier",
    "evaluate",
    "extract_features",
    "fingerprint",
    "frechet_distance",
    "frechet_distance_from_features",
    "kernel_distance",
    "load_classifier",
    "real_features",
    "save_classifier",
    "train_classifier",
]

Array = NDArray[np.float64]


class FeatureClassifier(nn.Module):
    """Three 3x3 convolutions (stride 1, 2, 2), 2x2 average pool, a ``feature_dim`` layer, logits."""

    feature_mean: Tensor
    feature_std: Tensor

    def __init__(
        self, channels: int, num_classes: int, feature_dim: int = 64, width: int = 32
    ) -> None:
        super().__init__()
        self.config = {
            "channels": channels,
            "num_classes": num_classes,
            "feature_dim": feature_dim,
            "width": width,
        }
        self.trunk = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(8 * width, feature_dim),
        )
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(feature_dim, num_classes))
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits for ``[-1, 1]`` images ``(N, C, H, W)``."""
        logits: Tensor = self.head(self.trunk(x))
        return logits

    def features(self, x: Tensor) -> Tensor:
        """Standardised penultimate features ``(N, feature_dim)``."""
        h: Tensor = self.trunk(x)
        return (h - self.feature_mean) / self.feature_std


def train_classifier(
    data: ImageDataset,
    *,
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 64,
    lr: float = 2e-3,
    feature_dim: int = 64,
    width: int = 32,
    threads: int | None = 1,
) -> FeatureClassifier:
    """Train the feature classifier on labelled ``data`` with Adam; deterministic given ``seed``.

    Initialisation and batch order come from ``seed`` alone (the global RNG is left as
    it was). Afterwards the feature standardisation is set from ``data``. Training runs
    on ``threads`` intra-op threads (torch's setting is restored afterwards; None keeps
    it): one thread by default, because a model this small gains little from more, one
    thread is not slowed down by other busy processes, and a fixed thread count keeps the
    floating-point reductions, hence the weights, the same on every machine.
    """
    if data.labels is None:
        raise DataError(f"the metric's classifier needs labelled data; {data.name!r} has no labels")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(data, data.labels, seed, epochs, batch_size, lr, feature_dim, width)
    finally:
        torch.set_num_threads(saved_threads)


def _train(
    data: ImageDataset,
    labels: Tensor,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    feature_dim: int,
    width: int,
) -> FeatureClassifier:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FeatureClassifier(data.shape[0], data.num_classes, feature_dim, width)
    gen = torch.Generator().manual_seed(seed)
    images = data.images()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps_per_epoch = -(-len(data) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data), generator=gen)
        for k in range(0, len(data), batch_size):
            idx = perm[k : k + batch_size]
            loss = nn.functional.cross_entropy(net(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        h = torch.cat([net.trunk(images[k : k + 1024]) for k in range(0, len(data), 1024)])
        net.feature_mean.copy_(h.mean(0))
        net.feature_std.copy_(h.std(0).clamp_min(1e-6))
    return net


@torch.no_grad()
def accuracy(net: FeatureClassifier, data: ImageDataset) -> float:
    """Fraction of ``data`` classified correctly."""
    if data.labels is None:
        raise DataError(f"accuracy needs labelled data; {data.name!r} has no labels")
    net.eval()
    pred = torch.cat(
        [net(data.images()[k : k + 1024]).argmax(1) for k in range(0, len(data), 1024)]
    )
    return float((pred == data.labels).to(torch.float64).mean())


_META_KEY = "edm2_reference.classifier"


def save_classifier(
    net: FeatureClassifier, path: str | os.PathLike[str], provenance: dict[str, str] | None = None
) -> None:
    """Write the weights, their config and optional ``provenance`` strings as safetensors (no pickle)."""
    state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    meta = {_META_KEY: json.dumps(net.config), **(provenance or {})}
    save_file(state, str(path), metadata=meta)


def _read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta: dict[str, str] = f.metadata() or {}
    except (OSError, safetensors.SafetensorError) as e:
        raise DataError(f"{str(path)!r} is not a readable safetensors file ({e})") from e
    return meta


def load_classifier(path: str | os.PathLike[str]) -> FeatureClassifier:
    """Read a classifier written by :func:`save_classifier`."""
    meta = _read_metadata(path)
    if _META_KEY not in meta:
        raise DataError(f"{str(path)!r} is not a classifier written by save_classifier")
    net = FeatureClassifier(**json.loads(meta[_META_KEY]))
    net.load_state_dict(load_file(str(path)))
    return net.eval()


def fingerprint(data: ImageDataset) -> str:
    """SHA-256 of a dataset's pixels, labels and scale: the identity a cached classifier is tied to."""
    h = hashlib.sha256(np.ascontiguousarray(data.pixels.numpy()).tobytes())
    if data.labels is not None:
        h.update(np.ascontiguousarray(data.labels.numpy()).tobytes())
    h.update(f"{tuple(data.pixels.shape)} {data.num_classes} {data.max_value}".encode())
    return h.hexdigest()


def cached_classifier(
    data: ImageDataset, path: str | os.PathLike[str], *, seed: int = 0, **train_kwargs: Any
) -> FeatureClassifier:
    """Load the classifier at ``path`` if it was trained on ``data`` with these settings; else train and save it."""
    key = json.dumps({"data": fingerprint(data), "seed": seed, **train_kwargs}, sort_keys=True)
    if os.path.exists(path) and _read_metadata(path).get("edm2_reference.trained_on") == key:
        return load_classifier(path)
    net = train_classifier(data, seed=seed, **train_kwargs)
    save_classifier(net, path, {"edm2_reference.trained_on": key})
    return net


@torch.no_grad()
def extract_features(net: FeatureClassifier, images: Tensor, batch_size: int = 1024) -> Array:
    """Standardised features of ``[-1, 1]`` images as float64 ``(N, d)``."""
    net.eval()
    x = images.to(torch.float32)
    feats = [net.features(x[k : k + batch_size]) for k in range(0, len(x), batch_size)]
    out: Array = torch.cat(feats).to(torch.float64).numpy()
    return out


def _sqrt_psd(c: Array) -> Array:
    w, v = np.linalg.eigh((c + c.T) / 2)
    out: Array = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    return out


def frechet_distance(mu1: Array, cov1: Array, mu2: Array, cov2: Array) -> float:
    r"""Fréchet distance between N(mu1, cov1) and N(mu2, cov2) (module docstring).

    The trace term is taken as a nuclear norm, :math:`\operatorname{tr}(C_1^{1/2} C_2
    C_1^{1/2})^{1/2} = \lVert C_1^{1/2} C_2^{1/2} \rVert_*` (the sum of singular values,
    as :math:`(C_1^{1/2} C_2^{1/2})(C_1^{1/2} C_2^{1/2})^\top = C_1^{1/2} C_2 C_1^{1/2}`):
    singular values come out with an absolute error of about eps times the norm, while the
    small eigenvalues of :math:`C_1^{1/2} C_2 C_1^{1/2}` do, and their square roots then
    err by up to :math:`\sqrt{\varepsilon}` times the norm. Rank-deficient covariances
    (fewer samples than features) have many such eigenvalues: FD(X, X) of 40-d features
    from 10 samples is ~1e-14 this way and ~-2e-6 by eigenvalues.
    """
    s1 = _sqrt_psd(np.asarray(cov1, dtype=np.float64))
    s2 = _sqrt_psd(np.asarray(cov2, dtype=np.float64))
    tr_sqrt = np.linalg.svd(s1 @ s2, compute_uv=False).sum()
    diff = np.asarray(mu1, dtype=np.float64) - np.asarray(mu2, dtype=np.float64)
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)


def frechet_distance_from_features(f1: Array, f2: Array) -> float:
    """FD between Gaussians fitted to two feature sets (unbiased covariances)."""
    return frechet_distance(
        f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    )


def _cubic(x: Array, y: Array, d: int) -> Array:
    k = x @ y.T / d + 1
    out: Array = k * k * k
    return out


def kernel_distance(
    f1: Array, f2: Array, *, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> float:
    """KID: unbiased MMD² with k(x, y) = (x.y/d + 1)^3, mean over seeded random subsets.

    Subsets have ``m = min(subset_size, len(f1), len(f2))`` rows drawn without
    replacement from each set; with ``m`` equal to both sizes every subset is the whole set.
    """
    m = min(subset_size, len(f1), len(f2))
    if m < 2:
        raise DataError(f"KID needs at least 2 samples per set, got {len(f1)} and {len(f2)}")
    d = f1.shape[1]
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = f1[rng.choice(len(f1), m, replace=False)]
        y = f2[rng.choice(len(f2), m, replace=False)]
        kxx, kyy, kxy = _cubic(x, x, d), _cubic(y, y, d), _cubic(x, y, d)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        total += float(within - 2 * kxy.mean())
    return total / num_subsets


@dataclass(frozen=True)
class QualityReport:
    """Generated-vs-real metrics beside the real-vs-real baseline at the same ``n``.

    ``class_entropy`` is the entropy (nats) of the histogram of predicted classes of the
    generated images (log K when balanced); ``confidence`` their mean top softmax probability.
    """

    n: int
    fd: float
    kid: float
    fd_baseline: float
    kid_baseline: float
    class_entropy: float
    confidence: float

    def __str__(self) -> str:
        return (
            f"n={self.n}: FD {self.fd:.3f} (real-vs-real {self.fd_baseline:.3f}), "
            f"KID {self.kid:.4f} (real-vs-real {self.kid_baseline:.4f}), "
            f"class entropy {self.class_entropy:.3f}, confidence {self.confidence:.3f}"
        )


@torch.no_grad()
def real_features(
    net: FeatureClassifier, real_images: Tensor, n: int, seed: int
) -> tuple[Array, Array]:
    """Features of the reference set A and the baseline set B: the real images shuffled with
    ``seed``, the first ``n`` (A) and the next ``n`` (B)."""
    perm = np.random.default_rng(seed).permutation(len(real_images))
    fa = extract_features(net, real_images[torch.from_numpy(perm[:n])])
    fb = extract_features(net, real_images[torch.from_numpy(perm[n : 2 * n])])
    return fa, fb


def evaluate(
    net: FeatureClassifier,
    generated: Tensor,
    real: ImageDataset | Tensor,
    *,
    n: int | None = None,
    seed: int = 0,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> QualityReport:
    """Compare ``n`` generated images with ``n`` real ones, and two disjoint real sets likewise.

    The real images are shuffled with ``seed``; the first ``n`` are the reference set A,
    the next ``n`` the baseline set B. Reported: FD/KID(generated, A) and FD/KID(B, A).
    ``n`` defaults to ``min(len(generated), len(real) // 2)``.
    """
    real_images = real.images() if isinstance(real, ImageDataset) else real
    n = min(len(generated), len(real_images) // 2) if n is None else n
    if not 2 <= n <= min(len(generated), len(real_images) // 2):
        raise DataError(
            f"n={n} needs n generated and 2n real images (have {len(generated)} and "
            f"{len(real_images)}); pass a smaller n or more images"
        )
    generated = generated[:n]
    fa, fb = real_features(net, real_images, n, seed)
    fg = extract_features(net, generated)
    kid = {"num_subsets": kid_subsets, "subset_size": kid_subset_size, "seed": seed}
    probs = torch.cat([net(generated[k : k + 1024].float()).softmax(1) for k in range(0, n, 1024)])
    hist = torch.bincount(probs.argmax(1), minlength=probs.shape[1]).to(torch.float64) / n
    entropy = float(-(hist[hist > 0] * hist[hist > 0].log()).sum())
    return QualityReport(
        n=n,
        fd=frechet_distance_from_features(fg, fa),
        kid=kernel_distance(fg, fa, **kid),
        fd_baseline=frechet_distance_from_features(fb, fa),
        kid_baseline=kernel_distance(fb, fa, **kid),
        class_entropy=entropy,
        confidence=float(probs.max(1).values.mean()),
    )
