"""Forced weight normalisation happens only while training; frozen copies can never rewrite weights."""

import copy
import pickle

import pytest
import torch

from edm2_reference.mp import FrozenModuleError, MPConv, freeze, is_frozen, normalize
from edm2_reference.network import Precond
from phema.errors import PhemaError


def tiny_precond() -> Precond:
    torch.manual_seed(0)
    return Precond(
        8, 1, 3, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,)
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert changed == []


def row_rms(w: torch.Tensor) -> torch.Tensor:
    return w.flatten(1).pow(2).mean(1).sqrt()


def test_training_forward_rewrites_weights_to_unit_rms_rows():
    layer = MPConv(8, 4, (3, 3)).train()
    before = layer.weight.detach().clone()
    assert not torch.allclose(row_rms(before), torch.ones(4), atol=1e-2)  # randn rows
    layer(torch.randn(2, 8, 5, 5)).sum().backward()
    torch.testing.assert_close(layer.weight.detach(), normalize(before))
    torch.testing.assert_close(row_rms(layer.weight.detach()), torch.ones(4), rtol=2e-4, atol=0)


@pytest.mark.parametrize("case", ["eval", "no_grad", "inference_mode", "requires_grad_off"])
def test_weights_bitwise_unchanged_outside_training(case):
    layer = MPConv(8, 4).train(case != "eval")
    if case == "requires_grad_off":
        layer.weight.requires_grad_(False)
    before = layer.weight.detach().clone()
    x = torch.randn(3, 8)
    if case == "no_grad":
        with torch.no_grad():
            y = layer(x)
    elif case == "inference_mode":
        with torch.inference_mode():
            y = layer(x)
    else:
        y = layer(x)
    assert torch.equal(layer.weight.detach(), before)
    # Skipping the rewrite does not change the output: the forward always uses normalize(weight),
    # and normalize(normalize(w)) differs from normalize(w) only through eps (relative <= 2e-4).
    trained = copy.deepcopy(layer).train()
    trained.weight.requires_grad_(True)
    torch.testing.assert_close(trained(x).detach(), y, rtol=2e-4, atol=1e-6)
    assert not torch.equal(trained.weight.detach(), before)  # that one did rewrite


def test_training_mode_precond_rewrites_every_mpconv():
    net = tiny_precond().train()
    convs = [m for m in net.modules() if isinstance(m, MPConv)]
    assert len(convs) == sum(k.endswith(".weight") for k in net.state_dict()) == 48
    before = [m.weight.detach().clone() for m in convs]
    net(torch.randn(2, 1, 8, 8), 1.0, torch.tensor([0, 2]), return_logvar=True)[0].sum().backward()
    for m, w in zip(convs, before, strict=True):
        assert not torch.equal(m.weight.detach(), w)
        torch.testing.assert_close(m.weight.detach(), normalize(w))


def test_eval_mode_precond_forward_leaves_state_bitwise_unchanged():
    net = tiny_precond().eval()
    before = snapshot(net)
    net(torch.randn(2, 1, 8, 8), torch.tensor([0.5, 3.0]), return_logvar=True)[0].sum().backward()
    assert_bitwise_equal(before, snapshot(net))


def test_frozen_copy_is_eval_only_and_leaves_the_original_alone():
    net = tiny_precond().train()
    frozen = net.frozen_copy()
    assert frozen is not net
    assert not frozen.training
    assert all(not m.training for m in frozen.modules())
    assert all(not p.requires_grad for p in frozen.parameters())
    assert is_frozen(frozen)
    assert frozen.frozen
    # The original is untouched: still training, still trainable, not frozen.
    assert net.training
    assert all(p.requires_grad for p in net.parameters())
    assert not is_frozen(net)
    assert_bitwise_equal(snapshot(net), snapshot(frozen))


@pytest.mark.parametrize("path", ["", "unet", "unet.enc.8x8_block0", "logvar_linear"])
def test_frozen_copy_refuses_training_mode_anywhere(path):
    frozen = tiny_precond().frozen_copy()
    target = frozen.get_submodule(path)
    with pytest.raises(FrozenModuleError, match="frozen evaluation copy") as info:
        target.train()
    assert isinstance(info.value, RuntimeError)
    assert isinstance(info.value, PhemaError)
    # Refused before touching any state.
    assert all(not m.training for m in frozen.modules())
    frozen.eval()  # still allowed
    frozen.train(False)


@pytest.mark.slow
def test_frozen_copy_never_rewrites_even_if_forced_into_training_flags():
    frozen = tiny_precond().frozen_copy()
    frozen.requires_grad_(True)  # undo everything the API lets one undo...
    for m in frozen.modules():
        m.training = True  # ...and bypass .train() entirely
    before = snapshot(frozen)
    d = frozen(torch.randn(2, 1, 8, 8), 2.0, torch.tensor([1, 1]))
    d.sum().backward()
    assert_bitwise_equal(before, snapshot(frozen))


def test_frozen_state_survives_deepcopy_and_pickle():
    frozen = tiny_precond().frozen_copy()
    for clone in (copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))):
        assert is_frozen(clone)
        with pytest.raises(FrozenModuleError):
            clone.train()


def test_loading_weights_into_a_frozen_copy_keeps_it_frozen():
    net = tiny_precond()
    frozen = net.frozen_copy()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in net.state_dict().items()}
    frozen.load_state_dict(ema)
    assert all(not p.requires_grad for p in frozen.parameters())
    frozen(torch.randn(1, 1, 8, 8), 1.0, torch.tensor([0]))
    assert_bitwise_equal(ema, snapshot(frozen))


def test_freeze_in_place_returns_the_same_module():
    net = tiny_precond()
    assert net.freeze() is net
    assert is_frozen(net)
    layer = MPConv(3, 3)
    assert freeze(layer) is layer
    assert not layer.forces_normalization
    with pytest.raises(FrozenModuleError):
        layer.train()
