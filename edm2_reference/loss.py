"""The EDM2 training loss with learned uncertainty (Karras et al. 2024, Eqs. 14-16 and 21).

Per image ``y`` with noise level ``sigma`` (``ln sigma ~ N(P_mean, P_std^2)``) and noise
``n ~ N(0, sigma^2 I)``, the network returns the denoised ``D = D(y + n; sigma)`` and a
log-variance ``u(sigma)``; the loss summed over the image's elements is::

    L = sum_pixels  lambda(sigma) / e^u * (D - y)^2  +  u,
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2   (= 1 / c_out^2)

so ``e^u`` learns the expected weighted error at each noise level and the loss weights
noise levels by their uncertainty. The objective is the mean of ``L`` over images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["NoiseDraw", "draw_noise", "edm2_loss"]


@dataclass(frozen=True)
class NoiseDraw:
    """The random part of one training step for a batch: noise levels, unit noise, flips."""

    sigma: Tensor  # [B]
    unit_noise: Tensor  # [B, C, H, W], N(0, 1); scaled by sigma in the loss
    flip: Tensor  # [B] bool, horizontal flips (all False without augmentation)

    def take(self, rows: Tensor) -> NoiseDraw:
        """The draws of the given rows (a rank's or a round's share of the global batch)."""
        return NoiseDraw(self.sigma[rows], self.unit_noise[rows], self.flip[rows])


def draw_noise(
    generator: torch.Generator,
    batch: int,
    shape: tuple[int, int, int],
    *,
    p_mean: float,
    p_std: float,
    xflip: bool,
    device: torch.device,
) -> NoiseDraw:
    """Draw a whole global batch's noise from ``generator`` (so every rank agrees on it)."""
    ln_sigma = torch.randn(batch, generator=generator, device=device) * p_std + p_mean
    noise = torch.randn((batch, *shape), generator=generator, device=device)
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    return NoiseDraw(ln_sigma.exp(), noise, flip & xflip)


def edm2_loss(net: nn.Module, images: Tensor, labels: Tensor | None, draw: NoiseDraw) -> Tensor:
    """Per-image losses ``[B]`` (each summed over the image's elements)."""
    y = torch.where(draw.flip[:, None, None, None], images.flip(-1), images)
    sigma = draw.sigma
    sd = float(getattr(net, "sigma_data", 0.5))
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2
    denoised, logvar = net(
        y + draw.unit_noise * sigma[:, None, None, None], sigma, labels, return_logvar=True
    )
    per_elem = weight[:, None, None, None] / logvar.exp() * (denoised - y) ** 2 + logvar
    out: Tensor = per_elem.flatten(1).sum(1)
    return out
