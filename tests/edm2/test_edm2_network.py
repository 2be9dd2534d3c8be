"""Config G Block / UNet / Precond: structure, magnitudes at init, attention, preconditioning.

Magnitude checks measure the per-image mean square (i.i.d. over images, so its standard error
``se`` comes from the sample) on pixels at least two away from the border (two zero-padded 3x3
convs shrink border pixels). Given the weights, the expected mean square is 1 up to a
weight-draw term: conv_res0 sees mp_silu outputs of mean mu = 0.35, which adds
mu^2 ((sum_i w_oi)^2 - 1) per channel, averaging out over channels to about
0.12 sqrt(2 / 64) = 0.02 at 64 channels (the spread we see across seeds is +-0.02). Tolerance on
the mean square: 5 se + 0.05.
"""

import math

import pytest
import torch

from edm2_reference.mp import mp_silu, pixel_norm
from edm2_reference.network import Block, Precond, UNet

EMB = 128
WEIGHT_DRAW = 0.05
ATTN_FLOOR = 0.49 / 0.58  # mean square of mp_sum(x, y, 0.3) when the attention branch is 0


def interior_ms(y: torch.Tensor, border: int = 2) -> tuple[float, float]:
    m = y[..., border:-border, border:-border].double().pow(2).flatten(1).mean(1)
    return m.mean().item(), (m.std() / math.sqrt(len(m))).item()


BLOCKS = {
    "enc": {"in_channels": 64, "out_channels": 64, "flavor": "enc"},
    "enc-skip": {"in_channels": 32, "out_channels": 64, "flavor": "enc"},
    "enc-down": {"in_channels": 64, "out_channels": 64, "flavor": "enc", "resample_mode": "down"},
    "dec": {"in_channels": 64, "out_channels": 64, "flavor": "dec"},
    "dec-skip": {"in_channels": 128, "out_channels": 64, "flavor": "dec"},
    "dec-up": {"in_channels": 64, "out_channels": 64, "flavor": "dec", "resample_mode": "up"},
    "enc-attn": {"in_channels": 128, "out_channels": 128, "flavor": "enc", "attention": True},
    "dec-attn": {"in_channels": 256, "out_channels": 128, "flavor": "dec", "attention": True},
}


@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_preserves_unit_magnitude_at_init(name):
    kw = BLOCKS[name]
    torch.manual_seed(0)
    block = Block(emb_channels=EMB, **kw).eval()
    x = torch.randn(32, kw["in_channels"], 12, 12)
    emb = mp_silu(torch.randn(32, EMB))
    with torch.no_grad():
        ms, se = interior_ms(block(x, emb))
    tol = 5 * se + WEIGHT_DRAW
    if kw.get("attention"):
        # The attention branch is a softmax average of unit-RMS values (mean square in [0, 1]).
        assert ATTN_FLOOR - tol < ms < 1 + tol
    else:
        assert abs(ms - 1) < tol


def test_block_residual_keeps_0_7_of_the_main_path():
    # out = (0.7 x + 0.3 y) / sqrt(0.58) with y nearly uncorrelated with x: corr(out, x) is
    # 0.7 / sqrt(0.58) = 0.919 (0.39 if the mp_sum arguments were swapped). The small x-y
    # correlation through conv_res0's centre tap moves it by about +0.01.
    torch.manual_seed(1)
    block = Block(64, 64, EMB, "enc").eval()
    x = torch.randn(16, 64, 8, 8)
    with torch.no_grad():
        out = block(x, torch.randn(16, EMB))
    xs = pixel_norm(x)
    corr = ((out * xs).sum() / (out.norm() * xs.norm())).item()
    assert corr == pytest.approx(0.7 / math.sqrt(0.58), abs=0.03)


def test_block_embedding_gain_starts_at_zero():
    torch.manual_seed(2)
    block = Block(64, 64, EMB, "dec").eval()
    x = torch.randn(2, 64, 4, 4)
    e1, e2 = torch.randn(2, EMB), torch.randn(2, EMB)
    assert block.emb_gain.item() == 0.0
    with torch.no_grad():
        assert torch.equal(block(x, e1), block(x, e2))
        block.emb_gain.fill_(1.0)
        assert not torch.allclose(block(x, e1), block(x, e2))


