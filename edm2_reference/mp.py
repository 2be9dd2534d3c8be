"""Magnitude-preserving primitives of the EDM2 Config G network.

The *magnitude* of a tensor is the root mean square (RMS) of its elements. Config G (Karras et
al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", section 3) builds
its network from operations that, fed with inputs of unit magnitude (and, where two inputs meet,
mutually uncorrelated ones), return outputs of unit expected magnitude at initialisation, and that
keep their learned weights at unit norm during training. Each function below states its
variance-preservation argument.

Forced weight normalisation and frozen evaluation copies
--------------------------------------------------------
:class:`MPConv` rewrites its own weight to unit-RMS rows in place on every forward pass made for
training (Eq. 66 of the paper). Evaluating an EMA copy in training mode would thus silently rewrite
the averaged weights. Two independent rules make that impossible here:

1. The rewrite only happens when the module is in training mode, *and* its weight requires a
   gradient, *and* autograd is recording (``torch.is_grad_enabled()``), *and* the module is not
   frozen. A forward under ``torch.no_grad()``/``torch.inference_mode()`` never writes.
2. :func:`freeze` turns a module tree into an evaluation-only copy: eval mode, ``requires_grad``
   off, and every :class:`Freezable` inside it refuses ``.train(True)`` with
   :class:`FrozenModuleError`. There is no unfreeze: to train, load the weights into a fresh net.

Skipping the in-place rewrite changes a forward's output only through the ``eps`` term (relative
2e-4 at most), since the forward always uses ``normalize(weight)`` and ``normalize`` is idempotent
up to ``eps``. Forced normalisation matters for the training dynamics, not for any one output.

Sharded training (FSDP2's ``fully_shard``) runs each forward on gathered copies of the weights, so
a rewrite made there would never reach the shards the optimizer steps. The training loop then
turns the rewrite off (``MPConv.normalize_in_forward = False``) and calls
:func:`normalize_weights_` before each forward instead: it rewrites each rank's rows in place,
and since rows are normalised one by one and ``fully_shard`` shards whole rows (dim 0), the
weights and the forward's arithmetic are those of the unsharded rewrite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, Self, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from phema.errors import PhemaError

__all__ = [
    "SILU_RMS",
    "Freezable",
    "FrozenModuleError",
    "MPConv",
    "MPFourier",
    "freeze",
    "is_frozen",
    "mp_cat",
    "mp_silu",
    "mp_sum",
    "normalize",
    "normalize_weights_",
    "pixel_norm",
    "resample",
    "resample_kernel",
]

SILU_RMS = 0.596
"""RMS of ``silu(x)`` for ``x ~ N(0, 1)``, to three digits (sqrt(E[silu(x)^2]) = 0.59647)."""

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class FrozenModuleError(PhemaError, RuntimeError):
    """A frozen (evaluation-only) network was asked to enter training mode."""


def normalize(x: Tensor, dim: int | tuple[int, ...] | None = None, eps: float = 1e-4) -> Tensor:
    """Scale ``x`` so that each slice over ``dim`` has unit RMS.

    ``normalize(x) = x / (eps + ||x||_dim / sqrt(n))`` with ``n`` the number of elements reduced
    over (default: every axis but the first, i.e. one slice per row / output channel / sample).
    The norm is computed in float32 (float64 for float64 inputs) whatever the dtype of ``x``. Dividing by the RMS gives unit
    magnitude exactly (up to ``eps``), for any input.
    """
    dims = tuple(range(1, x.ndim)) if dim is None else dim
    dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 for float64 inputs
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=dtype)
    n = x.numel() // max(norm.numel(), 1)
    norm = torch.add(eps, norm, alpha=1.0 / math.sqrt(n))
    return x / norm.to(x.dtype)


def pixel_norm(x: Tensor) -> Tensor:
    """Normalise each pixel's channel vector of an ``[N, C, H, W]`` tensor to unit RMS.

    Unit magnitude by construction: every pixel is divided by its own RMS over channels.
    """
    return normalize(x, dim=1)


def mp_silu(x: Tensor) -> Tensor:
    """Magnitude-preserving SiLU: ``silu(x) / 0.596``.

    For ``x ~ N(0, 1)``, ``E[silu(x)^2] = 0.59647^2``, so the output has unit expected RMS.
    """
    return F.silu(x) / SILU_RMS


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Magnitude-preserving weighted sum: ``((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)``.

    ``t`` is the weight of ``b``. For uncorrelated ``a`` and ``b`` of unit magnitude the variances
    add: ``E[((1-t) a + t b)^2] = (1-t)^2 + t^2``, which the denominator cancels.
    """
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Magnitude-preserving concatenation along ``dim``, ``t`` being the share given to ``b``.

    With ``Na`` and ``Nb`` channels and ``C = sqrt((Na + Nb) / ((1-t)^2 + t^2))``, ``a`` is scaled by
    ``C (1-t) / sqrt(Na)`` and ``b`` by ``C t / sqrt(Nb)``. If both inputs have unit RMS, the total
    sum of squares is ``C^2 ((1-t)^2 + t^2) = Na + Nb``: the output has unit RMS *exactly*, and the
    two parts carry energy in the ratio ``(1-t)^2 : t^2`` regardless of their widths.
    """
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    wa = c / math.sqrt(na) * (1 - t)
    wb = c / math.sqrt(nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def resample_kernel(f: Sequence[float]) -> tuple[float, ...]:
    """Check a separable resampling filter (EDM2's ``resample_filter``) and return it as floats.

    The filter is 1-D with an even, non-zero number of taps and a non-zero sum (it is normalised
    to sum 1); ``[1, 1]`` is the default 2x2 box, ``[1, 3, 3, 1]`` a smoother bilinear filter.
    """
    taps = tuple(float(v) for v in f)
    if not taps or len(taps) % 2 or not sum(taps):
        raise ValueError(
            f"resample_filter must be 1-D with an even number of taps and a non-zero sum, got {f!r}"
        )
    return taps


def resample(
    x: Tensor, mode: Literal["keep", "down", "up"] = "keep", f: Sequence[float] = (1, 1)
) -> Tensor:
    """Resample an ``[N, C, H, W]`` tensor by a factor of two.

    - ``"down"``: depthwise 2x2 box filter with stride 2, i.e. the mean of each 2x2 patch
      (EDM2's separable filter ``f = [1, 1] / 2``). It preserves any signal that is constant on
      2x2 patches; on white noise it halves the RMS (mean of four independent values), which is
      why every encoder block renormalises its pixels right after downsampling.
    - ``"up"``: nearest-neighbour 2x upsampling (transposed conv with ``4 * outer(f, f)``). Every
      value is repeated four times, so the RMS is preserved exactly.
    - ``"keep"``: identity.

    ``f`` is the separable filter (``resample_filter``): ``"down"`` is a depthwise stride-2 conv
    with ``outer(f, f) / sum(f)^2``, ``"up"`` a depthwise stride-2 transposed conv with four
    times that, both padded by ``(len(f) - 1) // 2`` so sizes halve or double exactly. The
    default ``(1, 1)`` takes the exact shortcuts above.
    """
    if mode == "keep":
        return x
    if mode not in ("down", "up"):
        raise ValueError(f"unknown resample mode {mode!r}; expected 'keep', 'down' or 'up'")
    if mode == "down" and (x.shape[-1] % 2 or x.shape[-2] % 2):
        raise ValueError(f"resample('down') needs even spatial sizes, got {tuple(x.shape[-2:])}")
    taps = resample_kernel(f)
    if len(set(taps)) == 1 and len(taps) == 2:  # the box filter: exact shortcuts
        if mode == "down":
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    k = torch.tensor(taps, dtype=torch.float32)
    k = torch.outer(k, k) / k.sum() ** 2
    c, pad = x.shape[1], (len(taps) - 1) // 2
    w = k.to(device=x.device, dtype=x.dtype).tile(c, 1, 1, 1)  # [C, 1, L, L], depthwise
    if mode == "down":
        return F.conv2d(x, w, groups=c, stride=2, padding=pad)
    return F.conv_transpose2d(x, w * 4, groups=c, stride=2, padding=pad)


class Freezable(nn.Module):
    """A module that :func:`freeze` can turn into an evaluation-only copy.

    Once frozen, ``.train(True)`` raises :class:`FrozenModuleError` before touching any state;
    ``.eval()`` / ``.train(False)`` stay allowed.
    """

    _frozen: bool = False

    @property
    def frozen(self) -> bool:
        """Whether this module is an evaluation-only copy (see :func:`freeze`)."""
        return self._frozen

    def train(self, mode: bool = True) -> Self:
        """Set training mode; refused with :class:`FrozenModuleError` on a frozen module."""
        if mode and self._frozen:
            raise FrozenModuleError(
                f"this {type(self).__name__} is a frozen evaluation copy (an EMA copy or a loaded "
                "snapshot); training mode would let forced weight normalisation rewrite its "
                "weights. Load its state_dict into a fresh, trainable network instead."
            )
        return super().train(mode)


def freeze(module: ModuleT) -> ModuleT:
    """Make ``module`` evaluation-only, in place, and return it.

    Puts the tree in eval mode, turns ``requires_grad`` off on every parameter, and marks every
    :class:`Freezable` inside so that ``.train(True)`` raises :class:`FrozenModuleError` and
    :class:`MPConv` never rewrites its weight. Irreversible by design.
    """
    module.eval()
    module.requires_grad_(False)
    for m in module.modules():
        if isinstance(m, Freezable):
            m._frozen = True
    return module


def is_frozen(module: nn.Module) -> bool:
    """Whether ``module`` contains a frozen :class:`Freezable` and none that is not."""
    flags = [m.frozen for m in module.modules() if isinstance(m, Freezable)]
    return bool(flags) and all(flags)


class MPConv(Freezable):
    """Magnitude-preserving linear layer (``kernel=()``) or 2-D convolution (``kernel=(k, k)``).

    The weight ``W`` of shape ``[out, in, *kernel]`` is initialised from ``N(0, 1)``; there is no
    bias. The forward pass uses ``w_o = gain * normalize(W_o) / sqrt(fan_in)`` for each output row
    ``o``, with ``fan_in = in * prod(kernel)``: every row has norm ``|gain|``. For inputs whose
    elements are uncorrelated with unit second moment, ``E[y_o^2] = ||w_o||^2 = gain^2``, so the
    layer preserves magnitude at ``gain = 1``. The weight is processed in float32 and cast to the
    input's dtype. Convolutions are zero-padded by ``k // 2`` ("same" size).

    Forced weight normalisation (``W <- normalize(W)`` in place) runs before each forward that is
    made for training; see the module docstring for the exact rule. A loop that normalises the
    weights itself (sharded training, :func:`normalize_weights_`) sets ``normalize_in_forward``
    to False.
    """

    normalize_in_forward: bool = True
    """Whether a forward made for training rewrites the weight (see :attr:`forces_normalization`)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...] = ()) -> None:
        super().__init__()
        if len(kernel) not in (0, 2):
            raise ValueError(f"kernel must be () (linear) or (k, k) (conv), got {kernel}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @property
    def forces_normalization(self) -> bool:
        """Whether the next forward pass rewrites ``weight`` to unit-RMS rows in place."""
        return (
            self.training
            and not self._frozen
            and self.weight.requires_grad
            and torch.is_grad_enabled()
            and self.normalize_in_forward
        )

    def forward(self, x: Tensor, gain: float | Tensor = 1.0) -> Tensor:
        w = self.weight.to(torch.float32)
        if self.forces_normalization:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)
        w = w * (gain / math.sqrt(w[0].numel()))
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    def extra_repr(self) -> str:
        kernel = tuple(self.weight.shape[2:])
        return f"{self.in_channels}, {self.out_channels}, kernel={kernel}"


