"""Profile maths against closed forms and an independent mpmath oracle."""

import itertools
import math

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phema import (
    STD_MAX,
    ProfileError,
    gamma_to_sigma_rel,
    power_beta,
    power_inner,
    power_weight,
    sigma_rel_to_gamma,
)

mpmath.mp.dps = 40


def _mp_gamma(std: float) -> float:
    """Largest root of sigma_rel(gamma) = std, found by mpmath at 40 digits from the definition."""
    s = mpmath.mpf(std)

    def f(g):  # sigma_rel(g)^2 - s^2, monotone decreasing for g >= 0
        return (g + 1) / ((g + 2) ** 2 * (g + 3)) - s**2

    return float(mpmath.findroot(f, (mpmath.mpf(0), mpmath.mpf(10) / s), solver="anderson"))


# Reference gammas from the spec notes (section 7a), printed to 10 decimals.
TABLE = [
    (0.010, 96.9948978237),
    (0.050, 16.9721986023),
    (0.075, 10.2891164490),
    (0.100, 6.9372039376),
    (0.150, 3.5578687749),
    (0.250, 0.7198239580),
]


@pytest.mark.parametrize(("std", "gamma"), TABLE)
def test_reference_gammas(std, gamma):
    # The table is rounded to 1e-10, so that is the tolerance.
    assert abs(float(sigma_rel_to_gamma(std)) - gamma) < 0.6e-10


@pytest.mark.parametrize("std", [1e-3, 0.01, 0.05, 0.1, 0.2, 0.28, STD_MAX * (1 - 1e-9)])
def test_gamma_matches_mpmath_oracle(std):
    # Root-finding conditioning: relative error ~ 1e-16 * small factor; 1e-13 leaves room.
    assert float(sigma_rel_to_gamma(std)) == pytest.approx(_mp_gamma(std), rel=1e-13, abs=1e-13)


def test_round_trip_grid_to_a_few_ulp():
    stds = np.linspace(1e-4, STD_MAX, 20001)
    back = gamma_to_sigma_rel(sigma_rel_to_gamma(stds))
    np.testing.assert_allclose(back, stds, rtol=2e-15, atol=0)
    # gamma -> std is flat near gamma = 0 (d std / d gamma is finite while std ~ 0.29), so
    # a 1-ulp change of std moves gamma by ~1e-15 absolute there: hence the atol.
    gammas = np.geomspace(1e-6, 1e4, 20001)
    back_g = sigma_rel_to_gamma(gamma_to_sigma_rel(gammas))
    np.testing.assert_allclose(back_g, gammas, rtol=1e-12, atol=1e-14)


@given(st.floats(min_value=1e-5, max_value=STD_MAX, allow_nan=False))
def test_round_trip_property(std):
    assert float(gamma_to_sigma_rel(sigma_rel_to_gamma(std))) == pytest.approx(std, rel=4e-15)


def test_shapes_are_preserved():
    stds = np.array([[0.05, 0.1], [0.15, 0.2]])
    assert sigma_rel_to_gamma(stds).shape == (2, 2)
    assert sigma_rel_to_gamma(0.05).shape == ()
    assert gamma_to_sigma_rel([1.0, 2.0, 3.0]).shape == (3,)


def test_boundaries():
    assert float(gamma_to_sigma_rel(0.0)) == pytest.approx(math.sqrt(1 / 12), rel=1e-15)
    assert float(sigma_rel_to_gamma(STD_MAX)) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.3, 1.0, float("nan"), float("inf")])
def test_out_of_range_std_raises_with_range(bad):
    with pytest.raises(ProfileError, match=r"0\.288675|finite"):
        sigma_rel_to_gamma(bad)


def test_percentage_hint():
    with pytest.raises(ProfileError, match="percentage"):
        sigma_rel_to_gamma([0.05, 5.0])
    with pytest.raises(ValueError, match="gamma must be >= 0"):  # also a builtin ValueError
        gamma_to_sigma_rel(-0.5)


def test_beta_formula_and_exact_profile_weights():
    g = float(sigma_rel_to_gamma(0.05))
    assert power_beta(g, 0.0, 5.0) == 0.0
    assert power_beta(g, 99.0, 100.0) == pytest.approx((1 - 1 / 100) ** (g + 1), rel=1e-14)
    # Product of betas telescopes to (t_i / t_N)^(gamma+1) whatever the spacing.
    times = [3.0, 4.5, 10.0, 10.25, 40.0]
    prod = 1.0
    for a, b in itertools.pairwise(times):
        prod *= power_beta(g, a, b)
    assert prod == pytest.approx((3.0 / 40.0) ** (g + 1), rel=1e-13)


@pytest.mark.parametrize(("t_prev", "t_next"), [(1e9 - 1, 1e9), (2**31 - 2048, 2**31), (1, 2)])
def test_weight_is_one_minus_beta_without_cancellation(t_prev, t_next):
    g = mpmath.mpf(float(sigma_rel_to_gamma(0.05)))
    exact = 1 - (mpmath.mpf(t_prev) / t_next) ** (g + 1)
    got = power_weight(float(g), t_prev, t_next)
    assert got == pytest.approx(float(exact), rel=1e-14)


@pytest.mark.parametrize(("t_prev", "t_next"), [(2.0, 2.0), (3.0, 2.0), (-1.0, 1.0), (0, math.inf)])
def test_times_must_increase(t_prev, t_next):
    with pytest.raises(ProfileError, match="t_prev < t_next"):
        power_beta(1.0, t_prev, t_next)


@pytest.mark.parametrize(
    ("ta", "ga", "tb", "gb"),
    [
        (1.0, 0.0, 1.0, 0.0),
        (100.0, 6.9, 80.0, 16.97),
        (3.0, 96.99, 5.0, 0.72),
        (7.0, 3.5, 7.0, 3.5),
    ],
)
def test_inner_product_matches_quadrature(ta, ga, tb, gb):
    def p(t, g):
        return lambda x: (g + 1) * x**g / mpmath.mpf(t) ** (g + 1)

    big_t = min(ta, tb)
    exact = mpmath.quad(lambda x: p(ta, ga)(x) * p(tb, gb)(x), [0, big_t * 0.9, big_t])
    assert float(power_inner(ta, ga, tb, gb)) == pytest.approx(float(exact), rel=1e-13)


def test_inner_product_is_scale_invariant_times_factor():
    a = power_inner(8.0, 6.9, 512.0, 16.97)
    b = power_inner(8.0 * 2**20, 6.9, 512.0 * 2**20, 16.97)
    assert float(a) == pytest.approx(float(b) * 2**20, rel=1e-13)
