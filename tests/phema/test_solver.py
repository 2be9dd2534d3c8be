"""The least-squares solver against an independent 40-digit mpmath oracle, and its contract."""

import math
import warnings

import mpmath
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phema import (
    ExponentialProfile,
    IllPosedWarning,
    PowerProfile,
    ProfileError,
    SolverError,
    fit_profiles,
    sigma_rel_to_gamma,
    solve_weights,
)

mpmath.mp.dps = 40


def _mp_density(t, std):
    g = mpmath.mpf(float(sigma_rel_to_gamma(std)))
    t = mpmath.mpf(t)
    return (lambda x: (g + 1) * x**g / t ** (g + 1)), t


def _mp_inner(fa, ta, fb, tb):
    """<f_a, f_b> by tanh-sinh quadrature, independent of the closed form."""
    big_t = min(ta, tb)
    return mpmath.quad(lambda x: fa(x) * fb(x), [0, big_t / 2, big_t * 0.9, big_t])


def _mp_solve(in_t, in_s, targets, exact=False):
    """Normal equations built by quadrature and solved at 40 digits; columns made to sum to 1."""
    dens = [_mp_density(t, s) for t, s in zip(in_t, in_s, strict=True)]
    n = len(dens)
    gram = mpmath.matrix(n, n)
    for i in range(n):
        for j in range(i, n):
            gram[i, j] = gram[j, i] = _mp_inner(dens[i][0], dens[i][1], dens[j][0], dens[j][1])
    cols = []
    for f, t in targets:
        b = mpmath.matrix([_mp_inner(d[0], d[1], f, t) for d in dens])
        if exact:
            kkt = mpmath.matrix(n + 1, n + 1)
            for i in range(n):
                for j in range(n):
                    kkt[i, j] = gram[i, j]
                kkt[i, n] = kkt[n, i] = 1
            rhs = mpmath.matrix([*b, 1])
            c = mpmath.lu_solve(kkt, rhs)[:n]
        else:
            c = mpmath.lu_solve(gram, b)
            total = sum(c)
            c = [ci / total for ci in c]
        cols.append([float(ci) for ci in c])
    return np.array(cols).T


IN_T = [256.0, 512.0, 768.0, 1024.0] * 2
IN_S = [0.05] * 4 + [0.10] * 4


@pytest.mark.parametrize("exact", [False, True])
def test_matches_mpmath_oracle(exact):
    out_s = [0.03, 0.075, 0.15, 0.2]
    targets = [_mp_density(1024.0, s) for s in out_s]
    ref = _mp_solve(IN_T, IN_S, targets, exact=exact)
    sol = fit_profiles(
        IN_T,
        IN_S,
        [PowerProfile(1024.0, s) for s in out_s],
        constraint="exact" if exact else "rescale",
        warn=False,
    )
    # Forward error: Gram entries carry a relative error of a few ulp (log/exp of
    # exponents up to ~20), amplified by the condition number; 16 ulp = 3.6e-15.
    cond = max(f.condition for f in sol.fits)
    tol = cond * 3.6e-15 * np.abs(ref).max()
    np.testing.assert_allclose(sol.weights, ref, rtol=0, atol=tol)


def test_exponential_target_matches_mpmath_oracle():
    lam = math.log(2) / 60.0
    t = 1024.0
    z = 1 - mpmath.exp(-lam * t)

    def q(x):
        return lam * mpmath.exp(-lam * (t - x)) / z

    ref = _mp_solve(IN_T, IN_S, [(q, mpmath.mpf(t))])
    sol = fit_profiles(IN_T, IN_S, [ExponentialProfile.from_half_life(t, 60.0)], warn=False)
    # As above, plus the quadrature's 1e-13 relative accuracy on the right-hand side.
    tol = sol.fits[0].condition * 1e-13 * np.abs(ref).max()
    np.testing.assert_allclose(sol.weights, ref, rtol=0, atol=tol)
    # Its norm^2 against quadrature.
    norm2 = mpmath.quad(lambda x: q(x) ** 2, [0, t * 0.9, t])
    prof = ExponentialProfile.from_half_life(t, 60.0)
    assert prof.norm2() == pytest.approx(float(norm2), rel=1e-13)


def test_exponential_constructors_agree():
    a = ExponentialProfile.from_half_life(100.0, 10.0)
    b = ExponentialProfile.from_beta(100.0, 0.5 ** (1 / 10))
    assert a.rate == pytest.approx(b.rate, rel=1e-14)
    assert a.half_life == pytest.approx(10.0, rel=1e-14)
    with pytest.raises(ProfileError, match="beta"):
        ExponentialProfile.from_beta(100.0, 1.5)