@torch.no_grad()
def normalize_weights_(module: nn.Module) -> None:
    """Forced weight normalisation, now, of every trainable :class:`MPConv` under ``module``.

    Each weight is rewritten in place to ``normalize(weight)``, as a forward made for training
    does (the same rule: training mode, not frozen, ``requires_grad``). For a weight sharded
    with FSDP2 (a ``DTensor`` of whole rows) only this rank's rows are rewritten, with no
    collective: rows are normalised independently, so the result is the unsharded rewrite's.
    Call it between optimizer steps, while the sharded parameters are registered.
    """
    for m in module.modules():
        if not (isinstance(m, MPConv) and m.training and not m.frozen and m.weight.requires_grad):
            continue
        w = m.weight
        local = w.to_local() if isinstance(w, DTensor) else w
        if local.numel():  # a rank may hold no rows of a small tensor
            local.copy_(normalize(local.to(torch.float32)))


class MPFourier(nn.Module):
    """Random Fourier features of a scalar per sample: ``sqrt(2) cos(2 pi (f x + p))``.

    Buffers ``freqs = 2 pi f`` with ``f ~ N(0, bandwidth^2)`` and ``phases = 2 pi p`` with
    ``p ~ U[0, 1)``; the output for ``x`` of shape ``[N]`` is ``[N, num_channels]``, computed in
    float32 and cast to ``x.dtype``. For a uniformly random phase ``E[2 cos^2] = 1``: each
    feature, hence the output, has unit expected magnitude for any ``x``.
    """

    freqs: Tensor
    phases: Tensor

    def __init__(self, num_channels: int, bandwidth: float = 1.0) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        y = x.to(torch.float32).reshape(-1)
        y = torch.outer(y, self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_channels}"
