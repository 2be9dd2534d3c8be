"""edm2_reference on official EDM2 networks: snapshot pickles, the official forward order and
the official constructor options (channel_mult_noise, channel_mult_emb, resample_filter)."""

from __future__ import annotations

import os
import sys

import pytest
import safetensors.torch
import torch

from edm2_reference.mp import resample
from edm2_reference.network import Precond
from edm2_reference.official import OfficialNetworkError, load_official_network, precond_kwargs
from edm2_reference.sample import load_network, main
from edm2_reference.sampler import generate

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from official_pickles import DIGITS8_KWARGS, official_snapshot
from rangeserver import serve

KWARGS = DIGITS8_KWARGS


def _main(argv: list[str]) -> int:
    """``python -m edm2_reference.sample`` in-process; its exit status."""
    try:
        main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    return 0


def _random_fp16_net(**kwargs) -> Precond:
    """A Precond with random (non-zero gain) weights, stored in fp16 like official snapshots."""
    torch.manual_seed(3)
    net = Precond(**precond_kwargs(kwargs))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 0 else 1.0))
    return net.half()


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(fixture.pkl, the same fp16 weights as safetensors, the state dict)."""
    root = tmp_path_factory.mktemp("official")
    net = _random_fp16_net(**KWARGS)
    pkl = root / "network-snapshot-0000512-0.100.pkl"
    pkl.write_bytes(official_snapshot(net, KWARGS))
    sft = root / "same.safetensors"
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    safetensors.torch.save_file(state, str(sft))
    return pkl, sft, state


def test_loads_the_recorded_architecture_and_weights(official):
    pkl, _, state = official
    loaded = load_official_network(str(pkl))
    assert loaded.encoder == "StandardRGBEncoder"
    assert loaded.init_kwargs["channel_mult"] == (1, 2)
    got = loaded.net.state_dict()
    assert list(got) == list(state)  # same names, same order
    for k, v in state.items():
        assert got[k].dtype == torch.float32  # fp16 weights upcast exactly
        assert torch.equal(got[k], v.float()), k
    assert not loaded.net.training
    assert loaded.index.bytes_read < loaded.index.size


def test_a_url_loads_by_ranged_reads_each_byte_once(official, tmp_path):
    pkl, _, state = official
    with serve(str(pkl.parent)) as (url, log):
        loaded = load_official_network(f"{url}/{pkl.name}")
        first = list(log.gets)
        png = tmp_path / "url.png"
        args = ["--net", f"{url}/{pkl.name}", "--seeds", "0-2", "--steps", "3", "--out", str(png)]
        assert _main([*args, "--device", "cpu"]) == 0
    got = loaded.net.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v.float()), k
    tensor_bytes = sum(v.numel() * v.element_size() for v in state.values())
    assert sum(e - s for _, s, e in first) == loaded.index.bytes_read + tensor_bytes
    local = tmp_path / "local.png"
    args = ["--net", str(pkl), "--seeds", "0-2", "--steps", "3", "--out", str(local)]
    assert _main([*args, "--device", "cpu"]) == 0
    assert png.read_bytes() == local.read_bytes()


def test_sampling_the_pickle_equals_sampling_the_safetensors(official, tmp_path):
    """Bitwise: both load the identical fp16 values into fp32 parameters and run the same code."""
    pkl, sft, _ = official
    a = load_official_network(str(pkl)).net
    b = load_network(str(sft), "digits8", label_dim=10, img_resolution=8, img_channels=1)
    kw = {"num_classes": 10, "batch_size": 3, "num_steps": 3}
    img_a = generate(a, [0, 1, 2], (1, 8, 8), **kw)
    img_b = generate(b, [0, 1, 2], (1, 8, 8), **kw)
    assert img_a.abs().sum() > 0
    assert torch.equal(img_a, img_b)
    pngs = []
    for src in (pkl, sft):
        png = tmp_path / f"{src.suffix[1:]}.png"
        args = ["--net", str(src), "--seeds", "0-2", "--steps", "3", "--out", str(png)]
        assert _main([*args, "--device", "cpu"]) == 0
        pngs.append(png.read_bytes())
    assert pngs[0] == pngs[1]


def test_latent_and_unknown_encoders_are_refused(tmp_path, capsys):
    kwargs = dict(KWARGS, img_channels=4)
    net = _random_fp16_net(**kwargs)
    pkl = tmp_path / "latent.pkl"
    pkl.write_bytes(official_snapshot(net, kwargs, encoder="StabilityVAEEncoder"))
    with pytest.raises(OfficialNetworkError, match=r"StabilityVAEEncoder.*latent.*VAE"):
        load_official_network(str(pkl), require_rgb=True)
    assert load_official_network(str(pkl)).encoder == "StabilityVAEEncoder"  # the net alone
    png = tmp_path / "x.png"
    assert _main(["--net", str(pkl), "--seeds", "0", "--steps", "2", "--out", str(png)]) == 1
    assert "StabilityVAEEncoder" in capsys.readouterr().err
    assert not png.exists()
    other = tmp_path / "other.pkl"
    other.write_bytes(official_snapshot(net, kwargs, encoder="MyEncoder"))
    with pytest.raises(OfficialNetworkError, match="MyEncoder"):
        load_official_network(str(other), require_rgb=True)
    # no encoder entry: the official sampler's default, StandardRGBEncoder
    none = tmp_path / "none.pkl"
    none.write_bytes(official_snapshot(net, kwargs, encoder=None))
    assert load_official_network(str(none)).encoder == "StandardRGBEncoder"


def test_unknown_kwargs_are_refused_by_name(tmp_path):
    net = _random_fp16_net(**KWARGS)
    pkl = tmp_path / "odd.pkl"
    pkl.write_bytes(official_snapshot(net, dict(KWARGS, fancy_mode=True, zeta=2)))
    with pytest.raises(OfficialNetworkError, match="know: fancy_mode, zeta; known: img_resolution"):
        load_official_network(str(pkl))
    with pytest.raises(OfficialNetworkError, match="no img_channels"):
        precond_kwargs({"img_resolution": 8, "label_dim": 0})
    assert precond_kwargs({"model_channels": 8}, (8, 1, 0))["img_channels"] == 1
    with pytest.raises(OfficialNetworkError, match="both by position and by name"):
        precond_kwargs({"img_resolution": 8}, (8, 1, 0))


def test_tensors_that_do_not_fit_are_refused_before_reading(tmp_path):
    net = _random_fp16_net(**KWARGS)
    pkl = tmp_path / "wrong.pkl"
    pkl.write_bytes(official_snapshot(net, dict(KWARGS, model_channels=16)))
    with pytest.raises(OfficialNetworkError, match="shape mismatches"):
        load_official_network(str(pkl))


def test_forward_takes_the_official_positional_order():
    torch.manual_seed(0)
    net = Precond(**precond_kwargs(KWARGS)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    x, sigma, labels = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0]), torch.tensor([1, 7])
    with torch.no_grad():
        d, logvar = net(x, sigma, labels, False, True)  # (x, sigma, class_labels, fp32, logvar)
        assert torch.equal(d, net(x, sigma, labels, force_fp32=True))
        assert torch.equal(d, net(x, sigma, class_labels=labels, return_logvar=False))
        assert logvar.shape == (2, 1, 1, 1)
        assert isinstance(net(x, sigma, labels, True), torch.Tensor)  # 4th is force_fp32
        with pytest.raises(TypeError, match="bogus"):  # **unet_kwargs reach UNet.forward
            net(x, sigma, labels, bogus=1)


def _shapes(**kw) -> dict[str, tuple[int, ...]]:
    args = {"model_channels": 8, "channel_mult": (1, 2), "num_blocks": 1, "attn_resolutions": ()}
    net = Precond(8, 1, 3, **(args | kw))
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def test_channel_mult_noise_and_emb_set_the_embedding_widths():
    base = _shapes()
    assert base["unet.emb_fourier.freqs"] == (8,)  # cnoise = model_channels * channel_mult[0]
    assert base["unet.emb_noise.weight"] == (16, 8)  # cemb = model_channels * max(channel_mult)
    assert base["unet.enc.8x8_block0.emb_linear.weight"] == (8, 16)
    wide = _shapes(channel_mult_noise=3, channel_mult_emb=5)
    assert wide["unet.emb_fourier.freqs"] == (24,)
    assert wide["unet.emb_noise.weight"] == (40, 24)
    assert wide["unet.emb_label.weight"] == (40, 3)
    assert wide["unet.enc.8x8_block0.emb_linear.weight"] == (8, 40)
    assert wide["unet.dec.4x4_in0.emb_linear.weight"] == (16, 40)
    assert _shapes(channel_mult=(2, 3))["unet.emb_fourier.freqs"] == (16,)  # cblock[0]
    # everything else is unchanged, and the logvar head never depends on them
    changed = {k for k in base if base[k] != wide[k]}
    assert all("emb" in k for k in changed)
    assert _shapes(resample_filter=[1, 3, 3, 1]) == base  # the filter holds no parameters


def test_resample_filter():
    x = torch.randn(2, 3, 8, 8)
    assert torch.allclose(resample(x, "down", [1, 1]), resample(x, "down", [2, 2]))
    assert torch.equal(resample(x, "up", (1, 1)), resample(x, "up"))
    f = [1, 3, 3, 1]
    down, up = resample(x, "down", f), resample(x, "up", f)
    assert down.shape == (2, 3, 4, 4)
    assert up.shape == (2, 3, 16, 16)
    ones = torch.ones(1, 1, 8, 8)  # normalised: a constant stays constant away from the border
    assert torch.allclose(resample(ones, "down", f)[..., 1:-1, 1:-1], torch.ones(1, 1, 2, 2))
    assert torch.allclose(resample(ones, "up", f)[..., 2:-2, 2:-2], torch.ones(1, 1, 12, 12))
    # down at the centre: the normalised outer([1,3,3,1]) weighted sum of a 4x4 patch
    k = torch.tensor(f, dtype=torch.float32)
    k = torch.outer(k, k) / 64
    assert torch.allclose(down[0, 0, 1, 1], (x[0, 0, 1:5, 1:5] * k).sum())
    for bad in ([1, 2, 1], [], [1, -1]):
        with pytest.raises(ValueError, match="resample_filter"):
            Precond(8, 1, 0, model_channels=8, channel_mult=(1, 2), resample_filter=bad)
    net = Precond(8, 1, 0, model_channels=8, channel_mult=(1, 2), resample_filter=f)
    assert net.unet.enc["4x4_down"].resample_filter == (1.0, 3.0, 3.0, 1.0)
    out = net(torch.randn(1, 1, 8, 8), 1.0)
    assert out.shape == (1, 1, 8, 8)


def test_odd_sizes_are_refused_with_the_size_named():
    net = Precond(8, 1, 0, model_channels=8, channel_mult=(1, 2), attn_resolutions=())
    with pytest.raises(ValueError, match=r"input size \(7, 8\) cannot be halved 1 times"):
        net(torch.randn(1, 1, 7, 8), 1.0)
    with pytest.raises(ValueError, match="cannot be halved"):
        Precond(9, 1, 0, model_channels=8, channel_mult=(1, 2))
    one_level = Precond(7, 1, 0, model_channels=8, channel_mult=(1,), attn_resolutions=())
    assert one_level(torch.randn(1, 1, 7, 7), 1.0).shape == (1, 1, 7, 7)  # nothing to halve
    assert net(torch.randn(1, 1, 12, 16), 1.0).shape == (1, 1, 12, 16)  # any even size


def test_file_sizes_are_checked_before_anything_is_allocated(tmp_path, monkeypatch):
    net = _random_fp16_net(**KWARGS)
    pkl = tmp_path / "huge.pkl"
    pkl.write_bytes(official_snapshot(net, dict(KWARGS, model_channels=10**6)))
    with pytest.raises(OfficialNetworkError, match="shape mismatches"):
        load_official_network(str(pkl))  # on the meta device: no 10**6-channel allocation
    import functools

    @functools.wraps(Precond.__init__)  # the same signature, for precond_kwargs
    def fails(self, *args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: not enough memory")

    monkeypatch.setattr(Precond, "__init__", fails)
    with pytest.raises(OfficialNetworkError, match=r"huge\.pkl: Precond\(.*RuntimeError"):
        load_official_network(str(pkl))
