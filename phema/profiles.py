r"""Power-function EMA profiles: std <-> gamma, per-update decay, and L2 inner products.

A power-function EMA of age :math:`t` averages the training trajectory
:math:`\theta(\tau)` with the density

.. math::

    p_{t,\gamma}(\tau) = \frac{(\gamma + 1)\,\tau^\gamma}{t^{\gamma + 1}},
    \qquad 0 \le \tau \le t,

and zero elsewhere (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", Eq. 121). Its relative width, the standard
deviation of :math:`p` divided by :math:`t`, is

.. math::

    \sigma_\text{rel}(\gamma) = \sqrt{\frac{\gamma + 1}{(\gamma + 2)^2 (\gamma + 3)}}.

"std" everywhere in phema means this :math:`\sigma_\text{rel}` (a fraction, e.g.
0.05), never a percentage. :math:`\gamma > 0` maps one to one onto
:math:`\sigma_\text{rel} \in (0, \sqrt{1/12})`; ``gamma = 0`` (the uniform average)
is the closed end of the range.

Everything here is float64 NumPy; no torch.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from phema.errors import ProfileError

__all__ = [
    "STD_MAX",
    "gamma_to_sigma_rel",
    "power_beta",
    "power_inner",
    "power_weight",
    "sigma_rel_to_gamma",
]

#: Largest valid std: the uniform average (gamma = 0) has std sqrt(1/12).
STD_MAX: float = math.sqrt(1.0 / 12.0)
#: Smallest std accepted: its exponent (about std^-2) stays far inside float range.
STD_MIN: float = 1e-100

Float64Array = NDArray[np.float64]


def _finite_array(value: ArrayLike, name: str) -> Float64Array:
    arr: Float64Array = np.asarray(value, dtype=np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ProfileError(f"{name} must be finite, got {arr[bad].ravel()[:5].tolist()}")
    return arr


def _check_std(std: Float64Array) -> None:
    bad = (std < STD_MIN) | (std > STD_MAX)
    if not bad.any():
        return
    values = std[bad].ravel()[:5].tolist()
    hint = ""
    if np.any((std[bad] > 1.0) & (std[bad] <= 100.0 * STD_MAX)):
        hint = "; did you pass a percentage (e.g. 5) instead of a fraction (0.05)?"
    raise ProfileError(
        f"std (sigma_rel) must be in [{STD_MIN:g}, {STD_MAX:.6f}], got {values}{hint}"
    )


def gamma_to_sigma_rel(gamma: ArrayLike) -> Float64Array:
    r"""Relative std of the power-function profile with exponent ``gamma``.

    .. math::

        \sigma_\text{rel} = \sqrt{\frac{\gamma + 1}{(\gamma + 2)^2 (\gamma + 3)}}

    Args:
        gamma: Exponent(s) :math:`\gamma \ge 0`, any shape.

    Returns:
        :math:`\sigma_\text{rel}`, same shape, float64.

    Raises:
        ProfileError: If any gamma is negative or not finite.

    Example:
        >>> round(float(gamma_to_sigma_rel(6.9372039376)), 10)
        0.1
    """
    g = _finite_array(gamma, "gamma")
    if np.any(g < 0.0):
        raise ProfileError(
            f"gamma must be >= 0 (std <= {STD_MAX:.6f}), got {g[g < 0].ravel()[:5].tolist()}"
        )
    out: Float64Array = np.sqrt((g + 1.0) / ((g + 2.0) ** 2 * (g + 3.0)))
    return out


def sigma_rel_to_gamma(std: ArrayLike) -> Float64Array:
    r"""Exponent of the power-function profile with relative std ``std``.

    Inverse of :func:`gamma_to_sigma_rel`: the largest real root of

    .. math::

        \gamma^3 + 7\gamma^2 + (16 - \sigma_\text{rel}^{-2})\,\gamma
        + (12 - \sigma_\text{rel}^{-2}) = 0

    (Algorithm 2 of the paper). Roots come from the companion matrices of all
    inputs at once and are then polished by two Newton steps on the cubic, which
    makes the round trip through :func:`gamma_to_sigma_rel` exact to a few ulp.

    Args:
        std: Relative std(s) in ``(0, sqrt(1/12)]``, any shape.

    Returns:
        :math:`\gamma`, same shape as ``std``, float64.

    Raises:
        ProfileError: If any value is outside ``(0, sqrt(1/12)]`` or not finite.

    Example:
        >>> float(sigma_rel_to_gamma(0.05).round(10))
        16.9721986023
    """
    s = _finite_array(std, "std")
    _check_std(s)
    flat = s.reshape(-1)
    c = 1.0 / (flat * flat)
    # Monic cubic g^3 + a2 g^2 + a1 g + a0 and its companion matrix, one per input.
    a2 = np.full_like(flat, 7.0)
    a1 = 16.0 - c
    a0 = 12.0 - c
    comp = np.zeros((flat.size, 3, 3))
    comp[:, 0, 0] = -a2
    comp[:, 0, 1] = -a1
    comp[:, 0, 2] = -a0
    comp[:, 1, 0] = 1.0
    comp[:, 2, 1] = 1.0
    # a0 < 0 makes exactly one root positive; the other two have negative real part.
    g = np.linalg.eigvals(comp).real.max(axis=1) if flat.size else flat.copy()
    for _ in range(2):
        f = ((g + a2) * g + a1) * g + a0
        df = (3.0 * g + 2.0 * a2) * g + a1
        g = g - f / df
    g = np.maximum(g, 0.0)
    out: Float64Array = g.reshape(s.shape)
    return out


def _check_times(t_prev: float, t_next: float) -> None:
    if not (math.isfinite(t_prev) and math.isfinite(t_next) and 0.0 <= t_prev < t_next):
        raise ProfileError(
            f"update times must satisfy 0 <= t_prev < t_next, got t_prev={t_prev}, "
            f"t_next={t_next}; pass the training time after each step, which must increase"
        )


def power_beta(gamma: float, t_prev: float, t_next: float) -> float:
    r"""Decay of one EMA update from time ``t_prev`` to ``t_next``.

    .. math::

        \beta = \left(1 - \frac{t_\text{next} - t_\text{prev}}{t_\text{next}}\right)^{\gamma+1}
              = \left(\frac{t_\text{prev}}{t_\text{next}}\right)^{\gamma+1}

    (Eq. 127), so the EMA after the update weights the interval
    :math:`(t_{i-1}, t_i]` by exactly
    :math:`(t_i^{\gamma+1} - t_{i-1}^{\gamma+1}) / t^{\gamma+1}`, whatever the
    spacing of the updates. ``t_prev = 0`` gives ``beta = 0`` (copy).

    Args:
        gamma: Profile exponent, ``>= 0``.
        t_prev: Time of the previous update (0 before the first), ``>= 0``.
        t_next: Time of this update, ``> t_prev``.

    Returns:
        beta in ``[0, 1)``.

    Raises:
        ProfileError: If the times are not finite or not increasing.

    Example:
        >>> power_beta(0.0, 1.0, 2.0)
        0.5
    """
    _check_times(t_prev, t_next)
    if t_prev == 0.0:
        return 0.0
    return math.exp((gamma + 1.0) * math.log(t_prev / t_next))


def power_weight(gamma: float, t_prev: float, t_next: float) -> float:
    r"""``1 - power_beta(gamma, t_prev, t_next)``, computed without cancellation.

    .. math::

        1 - \beta = -\operatorname{expm1}\!\big((\gamma + 1)\,
        \operatorname{log1p}(-\Delta t / t_\text{next})\big)

    This is the weight that an update gives the current parameters.

    Example:
        >>> power_weight(0.0, 1.0, 2.0)
        0.5
    """
    _check_times(t_prev, t_next)
    if t_prev == 0.0:
        return 1.0
    return -math.expm1((gamma + 1.0) * math.log1p(-(t_next - t_prev) / t_next))


def power_inner(
    t_a: ArrayLike, gamma_a: ArrayLike, t_b: ArrayLike, gamma_b: ArrayLike
) -> Float64Array:
    r"""L2 inner product of two power-function profiles, broadcast over inputs.

    With :math:`T = \min(t_a, t_b)` (Eq. 151):

    .. math::

        \langle p_{t_a,\gamma_a}, p_{t_b,\gamma_b} \rangle
        = \frac{(\gamma_a + 1)(\gamma_b + 1)\, T^{\gamma_a + \gamma_b + 1}}
               {(\gamma_a + \gamma_b + 1)\, t_a^{\gamma_a + 1}\, t_b^{\gamma_b + 1}}

    evaluated in log space so that large exponents cannot overflow.

    Args:
        t_a: Ages of the first profiles, ``> 0``.
        gamma_a: Their exponents.
        t_b: Ages of the second profiles, ``> 0``.
        gamma_b: Their exponents.

    Returns:
        The inner products, with the broadcast shape of the inputs.

    Example:
        >>> float(power_inner(1.0, 0.0, 1.0, 0.0))  # uniform density on [0, 1]
        1.0
    """
    ta = np.asarray(t_a, dtype=np.float64)
    tb = np.asarray(t_b, dtype=np.float64)
    ga = np.asarray(gamma_a, dtype=np.float64)
    gb = np.asarray(gamma_b, dtype=np.float64)
    big_t = np.minimum(ta, tb)
    # T^(ga+gb+1) / (ta^(ga+1) tb^(gb+1)) = (T/ta)^(ga+1) (T/tb)^(gb+1) / T: one ratio is
    # exactly 1 and the other <= 1, so no large logarithms cancel.
    log_val = (
        np.log1p(ga)
        + np.log1p(gb)
        - np.log1p(ga + gb)
        + (ga + 1.0) * np.log(big_t / ta)
        + (gb + 1.0) * np.log(big_t / tb)
        - np.log(big_t)
    )
    out: Float64Array = np.exp(log_val)
    return out
