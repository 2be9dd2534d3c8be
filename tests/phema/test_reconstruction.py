"""Post-hoc reconstruction in memory versus EMAs tracked directly during the same run.

For a piecewise-constant trajectory the EMA of profile f is exactly the integral of
f times theta, so the error of a reconstruction obeys Cauchy-Schwarz per coordinate:

    |theta_hat_j - theta_q_j| <= rel_error * ||q|| * ||theta_j||_L2(0, T),

with rel_error the solver's reported relative L2 error. The tests check that bound
(plus float64 rounding) on every coordinate, and that it is informative.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from phema import (
    ExponentialProfile,
    PowerFunctionEMA,
    PowerProfile,
    Snapshot,
    SolverError,
    reconstruct_in_memory,
)

STEPS = 3000
TARGET_STDS = (0.03, 0.075, 0.15, 0.2)


class _Walker(nn.Module):
    """A 64-dim float64 'model' that follows a drifting random walk, one step per update."""

    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(64, dtype=torch.float64))
        self.gen = torch.Generator().manual_seed(0)
        self.drift = torch.linspace(-1.0, 1.0, 64, dtype=torch.float64) / STEPS

    @torch.no_grad()
    def step(self):
        noise = torch.randn(64, generator=self.gen, dtype=torch.float64)
        self.theta.add_(self.drift + 0.05 * noise)


def _run(snapshot_every):
    net = _Walker()
    ema = PowerFunctionEMA(net, stds=(0.05, 0.10))
    truth = PowerFunctionEMA(net, stds=TARGET_STDS)
    snaps: list[Snapshot] = []
    path = []
    for step in range(1, STEPS + 1):
        net.step()
        path.append(net.theta.detach().clone())
        ema.update(step)
        truth.update(step)
        if step % snapshot_every == 0:
            snaps.extend(ema.snapshot())
    return snaps, truth, torch.stack(path)


def _l2_norms(path):
    """||theta_j||_L2(0, T) per coordinate for unit-length intervals."""
    return path.square().sum(0).sqrt()


@pytest.mark.parametrize("snapshot_every", [100, 300])
def test_reconstruction_is_within_reported_fit_error(snapshot_every):
    snaps, truth, path = _run(snapshot_every)
    targets = [PowerProfile(STEPS, s) for s in TARGET_STDS]
    outs, sol = reconstruct_in_memory(snaps, targets, warn=False)
    norms = _l2_norms(path)
    for std, out, fit in zip(TARGET_STDS, outs, sol.fits, strict=True):
        direct = truth.profile(std)["theta"]
        err = (out["theta"] - direct).abs()
        bound = fit.rel_error * math.sqrt(fit.target.norm2()) * norms
        # float64 slop: L1 norm of the coefficients times a few ulp of the values.
        slop = fit.l1_norm * 1e-13 * path.abs().max()
        assert torch.all(err <= bound + slop), (std, float((err - bound).max()))
        # None of these targets is a stored profile, so the bound is exercised, not trivial.
        assert float(err.max()) > 1e3 * float(slop)


def test_denser_snapshots_shrink_the_error():
    errors = {}
    for every in (50, 500):
        snaps, truth, _ = _run(every)
        outs, sol = reconstruct_in_memory(snaps, [PowerProfile(STEPS, 0.15)], warn=False)
        errors[every] = (
            float((outs[0]["theta"] - truth.profile(0.15)["theta"]).norm()),
            sol.fits[0].rel_error,
        )
    assert errors[50][1] < errors[500][1]
    assert errors[50][0] < errors[500][0]


def test_exponential_target_matches_a_classic_ema():
    snaps, _, path = _run(100)
    half_life = 150.0
    target = ExponentialProfile.from_half_life(STEPS, half_life)
    outs, sol = reconstruct_in_memory(snaps, [target], warn=False)
    lam = target.rate
    # The truncated, renormalised exponential profile, integrated over each step exactly.
    t = np.arange(0, STEPS + 1, dtype=np.float64)
    z = -math.expm1(-lam * STEPS)
    w = (np.exp(-lam * (STEPS - t[1:])) - np.exp(-lam * (STEPS - t[:-1]))) / z
    exact = (torch.from_numpy(w)[:, None] * path).sum(0)
    bound = sol.fits[0].rel_error * math.sqrt(target.norm2()) * _l2_norms(path)
    assert torch.all((outs[0]["theta"] - exact).abs() <= bound + 1e-12)
    # And the same as a classic EMA run step by step (beta = exp(-lam) per step), up to the
    # initial-weights mass exp(-lam * T) that the truncated profile leaves out.
    classic = path[0].clone()
    beta = math.exp(-lam)
    for theta in path[1:]:
        classic = beta * classic + (1 - beta) * theta
    slack = 2 * math.exp(-lam * STEPS) * float(path.abs().max())
    assert torch.all((classic - exact).abs() <= slack + 1e-12)


def test_mismatched_snapshot_layouts_are_named():
    a = Snapshot(1.0, 0.05, {"w": torch.zeros(3)})
    b = Snapshot(2.0, 0.05, {"w": torch.zeros(4)})
    with pytest.raises(SolverError, match=r"snapshot 1 \(t=2, std=0.05\): tensor 'w' has shape"):
        reconstruct_in_memory([a, b], [PowerProfile(2.0, 0.05)])
    c = Snapshot(2.0, 0.05, {"v": torch.zeros(3)})
    with pytest.raises(SolverError, match="holds other tensors"):
        reconstruct_in_memory([a, c], [PowerProfile(2.0, 0.05)])


def test_low_precision_snapshots_accumulate_in_float32():
    snaps = [
        Snapshot(float(t), s, {"w": torch.full((4,), float(t), dtype=torch.float16)})
        for t in (1, 2, 3)
        for s in (0.05, 0.1)
    ]
    outs, _ = reconstruct_in_memory(snaps, [PowerProfile(3.0, 0.075)], warn=False)
    assert outs[0]["w"].dtype == torch.float32
