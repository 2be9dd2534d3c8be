"""Magnitude-preserving primitives: closed forms, exact magnitudes, forced weight normalisation.

Statistical checks use the per-image mean square: images are independent, so the per-image
values are i.i.d. and their sample mean has a standard error estimated from the sample itself
(``se``); tolerances are 5 standard errors unless stated otherwise.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from edm2_reference.mp import (
    SILU_RMS,
    MPConv,
    MPFourier,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    pixel_norm,
    resample,
)


def rms(x: torch.Tensor) -> float:
    return x.double().pow(2).mean().sqrt().item()


def per_image_ms(y: torch.Tensor) -> tuple[float, float]:
    """Mean over images of the per-image mean square, and its standard error."""
    m = y.double().pow(2).flatten(1).mean(1)
    return m.mean().item(), (m.std() / math.sqrt(len(m))).item()


def orthonormal_columns(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


# --- normalize / pixel_norm ------------------------------------------------------------------


def test_normalize_divides_each_slice_by_its_rms_plus_eps():
    x = torch.randn(5, 3, 4, 4) * torch.tensor([0.01, 1.0, 7.0, 100.0, 3.0]).view(5, 1, 1, 1)
    y = normalize(x)
    r = x.double().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    torch.testing.assert_close(y.double(), x.double() / (1e-4 + r), rtol=1e-6, atol=0)
    # Hence unit RMS per slice, up to the eps term (relative 1e-4 / rms, at most 1e-2 here).
    torch.testing.assert_close(
        y.pow(2).mean(dim=(1, 2, 3)).sqrt(), (r / (1e-4 + r)).flatten().float()
    )


def test_normalize_computes_the_norm_in_float32():
    # 64 values of 1000 in float16: the sum of squares (6.4e7) overflows float16 (max 65504).
    x = torch.full((2, 64), 1000.0, dtype=torch.float16)
    y = normalize(x)
    assert y.dtype == torch.float16
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), torch.ones(2, 64), rtol=1e-3, atol=0)


def test_pixel_norm_gives_unit_rms_per_pixel():
    x = torch.randn(2, 8, 3, 3) * 5
    per_pixel = pixel_norm(x).pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(per_pixel, torch.ones(2, 3, 3), rtol=1e-3, atol=0)


# --- mp_silu ----------------------------------------------------------------------------------


def test_silu_rms_constant_matches_quadrature():
    # E[silu(x)^2] for x ~ N(0,1) by the trapezoid rule on [-12, 12] (the tails beyond carry
    # less than 1e-28); the constant is rounded to three digits, so |0.59647 - 0.596| < 5e-4.
    x = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    pdf = torch.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)
    exact = torch.trapezoid(F.silu(x) ** 2 * pdf, x).sqrt().item()
    assert exact == pytest.approx(0.59647, abs=1e-5)
    assert abs(exact - SILU_RMS) < 5e-4


def test_mp_silu_preserves_unit_magnitude():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 256, generator=g)
    ms, se = per_image_ms(mp_silu(x))
    # Expected (0.59647 / 0.596)^2 = 1.0016 (see the quadrature above).
    assert abs(ms - (0.59647 / 0.596) ** 2) < 5 * se
    torch.testing.assert_close(mp_silu(x), F.silu(x) / 0.596)


# --- mp_sum / mp_cat (exact for orthogonal / unit-RMS inputs) ---------------------------------


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 0.9])
def test_mp_sum_has_exact_unit_rms_for_orthogonal_inputs(t):
    q = orthonormal_columns(1000, 2, seed=1) * math.sqrt(1000)  # two orthogonal unit-RMS vectors
    a, b = q[:, 0], q[:, 1]
    out = mp_sum(a, b, t)
    torch.testing.assert_close(out, ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t**2))
    assert rms(out) == pytest.approx(1.0, abs=1e-12)


def test_mp_sum_t_is_the_weight_of_the_second_argument():
    a, b = torch.ones(4), torch.zeros(4)
    torch.testing.assert_close(mp_sum(a, b, 0.3), torch.full((4,), 0.7 / math.sqrt(0.58)))
    torch.testing.assert_close(mp_sum(a, b, 0.0), a)


@pytest.mark.parametrize(("na", "nb", "t"), [(3, 13, 0.5), (64, 32, 0.2), (5, 5, 0.7)])
def test_mp_cat_exact_unit_rms_and_energy_split(na, nb, t):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(1, na, 4, 4, generator=g, dtype=torch.float64)
    b = torch.randn(1, nb, 4, 4, generator=g, dtype=torch.float64) * 3
    a, b = a / rms(a), b / rms(b)  # exactly unit RMS
    out = mp_cat(a, b, t=t)
    assert out.shape == (1, na + nb, 4, 4)
    assert rms(out) == pytest.approx(1.0, abs=1e-12)
    share_a = out[:, :na].pow(2).sum() / out.pow(2).sum()
    assert share_a.item() == pytest.approx((1 - t) ** 2 / ((1 - t) ** 2 + t**2), abs=1e-12)


# --- MPConv -----------------------------------------------------------------------------------


@pytest.mark.parametrize("gain", [1.0, 2.5])
def test_mpconv_linear_rows_have_norm_gain_exactly(gain):
    # X = sqrt(N) Q with orthonormal columns: mean_n y_no^2 = ||w_o||^2 exactly, so every
    # output channel has mean square gain^2 (up to normalize's eps: relative 2e-4).
    n, cin, cout = 256, 40, 7
    x = (orthonormal_columns(n, cin, seed=3) * math.sqrt(n)).float()
    layer = MPConv(cin, cout).eval()
    y = layer(x, gain=gain)
    per_channel = y.double().pow(2).mean(0)
    torch.testing.assert_close(
        per_channel, torch.full((cout,), gain**2, dtype=torch.float64), rtol=5e-4, atol=0
    )


def test_mpconv_conv_equals_explicit_formula_and_has_no_bias():
    layer = MPConv(6, 5, (3, 3)).eval()
    w = layer.weight.double()
    w_ref = w / w.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # unit-norm rows (eps aside)
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.conv2d(x, w_ref, padding=1), rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(
        layer(torch.zeros_like(x)), torch.zeros(2, 5, 7, 7, dtype=torch.float64)
    )
    assert [name for name, _ in layer.named_parameters()] == ["weight"]


def test_mpconv_conv_preserves_unit_magnitude_on_white_noise():
    # At pixels one away from the border, y = w_o . patch with ||w_o|| = 1 is exactly N(0, 1).
    torch.manual_seed(4)
    layer = MPConv(16, 16, (3, 3)).eval()
    y = layer(torch.randn(64, 16, 12, 12))[..., 1:-1, 1:-1]
    ms, se = per_image_ms(y)
    assert abs(ms - 1.0) < 5 * se


def test_mpconv_casts_weights_to_the_input_dtype():
    layer = MPConv(4, 3).eval()
    assert layer(torch.randn(2, 4, dtype=torch.float64)).dtype == torch.float64
    layer.half()  # a float16 snapshot still runs on float32 inputs: weights are upcast first
    assert layer(torch.randn(2, 4)).dtype == torch.float32


# --- MPFourier --------------------------------------------------------------------------------


def test_mpfourier_closed_form_and_buffers():
    f = MPFourier(32, bandwidth=2.0)
    x = torch.tensor([-2.0, 0.0, 0.3, 5.0])
    ref = math.sqrt(2) * torch.cos(torch.outer(x.double(), f.freqs.double()) + f.phases.double())
    torch.testing.assert_close(f(x).double(), ref, rtol=0, atol=1e-5)
    assert f(x.half()).dtype == torch.float16
    assert list(f.state_dict()) == ["freqs", "phases"]
    assert list(f.parameters()) == []
    assert ((f.phases >= 0) & (f.phases < 2 * math.pi)).all()


def test_mpfourier_has_unit_magnitude_for_any_input():
    # With uniform random phases, 2 cos^2 has mean 1 and variance 1/2 per feature, i.i.d. over
    # features: the mean over 4096 features is within 5 sqrt(0.5 / 4096) = 0.055 of 1.
    torch.manual_seed(5)
    f = MPFourier(4096)
    y = f(torch.tensor([-3.0, -0.1, 0.0, 1.0, 20.0]))
    ms = y.double().pow(2).mean(1)
    assert (ms - 1).abs().max().item() < 5 * math.sqrt(0.5 / 4096)


# --- resample ---------------------------------------------------------------------------------


def test_resample_down_is_the_2x2_mean_and_up_is_nearest():
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    down = resample(x, "down")
    torch.testing.assert_close(
        down, x.reshape(2, 3, 3, 2, 4, 2).mean(dim=(3, 5)), rtol=0, atol=1e-15
    )
    up = resample(x, "up")
    i = torch.arange(12) // 2
    j = torch.arange(16) // 2
    assert torch.equal(up, x[:, :, i][:, :, :, j])
    assert torch.equal(resample(up, "down"), x)  # (a + a + a + a) / 4 == a exactly
    assert resample(x, "keep") is x


def test_resample_magnitudes():
    torch.manual_seed(6)
    x = torch.randn(64, 8, 8, 8)
    assert rms(resample(x, "up")) == pytest.approx(rms(x), rel=1e-6)  # exact: values repeated
    # White noise: the mean of 4 i.i.d. values has variance 1/4, hence RMS 1/2.
    ms, se = per_image_ms(resample(x, "down"))
    assert abs(ms - 0.25) < 5 * se


def test_resample_rejects_odd_sizes_and_unknown_modes():
    with pytest.raises(ValueError, match="even"):
        resample(torch.zeros(1, 1, 7, 7), "down")
    with pytest.raises(ValueError, match="unknown resample mode"):
        resample(torch.zeros(1, 1, 4, 4), "sideways")  # type: ignore[arg-type]
