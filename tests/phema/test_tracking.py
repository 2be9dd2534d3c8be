"""PowerFunctionEMA against a step-by-step oracle: exact profiles, dtypes, resume, wrappers."""

import io
import math
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from phema import PowerFunctionEMA, StateError, TrackingError, power_weight
from phema._shadow import FusedShadows


def _exact_profile(times, gamma):
    """Weight of interval (t_{i-1}, t_i] in the EMA at t_N: the integral of the power density."""
    u = np.concatenate([[0.0], np.asarray(times, dtype=np.float64)]) / times[-1]
    return u[1:] ** (gamma + 1) - u[:-1] ** (gamma + 1)  # in ratios: t^(gamma+1) overflows


def _one_hot_run(times, n_params, stds=(0.05, 0.10, 0.2)):
    net = nn.Linear(n_params, 1, bias=False).double()
    ema = PowerFunctionEMA(net, stds=stds)
    for i, t in enumerate(times):
        with torch.no_grad():
            net.weight.zero_()
            net.weight[0, i] = 1.0
        ema.update(t)
    return ema


RNG = np.random.default_rng(1234)
SCHEDULES = {
    "regular": np.arange(1.0, 1501.0),
    "every_7": 7.0 * np.arange(1.0, 1501.0),
    "irregular": np.cumsum(RNG.uniform(0.1, 30.0, 1500)),
    "images_2048": 2048.0 * np.arange(1.0, 1501.0) + 2.0**31,  # resumed late in a long run
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("n_params", [1500, 1531])  # 1531 is prime: blocked + tail layout
def test_one_hot_trajectory_recovers_exact_profile(schedule, n_params):
    times = SCHEDULES[schedule]
    ema = _one_hot_run(times, n_params)
    for std, gamma in zip(ema.stds, ema.gammas, strict=True):
        got = ema.profile(std)["weight"][0, : len(times)].numpy()
        want = _exact_profile(times, gamma)  # the first update copies: [0, t_1] -> step 1
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        assert got.sum() == pytest.approx(1.0, abs=1e-12)


def test_every_k_updates_give_the_profile_of_the_sampled_trajectory():
    """Updating every k steps weights each sample by its real interval, unlike a per-call beta."""
    times = 10.0 * np.arange(1.0, 201.0)
    ema = _one_hot_run(times, 200)
    std, gamma = ema.stds[0], ema.gammas[0]
    got = ema.profile(std)["weight"][0].numpy()
    weights_t = np.arange(1, 201) * 10.0
    centre = float((got * weights_t).sum() / weights_t[-1])
    # Centre of mass of the continuous profile: (gamma+1)/(gamma+2) of training.
    assert centre == pytest.approx((gamma + 1) / (gamma + 2), abs=10.0 / 2000)


class _Zoo(nn.Module):
    """Parameters of many layouts: small, blocked, blocked + tail, and non-contiguous."""

    def __init__(self, dtype):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.small = nn.Parameter(torch.randn(3, generator=g).to(dtype))
        self.blocked = nn.Parameter(torch.randn(64, 33, generator=g).to(dtype))
        self.tail = nn.Parameter(torch.randn(1031, generator=g).to(dtype))
        self.strided = nn.Parameter(torch.randn(40, 30, generator=g).to(dtype).t())


@pytest.mark.parametrize(
    ("dtype", "shadow", "atol"),
    [
        # fp32 shadows: one rounding of ~6e-8 per update on O(1) values over 60 updates.
        (torch.float32, torch.float32, 1e-5),
        (torch.bfloat16, torch.float32, 1e-5),
        (torch.float16, torch.float32, 1e-5),
        (torch.float64, torch.float64, 1e-13),
    ],
)
def test_dtype_matrix_against_float64_oracle(dtype, shadow, atol):
    net = _Zoo(dtype)
    assert not net.strided.is_contiguous()
    stds = (0.05, 0.10)
    ema = PowerFunctionEMA(net, stds=stds)
    ref = None
    t_prev = 0.0
    rng = np.random.default_rng(0)
    for _ in range(60):
        t = t_prev + float(rng.uniform(0.5, 3.0))
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn(p.shape, dtype=torch.float64).to(dtype) * 0.1)
        ema.update(t)
        cur = {n: p.detach().double() for n, p in net.named_parameters()}
        if ref is None:
            ref = [dict(cur) for _ in stds]
        else:
            for k, g in enumerate(ema.gammas):
                w = power_weight(g, t_prev, t)
                for n in cur:
                    ref[k][n] = ref[k][n] + w * (cur[n] - ref[k][n])
        t_prev = t
    for k, std in enumerate(stds):
        prof = ema.profile(std)
        for n, value in prof.items():
            assert value.dtype == shadow
            assert value.shape == getattr(net, n).shape
            torch.testing.assert_close(value.double(), ref[k][n], rtol=0, atol=atol)


