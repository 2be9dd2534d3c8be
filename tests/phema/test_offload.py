"""Host-memory shadows updated off the training thread (phema._offload), on the CPU.

Without an accelerator the staging copy is a plain copy, but the rest of the path is the
one a GPU run takes: the lerp runs on the background thread, the next update and every
read wait for it, errors surface there. The profiles must be bitwise those of the
synchronous update: the same lerp on the same values.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import phema.tracking
from phema import PowerFunctionEMA
from phema._offload import OffloadedShadows
from phema._shadow import FusedShadows


def _params() -> list[torch.Tensor]:
    torch.manual_seed(0)
    return [torch.randn(37, 5), torch.randn(3000), torch.randn(()).to(torch.bfloat16)]


def test_updates_match_the_synchronous_shadows_bitwise():
    params = _params()
    sync = FusedShadows(params, 3)
    off = OffloadedShadows(params, 3, None, torch.device("cpu"))
    sync.copy_from_sources()
    off.copy_from_sources(params)
    for step in range(1, 6):
        for p in params:
            p.add_(torch.randn_like(p))  # the optimizer moves on right after the update
        w = [0.5 / step, 0.2 / step, 0.05]
        sync.lerp(w)
        off.lerp(w, params)
    for i in range(len(params)):
        for k in range(3):
            assert torch.equal(off.get(i, k), sync.get(i, k))


def test_the_lerp_runs_off_the_calling_thread_and_reads_wait_for_it():
    params = _params()
    off = OffloadedShadows(params, 2, None, torch.device("cpu"))
    off.copy_from_sources(params)
    release, seen = threading.Event(), []
    real = off.inner.lerp

    def slow(weights, sources=None):
        seen.append(threading.current_thread().name)
        assert release.wait(30)
        real(weights, sources)

    off.inner.lerp = slow  # type: ignore[method-assign]
    off.lerp([0.5, 0.25], params)  # returns while the lerp is held back
    before = params[0].clone()
    params[0].add_(100.0)  # a later step: must not reach the queued update
    threading.Timer(0.2, release.set).start()
    got = off.get(0, 0)  # waits for the held lerp
    assert seen[0].startswith("phema-offload")
    first = off.inner.get(0, 0)  # after the wait, the shadow is settled
    assert torch.equal(got, first)
    want = FusedShadows([before.clone()], 2)
    want.copy_from_sources([_params()[0]])
    want.lerp([0.5, 0.25], [before])
    assert torch.equal(got, want.get(0, 0))


def test_an_error_in_the_background_is_raised_by_the_next_call():
    params = _params()
    off = OffloadedShadows(params, 2, None, torch.device("cpu"))
    off.copy_from_sources(params)

    def broken(weights, sources=None):
        raise RuntimeError("lerp failed")

    off.inner.lerp = broken  # type: ignore[method-assign]
    off.lerp([0.5, 0.5], params)
    with pytest.raises(RuntimeError, match="lerp failed"):
        off.get(0, 0)
    off.get(0, 0)  # reported once; the shadows are readable again


def test_power_function_ema_with_host_shadows_equals_the_plain_one(monkeypatch):
    monkeypatch.setattr(phema.tracking, "_elsewhere", lambda sources, device: True)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 40), nn.Linear(40, 2))
    plain = nn.Sequential(nn.Linear(6, 40), nn.Linear(40, 2))
    plain.load_state_dict(net.state_dict())
    off, ref = PowerFunctionEMA(net, device="cpu"), PowerFunctionEMA(plain)
    assert isinstance(off._shadows, OffloadedShadows)
    for t in (3.0, 7.0, 8.0, 20.0):
        with torch.no_grad():
            for p, q in zip(net.parameters(), plain.parameters(), strict=True):
                step = torch.randn_like(p)
                p.add_(step)
                q.add_(step)
        off.update(t)
        ref.update(t)
    for std in off.stds:
        a, b = off.profile(std), ref.profile(std)
        assert all(torch.equal(a[n], b[n]) for n in a)
    again = PowerFunctionEMA(net, device="cpu")
    again.load_state_dict(off.state_dict())
    assert all(torch.equal(again.profile(0.1)[n], ref.profile(0.1)[n]) for n in ref.names)
    with off.swapped(0.05):
        assert all(torch.equal(p, ref.profile(0.05)[n]) for n, p in net.named_parameters())
