"""EDM Heun sampler against closed forms for Gaussian data, guidance, per-seed inputs, grids.

For data ~ N(mu, s^2) per dimension the ideal denoiser is D(x, t) = (s^2 x + t^2 mu) / (s^2 + t^2),
so the ODE slope is (x - D) / t = k(t) (x - mu) with k(t) = t / (s^2 + t^2), and:

* the exact flow keeps (x(t) - mu) / sqrt(s^2 + t^2) constant;
* one Heun step from (x_hat, t_hat) to t' (h = t' - t_hat) multiplies x - mu by
  a = 1 + h/2 (k(t_hat) + k(t') (1 + h k(t_hat))), the last (Euler) step into 0 by
  a = s^2 / (s^2 + t_hat^2), and churn adds independent N(0, t_hat^2 - t^2) noise first.

Those scalar recursions, written out here by hand, are the oracles.
"""

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from edm2_reference.sampler import (
    SamplerError,
    edm_sampler,
    generate,
    karras_sigmas,
    make_inputs,
    save_image_grid,
    to_uint8,
)

MU, S = 0.3, 0.5
SMIN, SMAX = 0.002, 80.0


def gaussian_denoiser(mu, s, calls=None):
    """Ideal denoiser for N(mu, s^2); mu may depend on the one-hot labels (then a (K,) tensor)."""

    def denoise(x, sigma, labels):
        assert sigma.shape == (x.shape[0],)
        assert sigma.dtype == x.dtype
        if calls is not None:
            calls.append(labels)
        m = (
            mu
            if not torch.is_tensor(mu)
            else (labels.to(x.dtype) @ mu.to(x.dtype)).reshape(-1, 1, 1, 1)
        )
        t2 = sigma.reshape(-1, 1, 1, 1) ** 2
        return (s**2 * x + t2 * m) / (s**2 + t2)

    return denoise


def heun_factors(num_steps, s, gammas=None, rho=7.0):
    """Per-step multipliers a_i of x - mu and the noise levels t_i, t_hat_i (module docstring)."""
    t = [
        (SMAX ** (1 / rho) + i / (num_steps - 1) * (SMIN ** (1 / rho) - SMAX ** (1 / rho))) ** rho
        for i in range(num_steps)
    ]
    t.append(0.0)
    gammas = gammas or [0.0] * num_steps

    def k(u):
        return u / (s * s + u * u)

    out = []
    for i in range(num_steps):
        t_hat = t[i] * (1 + gammas[i])
        h = t[i + 1] - t_hat
        if i < num_steps - 1:
            a = 1 + h / 2 * (k(t_hat) + k(t[i + 1]) * (1 + h * k(t_hat)))
        else:
            a = s * s / (s * s + t_hat * t_hat)
        out.append((a, t[i], t_hat))
    return out


def unit_noise(n, shape=(1, 4, 4), seed=0):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


def exact_reference(noise):
    """Exact flow from sigma_max to sigma_min, then the sampler's final step D(x, sigma_min)."""
    x_t = noise.double() * SMAX
    return MU + (x_t - MU) * S**2 / (math.sqrt(S**2 + SMIN**2) * math.sqrt(S**2 + SMAX**2))