def test_block_clips_activations():
    torch.manual_seed(3)
    block = Block(64, 64, EMB, "dec").eval()  # no pixel norm on the decoder path
    with torch.no_grad():
        out = block(1e4 * torch.randn(2, 64, 4, 4), torch.randn(2, EMB))
    assert out.abs().max().item() == 256.0


def test_block_dropout_only_in_training():
    torch.manual_seed(4)
    block = Block(64, 64, EMB, "dec", dropout=0.5)
    x, e = torch.randn(2, 64, 4, 4), torch.randn(2, EMB)
    with torch.no_grad():
        assert not torch.equal(block.train()(x, e), block(x, e))
        assert torch.equal(block.eval()(x, e), block(x, e))


# --- attention --------------------------------------------------------------------------------


def reference_attention(block: Block, x: torch.Tensor, order: str = "official") -> torch.Tensor:
    """Cosine attention written out head by head, from the channel layout alone.

    Official layout of attn_qkv's output channels: index = (head * ch + c) * 3 + j, with j = 0, 1,
    2 for q, k, v. The "qkv-major" layout (j * C + head * ch + c) is the usual alternative.
    """
    n, c, h, w = x.shape
    ch = 64
    heads = c // ch
    qkv = block.attn_qkv(x).reshape(n, 3 * c, h * w)
    outs = []
    for head in range(heads):
        parts = []
        for j in range(3):
            if order == "official":
                idx = [(head * ch + i) * 3 + j for i in range(ch)]
            else:
                idx = [j * c + head * ch + i for i in range(ch)]
            t = qkv[:, idx]  # [N, ch, HW]
            parts.append(t / (1e-4 + t.norm(dim=1, keepdim=True) / math.sqrt(ch)))
        q, k, v = parts
        logits = torch.einsum("ncq,nck->nqk", q, k) / math.sqrt(ch)
        outs.append(torch.einsum("nqk,nck->ncq", logits.softmax(dim=-1), v))
    return block.attn_proj(torch.cat(outs, dim=1).reshape(n, c, h, w))