def _trajectory_step(net, step):
    g = torch.Generator().manual_seed(step)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.01)


def _fresh_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 1100), nn.ReLU(), nn.Linear(1100, 3))


def test_resume_is_bitwise_identical():
    net_a = _fresh_net()
    ema_a = PowerFunctionEMA(net_a)
    for step in range(1, 41):
        _trajectory_step(net_a, step)
        ema_a.update(step * 256)

    net_b = _fresh_net()
    ema_b = PowerFunctionEMA(net_b)
    for step in range(1, 21):
        _trajectory_step(net_b, step)
        ema_b.update(step * 256)
    buf = io.BytesIO()
    torch.save({"net": net_b.state_dict(), "ema": ema_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    net_c = _fresh_net()
    net_c.load_state_dict(ckpt["net"])
    ema_c = PowerFunctionEMA(net_c)
    ema_c.load_state_dict(ckpt["ema"])
    assert ema_c.t == 20 * 256
    for step in range(21, 41):
        _trajectory_step(net_c, step)
        ema_c.update(step * 256)
    for std in ema_a.stds:
        a, c = ema_a.profile(std), ema_c.profile(std)
        for n in a:
            assert torch.equal(a[n], c[n]), n
    assert ema_c.num_updates == ema_a.num_updates == 40


def test_mismatched_state_is_refused_with_names():
    ema = PowerFunctionEMA(_fresh_net())
    ema.update(1.0)
    state = ema.state_dict()
    with pytest.raises(StateError, match=r"saved stds \(0.05, 0.1\) differ"):
        PowerFunctionEMA(_fresh_net(), stds=(0.05, 0.2)).load_state_dict(state)
    other = PowerFunctionEMA(nn.Sequential(nn.Linear(8, 1100), nn.ReLU()))
    with pytest.raises(StateError, match=r"unexpected \['2.bias', '2.weight'\]"):
        other.load_state_dict(state)
    bad = dict(state, shadows=dict(state["shadows"]))
    bad["shadows"]["0.bias"] = bad["shadows"]["0.bias"].double()
    with pytest.raises(StateError, match=r"'0.bias' is torch.float64"):
        PowerFunctionEMA(_fresh_net()).load_state_dict(bad)
    prefixed = dict(state, shadows={f"module.{k}": v for k, v in state["shadows"].items()})
    with pytest.raises(StateError, match="DDP/compile prefix"):
        PowerFunctionEMA(_fresh_net()).load_state_dict(prefixed)
    with pytest.raises(ValueError, match="not a PowerFunctionEMA state"):
        PowerFunctionEMA(_fresh_net()).load_state_dict({"stds": [0.05]})


def test_torch_compile_wrapper_is_unwrapped():
    net = _fresh_net()
    compiled = torch.compile(net, backend="eager")
    ema = PowerFunctionEMA(compiled)
    assert ema.module is net
    assert ema.names == tuple(n for n, _ in net.named_parameters())
    assert not any(n.startswith("_orig_mod") for n in ema.names)


_DDP_SCRIPT = r"""
import os, socket, sys
import torch
import torch.distributed as dist
from torch import nn
from phema import PowerFunctionEMA, power_weight

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(8, 1100), nn.ReLU(), nn.Linear(1100, 3))
ddp = nn.parallel.DistributedDataParallel(net)
ema = PowerFunctionEMA(ddp)
assert ema.module is net, "not unwrapped"
assert "0.weight" in ema.names, ema.names
opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
ema.update(1.0)
before = net[0].weight.detach().clone()
ddp(torch.randn(4, 8)).square().sum().backward()
opt.step()
ema.update(2.0)
after = net[0].weight.detach()
assert not torch.equal(before, after)
for k, std in enumerate(ema.stds):
    w = power_weight(ema.gammas[k], 1.0, 2.0)
    torch.testing.assert_close(ema.profile(std)["0.weight"], before + w * (after - before),
                               rtol=0, atol=1e-7)
print("ok", flush=True)
os._exit(0)  # skip process-group teardown: gloo's worker thread can deadlock at exit
"""


@pytest.mark.slow
def test_ddp_wrapper_is_unwrapped_and_tracks_the_live_weights():
    # In a subprocess: a process group in the test process would outlive the test.
    out = subprocess.run(
        [sys.executable, "-c", _DDP_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_swapped_and_copy_module():
    net = _fresh_net()
    ema = PowerFunctionEMA(net)
    for step in range(1, 11):
        _trajectory_step(net, step)
        ema.update(step)
    live = {k: v.clone() for k, v in net.state_dict().items()}
    prof = ema.profile(0.10)
    with ema.swapped(0.10) as m:
        assert m is net
        for n, p in net.named_parameters():
            assert torch.equal(p.detach(), prof[n])
    for k, v in net.state_dict().items():
        assert torch.equal(v, live[k])
    with pytest.raises(RuntimeError, match="boom"), ema.swapped(0.05):
        raise RuntimeError("boom")
    for k, v in net.state_dict().items():
        assert torch.equal(v, live[k])
    clone = ema.copy_module(0.10)
    assert not clone.training
    assert all(not p.requires_grad for p in clone.parameters())
    for n, p in clone.named_parameters():
        assert torch.equal(p, prof[n])
    with pytest.raises(TrackingError, match=r"no tracked profile with std 0.07"):
        ema.profile(0.07)


def test_swap_in_and_out_span_two_calls():
    """swap_in/swap_out are swapped() split in two, for hooks that open and close apart."""
    net = _fresh_net()
    ema = PowerFunctionEMA(net)
    with pytest.raises(TrackingError, match="no profile yet"):
        ema.swap_in(0.05)
    assert ema.swapped_std is None
    for step in range(1, 6):
        _trajectory_step(net, step)
        ema.update(step)
    live = {k: v.clone() for k, v in net.state_dict().items()}
    state = ema.state_dict()
    ema.swap_in(0.05)
    assert ema.swapped_std == 0.05
    for n, p in net.named_parameters():
        assert torch.equal(p.detach(), ema.profile(0.05)[n])
    with pytest.raises(TrackingError, match="already swapped in"):
        ema.swap_in(0.10)
    with pytest.raises(TrackingError, match="swapped in would average"):
        ema.update(6)
    ema.swap_out()
    assert ema.swapped_std is None
    for k, v in net.state_dict().items():
        assert torch.equal(v, live[k])
    with pytest.raises(TrackingError, match="no profile is swapped in"):
        ema.swap_out()
    # the refused update changed nothing
    after = ema.state_dict()
    assert after["t"] == state["t"]
    assert after["num_updates"] == state["num_updates"]
    for n, v in state["shadows"].items():
        assert torch.equal(after["shadows"][n], v)


def test_buffer_policies():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    copy_ema = PowerFunctionEMA(net, stds=(0.1,))
    avg_ema = PowerFunctionEMA(net, stds=(0.1,), buffers="average")
    assert "1.running_mean" in avg_ema.names
    assert "1.running_mean" not in copy_ema.names
    means = []
    for step in range(1, 6):
        net.train()
        net(torch.randn(16, 4) + step)
        means.append(net[1].running_mean.clone().double())
        copy_ema.update(step)
        avg_ema.update(step)
    sd_copy = copy_ema.profile_state_dict(0.1)
    sd_avg = avg_ema.profile_state_dict(0.1)
    assert torch.equal(sd_copy["1.running_mean"], net[1].running_mean)
    w = _exact_profile(np.arange(1.0, 6.0), avg_ema.gammas[0])
    want = sum(float(wi) * m for wi, m in zip(w, means, strict=True))
    torch.testing.assert_close(sd_avg["1.running_mean"].double(), want, rtol=0, atol=1e-6)
    assert int(sd_avg["1.num_batches_tracked"]) == 5  # integer buffers are copied
    net.load_state_dict(sd_avg)  # a profile state dict loads into the module as is


def test_update_contract():
    net = _fresh_net()
    ema = PowerFunctionEMA(net)
    with pytest.raises(TrackingError, match="call update"):
        ema.profile_state_dict(0.05)
    ema.update(5.0)
    for bad in (5.0, 4.0, math.nan, math.inf):
        with pytest.raises(TrackingError, match="must be finite and increase"):
            ema.update(bad)
    with pytest.raises(TrackingError, match="distinct"):
        PowerFunctionEMA(net, stds=(0.1, 0.1))
    with pytest.raises(ValueError, match="percentage"):
        PowerFunctionEMA(net, stds=(5.0,))


def test_first_update_copies_even_non_finite_values():
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.bias.fill_(math.inf)
    ema = PowerFunctionEMA(net)
    ema.update(3.0)
    assert torch.equal(ema.profile(0.05)["bias"], net.bias.detach())


def test_replaced_parameter_storage_is_followed_or_refused():
    net = _fresh_net()
    ema = PowerFunctionEMA(net, stds=(0.2,))
    ema.update(1.0)
    p = net[0].weight
    p.data = p.data.clone() + 1.0  # new storage, same dtype: the update must follow it
    ema.update(2.0)
    w = power_weight(ema.gammas[0], 1.0, 2.0)
    want = (p.detach() - 1.0) + w * 1.0
    torch.testing.assert_close(ema.profile(0.2)["0.weight"], want, rtol=0, atol=1e-6)
    net.double()
    with pytest.raises(TrackingError, match="changed dtype"):
        ema.update(3.0)


def _replace_submodule(net):
    net[0] = nn.Linear(3, 4)


def _assign_state(net):
    state = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state, assign=True)


def _reassign_parameter(net):
    net[0].weight = nn.Parameter(net[0].weight.detach().clone())


@pytest.mark.parametrize(
    ("change", "stale"),
    [
        (_replace_submodule, "submodule '0' was replaced, so the tracked parameter '0.weight'"),
        (_assign_state, "parameter '0.weight' is no longer the one"),
        (_reassign_parameter, "parameter '0.weight' is no longer the one"),
    ],
)
@pytest.mark.parametrize("call", ["update", "swapped", "snapshot", "profile_state_dict", "profile"])
def test_a_replaced_parameter_is_refused_by_name(change, stale, call):
    net = _fresh_net()
    ema = PowerFunctionEMA(net, stds=(0.1,))
    ema.update(1.0)
    before = {k: v.clone() for k, v in ema.profile(0.1).items()}
    change(net)
    run = {
        "update": lambda: ema.update(2.0),
        "swapped": lambda: ema.swapped(0.1).__enter__(),
        "snapshot": ema.snapshot,
        "profile_state_dict": lambda: ema.profile_state_dict(0.1),
        "profile": lambda: ema.profile(0.1),
    }[call]
    with pytest.raises(TrackingError, match=re.escape(stale)):
        run()
    assert ema.t == 1.0  # nothing was folded in
    ema._links = []  # look past the check: the shadows are untouched
    assert all(torch.equal(v, before[k]) for k, v in ema.profile(0.1).items())


def test_a_parameter_added_after_the_ema_is_never_filled_from_the_live_module():
    net = _fresh_net()
    ema = PowerFunctionEMA(net, stds=(0.1,))
    ema.update(1.0)
    net[0].register_parameter("extra", nn.Parameter(torch.ones(2)))
    with pytest.raises(TrackingError, match=r"'0\.extra' is in the module's state but not tracked"):
        ema.profile_state_dict(0.1)
    with pytest.raises(TrackingError, match=r"'0\.extra'"):
        ema.copy_module(0.1)


def test_an_unchanged_module_is_not_sharded_and_passes_the_check():
    net = _fresh_net()
    ema = PowerFunctionEMA(net, stds=(0.1,), device="cpu")
    ema.update(1.0)
    ema.check_tracking()
    assert not ema.sharded
    assert not PowerFunctionEMA(net, stds=(0.1,), partition=True).sharded  # one process
    assert all(p.kind == "full" and p.begin == 0 and p.end == p.obj.numel() for p in ema.pieces)


def test_snapshot_copies_every_profile_in_the_requested_dtype():
    net = _fresh_net()
    ema = PowerFunctionEMA(net)
    ema.update(7.0)
    snaps = ema.snapshot(torch.float16)
    assert [(s.t, s.std) for s in snaps] == [(7.0, 0.05), (7.0, 0.10)]
    assert all(v.dtype == torch.float16 for s in snaps for v in s.tensors.values())


@given(
    st.lists(st.floats(0.01, 100.0), min_size=1, max_size=40),
    st.sampled_from([0.01, 0.05, 0.1, 0.2, 0.28]),
)
def test_profile_invariants_for_any_schedule(gaps, std):
    """For any increasing times: weights are the exact profile, non-negative, summing to one."""
    times = np.cumsum(gaps)
    ema = _one_hot_run(times, len(times), stds=(std,))
    got = ema.profile(std)["weight"][0].numpy()
    assert np.all(got >= 0)
    assert got.sum() == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(got, _exact_profile(times, ema.gammas[0]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("layout", ["blocked", "profile_major"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_both_shadow_layouts_match_the_oracle(layout, dtype):
    """The accelerator layout (profile-major, scalar weights) is exercised on the CPU too."""
    zoo = _Zoo(dtype)
    sources = [*zoo.parameters(), torch.empty(0, dtype=dtype)]
    shadows = FusedShadows(sources, 3, layout=layout)
    shadows.copy_from_sources()
    ref = [[s.double().clone() for s in sources] for _ in range(3)]
    gen = torch.Generator().manual_seed(3)
    for step in range(1, 20):
        for s in sources:
            s.data.add_(torch.randn(s.shape, generator=gen).to(dtype))
        weights = [0.5 / step, 0.3 / step, 0.9 / step]
        shadows.lerp(weights)
        for k, w in enumerate(weights):
            ref[k] = [r + w * (s.double() - r) for r, s in zip(ref[k], sources, strict=True)]
    for i in range(len(sources)):
        for k in range(3):
            got = shadows.get(i, k)
            assert got.shape == sources[i].shape
            # fp32 shadows: one rounding (6e-8) per step on values of size ~5.
            torch.testing.assert_close(got.double(), ref[k][i], rtol=0, atol=1e-5)


def test_a_tied_parameter_is_averaged_under_both_names(tmp_path):
    from phema import SnapshotStore, SnapshotWriter

    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    net[1].weight = net[0].weight  # tied: one Parameter, two state-dict keys
    ema = PowerFunctionEMA(net, stds=(0.1,))
    assert ema.names == ("0.weight",)
    assert ema.copied_keys() == ()
    ema.update(1.0)
    with SnapshotWriter(str(tmp_path)) as writer:
        writer.save(ema)
    (info,) = SnapshotStore(str(tmp_path)).list()
    assert info.copied == ()  # the alias is averaged, as a sharded snapshot records it
