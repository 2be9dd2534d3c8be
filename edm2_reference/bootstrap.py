r"""Uncertainty of the sweep's FD and KID: a paired bootstrap, and which rows tie with the best.

Uncertainty (:func:`compare_rows`, :func:`evaluate_sweep`): several networks ("rows"), each
sampled with the same seeds, are compared with one reference set by a bootstrap. Replicate
:math:`r = 1..R` draws :math:`n` indices with replacement from the generated samples (the
*same* indices for every row, since sample :math:`i` of every row comes from seed :math:`i`),
from the reference set, and from the baseline set, and recomputes every row's FD and KID
(:math:`\hat\theta^*_r`). The interval of an estimate :math:`\hat\theta` is the basic
bootstrap interval for the estimator's expectation at this :math:`n` (the quantity the
real-vs-real baseline is also measured in):

.. math::

    [\hat\theta - (q_{1-\alpha/2} - \bar\theta^*),\;
     \hat\theta - (q_{\alpha/2} - \bar\theta^*)],

:math:`q_p` the :math:`p` quantile of the replicates and :math:`\bar\theta^*` their mean.
Subtracting the mean removes the bootstrap's own small-sample bias (resampling with
replacement repeats points, which adds to the FD's upward bias again), which would shift a
plain percentile interval :math:`[q_{\alpha/2}, q_{1-\alpha/2}]` off the estimator's
expectation. FD's lower end is raised to 0 where the reflection goes below
(FD is never negative; KID, an unbiased estimate, can be). Two rows are compared by the same interval for the difference
:math:`\hat\theta_k - \hat\theta_\text{best}`, its replicates taken from the same resample
indices (a paired bootstrap); a row is *not significantly different from the best* when
that interval holds 0. The comparisons are per row at the given level, not adjusted for
multiplicity.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from edm2_reference.data import DataError, ImageDataset
from edm2_reference.metrics import (
    FeatureClassifier,
    _cubic,
    extract_features,
    frechet_distance_from_features,
    real_features,
)

__all__ = [
    "BOOTSTRAP_LEVEL",
    "BOOTSTRAP_RESAMPLES",
    "Estimate",
    "RowQuality",
    "SweepQuality",
    "bootstrap_interval",
    "compare_rows",
    "evaluate_sweep",
    "mmd2_unbiased",
]

Array = NDArray[np.float64]


BOOTSTRAP_RESAMPLES = 1000
"""Default number of bootstrap replicates :math:`R` (:func:`compare_rows`)."""

BOOTSTRAP_LEVEL = 0.95
"""Default confidence level of the intervals (two-sided, :math:`1 - \\alpha`)."""


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval ``[lo, hi]`` (module docstring)."""

    value: float
    lo: float
    hi: float

    def holds(self, x: float) -> bool:
        """Whether ``lo <= x <= hi``."""
        return self.lo <= x <= self.hi

    def __str__(self) -> str:
        return f"{self.value:.4g} [{self.lo:.4g}, {self.hi:.4g}]"


@dataclass(frozen=True)
class RowQuality:
    """One row's FD and KID, and their paired differences to the best row's.

    ``fd_vs_best`` is :math:`\\mathrm{FD}_k - \\mathrm{FD}_\\text{best}` (the best: least FD)
    with its paired interval, ``kid_vs_best`` likewise for the least KID; both are exactly
    0 for the best row itself.
    """

    fd: Estimate
    kid: Estimate
    fd_vs_best: Estimate
    kid_vs_best: Estimate

    @property
    def fd_tied(self) -> bool:
        """Not significantly different in FD from the best row (its interval holds 0)."""
        return self.fd_vs_best.holds(0.0)

    @property
    def kid_tied(self) -> bool:
        """Not significantly different in KID from the best row (its interval holds 0)."""
        return self.kid_vs_best.holds(0.0)


@dataclass(frozen=True)
class SweepQuality:
    """Every row's :class:`RowQuality`, the real-vs-real baseline and how they were measured."""

    n: int
    rows: tuple[RowQuality, ...]
    fd_baseline: Estimate
    kid_baseline: Estimate
    best_fd: int
    best_kid: int
    resamples: int
    level: float
    seed: int
    sets: int = 1  # generated sets of n per row, their figures averaged


