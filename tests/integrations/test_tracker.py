"""EMATracker: the framework-neutral part of the integrations, without any framework."""

import math

import pytest
import torch
from torch import nn

import phema
from phema.errors import StateError, TrackingError
from phema.integrations.tracker import EMATracker


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Linear(3, 2)


def _train(net: nn.Module, tracker: EMATracker, steps: range) -> None:
    for s in steps:
        with torch.no_grad():
            net.weight.add_(0.1 * s)
        tracker.step(s)


def test_time_is_steps_times_per_step_and_repeats_are_ignored():
    net = _net()
    tracker = EMATracker((0.05, 0.10), per_step=32)
    tracker.start(net)
    ref = phema.PowerFunctionEMA(_net(), (0.05, 0.10))
    ref.module.load_state_dict(net.state_dict())
    for s in range(1, 6):
        with torch.no_grad():
            net.weight.add_(0.1)
            ref.module.weight.add_(0.1)
        tracker.step(s)
        tracker.step(s)  # a second call for the same optimizer step changes nothing
        ref.update(32 * s)
    assert tracker.ema.t == 160
    assert tracker.ema.num_updates == 5
    for n, v in ref.profile(0.05).items():
        assert torch.equal(tracker.ema.profile(0.05)[n], v)
    with pytest.raises(TrackingError, match="step count went back"):
        tracker.step(3)


def test_options_are_checked_at_construction():
    with pytest.raises(TrackingError, match="stds is empty"):
        EMATracker(())
    with pytest.raises(phema.ProfileError):
        EMATracker((0.05, 0.5))  # above sqrt(1/12): refused before any training
    with pytest.raises(TrackingError, match="needs snapshot_every"):
        EMATracker(snapshots="memory://x")
    with pytest.raises(TrackingError, match="per_step must be finite"):
        EMATracker(per_step=math.inf)
    with pytest.raises(TrackingError, match=r"evaluate_with=0\.2 is not a tracked std"):
        EMATracker((0.05, 0.10), evaluate_with=0.2)


def test_state_loaded_before_start_waits_for_the_ema():
    net = _net()
    first = EMATracker((0.05, 0.10), per_step=2)
    first.start(net)
    _train(net, first, range(1, 5))
    state = first.state_dict()

    second = EMATracker((0.05, 0.10), per_step=2)
    assert not second.has_state
    second.load_state_dict(state)
    assert second.has_state
    assert second.state_dict()["last_step"] == 4  # the waiting state, before start
    second.start(_net(1), per_step=2)
    assert second.last_step == 4
    assert second.ema.t == first.ema.t
    for n, v in first.ema.state_dict()["shadows"].items():
        assert torch.equal(second.ema.state_dict()["shadows"][n], v)


def test_resume_with_another_time_per_step_is_refused():
    net = _net()
    first = EMATracker(per_step=8)
    first.start(net)
    _train(net, first, range(1, 3))
    other = EMATracker(per_step=16)
    other.start(_net())
    with pytest.raises(StateError, match="global batch size must not change"):
        other.load_state_dict(first.state_dict())
    with pytest.raises(StateError, match="not a phema tracker state"):
        other.load_state_dict({"format": "something else"})


def test_one_tracker_per_model_and_per_step_at_start():
    tracker = EMATracker()
    net = _net()
    tracker.start(net, per_step=64)
    assert tracker.per_step == 64
    tracker.start(net)  # again, same model: nothing changes
    with pytest.raises(TrackingError, match="already tracks another model"):
        tracker.start(_net())
    with pytest.raises(TrackingError, match="per_step must be finite"):
        EMATracker().start(_net(), per_step=0)


def test_swap_in_only_with_a_profile_and_close_restores_unless_told():
    net = _net()
    tracker = EMATracker((0.05, 0.10), evaluate_with=0.10)
    tracker.start(net)
    assert tracker.swap_in() is False  # no update yet: nothing to swap in
    _train(net, tracker, range(1, 4))
    live = net.weight.detach().clone()
    assert tracker.swap_in() is True
    assert torch.equal(net.weight.detach(), tracker.ema.profile(0.10)["weight"])
    tracker.close()
    assert torch.equal(net.weight.detach(), live)

    tracker = EMATracker((0.05, 0.10), evaluate_with=0.10)
    tracker.start(net)
    _train(net, tracker, range(1, 3))
    tracker.swap_in()
    with torch.no_grad():
        net.weight.fill_(3.0)  # weights loaded from elsewhere while swapped in
    tracker.close(restore=False)
    assert torch.equal(net.weight.detach(), torch.full_like(live, 3.0))


def test_snapshots_on_schedule():
    net = _net()
    url = "memory://tracker-schedule"
    tracker = EMATracker((0.05,), snapshots=url, snapshot_every=3, unit="samples", per_step=4)
    tracker.start(net)
    _train(net, tracker, range(1, 10))
    tracker.close()
    infos = phema.SnapshotStore(url).list()
    assert [(i.step, i.t, i.t_unit) for i in infos] == [
        (3, 12.0, "samples"),
        (6, 24.0, "samples"),
        (9, 36.0, "samples"),
    ]


def test_a_snapshot_when_steps_pass_a_multiple():
    """Steps that advance by 2 (two optimizers per batch) still snapshot every 3 steps."""
    net = _net()
    url = "memory://tracker-passing"
    tracker = EMATracker((0.05,), snapshots=url, snapshot_every=3)
    tracker.start(net)
    _train(net, tracker, range(2, 13, 2))
    tracker.close()
    assert [i.step for i in phema.SnapshotStore(url).list()] == [4, 6, 10, 12]


def test_a_damaged_state_names_what_it_lacks():
    tracker = EMATracker()
    with pytest.raises(StateError, match=r"lacks \['per_step', 'unit'\]"):
        tracker.load_state_dict({"format": "phema.tracker/1", "last_step": 3, "ema": {}})
