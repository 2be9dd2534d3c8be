"""EDM2 Config G network: residual :class:`Block`, :class:`UNet` and the :class:`Precond` wrapper.

Module and parameter names, shapes and registration order follow the official network
(``unet.enc["64x64_block0"].conv_res0.weight``, ``unet.emb_fourier.freqs``, ``logvar_linear.weight``,
...), so official weights can be ported by a name map. The code is our own, written from the paper
(Karras et al. 2024, Appendix B) and the notes in ``shared/spec/edm2.md``.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from edm2_reference.mp import (
    Freezable,
    MPConv,
    MPFourier,
    freeze,
    mp_cat,
    mp_silu,
    mp_sum,
    normalize,
    pixel_norm,
    resample,
    resample_kernel,
)

__all__ = ["Block", "Precond", "UNet"]


class Block(Freezable):
    """Residual block of Config G, in encoder (``"enc"``) or decoder (``"dec"``) flavour.

    With ``x`` the (resampled) input and ``e`` the embedding::

        enc: x <- pixel_norm(conv_skip(x))            (conv_skip only if in != out)
        y  = conv_res0(mp_silu(x))
        y  = mp_silu(y * (1 + emb_linear(e, gain=emb_gain)))    (per channel; emb_gain starts at 0)
        y  = conv_res1(dropout(y))
        dec: x <- conv_skip(x)                        (only if in != out)
        x  = mp_sum(x, y, res_balance)                (0.7 x + 0.3 y, renormalised)
        x  = mp_sum(x, attn_proj(attention(attn_qkv(x))), attn_balance)   (if attention)
        x  = clip(x, -clip_act, clip_act)

    Each step preserves unit magnitude at initialisation (see :mod:`edm2_reference.mp`), except
    the attention average: a softmax-weighted mean of unit vectors has RMS at most 1, so an
    attention block's output RMS lies between ``0.7 / sqrt(0.58) = 0.919`` and 1.

    Attention is cosine attention with ``channels_per_head`` channels per head:
    ``attn_qkv(x)`` is read as ``[N, heads, channels_per_head, 3, H*W]`` (head-major, then
    channel, then q/k/v innermost: the official channel order), each of q, k, v is normalised to
    unit RMS over its channels, and ``softmax(q.k / sqrt(channels_per_head)) v`` is taken over
    the pixels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: Literal["enc", "dec"] = "enc",
        resample_mode: Literal["keep", "down", "up"] = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
    ) -> None:
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"flavor must be 'enc' or 'dec', got {flavor!r}")
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.resample_filter = resample_kernel(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(
            out_channels if flavor == "enc" else in_channels, out_channels, (3, 3)
        )
        self.emb_linear = MPConv(emb_channels, out_channels)
        self.conv_res1 = MPConv(out_channels, out_channels, (3, 3))
        self.conv_skip = (
            MPConv(in_channels, out_channels, (1, 1)) if in_channels != out_channels else None
        )
        self.attn_qkv = MPConv(out_channels, out_channels * 3, (1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, (1, 1)) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_mode, self.resample_filter)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = pixel_norm(x)

        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)

        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)

        if self.num_heads:
            x = mp_sum(x, self.attention_branch(x), self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp_(-self.clip_act, self.clip_act)
        return x

    def attention_branch(self, x: Tensor) -> Tensor:
        """``attn_proj(attention(attn_qkv(x)))`` for ``x`` of shape ``[N, out_channels, H, W]``."""
        if self.attn_qkv is None or self.attn_proj is None:
            raise ValueError("this block has no attention")
        n, c, h, w = x.shape
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, c // self.num_heads, 3, h * w)
        q, k, v = normalize(qkv, dim=2).unbind(3)  # each [N, heads, ch, HW]
        # SDPA wants [N, heads, tokens, ch]; its default scale is 1/sqrt(ch).
        y = F.scaled_dot_product_attention(q.mT, k.mT, v.mT)  # [N, heads, HW, ch]
        out: Tensor = self.attn_proj(y.mT.reshape(n, c, h, w))
        return out


class UNet(Freezable):
    """Config G U-Net: ``F(x, c_noise, labels)`` on ``[N, img_channels, R, R]`` inputs.

    Level ``l`` works at resolution ``R / 2^l`` with ``model_channels * channel_mult[l]``
    channels. The noise Fourier features have ``model_channels * channel_mult_noise`` channels
    (default ``model_channels * channel_mult[0]``), the embedding ``model_channels *
    channel_mult_emb`` (default ``model_channels * max(channel_mult)``). The embedding is
    ``mp_silu(mp_sum(emb_noise(emb_fourier(c_noise)), emb_label(labels * sqrt(label_dim)), 0.5))``
    and is always computed in float32 (one-hot labels times ``sqrt(label_dim)`` have unit RMS).

    Encoder (``enc``): ``RxR_conv`` (3x3 conv on the input with a ones channel appended) at the top
    level, ``RxR_down`` at the others, then ``RxR_block0 .. block{num_blocks-1}``; each output is
    kept as a skip. Decoder (``dec``): ``RxR_in0`` (attention) and ``RxR_in1`` at the lowest
    level, ``RxR_up`` at the others, then ``num_blocks + 1`` blocks, each fed
    ``mp_cat(x, skip, t=concat_balance)``. The ``blockN`` blocks at ``attn_resolutions`` have
    attention, and so does ``in0``; ``down``, ``up`` and ``in1`` blocks never do. The
    output is ``out_conv(x, gain=out_gain)``, and ``out_gain`` starts at 0, so ``F = 0`` at init.
    ``resample_filter`` is the separable filter of the down and up blocks (see
    :func:`edm2_reference.mp.resample`).

    Spatial sizes: every level but the last halves the size, and the decoder concatenates each
    upsampled map with the encoder's skip of the same level, so both the constructor's
    ``img_resolution`` and each input's height and width must be divisible by
    ``2^(len(channel_mult) - 1)``. An odd size at a down block would be floored by the stride-2
    filter and the skip concatenation would then fail; both are refused up front here, with
    the size named.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        *,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        resample_filter: Sequence[float] = (1, 1),
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
    ) -> None:
        super().__init__()
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(
                f"img_resolution {img_resolution} cannot be halved {len(channel_mult) - 1} times"
            )
        cblock = [model_channels * m for m in channel_mult]
        cnoise = (
            model_channels * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        )
        cemb = model_channels * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.levels = len(cblock)
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))

        block = functools.partial(
            Block,
            emb_channels=cemb,
            resample_filter=resample_filter,
            channels_per_head=channels_per_head,
            dropout=dropout,
            res_balance=res_balance,
            attn_balance=attn_balance,
            clip_act=clip_act,
        )

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb)
        self.emb_label = MPConv(label_dim, cemb) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = img_channels + 1
        skips: list[int] = []
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, (3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = block(
                    cout, cout, flavor="enc", resample_mode="down"
                )
            skips.append(cout)
            for idx in range(num_blocks):
                cin, cout = cout, channels
                attn = res in attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = block(cin, cout, flavor="enc", attention=attn)
                skips.append(cout)

        self.dec = nn.ModuleDict()
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = block(cout, cout, flavor="dec", attention=True)
                self.dec[f"{res}x{res}_in1"] = block(cout, cout, flavor="dec")
            else:
                self.dec[f"{res}x{res}_up"] = block(cout, cout, flavor="dec", resample_mode="up")
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), channels
                attn = res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = block(cin, cout, flavor="dec", attention=attn)
        self.out_conv = MPConv(cout, img_channels, (3, 3))

    def embedding(self, noise_labels: Tensor, class_labels: Tensor | None) -> Tensor:
        """The float32 embedding ``[N, cemb]`` fed to every block."""
        emb = self.emb_noise(self.emb_fourier(noise_labels.to(torch.float32)))
        if self.emb_label is not None:
            if class_labels is None:
                raise ValueError(f"this UNet is conditional (label_dim {self.label_dim})")
            labels = class_labels.to(torch.float32)
            emb = mp_sum(
                emb, self.emb_label(labels * math.sqrt(labels.shape[1])), self.label_balance
            )
        return mp_silu(emb)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None) -> Tensor:
        step = 1 << (self.levels - 1)
        if x.shape[-1] % step or x.shape[-2] % step:
            raise ValueError(
                f"input size {tuple(x.shape[-2:])} cannot be halved {self.levels - 1} times: "
                f"height and width must be multiples of {step}"
            )
        emb = self.embedding(noise_labels, class_labels)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for module in self.enc.values():
            x = module(x) if isinstance(module, MPConv) else module(x, emb)
            skips.append(x)
        for name, module in self.dec.items():
            if "block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        out: Tensor = self.out_conv(x, gain=self.out_gain)
        return out


class Precond(Freezable):
    """EDM preconditioning around the Config G :class:`UNet`, plus the learned uncertainty head.

    With ``s = sigma`` and ``sd = sigma_data``::

        c_skip = sd^2 / (s^2 + sd^2)        c_out = s sd / sqrt(s^2 + sd^2)
        c_in   = 1 / sqrt(s^2 + sd^2)       c_noise = ln(s) / 4
        D(x; s) = c_skip x + c_out F(c_in x, c_noise, labels)
        u(s)    = logvar_linear(logvar_fourier(c_noise))     (MPFourier(128) -> MPConv(128 -> 1))

    ``c_in`` scales a noisy image of variance ``sd^2 + s^2`` to unit variance; ``c_skip`` and
    ``c_out`` make the network's target unit-variance (Karras et al. 2022, Table 1). The trunk runs
    in float16 only when ``use_fp16`` is set and the input is on CUDA; everything else is float32.

    Evaluation copies: :meth:`frozen_copy` returns an eval-mode, ``requires_grad=False`` copy
    whose ``.train(True)`` raises :class:`edm2_reference.mp.FrozenModuleError`; :meth:`freeze`
    does the same in place.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int,
        *,
        use_fp16: bool = True,
        sigma_data: float = 0.5,
        logvar_channels: int = 128,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        resample_filter: Sequence[float] = (1, 1),
        channels_per_head: int = 64,
        dropout: float = 0.0,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256.0,
    ) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_data = sigma_data
        self.unet = UNet(
            img_resolution,
            img_channels,
            label_dim,
            model_channels=model_channels,
            channel_mult=channel_mult,
            channel_mult_noise=channel_mult_noise,
            channel_mult_emb=channel_mult_emb,
            num_blocks=num_blocks,
            attn_resolutions=attn_resolutions,
            label_balance=label_balance,
            concat_balance=concat_balance,
            resample_filter=resample_filter,
            channels_per_head=channels_per_head,
            dropout=dropout,
            res_balance=res_balance,
            attn_balance=attn_balance,
            clip_act=clip_act,
        )
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for ``sigma`` (any shape, computed in float32)."""
        s = sigma.to(torch.float32)
        sd = self.sigma_data
        var = s**2 + sd**2
        return sd**2 / var, s * sd / var.sqrt(), var.rsqrt(), s.log() / 4

    def _sigma(self, sigma: float | Tensor, n: int, device: torch.device) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32, device=device).reshape(-1)
        if s.numel() == 1:
            return s.expand(n)
        if s.numel() != n:
            raise ValueError(f"sigma has {s.numel()} values for a batch of {n} images")
        return s

    def _labels(self, labels: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        if not self.label_dim:
            return None
        if labels is None:  # a zero label vector, as the official network does
            return torch.zeros(n, self.label_dim, device=device)
        if not labels.is_floating_point() and labels.ndim == 1:  # class indices
            labels = F.one_hot(labels.long(), self.label_dim)
        if labels.ndim != 2 or labels.shape[1] != self.label_dim or labels.shape[0] not in (1, n):
            raise ValueError(
                f"class_labels must be [{n}, {self.label_dim}] or [{n}] indices, "
                f"got {tuple(labels.shape)}"
            )
        return labels.to(device=device, dtype=torch.float32).expand(n, -1)

    @overload
    def forward(
        self,
        x: Tensor,
        sigma: float | Tensor,
        class_labels: Tensor | None = ...,
        force_fp32: bool = ...,
        return_logvar: Literal[False] = ...,
        **unet_kwargs: Any,
    ) -> Tensor: ...

    @overload
    def forward(
        self,
        x: Tensor,
        sigma: float | Tensor,
        class_labels: Tensor | None,
        force_fp32: bool,
        return_logvar: Literal[True],
        **unet_kwargs: Any,
    ) -> tuple[Tensor, Tensor]: ...

    @overload
    def forward(
        self,
        x: Tensor,
        sigma: float | Tensor,
        class_labels: Tensor | None = ...,
        force_fp32: bool = ...,
        *,
        return_logvar: Literal[True],
        **unet_kwargs: Any,
    ) -> tuple[Tensor, Tensor]: ...

    def forward(
        self,
        x: Tensor,
        sigma: float | Tensor,
        class_labels: Tensor | None = None,
        force_fp32: bool = False,
        return_logvar: bool = False,
        **unet_kwargs: Any,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Denoise ``x`` ``[N, C, H, W]`` at noise level ``sigma`` (scalar or one per image).

        The official signature and order: ``(x, sigma, class_labels=None, force_fp32=False,
        return_logvar=False, **unet_kwargs)``; ``unet_kwargs`` go to :meth:`UNet.forward`.
        ``class_labels``: ``[N, label_dim]`` one-hot (or soft) labels, or ``[N]`` integer class
        indices; ``None`` gives zero labels. ``force_fp32`` keeps the trunk in float32 on CUDA.
        Returns ``D`` (float32, like ``x``), or ``(D, u)`` with ``u`` of shape ``[N, 1, 1, 1]``
        when ``return_logvar``.
        """
        x = x.to(torch.float32)
        n = x.shape[0]
        sigma_n = self._sigma(sigma, n, x.device)
        labels = self._labels(class_labels, n, x.device)
        on_cuda = x.device.type == "cuda"
        dtype = torch.float16 if self.use_fp16 and on_cuda and not force_fp32 else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma_n.reshape(-1, 1, 1, 1))
        f: Tensor = self.unet((c_in * x).to(dtype), c_noise.flatten(), labels, **unet_kwargs)
        d = c_skip * x + c_out * f.to(torch.float32)
        if not return_logvar:
            return d
        logvar: Tensor = self.logvar_linear(self.logvar_fourier(c_noise.flatten())).reshape(
            -1, 1, 1, 1
        )
        return d, logvar

    def freeze(self) -> Precond:
        """Make this network an evaluation-only copy, in place (see :func:`edm2_reference.mp.freeze`)."""
        return freeze(self)

    def frozen_copy(self) -> Precond:
        """A deep copy in eval mode with ``requires_grad=False`` that refuses ``.train(True)``.

        Use it for EMA copies and loaded snapshots: its weights can never be rewritten by forced
        weight normalisation. ``self`` is left untouched.
        """
        return freeze(copy.deepcopy(self))