def bootstrap_interval(
    estimate: float, replicates: Array, level: float, *, floor: float | None = None
) -> Estimate:
    r"""Basic bootstrap interval for the estimator's expectation (module docstring).

    :math:`[\hat\theta - (q_{1-\alpha/2} - \bar\theta^*), \hat\theta - (q_{\alpha/2} -
    \bar\theta^*)]` with :math:`\alpha = 1 - \text{level}`, quantiles by numpy's default
    linear interpolation. ``floor``: a bound the estimator cannot go below (0 for FD, a
    sum of squares), to which ``lo`` is raised; the reflection can overshoot it when the
    replicates are skewed away from it, as FD's are when the two sets are alike.
    """
    if not 0.0 < level < 1.0:
        raise DataError(f"confidence level must be in (0, 1), got {level}; pass e.g. 0.95")
    reps = np.asarray(replicates, dtype=np.float64)
    if reps.ndim != 1 or len(reps) < 2 or not np.all(np.isfinite(reps)):
        raise DataError(f"need at least 2 finite bootstrap replicates, got {reps.shape}")
    alpha = 1.0 - level
    q_lo, q_hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    centre = float(reps.mean())
    lo = float(estimate - (q_hi - centre))
    if floor is not None:
        lo = max(lo, min(floor, float(estimate)))
    return Estimate(float(estimate), lo, float(estimate - (q_lo - centre)))


def _sqrt_psd_batch(c: Array) -> Array:
    """Symmetric PSD square roots of a stack ``(..., d, d)`` (round-off negatives clipped)."""
    w, v = np.linalg.eigh((c + np.swapaxes(c, -1, -2)) / 2)
    out: Array = (v * np.sqrt(np.clip(w, 0, None))[..., None, :]) @ np.swapaxes(v, -1, -2)
    return out


def _weighted_moments(f: Array, counts: NDArray[np.int64], chunk: int = 64) -> tuple[Array, Array]:
    r"""Means ``(R, d)`` and unbiased covariances ``(R, d, d)`` of ``R`` resamples of ``f``.

    Resample :math:`r` holds row :math:`i` of ``f`` ``counts[r, i]`` times, :math:`n =
    \sum_i w_i`: :math:`\mu = \sum_i w_i f_i / n`, :math:`C = (\sum_i w_i f_i f_i^\top - n
    \mu\mu^\top) / (n - 1)`, computed on ``f`` centred by its own mean (shift-invariant, less
    cancellation).
    """
    centre = f.mean(0)
    g = f - centre
    w = counts.astype(np.float64)
    n = float(counts[0].sum())
    mu = w @ g / n
    cov = np.empty((len(w), f.shape[1], f.shape[1]))
    for k in range(0, len(w), chunk):
        wk = w[k : k + chunk]
        cov[k : k + chunk] = np.swapaxes(wk[:, :, None] * g[None], 1, 2) @ g
    cov -= n * mu[:, :, None] * mu[:, None, :]
    cov /= n - 1
    return mu + centre, cov


def _fd_batch(mu1: Array, cov1: Array, s1: Array, mu2: Array, cov2: Array, s2: Array) -> Array:
    """:func:`frechet_distance` over stacks, with the covariances' square roots given."""
    tr_sqrt = np.linalg.svd(s1 @ s2, compute_uv=False).sum(-1)
    diff = mu1 - mu2
    tr1, tr2 = np.trace(cov1, axis1=-2, axis2=-1), np.trace(cov2, axis1=-2, axis2=-1)
    out: Array = (diff * diff).sum(-1) + tr1 + tr2 - 2 * tr_sqrt
    return out


