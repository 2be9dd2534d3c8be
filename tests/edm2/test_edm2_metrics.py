"""Fréchet distance and KID against closed forms and brute force; their bootstrap intervals
(coverage on Gaussians); the held-out split; the digits classifier; reports."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file

from edm2_reference import bootstrap, metrics
from edm2_reference.bootstrap import (
    Estimate,
    bootstrap_interval,
    compare_rows,
    evaluate_sweep,
    mmd2_unbiased,
)
from edm2_reference.data import (
    HELD_OUT_FRACTION,
    DataError,
    holdout_indices,
    holdout_split,
    load_dataset,
    split_indices,
)
from edm2_reference.metrics import (
    accuracy,
    cached_classifier,
    evaluate,
    extract_features,
    frechet_distance,
    frechet_distance_from_features,
    kernel_distance,
    load_classifier,
    save_classifier,
    train_classifier,
)


def _spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d)) * scale
    return a @ a.T + 0.1 * np.eye(d)


# ---------------------------------------------------------------------------------------
# Fréchet distance


def test_fd_of_diagonal_gaussians():
    # Commuting covariances: tr (C1^1/2 C2 C1^1/2)^1/2 = sum sqrt(a_i b_i), so
    # FD = |m1 - m2|^2 + sum (sqrt a_i - sqrt b_i)^2.
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert math.isclose(frechet_distance(m1, np.diag(a), m2, np.diag(b)), expected, rel_tol=1e-12)
    # The same in a rotated basis (still commuting, no longer diagonal).
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    c1, c2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert math.isclose(frechet_distance(q @ m1, c1, q @ m2, c2), expected, rel_tol=1e-10)
    # One dimension: (m1 - m2)^2 + (s1 - s2)^2.
    one = frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-1.0]), np.array([[9.0]]))
    assert math.isclose(one, 4.0 + 1.0, rel_tol=1e-12)


def test_fd_of_general_gaussians_against_scipy_sqrtm():
    rng = np.random.default_rng(1)
    for d in [2, 8, 32]:
        m1, m2 = rng.normal(size=d), rng.normal(size=d)
        c1, c2 = _spd(rng, d), _spd(rng, d, 0.5)
        # Independent route: scipy's Schur-based sqrtm of the product C1 C2, whose
        # eigenvalues equal those of C1^1/2 C2 C1^1/2.
        tr_sqrt = np.trace(scipy.linalg.sqrtm(c1 @ c2)).real
        expected = np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * tr_sqrt
        got = frechet_distance(m1, c1, m2, c2)
        assert math.isclose(got, expected, rel_tol=1e-8), (d, got, expected)
        assert math.isclose(got, frechet_distance(m2, c2, m1, c1), rel_tol=1e-8)  # symmetric


def test_fd_is_zero_for_identical_singular_gaussians():
    # Rank-deficient covariance (fewer samples than features): the nuclear-norm trace keeps
    # the round-off near eps * tr C; square roots of the eigenvalues of C^1/2 C C^1/2 would
    # leave about sqrt(eps) * tr C ~ 2e-6 here (measured), and could go negative.
    rng = np.random.default_rng(2)
    f = rng.normal(size=(10, 40))
    c = np.cov(f, rowvar=False)
    assert abs(frechet_distance(f.mean(0), c, f.mean(0), c)) < 1e-12 * np.trace(c)


def test_fd_from_features_fits_unbiased_gaussians():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(5, 3))
    cx, cy = (a - a.mean(0) for a in (x, y))
    fitted = frechet_distance(x.mean(0), cx.T @ cx / 5, y.mean(0), cy.T @ cy / 4)
    assert math.isclose(frechet_distance_from_features(x, y), fitted, rel_tol=1e-12)


def test_fd_from_samples_of_known_gaussians():
    rng = np.random.default_rng(3)
    d, n = 3, 50_000
    m1, m2 = np.zeros(d), np.array([1.0, 0.0, -0.5])
    c1, c2 = _spd(rng, d, 0.5), _spd(rng, d, 0.7)
    x = rng.multivariate_normal(m1, c1, size=n)
    y = rng.multivariate_normal(m2, c2, size=n)
    # Dominant sampling error: 2 (m1 - m2).(dm1 - dm2) with sd 2 |m1 - m2| sqrt(tr/n) ~ 0.01,
    # plus O(d / n) bias; 0.06 is about 5 standard errors.
    assert abs(frechet_distance_from_features(x, y) - frechet_distance(m1, c1, m2, c2)) < 0.06


# ---------------------------------------------------------------------------------------
# KID


def _brute_force_mmd2(x, y):
    d, m = len(x[0]), len(x)

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b, strict=True)) / d + 1) ** 3

    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return kxx + kyy - 2 * kxy


def test_kid_is_the_unbiased_mmd2_with_the_cubic_kernel():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(7, 3)), rng.normal(0.5, 1.2, size=(7, 3))
    # Subsets as large as both sets are the sets themselves (in another order).
    got = kernel_distance(x, y, num_subsets=3, subset_size=100)
    assert math.isclose(got, _brute_force_mmd2(x.tolist(), y.tolist()), rel_tol=1e-10)


def test_kid_is_unbiased_for_equal_distributions():
    # Mean over independent small draws from one distribution: |mean| < 4 standard errors,
    # while the biased (diagonal-including) V-statistic stays clearly positive.
    rng = np.random.default_rng(5)
    trials, m, d = 400, 8, 4
    unbiased, biased = [], []
    for _ in range(trials):
        x, y = rng.normal(size=(m, d)), rng.normal(size=(m, d))
        unbiased.append(kernel_distance(x, y, num_subsets=1, subset_size=m))
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(unbiased) / math.sqrt(trials)
    assert abs(np.mean(unbiased)) < 4 * se
    assert np.mean(biased) > 4 * np.std(biased) / math.sqrt(trials)


def test_kid_subsets_and_errors():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(50, 4)), rng.normal(1.0, 1.0, size=(60, 4))
    many = kernel_distance(x, y, num_subsets=20, subset_size=10, seed=1)
    assert many == kernel_distance(x, y, num_subsets=20, subset_size=10, seed=1)
    assert many != kernel_distance(x, y, num_subsets=20, subset_size=10, seed=2)
    assert many > 0.5 * kernel_distance(x, y, num_subsets=1, subset_size=50)  # a clear shift
    with pytest.raises(DataError, match="at least 2 samples"):
        kernel_distance(x[:1], y)


# ---------------------------------------------------------------------------------------
# The held-out split


def test_holdout_split_is_disjoint_from_training_by_indices():
    digits = load_dataset("digits")
    train_idx, held_idx = holdout_indices(len(digits))
    # Disjoint and together the whole set: no held-out image is ever a training image.
    assert np.intersect1d(train_idx, held_idx).size == 0
    assert np.array_equal(np.union1d(train_idx, held_idx), np.arange(len(digits)))
    # round((1 - 0.5) * 1797) = round(898.5) = 898 (half to even) training images.
    assert (len(train_idx), len(held_idx)) == (898, 899)
    assert HELD_OUT_FRACTION == 0.5
    # Deterministic, and the datasets are exactly those rows.
    again = holdout_indices(len(digits))
    assert all(np.array_equal(a, b) for a, b in zip(again, (train_idx, held_idx), strict=True))
    train, held = holdout_split(digits)
    assert torch.equal(train.pixels, digits.pixels[torch.from_numpy(train_idx)])
    assert torch.equal(held.pixels, digits.pixels[torch.from_numpy(held_idx)])
    assert held.labels is not None
    assert digits.labels is not None
    assert torch.equal(held.labels, digits.labels[torch.from_numpy(held_idx)])
    # Another seed or fraction is another split; ImageDataset.split is the same rule.
    assert not np.array_equal(holdout_indices(len(digits), seed=1)[1], held_idx)
    assert len(holdout_indices(len(digits), 0.2)[1]) == 1797 - round(0.8 * 1797)
    first, _ = digits.split(0.5, seed=0)
    assert torch.equal(first.pixels, train.pixels)
    assert np.array_equal(split_indices(10, 0.3, 4)[0], np.sort(split_indices(10, 0.3, 4)[0]))
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(DataError, match=r"held-out fraction must be in \(0, 1\)"):
            holdout_indices(100, bad)


# ---------------------------------------------------------------------------------------
# Bootstrap intervals


def test_bootstrap_interval_is_the_basic_interval_around_the_estimate():
    # Replicates 0..100 (mean 50, 2.5% and 97.5% quantiles 2.5 and 97.5): the interval is
    # the estimate minus the replicates' spread about their mean, reflected.
    reps = np.arange(101.0)
    got = bootstrap_interval(10.0, reps, 0.95)
    assert got == Estimate(10.0, 10.0 - 47.5, 10.0 + 47.5)
    # A right-skewed bootstrap distribution gives a longer *lower* arm.
    skewed = np.concatenate([np.zeros(90), np.full(11, 10.0)])
    est = bootstrap_interval(0.0, skewed, 0.8)
    mean = skewed.mean()
    assert math.isclose(est.lo, -(10.0 - mean))
    assert math.isclose(est.hi, mean)
    assert est.value - est.lo > est.hi - est.value
    # A floor (FD >= 0) raises only the lower end, and never above the estimate.
    assert bootstrap_interval(10.0, reps, 0.95, floor=0.0) == Estimate(10.0, 0.0, 57.5)
    assert bootstrap_interval(-1e-15, reps, 0.95, floor=0.0).lo == -1e-15
    assert bootstrap_interval(60.0, reps, 0.95, floor=0.0) == Estimate(60.0, 12.5, 107.5)
    with pytest.raises(DataError, match=r"level must be in \(0, 1\), got 1.5"):
        bootstrap_interval(0.0, reps, 1.5)
    with pytest.raises(DataError, match="at least 2 finite"):
        bootstrap_interval(0.0, np.array([1.0, np.nan]), 0.95)


def test_resampled_statistics_match_explicit_resamples():
    # The batched replicates (counts, weighted moments, kernel sums) equal FD and the unbiased
    # MMD² computed directly on the resampled sets, duplicates included.
    rng = np.random.default_rng(11)
    n, d = 12, 3
    x, y = rng.normal(size=(n, d)), rng.normal(0.3, 1.1, size=(n, d))
    counts = bootstrap._resample_counts(np.random.default_rng(0), n, 5)
    assert counts.shape == (5, n)
    assert np.all(counts.sum(1) == n)
    wy = counts[::-1].copy()
    mu_x, cov_x = bootstrap._weighted_moments(x, counts, chunk=2)
    mu_y, cov_y = bootstrap._weighted_moments(y, wy)
    fd = bootstrap._fd_batch(
        mu_x, cov_x, bootstrap._sqrt_psd_batch(cov_x), mu_y, cov_y, bootstrap._sqrt_psd_batch(cov_y)
    )
    k = lambda a, b: metrics._cubic(a, b, d)  # noqa: E731
    kid = bootstrap._mmd2_batch(k(x, x), k(y, y), k(x, y), counts, wy)
    for r in range(5):
        xr, yr = np.repeat(x, counts[r], axis=0), np.repeat(y, wy[r], axis=0)
        assert math.isclose(fd[r], frechet_distance_from_features(xr, yr), rel_tol=1e-9)
        want = _brute_force_mmd2(xr.tolist(), yr.tolist())
        assert math.isclose(kid[r], want, rel_tol=1e-9)


def test_mmd2_unbiased_is_kid_over_the_whole_sets():
    rng = np.random.default_rng(12)
    x, y = rng.normal(size=(30, 4)), rng.normal(0.2, 1.0, size=(30, 4))
    whole = kernel_distance(x, y, num_subsets=2, subset_size=30)
    assert math.isclose(mmd2_unbiased(x, y), whole, rel_tol=1e-12)
    with pytest.raises(DataError, match="at least 2 samples"):
        mmd2_unbiased(x[:1], y)


def _expected_cubic_kernel(a, cov_a, b, cov_b, d):
    """E k(x, y), k = (x.y / d + 1)^3, x ~ N(a, A), y ~ N(b, B) independent, in closed form.

    E x.y = a.b; E (x.y)^2 = tr((A + aa^T)(B + bb^T)); given y, x.y ~ N(a.y, y^T A y), so
    E (x.y)^3 = E_y[(a.y)^3 + 3 (a.y) y^T A y] = m^3 + 3 m a^T B a + 3 (m (b^T A b + tr AB)
    + 2 a^T B A b) with m = a.b (y = b + z, odd moments of z vanish).
    """
    m = a @ b
    e1 = m
    e2 = np.trace((cov_a + np.outer(a, a)) @ (cov_b + np.outer(b, b)))
    e3 = m**3 + 3 * m * (a @ cov_b @ a) + 3 * (m * (b @ cov_a @ b + np.trace(cov_a @ cov_b)))
    e3 += 6 * (a @ cov_b @ cov_a @ b)
    return e3 / d**3 + 3 * e2 / d**2 + 3 * e1 / d + 1


def test_intervals_cover_at_the_nominal_rate_on_gaussians():
    # X ~ N(a, I), Y ~ N(b, diag(0.5..2)) in d = 8, samples of n = 100, 200 repeats, each with
    # its own 200-resample bootstrap. FD: its estimator is biased upward at small n (here
    # E FD_n = 1.78 vs the closed form 1.21), and the interval is for E FD_n, the quantity
    # the real-vs-real baseline at the same n is in; E FD_n comes from 4,000 independent
    # draws (its Monte Carlo error, sd / sqrt(4000) ~ 0.005, is 1% of the interval's
    # half-width). KID is unbiased, so its interval must cover the closed-form MMD².
    d, n, repeats, resamples = 8, 100, 200, 200
    rng = np.random.default_rng(2024)
    a, b = np.linspace(-0.2, 0.2, d), np.full(d, 0.3)
    sd_x, sd_y = np.ones(d), np.sqrt(np.linspace(0.5, 2.0, d))
    cov_x, cov_y = np.diag(sd_x**2), np.diag(sd_y**2)

    def draw():
        return rng.normal(size=(n, d)) * sd_x + a, rng.normal(size=(n, d)) * sd_y + b

    fd_inf = frechet_distance(a, cov_x, b, cov_y)
    mc = np.array([frechet_distance_from_features(*draw()) for _ in range(4000)])
    fd_n = mc.mean()
    assert fd_n > fd_inf + 10 * mc.std() / math.sqrt(len(mc))  # the bias is real
    kid_true = (
        _expected_cubic_kernel(a, cov_x, a, cov_x, d)
        + _expected_cubic_kernel(b, cov_y, b, cov_y, d)
        - 2 * _expected_cubic_kernel(a, cov_x, b, cov_y, d)
    )
    fd_hits = kid_hits = 0
    fd_widths, kid_values, kid_widths = [], [], []
    for r in range(repeats):
        x, y = draw()
        base = rng.normal(size=(n, d)) * sd_y + b
        row = compare_rows([x], y, base, resamples=resamples, seed=r).rows[0]
        fd_hits += row.fd.holds(fd_n)
        kid_hits += row.kid.holds(kid_true)
        fd_widths.append(row.fd.hi - row.fd.lo)
        kid_widths.append(row.kid.hi - row.kid.lo)
        kid_values.append(row.kid.value)
    # Coverage is Binomial(200, p) / 200: at p = 0.95 its sd is sqrt(0.95 * 0.05 / 200) =
    # 0.0154, and 3 sd = 0.046 leaves a correct 95% interval a 0.3% chance of failing
    # (the bootstrap is only first-order accurate, measured 0.945-0.985 over seeds).
    tol = 3 * math.sqrt(0.95 * 0.05 / repeats)
    assert abs(fd_hits / repeats - 0.95) <= tol, fd_hits
    assert abs(kid_hits / repeats - 0.95) <= tol, kid_hits
    # ... and not by being wide: about 2 x 1.96 sd of the estimator (measured 1.12 x for FD
    # and 1.2 x for KID: resampling with repeats adds a little variance).
    assert 0.8 < np.mean(fd_widths) / (2 * 1.96 * mc.std()) < 1.4
    assert 0.8 < np.mean(kid_widths) / (2 * 1.96 * np.std(kid_values)) < 1.4


def test_paired_comparison_with_the_best_row():
    rng = np.random.default_rng(13)
    n, d = 150, 4
    x = rng.normal(size=(n, d))
    ref, base = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    shifted = x + 0.15  # the same samples a little off: worse, by less than FD's own noise
    far = x + 1.0
    q = compare_rows([shifted, x, x.copy(), far], ref, base, resamples=300, seed=1)
    fds = [row.fd.value for row in q.rows]
    assert q.best_fd == int(np.argmin(fds)) in (1, 2)
    assert q.rows[1].fd.value == q.rows[2].fd.value
    # Identical rows: with shared resample indices every replicate difference is exactly 0.
    for k in (1, 2):
        assert q.rows[k].fd_vs_best == Estimate(0.0, 0.0, 0.0)
        assert q.rows[k].fd_tied
        assert q.rows[k].kid_tied
    # The shifted row's interval overlaps the best's, yet pairing resolves the difference.
    assert q.rows[0].fd.lo < q.rows[1].fd.hi
    assert q.rows[0].fd_vs_best.lo > 0
    assert not q.rows[0].fd_tied
    assert q.rows[3].fd_vs_best.lo > 0
    assert not q.rows[3].fd_tied
    assert not q.rows[3].kid_tied
    # The baseline (two samples of the reference's distribution) sits below the far row.
    assert q.fd_baseline.hi < q.rows[3].fd.lo
    assert (q.n, q.resamples, q.level, q.seed) == (n, 300, 0.95, 1)
    assert compare_rows([x], ref, base, resamples=300, seed=1).rows[0].fd == q.rows[1].fd


def test_sets_average_figures_of_the_same_expectation_with_less_noise():
    """Two sets of n per row: the figure is the mean of the two sets' figures, each against
    the same reference; over repeats the spread of a row's FD shrinks by about sqrt(2) when
    the reference is fixed (its own noise stays), and the mean stays that of one set of n."""
    rng = np.random.default_rng(21)
    d, n, shift = 3, 60, 0.3
    ref, base = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    ones, twos = [], []
    for _ in range(150):
        g = rng.normal(size=(2 * n, d)) + shift
        one = compare_rows([g[:n]], ref, base, resamples=20, seed=0)
        two = compare_rows([g], ref, base, resamples=20, seed=0, sets=2)
        second = compare_rows([g[n:]], ref, base, resamples=20, seed=0)
        assert two.rows[0].fd.value == pytest.approx(
            (one.rows[0].fd.value + second.rows[0].fd.value) / 2, rel=1e-12
        )
        ones.append(one.rows[0].fd.value)
        twos.append(two.rows[0].fd.value)
    # same expectation: means within 4 standard errors of their difference
    diff_se = np.sqrt(np.var(ones) / len(ones) + np.var(twos) / len(twos))
    assert abs(np.mean(ones) - np.mean(twos)) < 4 * diff_se
    # variance ratio near 2 (sampling error of a variance ratio over 150 repeats: ~25%)
    assert 1.4 < np.var(ones) / np.var(twos) < 2.9


def test_compare_rows_errors():
    rng = np.random.default_rng(14)
    x = rng.normal(size=(20, 3))
    with pytest.raises(DataError, match=r"\(1 \* 20, 3\).*got \[\(19, 3\)\]"):
        compare_rows([x[:19]], x, x)
    with pytest.raises(DataError, match=r"\(2 \* 20, 3\)"):
        compare_rows([x], x, x, sets=2)
    with pytest.raises(DataError, match="resamples=1 is too few"):
        compare_rows([x], x, x, resamples=1)
    with pytest.raises(DataError, match="at least one"):
        compare_rows([], x, x)


# ---------------------------------------------------------------------------------------
# Classifier and reports on the digits


@pytest.fixture(scope="module")
def digits_splits():
    # The documented split the reference client trains and evaluates with.
    train, held_out = holdout_split(load_dataset("digits"))
    return train, held_out


@pytest.fixture(scope="module")
def classifier(digits_splits):
    return train_classifier(digits_splits[0], seed=0)


@pytest.mark.slow
def test_classifier_accuracy_on_held_out_digits(classifier, digits_splits):
    # Measured 0.968 (seed 0, 20 epochs, 898 training images); 0.95 leaves room for BLAS
    # differences between machines, not for a broken model (chance is 0.10).
    assert accuracy(classifier, digits_splits[1]) >= 0.95
    assert accuracy(classifier, digits_splits[0]) >= 0.99
    # Features are standardised with the training split's statistics.
    f = extract_features(classifier, digits_splits[0].images())
    np.testing.assert_allclose(f.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(f.std(0, ddof=1), 1, rtol=1e-3)


def test_training_is_deterministic_given_the_seed(digits_splits):
    small = digits_splits[0].subset(range(200))
    before = torch.get_rng_state()
    a = train_classifier(small, seed=3, epochs=2)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is left alone
    b = train_classifier(small, seed=3, epochs=2)
    c = train_classifier(small, seed=4, epochs=2)
    for (name, p), q, r in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
        if "weight" in name:
            assert not torch.equal(p, r), name


def test_unlabeled_data_is_refused():
    with pytest.raises(DataError, match="needs labelled data"):
        train_classifier(load_dataset("digits", use_labels=False))


def test_save_load_and_cache(tmp_path, classifier, digits_splits, monkeypatch):
    path = tmp_path / "classifier.safetensors"
    save_classifier(classifier, path)
    assert set(load_file(path)) == set(classifier.state_dict())  # plain safetensors
    loaded = load_classifier(path)
    x = digits_splits[1].images()[:50]
    assert np.array_equal(extract_features(loaded, x), extract_features(classifier, x))
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"\x00" * 16)
    with pytest.raises(DataError, match=r"bogus\.safetensors"):
        load_classifier(bogus)

    small = digits_splits[0].subset(range(100))
    cache = tmp_path / "cache.safetensors"
    first = cached_classifier(small, cache, seed=1, epochs=1)

    def no_training(*args, **kwargs):
        raise AssertionError("should have loaded the cache")

    monkeypatch.setattr(metrics, "train_classifier", no_training)
    again = cached_classifier(small, cache, seed=1, epochs=1)
    assert np.array_equal(extract_features(again, x), extract_features(first, x))
    for changed in [
        lambda: cached_classifier(small, cache, seed=2, epochs=1),
        lambda: cached_classifier(digits_splits[0].subset(range(101)), cache, seed=1, epochs=1),
    ]:
        with pytest.raises(AssertionError, match="should have loaded"):
            changed()


@pytest.mark.slow
def test_report_baseline_is_small_against_noise(classifier, digits_splits):
    held_out = digits_splits[1]
    noise = torch.rand(400, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    report = evaluate(classifier, noise, held_out, n=400, kid_subsets=10)
    assert report.n == 400
    assert report.fd > 20 * report.fd_baseline
    assert report.kid > 20 * abs(report.kid_baseline)
    assert "real-vs-real" in str(report)


@pytest.mark.slow
def test_report_on_real_images_matches_its_baseline(classifier, digits_splits):
    # Real images the classifier never saw, as "generated": the same distribution as the
    # reference, so FD and KID are of the baseline's size, classes balanced, predictions sure.
    held_out = digits_splits[1]
    gen, real = held_out.subset(range(299)), held_out.subset(range(299, 899))
    report = evaluate(classifier, gen.images(), real, kid_subsets=10)
    assert report.n == 299
    assert report.fd < 2 * report.fd_baseline
    assert (
        report.kid
        < 0.05 * evaluate(classifier, torch.zeros(299, 1, 8, 8), real, kid_subsets=10).kid
    )
    assert report.class_entropy > 0.95 * math.log(10)
    assert report.confidence > 0.9


def test_report_sets_and_errors(classifier, digits_splits):
    real = digits_splits[1]
    n, seed = 100, 9
    perm = np.random.default_rng(seed).permutation(len(real))
    # The documented split: A = perm[:n] is the reference, B = perm[n:2n] the baseline set,
    # so B passed as "generated" reproduces the baseline exactly.
    b = real.images(perm[n : 2 * n])
    report = evaluate(classifier, b, real, n=n, seed=seed, kid_subsets=5)
    assert report.fd == report.fd_baseline
    assert report.kid == report.kid_baseline
    with pytest.raises(DataError, match=r"n=500 needs n generated and 2n real"):
        evaluate(classifier, b, real, n=500)


def test_sweep_matches_the_single_report_and_ranks_noise_last(classifier, digits_splits):
    real = digits_splits[1]
    n, seed = 100, 9
    perm = np.random.default_rng(seed).permutation(len(real))
    b = real.images(perm[n : 2 * n])  # the baseline set itself as a "generated" row
    noise = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    q = evaluate_sweep(classifier, [b, noise], real, n=n, seed=seed, resamples=100)
    single = evaluate(classifier, b, real, n=n, seed=seed, kid_subsets=2, kid_subset_size=n)
    assert q.rows[0].fd.value == single.fd == q.fd_baseline.value
    assert math.isclose(q.rows[0].kid.value, single.kid, rel_tol=1e-9, abs_tol=1e-12)
    assert q.best_fd == 0
    assert not q.rows[1].fd_tied
    assert not q.rows[1].kid_tied
    assert q.rows[1].fd.lo > q.fd_baseline.hi
    with pytest.raises(DataError, match=r"n=500 needs 1 x n generated images per row and 2n real"):
        evaluate_sweep(classifier, [b], real, n=500)