def test_karras_sigmas():
    t = karras_sigmas(5, SMIN, SMAX, 7.0)
    assert t.dtype == torch.float64
    assert t.shape == (6,)
    assert t[0] == SMAX
    assert t[-1] == 0
    assert math.isclose(float(t[4]), SMIN, rel_tol=1e-12)
    assert bool((t[1:] < t[:-1]).all())
    mid = (SMAX ** (1 / 7) + 0.5 * (SMIN ** (1 / 7) - SMAX ** (1 / 7))) ** 7
    assert math.isclose(float(t[2]), mid, rel_tol=1e-12)
    # rho = 1 is linear spacing.
    torch.testing.assert_close(
        karras_sigmas(3, 1.0, 3.0, 1.0), torch.tensor([3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    )
    with pytest.raises(SamplerError, match="num_steps"):
        karras_sigmas(0)


@pytest.mark.parametrize("num_steps", [1, 2, 7, 32])
def test_deterministic_sampler_equals_heun_recursion(num_steps):
    # Per sample, x - mu = (prod a_i) (x_0 - mu) to float64 round-off (~1e-15 per operation).
    noise = unit_noise(64)
    x = edm_sampler(gaussian_denoiser(MU, S), noise, num_steps=num_steps, dtype=torch.float64)
    a = (
        math.prod(f[0] for f in heun_factors(num_steps, S))
        if num_steps > 1
        else S**2 / (S**2 + SMAX**2)
    )
    expected = MU + a * (noise.double() * SMAX - MU)
    torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)


def test_heun_converges_at_second_order_to_the_exact_flow():
    noise = unit_noise(16)
    ref = exact_reference(noise)
    errors = []
    for n in [32, 64, 128, 256]:
        x = edm_sampler(gaussian_denoiser(MU, S), noise, num_steps=n, dtype=torch.float64)
        errors.append(float(((x - ref) / (ref - MU)).abs().max()))
    # Heun is second order: halving every step (N -> 2N) divides the error by ~4.
    ratios = [e0 / e1 for e0, e1 in itertools.pairwise(errors)]
    assert all(abs(r - 4) < 0.7 for r in ratios), (errors, ratios)
    assert errors[0] < 0.02  # 32 steps: std within 2% of s (the EDM2 default schedule)
    # The final step to sigma = 0 is D(x, sigma_min), not the exact flow: a fixed bias of
    # relative size 1 - s / sqrt(s^2 + sigma_min^2) ~ sigma_min^2 / (2 s^2) = 8e-6.
    exact_at_zero = MU + (noise.double() * SMAX - MU) * S / math.sqrt(S**2 + SMAX**2)
    bias = ((ref - exact_at_zero) / (exact_at_zero - MU)).abs().max()
    assert math.isclose(float(bias), 1 - S / math.sqrt(S**2 + SMIN**2), rel_tol=1e-6)


def test_samples_have_the_data_distribution():
    n = 4096
    noise = unit_noise(n, (1, 2, 2), seed=3)
    x = edm_sampler(gaussian_denoiser(MU, S), noise, num_steps=32, dtype=torch.float64)
    a = math.prod(f[0] for f in heun_factors(32, S))
    exact_a = S / math.sqrt(S**2 + SMAX**2)
    # Tolerances: 5 standard errors of the sample statistics (4n scalars), plus the
    # discretisation's relative scale error |a / a_exact - 1| and the mean's pull -mu a.
    m = 4 * n
    assert abs(float(x.mean()) - MU) < 5 * S / math.sqrt(m) + abs(MU * a)
    assert abs(float(x.std()) / S - 1) < 5 / math.sqrt(2 * m) + abs(a / exact_a - 1) + 1e-3


def test_float32_path_tracks_float64():
    noise = unit_noise(64)
    x64 = edm_sampler(gaussian_denoiser(MU, S), noise, num_steps=32, dtype=torch.float64)
    x32 = edm_sampler(gaussian_denoiser(MU, S), noise, num_steps=32, dtype=torch.float32)
    assert x32.dtype == torch.float32
    # 63 denoiser calls and ~10 float32 ops each (eps 6e-8) on values of size ~1.
    assert float((x32.double() - x64).abs().max()) < 64 * 10 * 6e-8


def _churn_gammas(num_steps, churn, S_min, S_max):
    gamma = min(churn / num_steps, math.sqrt(2) - 1)
    t = karras_sigmas(num_steps).tolist()
    return [gamma if S_min <= t[i] <= S_max else 0.0 for i in range(num_steps)]


# The window bounds are noise levels of the schedule itself, so both ends are exercised.
WINDOWS = [(0.0, math.inf), (karras_sigmas(32)[20].item(), karras_sigmas(32)[5].item())]


@pytest.mark.parametrize(("S_min", "S_max"), WINDOWS)
@pytest.mark.parametrize("churn", [10.0, 40.0])  # gamma = 0.3125 and the cap sqrt(2) - 1
def test_churn_equals_the_per_sample_recursion(S_min, S_max, churn):
    num_steps, s_noise = 32, 0.9
    draws = []
    gen = torch.Generator().manual_seed(7)

    def recording_randn_like(y):
        draws.append(torch.randn(y.shape, generator=gen, dtype=y.dtype))
        return draws[-1]

    noise = unit_noise(6)
    x = edm_sampler(
        gaussian_denoiser(MU, S),
        noise,
        num_steps=num_steps,
        S_churn=churn,
        S_min=S_min,
        S_max=S_max,
        S_noise=s_noise,
        dtype=torch.float64,
        randn_like=recording_randn_like,
    )
    gammas = _churn_gammas(num_steps, churn, S_min, S_max)
    assert len(draws) == sum(g > 0 for g in gammas)
    y, used = noise.double() * SMAX - MU, iter(draws)
    for (a, t_cur, t_hat), g in zip(heun_factors(num_steps, S, gammas), gammas, strict=True):
        if g > 0:
            y = y + math.sqrt(t_hat**2 - t_cur**2) * s_noise * next(used)
        y = a * y
    torch.testing.assert_close(x, MU + y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("S_min", "S_max"), WINDOWS)
def test_churned_samples_have_the_recursion_mean_and_variance(S_min, S_max):
    n, num_steps, churn = 5000, 32, 40.0
    gammas = _churn_gammas(num_steps, churn, S_min, S_max)
    m, v = -MU, SMAX**2  # x_0 - mu = sigma_max n - mu
    for a, t_cur, t_hat in heun_factors(num_steps, S, gammas):
        m, v = a * m, a * a * (v + t_hat**2 - t_cur**2)
    gen = torch.Generator().manual_seed(7)
    x = edm_sampler(
        gaussian_denoiser(MU, S),
        unit_noise(n, (1, 2, 2), seed=5),
        num_steps=num_steps,
        S_churn=churn,
        S_min=S_min,
        S_max=S_max,
        dtype=torch.float64,
        randn_like=lambda y: torch.randn(y.shape, generator=gen, dtype=y.dtype),
    )
    count = x.numel()
    # 5 standard errors: sqrt(v / n) for the mean, sqrt(2 / (n - 1)) v for the variance.
    assert abs(float(x.mean()) - (MU + m)) < 5 * math.sqrt(v / count)
    assert abs(float(x.var()) - v) < 5 * math.sqrt(2 / (count - 1)) * v


def test_churned_variance_converges_to_the_data_variance():
    # Maximal churn at every level is a consistent sampler: the output variance from the
    # recursion (checked per sample above) tends to s^2 as the steps shrink.
    errors = []
    for num_steps in [32, 64, 128, 256]:
        gammas = _churn_gammas(num_steps, 2.0 * num_steps, 0.0, math.inf)
        v = SMAX**2
        for a, t_cur, t_hat in heun_factors(num_steps, S, gammas):
            v = a * a * (v + t_hat**2 - t_cur**2)
        errors.append(abs(math.sqrt(v) / S - 1))
    assert errors == sorted(errors, reverse=True), errors
    assert errors[-1] < 0.01, errors


def test_churn_off_or_outside_its_window_is_deterministic():
    noise = unit_noise(8)
    den = gaussian_denoiser(MU, S)

    def forbidden(_):
        raise AssertionError("no churn noise may be drawn")

    x = edm_sampler(den, noise, num_steps=8, dtype=torch.float64)
    assert torch.equal(
        x, edm_sampler(den, noise, num_steps=8, dtype=torch.float64, randn_like=forbidden)
    )
    outside = edm_sampler(
        den, noise, num_steps=8, dtype=torch.float64, S_churn=10, S_min=100, randn_like=forbidden
    )
    assert torch.equal(x, outside)
    churned = edm_sampler(den, noise, num_steps=8, dtype=torch.float64, S_churn=10)
    assert not torch.allclose(x, churned)


def test_guidance_is_the_lerp_of_the_two_denoisers():
    # D_g + w (D_net - D_g) of two ideal denoisers with means mu1, mu2 and equal s is the
    # ideal denoiser of N(mu2 + w (mu1 - mu2), s^2): guided sampling must equal that exactly.
    mu1, mu2, w, n = 0.4, -0.2, 2.5, 12
    net_calls, g_calls = [], []
    noise = unit_noise(n)
    labels = torch.eye(3)[torch.arange(n) % 3]
    guided = edm_sampler(
        gaussian_denoiser(mu1, S, net_calls),
        noise,
        labels,
        gnet=gaussian_denoiser(mu2, S, g_calls),
        guidance=w,
        num_steps=16,
        dtype=torch.float64,
    )
    direct = edm_sampler(
        gaussian_denoiser(mu2 + w * (mu1 - mu2), S), noise, num_steps=16, dtype=torch.float64
    )
    torch.testing.assert_close(guided, direct, rtol=1e-12, atol=1e-12)
    # 2N - 1 calls each, and both networks see the labels.
    assert len(net_calls) == len(g_calls) == 31
    assert all(c is labels for c in net_calls + g_calls)
    # w = 1 never calls the guiding network.
    g_calls.clear()
    edm_sampler(
        gaussian_denoiser(mu1, S), noise, gnet=gaussian_denoiser(mu2, S, g_calls), num_steps=4
    )
    assert g_calls == []
    with pytest.raises(SamplerError, match=r"guidance=2\.0 needs a guiding network"):
        edm_sampler(gaussian_denoiser(mu1, S), noise, guidance=2.0)


def test_labels_select_the_class_mean():
    means = torch.tensor([-0.5, 0.1, 0.6], dtype=torch.float64)
    noise = unit_noise(9)
    labels = torch.eye(3)[[0, 1, 2, 2, 1, 0, 0, 1, 2]]
    x = edm_sampler(gaussian_denoiser(means, S), noise, labels, num_steps=12, dtype=torch.float64)
    mu = (labels.double() @ means).reshape(-1, 1, 1, 1)
    a = math.prod(f[0] for f in heun_factors(12, S))
    torch.testing.assert_close(x, mu + a * (noise.double() * SMAX - mu), rtol=1e-12, atol=1e-12)


def test_inputs_depend_only_on_the_seed():
    seeds = [5, 0, 7, 2]
    inputs = make_inputs(seeds, (1, 3, 3), num_classes=10)
    for row, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(seed)
        # Each seed's generator draws its noise first, then its class.
        assert torch.equal(inputs.noise[row], torch.randn(1, 3, 3, generator=gen))
        assert int(inputs.labels[row].argmax()) == int(torch.randint(10, (), generator=gen))
        one = make_inputs([seed], (1, 3, 3), num_classes=10)
        assert torch.equal(one.noise[0], inputs.noise[row])
        assert torch.equal(one.labels[0], inputs.labels[row])
    fixed = make_inputs(seeds, (1, 3, 3), num_classes=10, class_idx=4)
    assert torch.equal(fixed.labels, torch.eye(10)[[4, 4, 4, 4]])
    assert make_inputs(seeds, (1, 3, 3)).labels is None
    with pytest.raises(SamplerError, match="class_idx=10"):
        make_inputs(seeds, (1, 3, 3), num_classes=10, class_idx=10)


def test_batching_does_not_change_images():
    means = torch.tensor([-0.5, 0.1, 0.6])
    kwargs = {"num_classes": 3, "num_steps": 8, "S_churn": 5.0, "dtype": torch.float64}
    seeds = [11, 3, 8, 0, 6]
    together = generate(gaussian_denoiser(means, S), seeds, (1, 2, 2), batch_size=5, **kwargs)
    apart = generate(gaussian_denoiser(means, S), seeds, (1, 2, 2), batch_size=2, **kwargs)
    alone = [
        generate(gaussian_denoiser(means, S), [s], (1, 2, 2), batch_size=1, **kwargs) for s in seeds
    ]
    assert torch.equal(together, apart)
    assert torch.equal(together, torch.cat(alone))
    other = generate(gaussian_denoiser(means, S), [12], (1, 2, 2), **kwargs)
    assert not torch.equal(other[0], together[0])


def test_to_uint8_inverts_the_data_scale():
    levels = torch.arange(256, dtype=torch.float32)
    images = (levels / 127.5 - 1).reshape(1, 1, 16, 16)
    assert to_uint8(images).reshape(-1).tolist() == list(range(256))
    # Rounds to the nearest level, clips outside [-1, 1].
    off_grid = (torch.tensor([10.4, 10.6, -3.0, 300.0]) - 127.5) / 127.5
    assert to_uint8(off_grid.reshape(1, 1, 1, 4)).reshape(-1).tolist() == [10, 11, 0, 255]


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid(tmp_path, channels):
    images = torch.rand(5, channels, 2, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = tmp_path / "grid.png"
    assert save_image_grid(images, path, ncols=2, scale=2, padding=1) == (3, 2)
    with Image.open(path) as im:
        grid = np.asarray(im)
        assert im.mode == ("L" if channels == 1 else "RGB")
    grid = grid.reshape(*grid.shape[:2], channels)
    # 2x3 images scaled by 2, plus 1 pixel of padding: cells of 5 x 7.
    assert grid.shape[:2] == (3 * 5 - 1, 2 * 7 - 1)
    tiles = to_uint8(images)
    for k in range(5):
        r, c = divmod(k, 2)
        tile = grid[r * 5 : r * 5 + 4, c * 7 : c * 7 + 6]
        assert np.array_equal(tile, tiles[k].repeat(2, 0).repeat(2, 1))
    assert grid[10:, 7:].max() == 0  # the sixth cell stays empty
    assert grid[4, :].max() == 0  # padding row
    assert save_image_grid(images, path) == (2, 3)  # default: ceil(sqrt(n)) columns
    with pytest.raises(SamplerError, match="images must be"):
        save_image_grid(torch.zeros(2, 2, 4, 4), path)
