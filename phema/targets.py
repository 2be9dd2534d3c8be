r"""Averaging profiles that a reconstruction can aim at.

A target is anything whose L2 inner product with a stored power-function profile
and whose own squared norm have closed forms (or an accurate quadrature): that is
all the least-squares solver in :mod:`phema.solver` needs.

* :class:`PowerProfile`: the EDM2 power-function EMA of age ``t`` and std ``std``.
* :class:`ExponentialProfile`: a classic EMA with a constant rate :math:`\lambda`
  per unit of time (``beta`` per unit time, or a half-life), truncated to the
  training interval and renormalised:

  .. math::

      q_{t,\lambda}(\tau) = \frac{\lambda e^{-\lambda (t - \tau)}}{1 - e^{-\lambda t}},
      \qquad 0 \le \tau \le t.

  A classic EMA started from the initial weights also gives those weights a
  point mass :math:`e^{-\lambda t}`; once :math:`\lambda t \gg 1` (every EMA worth
  using) that mass is negligible, and the truncated density is what the solver
  matches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray
from scipy import integrate

from phema.errors import ProfileError
from phema.profiles import gamma_to_sigma_rel, power_inner, sigma_rel_to_gamma

__all__ = ["ExponentialProfile", "PowerProfile", "Profile", "power_density"]


def _check_time(t: float) -> float:
    t = float(t)
    if not (math.isfinite(t) and t > 0.0):
        raise ProfileError(f"profile time t must be finite and > 0, got {t}")
    return t


@dataclass(frozen=True)
class PowerProfile:
    """Power-function EMA profile of age ``t`` and relative std ``std``."""

    t: float
    std: float
    #: Exponent of the profile, from :func:`~phema.profiles.sigma_rel_to_gamma`.
    gamma: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", _check_time(self.t))
        object.__setattr__(self, "std", float(self.std))
        object.__setattr__(self, "gamma", float(sigma_rel_to_gamma(self.std)))

    @classmethod
    def from_gamma(cls, t: float, gamma: float) -> PowerProfile:
        """Profile of age ``t`` with exponent ``gamma``."""
        return cls(t, float(gamma_to_sigma_rel(gamma)))

    def scaled(self, unit: float) -> PowerProfile:
        """The same profile with time counted in units of ``unit`` (age ``t / unit``)."""
        return PowerProfile(self.t / unit, self.std)

    def norm2(self) -> float:
        r""":math:`\|p\|^2 = (\gamma+1)^2 / ((2\gamma+1)\,t)`."""
        g = self.gamma
        return (g + 1.0) ** 2 / ((2.0 * g + 1.0) * self.t)

    def density(self, tau: NDArray[np.float64]) -> NDArray[np.float64]:
        r""":math:`p(\tau) = (\gamma+1)\,\tau^\gamma / t^{\gamma+1}` on :math:`[0, t]`, 0 after."""
        return power_density(np.asarray(tau, dtype=np.float64), self.t, self.gamma)

    def inner(self, t: NDArray[np.float64], gamma: NDArray[np.float64]) -> NDArray[np.float64]:
        """Inner products with power-function profiles ``(t[i], gamma[i])``."""
        return power_inner(t, gamma, self.t, self.gamma)

    def describe(self) -> str:
        """Short human-readable name, e.g. ``std 0.100 at t=4096``."""
        return f"std {self.std:.4g} at t={self.t:g}"


@dataclass(frozen=True)
class ExponentialProfile:
    r"""Classic EMA with decay rate ``rate`` per unit time (``beta = exp(-rate)``), age ``t``."""

    t: float
    rate: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "t", _check_time(self.t))
        rate = float(self.rate)
        if not (math.isfinite(rate) and rate > 0.0):
            raise ProfileError(f"exponential EMA rate must be finite and > 0, got {rate}")
        object.__setattr__(self, "rate", rate)

    @classmethod
    def from_half_life(cls, t: float, half_life: float) -> ExponentialProfile:
        """EMA whose weights halve every ``half_life`` units of time."""
        if not (math.isfinite(half_life) and half_life > 0.0):
            raise ProfileError(f"half_life must be finite and > 0, got {half_life}")
        return cls(t, math.log(2.0) / half_life)

    @classmethod
    def from_beta(cls, t: float, beta: float) -> ExponentialProfile:
        """EMA that decays by ``beta`` per unit of time (e.g. 0.9999 per step)."""
        if not (math.isfinite(beta) and 0.0 < beta < 1.0):
            raise ProfileError(f"beta must be in (0, 1) (decay per unit of time), got {beta}")
        return cls(t, -math.log(beta))

    def scaled(self, unit: float) -> ExponentialProfile:
        """The same profile with time counted in units of ``unit`` (age ``t / unit``)."""
        rate = self.rate * unit
        if not math.isfinite(rate):
            raise ProfileError(
                f"exp. EMA of rate {self.rate:g} per unit time over t={self.t:g}: rate x t "
                "overflows a float, so its weight lies in a vanishing end of the interval"
            )
        return ExponentialProfile(self.t / unit, rate)

    @property
    def half_life(self) -> float:
        """Time over which the weights halve."""
        return math.log(2.0) / self.rate

    def _log_z(self) -> float:
        # log(1 - exp(-rate * t)), stable for small and large arguments.
        return math.log(-math.expm1(-self.rate * self.t))

    def density(self, tau: NDArray[np.float64]) -> NDArray[np.float64]:
        r""":math:`q(\tau) = \lambda e^{-\lambda (t-\tau)} / (1 - e^{-\lambda t})` on :math:`[0, t]`."""
        tau = np.asarray(tau, dtype=np.float64)
        inside = (tau >= 0.0) & (tau <= self.t)
        log_q = (
            math.log(self.rate) - self.rate * (self.t - np.clip(tau, 0.0, self.t)) - self._log_z()
        )
        return np.where(inside, np.exp(log_q), 0.0)

    def norm2(self) -> float:
        r""":math:`\|q\|^2 = \lambda (1 - e^{-2\lambda t}) / (2 (1 - e^{-\lambda t})^2)`."""
        lam, x = self.rate, self.rate * self.t
        # As two ratios of like magnitude: (1 - e^-x)^2 alone underflows for x < ~1e-154.
        z = -math.expm1(-x)
        return (lam / z) * (-math.expm1(-2.0 * x) / z) / 2.0

    def inner(self, t: NDArray[np.float64], gamma: NDArray[np.float64]) -> NDArray[np.float64]:
        r"""Inner products with power-function profiles ``(t[i], gamma[i])``.

        With :math:`T = \min(t, t_i)` and :math:`a = \lambda T`,

        .. math::

            \langle q, p_i \rangle = (\gamma_i + 1) (T / t_i)^{\gamma_i + 1}
            \frac{\lambda e^{-\lambda (t - T)}}{1 - e^{-\lambda t}}
            \int_0^1 e^{-a u} (1 - u)^{\gamma_i}\, du,

        where the last integral is done by adaptive quadrature to ~1e-13.
        """
        ts = np.asarray(t, dtype=np.float64)
        gs = np.asarray(gamma, dtype=np.float64)
        out = np.empty(np.broadcast(ts, gs).shape)
        lam = self.rate
        for idx, (ti, gi) in enumerate(np.broadcast(ts, gs)):
            big_t = min(self.t, float(ti))
            a = lam * big_t
            integral = _decay_integral(a, float(gi))
            log_val = (
                math.log1p(gi)
                + (gi + 1.0) * math.log(big_t / ti)
                + math.log(lam)
                - lam * (self.t - big_t)
                - self._log_z()
            )
            out.flat[idx] = math.exp(log_val) * integral
        return out

    def describe(self) -> str:
        """Short human-readable name, e.g. ``exp. EMA half-life 100 at t=4096``."""
        return f"exp. EMA half-life {self.half_life:.4g} at t={self.t:g}"


def power_density(tau: NDArray[np.float64], t: float, gamma: float) -> NDArray[np.float64]:
    r"""Power profile of age ``t`` at times ``tau``: the weight per unit time the EMA gives ``tau``.

    :math:`p(\tau) = (\gamma+1)\,\tau^\gamma / t^{\gamma+1}` for :math:`0 \le \tau \le t`, else 0.
    """
    tau = np.asarray(tau, dtype=np.float64)
    u = np.clip(tau / t, 0.0, 1.0)
    inside = (tau >= 0.0) & (tau <= t)
    return np.where(inside, (gamma + 1.0) / t * u**gamma, 0.0)


def _decay_integral(a: float, gamma: float) -> float:
    r""":math:`\int_0^1 e^{-a u} (1 - u)^\gamma du`, integrand decreasing from 1."""
    # The integrand falls off on a scale of 1/(a + gamma); beyond 60 such scales it
    # is below e^-60 of its peak, so the tail is dropped to keep quadrature sharp.
    upper = min(1.0, 60.0 / (a + gamma)) if a + gamma > 0 else 1.0
    value, _ = integrate.quad(
        lambda u: math.exp(-a * u + gamma * math.log1p(-u)) if u < 1.0 else 0.0,
        0.0,
        upper,
        epsabs=0.0,
        epsrel=1e-13,
        limit=200,
    )
    return float(value)


Profile = PowerProfile | ExponentialProfile
