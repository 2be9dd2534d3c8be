"""Fréchet distance and KID against closed forms and brute force; the digits classifier; reports."""

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file

from edm2_reference import metrics
from edm2_reference.data import DataError, load_dataset
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
# Classifier and reports on the digits


@pytest.fixture(scope="module")
def digits_splits():
    train, held_out = load_dataset("digits").split(0.5, seed=0)
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
