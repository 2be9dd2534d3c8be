r"""The EDM sampler (Karras et al. 2022, Algorithm 2) with EDM2's guidance, and image output.

The denoiser is any callable ``D(x, sigma, class_labels) -> tensor`` with ``x`` of shape
``(N, C, H, W)``, ``sigma`` of shape ``(N,)`` and ``class_labels`` one-hot ``(N, K)`` or
``None``; it returns the denoised estimate of ``x``'s clean image. With time steps

.. math::

    t_i = \Big(\sigma_\max^{1/\rho} + \tfrac{i}{N-1}\big(\sigma_\min^{1/\rho}
          - \sigma_\max^{1/\rho}\big)\Big)^{\rho}, \quad i < N, \qquad t_N = 0

(EDM Eq. 5) and :math:`x_0 = t_0\,n`, each step integrates the probability-flow ODE
:math:`dx/dt = (x - D(x, t))/t`: optional churn raises the noise level to
:math:`\hat t = (1 + \gamma)\,t_i` with
:math:`\gamma = \min(S_\text{churn}/N, \sqrt2 - 1)` when :math:`S_\min \le t_i \le S_\max`
by adding :math:`\sqrt{\hat t^2 - t_i^2}\,S_\text{noise}\,\epsilon`; then an Euler step to
:math:`t_{i+1}` and, except on the last step (into :math:`t_N = 0`, where the ODE's
slope is undefined), the trapezoidal (Heun) correction: :math:`2N - 1` denoiser calls.

Guidance by a second network (EDM2, autoguidance) uses
:math:`D = D_g + w\,(D_\text{net} - D_g)`; ``w = 1`` never calls the guiding network.

Every image depends only on its seed: :class:`SeedGenerators` keeps one
``torch.Generator`` per seed, from which its noise, its random class and its churn noise
are drawn in that order, so batching and batch order change nothing.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image
from torch import Tensor

from phema.errors import PhemaError

__all__ = [
    "Denoiser",
    "SamplerError",
    "SeedGenerators",
    "SeedInputs",
    "edm_sampler",
    "generate",
    "karras_sigmas",
    "make_inputs",
    "save_image_grid",
    "to_uint8",
]

Denoiser = Callable[[Tensor, Tensor, Tensor | None], Tensor]


class SamplerError(PhemaError, ValueError):
    """Sampler settings that cannot work together (guidance without a guiding net, bad steps)."""


def karras_sigmas(
    num_steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The ``num_steps + 1`` noise levels :math:`t_0 = \\sigma_\\max > ... > t_{N-1} = \\sigma_\\min > t_N = 0`."""
    if num_steps < 1 or not 0 < sigma_min <= sigma_max or rho <= 0:
        raise SamplerError(
            f"need num_steps >= 1, 0 < sigma_min <= sigma_max and rho > 0, got "
            f"{num_steps=}, {sigma_min=}, {sigma_max=}, {rho=}"
        )
    # EDM Eq. 5, evaluated in float64 and only then cast.
    i = torch.arange(num_steps, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    ramp = i / (num_steps - 1) if num_steps > 1 else i
    t = (a + ramp * (b - a)) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)]).to(dtype=dtype, device=device)