def test_attention_equals_the_explicit_per_head_formula():
    torch.manual_seed(5)
    block = Block(192, 192, EMB, "enc", attention=True).eval()  # 3 heads of 64
    assert block.num_heads == 3
    x = torch.randn(2, 192, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        got = block.attention_branch(x)
        torch.testing.assert_close(got, reference_attention(block, x), rtol=1e-10, atol=1e-12)
        # The check is sensitive to the channel layout.
        other = reference_attention(block, x, order="qkv-major")
        assert (got - other).abs().max().item() > 0.1


def test_attention_needs_64_channels_per_head():
    assert Block(32, 32, EMB, attention=True).num_heads == 0
    assert Block(32, 32, EMB, attention=True).attn_qkv is None
    assert Block(128, 128, EMB, attention=True).num_heads == 2


# --- UNet structure ---------------------------------------------------------------------------


def meta_unet(**kw) -> UNet:
    with torch.device("meta"):
        return UNet(64, 4, 1000, model_channels=128, **kw)


def test_unet_module_names_and_attention_follow_the_official_layout():
    unet = meta_unet()
    enc = ["64x64_conv", "64x64_block0", "64x64_block1", "64x64_block2"]
    dec = ["8x8_in0", "8x8_in1", *[f"8x8_block{i}" for i in range(4)]]
    for res in (32, 16, 8):
        enc += [f"{res}x{res}_down", *[f"{res}x{res}_block{i}" for i in range(3)]]
    for res in (16, 32, 64):
        dec += [f"{res}x{res}_up", *[f"{res}x{res}_block{i}" for i in range(4)]]
    assert list(unet.enc) == enc
    assert list(unet.dec) == dec
    with_attention = {
        f"{part}.{k}"
        for part, d in (("enc", unet.enc), ("dec", unet.dec))
        for k, m in d.items()
        if isinstance(m, Block) and m.num_heads
    }
    expected = {f"enc.{r}x{r}_block{i}" for r in (16, 8) for i in range(3)}
    expected |= {f"dec.{r}x{r}_block{i}" for r in (16, 8) for i in range(4)} | {"dec.8x8_in0"}
    assert with_attention == expected


def test_precond_state_dict_layout():
    with torch.device("meta"):
        net = Precond(64, 4, 1000, model_channels=448)  # img512-xxl
    sd = net.state_dict()
    assert len(sd) == 203
    scalars = [k for k, v in sd.items() if v.ndim == 0]
    assert len(scalars) == 37
    assert "unet.out_gain" in scalars
    buffers = {k for k, _ in net.named_buffers()}
    assert buffers == {
        "unet.emb_fourier.freqs",
        "unet.emb_fourier.phases",
        "logvar_fourier.freqs",
        "logvar_fourier.phases",
    }
    c = 448
    shapes = {
        "unet.enc.64x64_conv.weight": (c, 5, 3, 3),
        "unet.emb_noise.weight": (4 * c, c),
        "unet.emb_label.weight": (4 * c, 1000),
        "unet.emb_fourier.freqs": (c,),
        "unet.dec.8x8_block0.conv_res0.weight": (1792, 3584, 3, 3),
        "unet.dec.8x8_block0.conv_skip.weight": (1792, 3584, 1, 1),
        "unet.enc.16x16_block0.attn_qkv.weight": (3 * 3 * c, 3 * c, 1, 1),
        "unet.enc.32x32_down.conv_res0.weight": (c, c, 3, 3),  # down blocks keep the width
        "unet.enc.32x32_block0.conv_skip.weight": (2 * c, c, 1, 1),
        "unet.out_conv.weight": (4, c, 3, 3),
        "logvar_linear.weight": (1, 128),
        "logvar_fourier.freqs": (128,),
    }
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes


def test_unet_rejects_resolutions_it_cannot_halve():
    with pytest.raises(ValueError, match="cannot be halved"):
        UNet(12, 1, 0, model_channels=8, channel_mult=(1, 1, 1, 1))


def small_precond(label_dim: int = 10, **kw) -> Precond:
    """8x8 RGB, two levels of 64 channels, attention at 4x4: cheap but complete."""
    torch.manual_seed(6)
    kw = {
        "model_channels": 64,
        "channel_mult": (1, 1),
        "num_blocks": 1,
        "attn_resolutions": (4,),
    } | kw
    return Precond(8, 3, label_dim, **kw)


def test_unet_activations_stay_order_one_through_every_block():
    # Each block keeps unit magnitude up to the attention floor (0.92 in RMS) and the zero
    # padding at small resolutions (at 4x4, a 3x3 conv sees 69% of its taps on average), so
    # [0.6, 1.4] in RMS; a missing sqrt(fan_in) would be off by a factor sqrt(9 * 64) = 24.
    torch.manual_seed(6)
    net = Precond(
        16, 3, 10, model_channels=64, channel_mult=(1, 1, 2), num_blocks=2, attn_resolutions=(8,)
    ).eval()
    rms = {}
    for part, d in (("enc", net.unet.enc), ("dec", net.unet.dec)):
        for k, m in d.items():
            m.register_forward_hook(
                lambda _m, _i, out, key=f"{part}.{k}": rms.__setitem__(
                    key, out.pow(2).mean().sqrt()
                )
            )
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        f = net.unet(x, torch.randn(4) / 2, torch.eye(10)[torch.arange(4)])
    assert len(rms) == len(net.unet.enc) + len(net.unet.dec) == 22
    assert {k: v.item() for k, v in rms.items() if not 0.6 < v < 1.4} == {}
    assert torch.equal(f, torch.zeros_like(f))  # out_gain starts at 0


# --- Precond ----------------------------------------------------------------------------------


def test_precond_coefficients_closed_form():
    net = small_precond()
    sd = 0.5
    s = torch.tensor([0.002, 0.1, 0.5, 1.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = net.coefficients(s)
    v = s**2 + sd**2
    torch.testing.assert_close(c_skip, (sd**2 / v).float())
    torch.testing.assert_close(c_out, (s * sd / v.sqrt()).float())
    torch.testing.assert_close(c_in, (1 / v.sqrt()).float())
    torch.testing.assert_close(c_noise, (s.log() / 4).float())
    # At sigma = sigma_data: c_skip 1/2, c_out = c_in * sd^2 = sd / sqrt(2).
    at_sd = [t.item() for t in net.coefficients(torch.tensor(sd))]
    assert at_sd == pytest.approx(
        [0.5, sd / math.sqrt(2), 1 / (sd * math.sqrt(2)), math.log(sd) / 4]
    )


def test_precond_at_init_is_exactly_the_skip_path():
    net = small_precond().eval()
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.01, 0.7, 40.0])
    with torch.no_grad():
        d = net(x, sigma, torch.tensor([1, 2, 3]))
        c_skip = net.coefficients(sigma)[0].view(-1, 1, 1, 1)
        assert torch.equal(d, c_skip * x)
        assert torch.equal(net(x, 0.7), (0.25 / (0.49 + 0.25)) * x)  # scalar sigma broadcasts


def test_precond_composes_the_unet_output():
    net = small_precond().eval()
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
        x = torch.randn(2, 3, 8, 8)
        sigma = torch.tensor([0.3, 5.0])
        labels = torch.eye(10)[[4, 7]]
        d, logvar = net(x, sigma, labels, return_logvar=True)
        c_skip, c_out, c_in, c_noise = (c.view(-1, 1, 1, 1) for c in net.coefficients(sigma))
        f = net.unet(c_in * x, c_noise.flatten(), labels)
        torch.testing.assert_close(d, c_skip * x + c_out * f)
        assert f.abs().max() > 0.1
        u = net.logvar_linear(net.logvar_fourier(c_noise.flatten()))
        assert logvar.shape == (2, 1, 1, 1)
        torch.testing.assert_close(logvar.flatten(), u.flatten())


def test_precond_labels_indices_none_and_unconditional():
    net = small_precond().eval()
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
        for block in net.unet.modules():
            if isinstance(block, Block):
                block.emb_gain.fill_(1.0)  # at init (0) the embedding has no effect at all
        x = torch.randn(2, 3, 8, 8)
        idx = torch.tensor([3, 9])
        assert torch.equal(net(x, 1.0, idx), net(x, 1.0, torch.eye(10)[idx]))
        assert torch.equal(net(x, 1.0, idx.int()), net(x, 1.0, idx))
        assert torch.equal(net(x, 1.0, None), net(x, 1.0, torch.zeros(2, 10)))
        assert not torch.allclose(net(x, 1.0, idx), net(x, 1.0, None))
        uncond = small_precond(label_dim=0).eval()
        assert uncond.unet.emb_label is None
        uncond.unet.out_gain.fill_(1.0)
        assert torch.equal(uncond(x, 1.0, idx), uncond(x, 1.0))  # labels ignored


def test_precond_rejects_mismatched_sigma_and_labels():
    net = small_precond().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="3 values for a batch of 2"):
        net(x, torch.ones(3))
    with pytest.raises(ValueError, match=r"class_labels must be \[2, 10\] or \[2\] indices"):
        net(x, 1.0, torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"got \(1, 20\)"):
        net(x, 1.0, torch.zeros(1, 20))


def test_precond_runs_float32_on_cpu_and_accepts_float16_snapshots():
    net = small_precond(use_fp16=True).eval()
    seen = []
    net.unet.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0].dtype))
    with torch.no_grad():
        net.unet.out_gain.fill_(1.0)
        x = torch.randn(2, 3, 8, 8)
        d = net(x, 0.8, torch.tensor([0, 1]))
        assert seen == [torch.float32]
        # A snapshot stores parameters and buffers in float16; MPConv upcasts on the CPU.
        half = small_precond(use_fp16=True).eval()
        half.load_state_dict(net.state_dict())
        half.half()
        d16 = half(x, 0.8, torch.tensor([0, 1]))
    assert d16.dtype == torch.float32
    # float16 weights and Fourier buffers carry a relative rounding error of 2^-11 each.
    torch.testing.assert_close(d16, d, rtol=0, atol=0.05 * d.abs().max().item())
