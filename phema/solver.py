r"""Least-squares synthesis of new EMA profiles from stored power-function profiles.

Given stored profiles :math:`p_i` (snapshot time :math:`t_i`, std
:math:`\sigma_i`) and a target profile :math:`q`, find coefficients :math:`c`
minimising :math:`\|q - \sum_i c_i p_i\|_{L^2}`: the normal equations

.. math::

    A c = b, \qquad A_{ij} = \langle p_i, p_j \rangle, \qquad b_i = \langle p_i, q \rangle

use the closed-form inner products of :mod:`phema.profiles` (Eq. 151 of the
paper) and are solved in float64 (LU with partial pivoting). The coefficients
are then made to sum to one, so that the result is an average of snapshots:
``constraint="rescale"`` divides by the sum (the reference behaviour), and
``constraint="exact"`` solves the equality-constrained problem

.. math::

    \begin{pmatrix} A & \mathbf 1 \\ \mathbf 1^\top & 0 \end{pmatrix}
    \begin{pmatrix} c \\ \mu \end{pmatrix}
    = \begin{pmatrix} b \\ 1 \end{pmatrix}.

Times enter only through ratios (the inner products are homogeneous of degree
:math:`-1` in time), so each target's system is built in units of its own age
:math:`t`; the coefficients are the same and no time near the float limits over-
or underflows.

Because an EMA applied to a piecewise-constant trajectory is exactly
:math:`\int p(\tau)\theta(\tau)\,d\tau`, the reconstruction error of every
parameter is bounded by Cauchy-Schwarz:

.. math::

    |\hat\theta - \theta_q| \le \|q - \textstyle\sum_i c_i p_i\| \, \|\theta\|_{L^2(0, t)}
    = \varepsilon_\text{rel}\, \|q\|\, \|\theta\|_{L^2(0, t)},

which is why each solution reports its relative L2 error
:math:`\varepsilon_\text{rel}`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from phema.errors import IllPosedWarning, ProfileError, SolverError
from phema.profiles import power_inner, sigma_rel_to_gamma
from phema.targets import PowerProfile, Profile

__all__ = ["Fit", "Solution", "fit_profiles", "solve_weights"]

#: A fit whose relative L2 error exceeds this is reported as poor.
POOR_FIT_REL_ERROR = 0.05
#: Coefficients whose L1 norm exceeds this amplify snapshot rounding noise by as much.
LARGE_L1_NORM = 10.0
#: Above this condition number the float64 solve has lost more than 4 of its ~16 digits.
ILL_CONDITIONED = 1e12
#: Relative tolerance for "a snapshot exists at the target time".
TIME_RTOL = 1e-12


@dataclass(frozen=True)
class Fit:
    r"""Quality of one synthesised profile.

    Attributes:
        target: The profile that was asked for.
        rel_error: :math:`\|q - \sum c_i p_i\| / \|q\|`; evaluated from the normal
            equations, so values below ~1e-7 mean "as exact as float64 can tell".
        l1_norm: :math:`\sum_i |c_i|` (1 when every coefficient is non-negative).
        condition: 2-norm condition number of the Gram matrix of the snapshots used.
        num_inputs: How many snapshots (those with ``0 < t_i <= t``) were used.
        issues: Human-readable reasons the request is ill-posed; empty when fine.
    """

    target: Profile
    rel_error: float
    l1_norm: float
    condition: float
    num_inputs: int
    issues: tuple[str, ...]

    def summary(self) -> str:
        """One line: target, relative error, L1 norm and conditioning."""
        return (
            f"{self.target.describe()}: rel. L2 error {self.rel_error:.3g}, "
            f"L1 norm {self.l1_norm:.3g}, cond {self.condition:.3g}"
        )


@dataclass(frozen=True)
class Solution:
    """Coefficients ``weights[i, j]`` of snapshot ``i`` in target ``j``, and each fit."""

    weights: NDArray[np.float64]
    fits: tuple[Fit, ...]


def _as_vector(value: ArrayLike, name: str) -> NDArray[np.float64]:
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.ndim != 1:
        raise SolverError(f"{name} must be a 1-D sequence, got shape {arr.shape}")
    return arr


def _check_inputs(
    in_times: ArrayLike, in_stds: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    times = _as_vector(in_times, "in_times")
    stds = _as_vector(in_stds, "in_stds")
    if times.shape != stds.shape:
        raise SolverError(
            f"in_times and in_stds must have the same length, got {times.size} and {stds.size}"
        )
    if times.size == 0:
        raise SolverError("no snapshots given: pass at least one (time, std) pair")
    bad = ~np.isfinite(times) | (times < 0)
    if bad.any():
        raise ProfileError(f"snapshot times must be finite and >= 0, got {times[bad][:5].tolist()}")
    gammas = sigma_rel_to_gamma(stds)
    order = np.lexsort((stds, times))
    same = (np.diff(times[order]) == 0) & (np.diff(stds[order]) == 0)
    if same.any():
        k = int(np.flatnonzero(same)[0])
        i, j = sorted((int(order[k]), int(order[k + 1])))
        raise SolverError(
            f"snapshots {i} and {j} are the same profile (t={times[i]:g}, std={stds[i]:g}); "
            "remove the duplicate"
        )
    return times, stds, gammas


def fit_profiles(
    in_times: ArrayLike,
    in_stds: ArrayLike,
    targets: Sequence[Profile],
    *,
    constraint: Literal["rescale", "exact"] = "rescale",
    warn: bool = True,
) -> Solution:
    """Coefficients that combine stored power-function profiles into each target.

    Snapshots may come in any order and any mix of times and stds. For a target
    of age ``t`` only snapshots with ``0 < t_i <= t`` take part (a snapshot at
    ``t_i = 0`` holds the initial weights and has no profile); the others get 0.

    Args:
        in_times: Snapshot times, in the same unit as the targets' ``t``.
        in_stds: Snapshot stds (relative widths), one per snapshot.
        targets: Profiles to synthesise (:class:`~phema.targets.PowerProfile` or
            :class:`~phema.targets.ExponentialProfile`).
        constraint: How the coefficients are made to sum to one (module docstring).
        warn: Emit an :class:`~phema.errors.IllPosedWarning` per ill-posed target.

    Returns:
        A :class:`Solution` with ``weights`` of shape ``[n_in, n_targets]``.

    Raises:
        SolverError: If a target has no usable snapshot, snapshots repeat, or the
            system is singular.
        ProfileError: If a time or std is out of range.
    """
    times, stds, gammas = _check_inputs(in_times, in_stds)
    if constraint not in ("rescale", "exact"):
        raise SolverError(f"constraint must be 'rescale' or 'exact', got {constraint!r}")
    weights = np.zeros((times.size, len(targets)))
    fits: list[Fit | None] = [None] * len(targets)
    by_time: dict[float, list[int]] = {}
    for j, target in enumerate(targets):
        by_time.setdefault(target.t, []).append(j)
    for t_out, cols in by_time.items():
        # A time so far below t_out that t_i / t_out underflows to 0 holds, at this
        # scale, the initial weights: like t_i = 0, it has no profile to fit with.
        used = np.flatnonzero((times / t_out > 0) & (times <= t_out * (1.0 + TIME_RTOL)))
        if used.size == 0:
            positive = times[times > 0]
            first = f"the earliest is at t={positive.min():g}" if positive.size else "all at t=0"
            raise SolverError(
                f"no snapshot with 0 < t <= {t_out:g} to build the target from ({first}); "
                "pick a target time at or after a snapshot"
            )
        # In units of t_out every time lies in (0, 1]: inner products scale as 1/unit
        # and the coefficients not at all, so no time (1e308, 1e-300) over- or underflows.
        t_u, g_u = times[used] / t_out, gammas[used]
        scaled = [targets[j].scaled(t_out) for j in cols]
        gram = power_inner(t_u[:, None], g_u[:, None], t_u[None, :], g_u[None, :])
        rhs = np.stack([target.inner(t_u, g_u) for target in scaled], axis=1)
        if not (np.isfinite(gram).all() and np.isfinite(rhs).all()):
            raise SolverError(
                f"the snapshots up to t={t_out:g} span too many orders of magnitude in time "
                f"(earliest t={times[used].min():g}) to be combined in float64"
            )
        coef = _solve(gram, rhs, constraint, t_out)
        cond = float(np.linalg.cond(gram))
        for col, j in enumerate(cols):
            c, b = coef[:, col], rhs[:, col]
            qq = scaled[col].norm2()
            resid2 = qq - 2.0 * float(c @ b) + float(c @ gram @ c)
            rel = math.sqrt(max(resid2, 0.0) / qq)
            weights[used, j] = c
            l1 = float(np.abs(c).sum())
            issues = _issues(targets[j], times[used], stds[used], rel, l1, cond)
            fits[j] = Fit(targets[j], rel, l1, cond, int(used.size), issues)
    done = tuple(f for f in fits if f is not None)
    if warn:
        for fit in done:
            if fit.issues:
                warnings.warn(
                    f"ill-posed reconstruction: {'; '.join(fit.issues)} ({fit.summary()})",
                    IllPosedWarning,
                    stacklevel=2,
                )
    return Solution(weights, done)


def _solve(
    gram: NDArray[np.float64], rhs: NDArray[np.float64], constraint: str, t_out: float
) -> NDArray[np.float64]:
    n = gram.shape[0]
    try:
        if constraint == "exact":
            kkt = np.zeros((n + 1, n + 1))
            kkt[:n, :n] = gram
            kkt[:n, n] = kkt[n, :n] = 1.0
            full_rhs = np.vstack([rhs, np.ones((1, rhs.shape[1]))])
            coef: NDArray[np.float64] = np.linalg.solve(kkt, full_rhs)[:n]
            return coef
        coef = np.asarray(np.linalg.solve(gram, rhs), dtype=np.float64)
    except np.linalg.LinAlgError as exc:
        raise SolverError(
            f"the snapshots up to t={t_out:g} give a singular system ({exc}); "
            "they do not determine the target"
        ) from exc
    sums = coef.sum(axis=0)
    if np.any(np.abs(sums) < 1e-8):
        raise SolverError(
            f"the least-squares coefficients for t={t_out:g} sum to ~0 and cannot be "
            "rescaled to an average; use constraint='exact'"
        )
    out: NDArray[np.float64] = coef / sums
    return out


def _issues(
    target: Profile,
    times: NDArray[np.float64],
    stds: NDArray[np.float64],
    rel: float,
    l1: float,
    cond: float,
) -> tuple[str, ...]:
    found: list[str] = []
    if not np.any(np.abs(times - target.t) <= TIME_RTOL * target.t):
        found.append(f"no snapshot at t={target.t:g} (latest before it at t={times.max():g})")
    # Above the largest stored std the fit stays good (the rel. error check covers it);
    # below the smallest, the coefficients grow and amplify snapshot noise.
    if isinstance(target, PowerProfile) and target.std < stds.min() * (1 - 1e-12):
        found.append(
            f"std {target.std:g} is below every stored std (smallest {stds.min():g}): extrapolation"
        )
    if rel > POOR_FIT_REL_ERROR:
        found.append(f"poor fit (relative L2 error {rel:.3g} > {POOR_FIT_REL_ERROR})")
    if l1 > LARGE_L1_NORM:
        found.append(f"coefficients' L1 norm {l1:.3g} amplifies snapshot rounding noise")
    if cond > ILL_CONDITIONED:
        found.append(f"Gram matrix condition number {cond:.3g} costs float64 digits")
    return tuple(found)


def solve_weights(
    in_times: ArrayLike,
    in_stds: ArrayLike,
    out_times: ArrayLike,
    out_stds: ArrayLike,
) -> NDArray[np.float64]:
    """Coefficients ``[n_in, n_out]`` of stored profiles for power-function targets.

    The plain-array form of :func:`fit_profiles`; each column sums to one.

    Example:
        >>> w = solve_weights([1.0, 2.0], [0.1, 0.1], [2.0], [0.1])
        >>> w.round(12).tolist()
        [[0.0], [1.0]]
    """
    t_out = _as_vector(out_times, "out_times")
    s_out = _as_vector(out_stds, "out_stds")
    if t_out.shape != s_out.shape:
        t_out, s_out = np.broadcast_arrays(t_out, s_out)
    targets = [PowerProfile(float(t), float(s)) for t, s in zip(t_out, s_out, strict=True)]
    return fit_profiles(in_times, in_stds, targets).weights