def _residual_by_quadrature(in_t, in_s, c, target_t, target_s):
    """||q - sum c_i p_i|| / ||q|| by direct quadrature of the squared residual."""
    dens = [_mp_density(t, s)[0] for t, s in zip(in_t, in_s, strict=True)]
    q, tq = _mp_density(target_t, target_s)

    def r(x):
        return q(x) - sum(
            ci * d(x) if x <= ti else 0 for ci, d, ti in zip(c, dens, in_t, strict=True)
        )

    edges = sorted({0.0, *in_t, float(tq)})
    num = mpmath.quad(lambda x: r(x) ** 2, edges)
    den = mpmath.quad(lambda x: q(x) ** 2, [0, tq])
    return float(mpmath.sqrt(num / den))


@pytest.mark.parametrize("std", [0.03, 0.075, 0.2])
def test_reported_fit_error_matches_quadrature(std):
    sol = fit_profiles(IN_T, IN_S, [PowerProfile(1024.0, std)], warn=False)
    direct = _residual_by_quadrature(IN_T, IN_S, [float(x) for x in sol.weights[:, 0]], 1024.0, std)
    # The normal-equation form loses ~sqrt(eps * L1^2) absolutely; above that they agree.
    assert sol.fits[0].rel_error == pytest.approx(direct, rel=1e-6, abs=1e-7)
    assert sol.fits[0].l1_norm == pytest.approx(np.abs(sol.weights[:, 0]).sum())


def test_stored_profile_is_reproduced_exactly():
    w = solve_weights(IN_T, IN_S, [768.0, 1024.0], [0.10, 0.05])
    e1 = np.zeros(8)
    e1[6] = 1.0
    e2 = np.zeros(8)
    e2[3] = 1.0
    np.testing.assert_allclose(w[:, 0], e1, atol=1e-10)
    np.testing.assert_allclose(w[:, 1], e2, atol=1e-10)


def test_later_snapshots_get_zero_weight_and_fit_uses_earlier_ones():
    sol = fit_profiles(IN_T, IN_S, [PowerProfile(512.0, 0.075)], warn=False)
    later = [i for i, t in enumerate(IN_T) if t > 512.0]
    assert np.all(sol.weights[later, 0] == 0.0)
    assert sol.fits[0].num_inputs == 4


@given(
    st.lists(st.floats(0.03, 0.25), min_size=1, max_size=4),
    st.sampled_from([512.0, 768.0, 1024.0]),
    st.permutations(list(range(8))),
)
def test_columns_sum_to_one_and_order_does_not_matter(out_stds, t_out, perm):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllPosedWarning)
        w = solve_weights(IN_T, IN_S, [t_out] * len(out_stds), out_stds)
        wp = solve_weights(
            [IN_T[i] for i in perm], [IN_S[i] for i in perm], [t_out] * len(out_stds), out_stds
        )
    np.testing.assert_allclose(w.sum(axis=0), 1.0, rtol=1e-12)
    np.testing.assert_allclose(wp, w[perm], atol=1e-9 * max(1.0, np.abs(w).max()))


def test_snapshot_at_time_zero_is_ignored():
    w = solve_weights([0.0, *IN_T], [0.05, *IN_S], [1024.0], [0.1])
    assert w[0, 0] == 0.0
    np.testing.assert_allclose(w[1:, 0], solve_weights(IN_T, IN_S, [1024.0], [0.1])[:, 0])


def test_warns_below_smallest_std_with_fit_quality():
    with pytest.warns(IllPosedWarning, match=r"below every stored std.*rel\. L2 error"):
        fit_profiles(IN_T, IN_S, [PowerProfile(1024.0, 0.02)])


def test_warns_when_no_snapshot_at_target_time():
    with pytest.warns(IllPosedWarning, match="no snapshot at t=900"):
        sol = fit_profiles(IN_T, IN_S, [PowerProfile(900.0, 0.1)])
    assert sol.fits[0].issues


def test_well_posed_request_is_silent():
    sol = fit_profiles(IN_T, IN_S, [PowerProfile(1024.0, 0.075)])  # warnings are errors here
    assert sol.fits[0].issues == ()
    assert sol.fits[0].rel_error < 0.05


def test_errors_name_the_problem():
    with pytest.raises(SolverError, match="no snapshot with 0 < t <= 100"):
        solve_weights(IN_T, IN_S, [100.0], [0.1])
    with pytest.raises(SolverError, match="snapshots 0 and 2 are the same profile"):
        solve_weights([1.0, 2.0, 1.0], [0.1, 0.1, 0.1], [2.0], [0.1])
    with pytest.raises(SolverError, match="same length"):
        solve_weights([1.0, 2.0], [0.1], [2.0], [0.1])
    with pytest.raises(ProfileError, match="percentage"):
        solve_weights(IN_T, IN_S, [1024.0], [10.0])
    with pytest.raises(ProfileError, match="finite"):
        solve_weights([1.0, float("nan")], [0.1, 0.1], [1.0], [0.1])
    with pytest.raises(ProfileError, match="t must be finite and > 0"):
        PowerProfile(0.0, 0.1)
