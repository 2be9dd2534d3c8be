"""Presets: official parameter counts (built on the meta device), hyper-parameters, building."""

import dataclasses

import pytest
import torch

from edm2_reference.presets import PRESETS, Preset, PresetError, build_precond, get_preset

# Parameter counts of the official networks at label_dim 1000 (shared/spec/edm2.md, section 4.5),
# with (model_channels, duration in Mi images, lr_ref, dropout).
OFFICIAL = {
    "img512-xxs": (31_309_029, 64, 2048, 0.0170, 0.0),
    "img512-xs": (124_713_253, 128, 2048, 0.0120, 0.0),
    "img512-s": (280_212_837, 192, 2048, 0.0100, 0.0),
    "img512-m": (497_807_781, 256, 2048, 0.0090, 0.1),
    "img512-l": (777_498_085, 320, 1792, 0.0080, 0.1),
    "img512-xl": (1_119_283_749, 384, 1280, 0.0070, 0.1),
    "img512-xxl": (1_523_164_773, 448, 896, 0.0065, 0.1),
    "img64-xs": (124_710_949, 128, 1024, 0.0120, 0.0),
    "img64-s": (280_209_381, 192, 1024, 0.0100, 0.0),
    "img64-m": (497_803_173, 256, 2048, 0.0090, 0.1),
    "img64-l": (777_492_325, 320, 1024, 0.0080, 0.1),
    "img64-xl": (1_119_276_837, 384, 640, 0.0070, 0.1),
}

# Our own small presets at their default label_dim (10).
SMALL = {"cifar32": 37_874_205, "mnist28": 1_201_776, "digits8": 722_539, "mnist8": 722_539}


def count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_parameter_counts_on_the_meta_device(name):
    net = build_precond(name, label_dim=1000, device="meta")
    assert net.unet.out_gain.device.type == "meta"
    assert count(net) == OFFICIAL[name][0] == get_preset(name).official_params


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_hyper_parameters(name):
    p = get_preset(name)
    _, channels, duration_mi, lr, dropout = OFFICIAL[name]
    latent = name.startswith("img512")
    net, tr = p.network, p.training
    assert (net.img_resolution, net.img_channels) == (64, 4 if latent else 3)
    assert (net.model_channels, net.dropout) == (channels, dropout)
    assert (net.channel_mult, net.num_blocks, net.attn_resolutions) == ((1, 2, 3, 4), 3, (16, 8))
    assert (net.sigma_data, net.logvar_channels, net.use_fp16) == (0.5, 128, True)
    assert tr.batch_size == 2048
    assert tr.duration_nimg == duration_mi << 20
    assert tr.lr_ref == lr
    assert tr.decay_batches == (70000 if latent else 35000)
    assert (tr.p_mean, tr.p_std) == ((-0.4, 1.0) if latent else (-0.8, 1.6))
    assert (tr.rampup_nimg, tr.adam_betas, tr.ema_stds) == (10_000_000, (0.9, 0.99), (0.05, 0.1))
    assert tr.snapshot_nimg == 8 << 20
    assert p.label_dim == 1000
    assert p.encoder == ("stability-vae" if latent else "rgb")


@pytest.mark.parametrize("name", list(SMALL))
def test_small_preset_parameter_counts(name):
    assert count(build_precond(name, device="meta")) == SMALL[name]


def test_digits8_is_well_under_a_million_parameters_and_fits_its_data():
    p = get_preset("digits8")
    assert SMALL["digits8"] < 750_000
    assert (p.network.img_resolution, p.network.img_channels, p.dataset) == (8, 1, "digits")
    assert (p.training.p_mean, p.training.p_std) == (-1.2, 1.2)


def test_mnist8_is_digits8_on_downsampled_mnist_with_a_shorter_schedule():
    digits8, mnist8 = get_preset("digits8"), get_preset("mnist8")
    assert mnist8.network == digits8.network
    assert mnist8.training == dataclasses.replace(digits8.training, duration_nimg=64 * 1024)
    assert (mnist8.dataset, mnist8.label_dim) == ("mnist8", 10)


def test_small_preset_cadences_are_whole_batches_and_kimg():
    # Snapshot names store kimg and the EDM2 reader assumes multiples of 1024 images.
    for p in PRESETS.values():
        tr = p.training
        for nimg in (tr.snapshot_nimg, tr.checkpoint_nimg, tr.status_nimg, tr.duration_nimg):
            assert nimg % tr.batch_size == 0
            assert nimg % 1024 == 0


def test_learning_rate_schedule():
    tr = get_preset("img64-xs").training
    t_ref = 35000 * 2048
    assert tr.learning_rate(0) == 0.0
    assert tr.learning_rate(5_000_000) == pytest.approx(0.012 / 2)  # half-way through the ramp
    assert tr.learning_rate(10_000_000) == pytest.approx(0.012)
    assert tr.learning_rate(t_ref) == pytest.approx(0.012)
    assert tr.learning_rate(4 * t_ref) == pytest.approx(0.012 / 2)  # 1 / sqrt(4)


def test_build_precond_overrides_and_label_dim():
    xxs = build_precond("img512-xs", label_dim=1000, device="meta", model_channels=64)
    assert count(xxs) == OFFICIAL["img512-xxs"][0]
    uncond = build_precond("img512-xs", label_dim=0, device="meta")
    assert uncond.unet.emb_label is None
    assert count(uncond) == OFFICIAL["img512-xs"][0] - 1000 * 4 * 128
    net = build_precond("digits8", dropout=0.2, attn_resolutions=[8, 4])
    assert net.unet.enc["8x8_block0"].dropout == 0.2
    assert net.label_dim == 10
    assert net.unet.enc["8x8_block0"].num_heads == 0  # 32 channels: fewer than 64 per head
    assert net.unet.enc["4x4_block0"].num_heads == 1
    assert net.unet.out_gain.device.type == "cpu"


def test_build_precond_accepts_a_preset_object():
    p = dataclasses.replace(get_preset("digits8"), label_dim=0)
    assert isinstance(p, Preset)
    assert build_precond(p, device="meta").label_dim == 0


def test_unknown_names_and_overrides_raise():
    with pytest.raises(
        PresetError, match=r"unknown preset 'img512-xxxl'; choose from img512-xxs, img512-xs"
    ):
        get_preset("img512-xxxl")
    with pytest.raises(ValueError, match=r"unknown network override\(s\) \['channels'\]"):
        build_precond("digits8", channels=3)


def test_presets_are_read_only_data():
    with pytest.raises(TypeError):
        PRESETS["mine"] = get_preset("digits8")  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_preset("digits8").network.model_channels = 8  # type: ignore[misc]