def mmd2_unbiased(f1: Array, f2: Array) -> float:
    """Unbiased MMD² with the cubic kernel over the whole sets: :func:`kernel_distance` with
    one subset as large as both (sets of equal size), or a two-sample U-statistic otherwise."""
    d = f1.shape[1]
    kxx, kyy, kxy = _cubic(f1, f1, d), _cubic(f2, f2, d), _cubic(f1, f2, d)
    m1, m2 = len(f1), len(f2)
    if min(m1, m2) < 2:
        raise DataError(f"KID needs at least 2 samples per set, got {m1} and {m2}")
    xx = (kxx.sum() - np.trace(kxx)) / (m1 * (m1 - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (m2 * (m2 - 1))
    return float(xx + yy - 2 * kxy.mean())


def _mmd2_batch(
    kxx: Array, kyy: Array, kxy: Array, wx: NDArray[np.int64], wy: NDArray[np.int64]
) -> Array:
    r""":func:`mmd2_unbiased` of ``R`` resamples given by counts ``wx``, ``wy`` ``(R, n)``.

    Over a resample's positions :math:`p \ne q`, :math:`\sum k(x_{\iota_p}, x_{\iota_q}) =
    w^\top K w - \sum_i w_i K_{ii}` (two positions holding one original point add
    :math:`K_{ii}`, as a resample with repeats would).
    """
    a, b = wx.astype(np.float64), wy.astype(np.float64)
    n, m = a[0].sum(), b[0].sum()
    xx = (np.einsum("ri,ri->r", a @ kxx, a) - a @ np.diag(kxx)) / (n * (n - 1))
    yy = (np.einsum("ri,ri->r", b @ kyy, b) - b @ np.diag(kyy)) / (m * (m - 1))
    xy = np.einsum("ri,ri->r", a @ kxy, b) / (n * m)
    out: Array = xx + yy - 2 * xy
    return out


def _resample_counts(rng: np.random.Generator, n: int, resamples: int) -> NDArray[np.int64]:
    """``(R, n)`` multiplicities of ``n`` uniform draws with replacement from ``n`` items."""
    idx = rng.integers(0, n, size=(resamples, n))
    counts = np.zeros((resamples, n), dtype=np.int64)
    np.add.at(counts, (np.arange(resamples)[:, None], idx), 1)
    return counts


def compare_rows(
    generated: Sequence[Array],
    reference: Array,
    baseline: Array,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    seed: int = 0,
    sets: int = 1,
) -> SweepQuality:
    r"""FD and KID of every generated feature set against ``reference``, with paired bootstrap intervals.

    ``generated[k]`` are the ``(sets * n, d)`` features of row :math:`k`; row :math:`i` of every
    set must come from the same seed (the resample indices are shared, module docstring).
    With ``sets`` :math:`S > 1` each row's figure is the mean over its :math:`S` consecutive
    sets of :math:`n` (each against the one reference set, each resampled on its own): the
    same expectation as one set of :math:`n`, so still comparable with the real-vs-real
    baseline at :math:`n`, with the generated samples' share of the variance divided by
    :math:`S`.
    ``baseline`` (``(n, d)``, real images disjoint from ``reference``) gives the
    real-vs-real figures. Point estimates: :func:`frechet_distance_from_features` and
    :func:`mmd2_unbiased`; intervals: :func:`bootstrap_interval` over ``resamples``
    replicates drawn by ``numpy.random.default_rng(seed)``.
    """
    if not generated:
        raise DataError("compare_rows needs at least one generated feature set")
    n = len(reference)
    d = np.shape(reference)[-1]
    shapes = {np.shape(f) for f in generated}
    if (
        shapes != {(sets * n, d)}
        or {np.shape(baseline), np.shape(reference)} != {(n, d)}
        or n < 2
        or sets < 1
    ):
        raise DataError(
            f"generated sets must be (sets * n, d) = ({sets} * {n}, {d}) and the reference and "
            f"baseline (n >= 2, d), got {sorted(shapes)}, {np.shape(reference)} and "
            f"{np.shape(baseline)}; sample every row with the same seeds"
        )
    if resamples < 2:
        raise DataError(f"resamples={resamples} is too few; pass 2 or more (e.g. 1000)")
    rng = np.random.default_rng(seed)
    w_gens = [_resample_counts(rng, n, resamples) for _ in range(sets)]
    w_ref, w_base = (_resample_counts(rng, n, resamples) for _ in range(2))
    mu_r, cov_r = _weighted_moments(reference, w_ref)
    s_r = _sqrt_psd_batch(cov_r)
    k_rr = _cubic(reference, reference, d)

    def measure_one(f: Array, w: NDArray[np.int64]) -> tuple[float, float, Array, Array]:
        mu, cov = _weighted_moments(f, w)
        fd_reps = _fd_batch(mu, cov, _sqrt_psd_batch(cov), mu_r, cov_r, s_r)
        kid_reps = _mmd2_batch(_cubic(f, f, d), k_rr, _cubic(f, reference, d), w, w_ref)
        return (
            frechet_distance_from_features(f, reference),
            mmd2_unbiased(f, reference),
            fd_reps,
            kid_reps,
        )

    def measure(f: Array, ws: list[NDArray[np.int64]]) -> tuple[float, float, Array, Array]:
        parts = [measure_one(f[j * n : (j + 1) * n], w) for j, w in enumerate(ws)]
        fd, kid, fd_reps, kid_reps = zip(*parts, strict=True)
        return float(np.mean(fd)), float(np.mean(kid)), np.mean(fd_reps, 0), np.mean(kid_reps, 0)

    fd_b, kid_b, fd_b_reps, kid_b_reps = measure(baseline, [w_base])
    measured = [measure(np.asarray(f, dtype=np.float64), w_gens) for f in generated]
    fds = np.array([m[0] for m in measured])
    kids = np.array([m[1] for m in measured])
    best_fd, best_kid = int(np.argmin(fds)), int(np.argmin(kids))
    rows = tuple(
        RowQuality(
            fd=bootstrap_interval(fd, fd_reps, level, floor=0.0),
            kid=bootstrap_interval(kid, kid_reps, level),
            fd_vs_best=bootstrap_interval(fd - fds[best_fd], fd_reps - measured[best_fd][2], level),
            kid_vs_best=bootstrap_interval(
                kid - kids[best_kid], kid_reps - measured[best_kid][3], level
            ),
        )
        for fd, kid, fd_reps, kid_reps in measured
    )
    return SweepQuality(
        n=n,
        rows=rows,
        fd_baseline=bootstrap_interval(fd_b, fd_b_reps, level, floor=0.0),
        kid_baseline=bootstrap_interval(kid_b, kid_b_reps, level),
        best_fd=best_fd,
        best_kid=best_kid,
        resamples=resamples,
        level=level,
        seed=seed,
        sets=sets,
    )


@torch.no_grad()
def evaluate_sweep(
    net: FeatureClassifier,
    generated: Sequence[Tensor],
    real: ImageDataset | Tensor,
    *,
    n: int | None = None,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
    level: float = BOOTSTRAP_LEVEL,
    sets: int = 1,
) -> SweepQuality:
    """:func:`compare_rows` on classifier features; the real sets are those of :func:`evaluate`.

    The real images (held out of training, :func:`edm2_reference.data.holdout_split`) are
    shuffled with ``seed``: the first ``n`` are the reference, the next ``n`` the baseline
    set; each row's first ``sets * n`` images are used. ``n`` defaults to ``min(len(every
    row) // sets, len(real) // 2)``. The bootstrap is seeded with ``seed`` too.
    """
    real_images = real.images() if isinstance(real, ImageDataset) else real
    if not generated:
        raise DataError("evaluate_sweep needs at least one set of generated images")
    fewest = min(len(g) for g in generated)
    n = min(fewest // max(sets, 1), len(real_images) // 2) if n is None else n
    if sets < 1 or not 2 <= n <= min(fewest // sets, len(real_images) // 2):
        raise DataError(
            f"n={n} needs {sets} x n generated images per row and 2n real images (have "
            f"{fewest} and {len(real_images)}); pass a smaller n or more images"
        )
    fa, fb = real_features(net, real_images, n, seed)
    fgs = [extract_features(net, g[: sets * n]) for g in generated]
    return compare_rows(fgs, fa, fb, resamples=resamples, level=level, seed=seed, sets=sets)