@torch.no_grad()
def edm_sampler(
    net: Denoiser,
    noise: Tensor,
    labels: Tensor | None = None,
    gnet: Denoiser | None = None,
    *,
    num_steps: int = 32,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    guidance: float = 1.0,
    S_churn: float = 0.0,
    S_min: float = 0.0,
    S_max: float = math.inf,
    S_noise: float = 1.0,
    dtype: torch.dtype = torch.float32,
    randn_like: Callable[[Tensor], Tensor] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Deterministic (or, with ``S_churn > 0``, stochastic) Heun sampling from unit noise.

    Args:
        net: Denoiser ``D(x, sigma, labels)``; its output is cast to ``dtype``.
        noise: Unit Gaussian ``(N, C, H, W)``; scaled by :math:`\\sigma_\\max` here.
        labels: One-hot ``(N, K)`` class labels, passed to ``net`` and ``gnet``, or None.
        gnet: Guiding denoiser, required when ``guidance != 1``.
        num_steps: N, the number of noise levels above zero (2N - 1 denoiser calls).
        sigma_min, sigma_max, rho: The time-step schedule (:func:`karras_sigmas`).
        guidance: w in :math:`D_g + w (D_\\text{net} - D_g)`.
        S_churn, S_min, S_max, S_noise: EDM stochasticity; ``S_churn = 0`` is deterministic.
        dtype: Precision of the ODE state and arithmetic (float32 or float64).
        randn_like: Churn noise source; pass :meth:`SeedGenerators.randn_like` for
            per-seed determinism. Defaults to ``torch.randn_like``.
        on_step: Called as ``on_step(i + 1, num_steps)`` after step ``i`` (progress display).

    Returns:
        The samples at :math:`\\sigma = 0`, ``(N, C, H, W)`` in ``dtype``. Runs under
        ``torch.no_grad()``: 2N - 1 network calls would otherwise keep every activation.
    """
    if guidance != 1 and gnet is None:
        raise SamplerError(f"guidance={guidance} needs a guiding network: pass gnet=...")
    draw = torch.randn_like if randn_like is None else randn_like
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, dtype, noise.device)
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)

    def denoise(x: Tensor, t: Tensor) -> Tensor:
        sigma = t.expand(x.shape[0])
        d = net(x, sigma, labels).to(dtype)
        if guidance == 1 or gnet is None:
            return d
        g = gnet(x, sigma, labels).to(dtype)
        return g.lerp(d, guidance)

    x_next = noise.to(dtype) * t_steps[0]
    for i in range(num_steps):
        t_cur, t_next, x_cur = t_steps[i], t_steps[i + 1], x_next
        # Churn: raise the noise level to t_hat by adding fresh noise (EDM Alg. 2, lines 4-6).
        gamma = gamma_max if S_churn > 0 and S_min <= float(t_cur) <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur
        if gamma > 0:
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * draw(x_cur)
        # Euler step (line 8), then the trapezoidal correction unless stepping to 0 (line 11).
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        if on_step is not None:
            on_step(i + 1, num_steps)
    return x_next


class SeedGenerators:
    """One ``torch.Generator`` per seed; every draw stacks one per-seed draw per row."""

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator(self.device).manual_seed(s) for s in self.seeds]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal ``(len(seeds), *shape)``."""
        return torch.stack(
            [
                torch.randn(*shape, generator=g, dtype=dtype, device=self.device)
                for g in self.generators
            ]
        )

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal shaped like ``x``, whose first axis must be ``len(seeds)``."""
        if x.shape[0] != len(self.generators):
            raise SamplerError(f"batch of {x.shape[0]} rows for {len(self.generators)} seeds")
        return self.randn(x.shape[1:], x.dtype).to(x.device)

    def randint(self, high: int, shape: Sequence[int] = ()) -> Tensor:
        """Uniform integers in ``[0, high)``, ``(len(seeds), *shape)``."""
        return torch.stack(
            [
                torch.randint(high, tuple(shape), generator=g, device=self.device)
                for g in self.generators
            ]
        )


class SeedInputs(NamedTuple):
    """What :func:`make_inputs` draws for a list of seeds."""

    noise: Tensor
    labels: Tensor | None
    generators: SeedGenerators


def make_inputs(
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    num_classes: int = 0,
    class_idx: int | None = None,
    device: torch.device | str = "cpu",
) -> SeedInputs:
    """Per-seed noise ``(n, *shape)`` and one-hot labels (random per seed unless ``class_idx``).

    Each seed's generator draws its noise first, then (for a conditional net without
    ``class_idx``) its class; the same generators then serve the churn noise.
    """
    gens = SeedGenerators(seeds, device)
    noise = gens.randn(shape)
    labels = None
    if num_classes > 0:
        if class_idx is not None and not 0 <= class_idx < num_classes:
            raise SamplerError(f"class_idx={class_idx} outside [0, {num_classes})")
        idx = (
            gens.randint(num_classes)
            if class_idx is None
            else torch.full((len(gens.seeds),), class_idx)
        )
        labels = torch.nn.functional.one_hot(idx.to(device), num_classes).to(torch.float32)
    return SeedInputs(noise, labels, gens)


def generate(
    net: Denoiser,
    seeds: Sequence[int],
    shape: Sequence[int],
    *,
    num_classes: int = 0,
    class_idx: int | None = None,
    batch_size: int = 64,
    gnet: Denoiser | None = None,
    device: torch.device | str = "cpu",
    progress: Callable[[float], None] | None = None,
    **sampler_kwargs: Any,
) -> Tensor:
    """Sample one image per seed in batches; the result does not depend on ``batch_size``.

    ``sampler_kwargs`` go to :func:`edm_sampler` (``num_steps``, ``guidance``, ``dtype``, ...).
    ``progress``, if given, is called after every sampler step with the images it advanced
    (a batch's size over the number of steps; the calls add up to ``len(seeds)``).
    """
    if batch_size < 1:
        raise SamplerError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for start in range(0, len(seeds), batch_size):
        batch = seeds[start : start + batch_size]
        noise, labels, gens = make_inputs(
            batch, shape, num_classes=num_classes, class_idx=class_idx, device=device
        )
        on_step = None if progress is None else functools.partial(_advance, progress, len(batch))
        out.append(
            edm_sampler(
                net,
                noise,
                labels,
                gnet,
                randn_like=gens.randn_like,
                on_step=on_step,
                **sampler_kwargs,
            )
        )
    return torch.cat(out)


def _advance(progress: Callable[[float], None], n: int, done: int, total: int) -> None:
    progress(n / total)


def to_uint8(images: Tensor) -> NDArray[np.uint8]:
    """``[-1, 1]`` float ``(N, C, H, W)`` to uint8 ``(N, H, W, C)``: round(127.5 x + 127.5), clipped."""
    x = (images.detach().to(torch.float32).cpu() * 127.5 + 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def save_image_grid(
    images: Tensor,
    path: str | os.PathLike[str] | IO[bytes],
    *,
    ncols: int | None = None,
    scale: int = 1,
    padding: int = 0,
) -> tuple[int, int]:
    """Write ``[-1, 1]`` images ``(N, C, H, W)``, C in {1, 3}, as one PNG grid.

    Args:
        images: The images; values outside [-1, 1] are clipped.
        path: Output file, or a binary file object to write the PNG to.
        ncols: Images per row; default ``ceil(sqrt(N))``.
        scale: Nearest-neighbour upscaling factor (8x8 digits are hard to see at 1).
        padding: Black pixels between images (after scaling).

    Returns:
        ``(rows, cols)`` of the grid.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise SamplerError(f"images must be (N>0, 1 or 3, H, W), got {tuple(images.shape)}")
    n, c, h, w = images.shape
    cols = ncols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tiles = to_uint8(images).repeat(scale, axis=1).repeat(scale, axis=2)
    hs, ws = h * scale + padding, w * scale + padding
    grid = np.zeros((rows * hs - padding, cols * ws - padding, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        grid[r * hs : r * hs + h * scale, q * ws : q * ws + w * scale] = tiles[k]
    Image.fromarray(grid[:, :, 0] if c == 1 else grid).save(path, format="PNG")
    return rows, cols
