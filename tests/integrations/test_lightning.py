"""EMACallback in real Lightning runs: profiles against a float64 oracle, steps, evaluation, resume.

Tiny models on CPU. Every run records the parameters after each optimizer step (a
second callback placed after EMACallback), so the tests compare the callback's EMA
with the power-function average of the trajectory Lightning actually produced.
"""

import importlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

L = pytest.importorskip("lightning.pytorch")

import torch.nn.functional as F  # noqa: E402
from launch import run_torchrun  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import phema  # noqa: E402
from phema import ProfileError, StateError, TrackingError  # noqa: E402
from phema.integrations.lightning import EMACallback  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
    "ignore:.*exists and is not empty:UserWarning",
)

STDS = (0.05, 0.10)
BATCH = 8
TRAIN_BATCHES = 6  # batches per epoch


# -- model, data and trainer ----------------------------------------------------------


class Net(L.LightningModule):
    """A 2-layer MLP; records what validation and test see."""

    def __init__(self, fail_validation_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.fail_validation_at = fail_validation_at
        self.val_steps = []  # (sanity, global_step, weights, loss) per validation batch
        self.val_epoch_ends = []  # (sanity, global_step, weights)
        self.test_steps = []  # (weights, loss)

    def weights(self):
        return {n: p.detach().clone() for n, p in self.named_parameters()}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        if self.fail_validation_at == self.trainer.global_step:
            raise RuntimeError("validation failed")
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("val_loss", loss)
        sanity = self.trainer.sanity_checking
        self.val_steps.append((sanity, self.trainer.global_step, self.weights(), loss.item()))

    def on_validation_epoch_end(self):
        sanity = self.trainer.sanity_checking
        self.val_epoch_ends.append((sanity, self.trainer.global_step, self.weights()))

    def test_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        self.log("test_loss", loss)
        self.test_steps.append((self.weights(), loss.item()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class ManualNet(Net):
    """Manual optimization: one optimizer step every other batch."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        self.manual_backward(F.mse_loss(self.net(x), y))
        if batch_idx % 2 == 1:
            opt.step()
            opt.zero_grad()


def loader(n, seed, batch_size=BATCH):
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))
    return DataLoader(data, batch_size=batch_size)


TRAIN = loader(TRAIN_BATCHES * BATCH, 0)
VAL = loader(16, 1, batch_size=16)  # one validation batch


def trainer(root, callbacks, **kwargs):
    kwargs.setdefault("enable_checkpointing", False)
    kwargs.setdefault("num_sanity_val_steps", 0)
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        callbacks=callbacks,
        default_root_dir=root,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
        deterministic=True,
        **kwargs,
    )


class Record(Callback):
    """Parameters (float64) after every optimizer step; profiles at ``at`` steps."""

    def __init__(self, ema_cb=None, at=()):
        self.steps, self.params, self.profiles = [], [], {}
        self.ema_cb, self.at = ema_cb, set(at)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > (self.steps[-1] if self.steps else 0):
            self.steps.append(step)
            self.params.append({n: p.detach().double() for n, p in pl_module.named_parameters()})
            if step in self.at:
                ema = self.ema_cb.ema
                self.profiles[step] = {s: ema.profile_state_dict(s) for s in ema.stds}


# -- float64 oracle ---------------------------------------------------------------------


def gamma_of(std):
    """The exponent with relative std ``std``: std^2 = (g+1) / ((g+2)^2 (g+3)), g >= 0.

    The right side falls from 1/12 at g = 0 towards 0, so bisection finds the root.
    """
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if (mid + 1) / ((mid + 2) ** 2 * (mid + 3)) > std * std:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def oracle(steps, params, std, per_step):
    """Power-function average of the recorded trajectory in float64.

    Sample i (after step s_i, at t_i = s_i * per_step) weighs
    (t_i^(g+1) - t_{i-1}^(g+1)) / t_N^(g+1), with t_0 = 0.
    """
    g = gamma_of(std)
    t = np.asarray(steps, dtype=np.float64) * per_step
    u = np.concatenate([[0.0], t]) / t[-1]
    w = u[1:] ** (g + 1) - u[:-1] ** (g + 1)
    assert w.sum() == pytest.approx(1.0, abs=1e-12)
    return {n: sum(float(wi) * p[n] for wi, p in zip(w, params, strict=True)) for n in params[0]}


def assert_matches_oracle(ema, record, per_step):
    """Compare with the oracle to 5e-7 of the largest weight.

    fp32 shadows: each update rounds once (half an ulp, 6e-8 relative) and damps the
    earlier errors by beta, so the error stays at a few ulp instead of growing with the
    steps (measured: at most 1.7e-7 over 60 and 120 steps of these runs). One update
    missed or added moves the profile by more than 1e-3 (checked below).
    """
    for std in ema.stds:
        want = oracle(record.steps, record.params, std, per_step)
        got = ema.profile(std)
        scale = max(max(p[n].abs().max().item() for n in p) for p in record.params)
        for n in want:
            torch.testing.assert_close(got[n].double(), want[n], rtol=0, atol=5e-7 * scale)


def assert_states_equal(a, b):
    assert a["t"] == b["t"]
    assert a["num_updates"] == b["num_updates"]
    assert a["shadows"].keys() == b["shadows"].keys()
    for n in a["shadows"]:
        assert torch.equal(a["shadows"][n], b["shadows"][n]), n


def assert_weights_equal(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


def val_loss_of(state):
    """The validation metric of a fresh model holding ``state``."""
    model = Net()
    model.load_state_dict(state)
    x, y = next(iter(VAL))
    with torch.no_grad():
        return F.mse_loss(model.net(x), y).item()


# -- tests ------------------------------------------------------------------------------


def test_profiles_match_float64_oracle(tmp_path):
    ema_cb = EMACallback(stds=(0.05, 0.10, 0.2), unit="samples", per_step=BATCH)
    record = Record()
    trainer(tmp_path, [ema_cb, record], max_epochs=2).fit(Net(), TRAIN)
    ema = ema_cb.ema
    assert record.steps == list(range(1, 2 * TRAIN_BATCHES + 1))
    assert ema.num_updates == 2 * TRAIN_BATCHES
    assert ema.t == 2 * TRAIN_BATCHES * BATCH
    assert_matches_oracle(ema, record, BATCH)
    # The tolerance tells a missing update apart: leave out the next-to-last sample.
    std = ema.stds[1]
    skipped = oracle(
        record.steps[:-2] + record.steps[-1:], record.params[:-2] + record.params[-1:], std, BATCH
    )
    got = ema.profile(std)
    assert max((got[n].double() - skipped[n]).abs().max().item() for n in got) > 1e-3


def test_accumulate_grad_batches_updates_once_per_optimizer_step(tmp_path):
    ema_cb = EMACallback(stds=STDS, per_step=2.0)
    record = Record()
    fit = trainer(tmp_path, [ema_cb, record], max_epochs=2, accumulate_grad_batches=2)
    fit.fit(Net(), TRAIN)
    steps = 2 * TRAIN_BATCHES // 2
    assert fit.global_step == steps
    assert ema_cb.ema.num_updates == steps
    assert ema_cb.ema.t == steps * 2.0
    assert record.steps == list(range(1, steps + 1))
    assert_matches_oracle(ema_cb.ema, record, 2.0)


def test_manual_optimization_counts_optimizer_steps(tmp_path):
    ema_cb = EMACallback(stds=STDS)
    record = Record()
    fit = trainer(tmp_path, [ema_cb, record], max_epochs=2)
    fit.fit(ManualNet(), TRAIN)
    assert fit.global_step == TRAIN_BATCHES  # one step per two batches
    assert ema_cb.ema.num_updates == TRAIN_BATCHES
    assert ema_cb.ema.t == TRAIN_BATCHES
    assert_matches_oracle(ema_cb.ema, record, 1.0)


def _validated_run(root, evaluate_with):
    ema_cb = EMACallback(stds=STDS, evaluate_with=evaluate_with)
    record = Record(ema_cb, at=range(1, 100))
    model = Net()
    fit = trainer(
        root, [ema_cb, record], max_epochs=2, val_check_interval=3, num_sanity_val_steps=1
    )
    fit.fit(model, TRAIN, VAL)
    return model, ema_cb, record, fit


def test_validation_uses_the_profile_and_training_resumes_from_training_weights(tmp_path):
    initial = Net().weights()
    model, ema_cb, record, fit = _validated_run(tmp_path / "a", 0.10)

    # The sanity check ran before any step, with the training weights, and did not raise.
    sanity = [v for v in model.val_steps if v[0]]
    assert len(sanity) == 1
    assert_weights_equal(sanity[0][2], initial)

    # Every other validation step and epoch end saw exactly the 0.10 profile of its step.
    validations = [v for v in model.val_steps if not v[0]]
    assert [v[1] for v in validations] == [3, 6, 9, 12]
    for _, step, weights, _ in validations:
        assert_weights_equal(weights, record.profiles[step][0.10])
    ends = [v for v in model.val_epoch_ends if not v[0]]
    assert [v[1] for v in ends] == [3, 6, 9, 12]
    for _, step, weights in ends:
        assert_weights_equal(weights, record.profiles[step][0.10])

    # The logged metric is the profile's: a fresh model with the profile computes it.
    logged = fit.callback_metrics["val_loss"].item()
    assert logged == pytest.approx(val_loss_of(ema_cb.ema.profile_state_dict(0.10)), rel=1e-6)
    assert logged != pytest.approx(val_loss_of(model.state_dict()), rel=1e-3)

    # Training went on from the training weights: same end as without evaluate_with.
    plain, plain_cb, _, _ = _validated_run(tmp_path / "b", None)
    assert_weights_equal(model.weights(), plain.weights())
    assert_states_equal(ema_cb.ema.state_dict(), plain_cb.ema.state_dict())
    assert_weights_equal(plain.val_steps[-1][2], plain.weights())  # None: training weights


def test_validation_error_restores_training_weights(tmp_path):
    ema_cb = EMACallback(stds=STDS, evaluate_with=0.10)
    record = Record()
    model = Net(fail_validation_at=6)
    fit = trainer(tmp_path, [ema_cb, record], max_epochs=2, val_check_interval=3)
    with pytest.raises(RuntimeError, match="validation failed"):
        fit.fit(model, TRAIN, VAL)
    assert [v[1] for v in model.val_steps] == [3]  # the validation at step 3 went through
    assert ema_cb.ema.swapped_std is None
    assert record.steps[-1] == 6
    want = {n: p.float() for n, p in record.params[-1].items()}
    assert_weights_equal(model.weights(), want)
    assert ema_cb.ema.profile(0.10)["net.0.weight"].ne(want["net.0.weight"]).any()


class SaveDuringValidation(Callback):
    """Saves a checkpoint from ``on_validation_epoch_end``, while the profile is in."""

    def __init__(self, path):
        self.path = path
        self.weights_after_save = None

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.global_step == TRAIN_BATCHES and not trainer.sanity_checking:
            before = pl_module.weights()
            trainer.save_checkpoint(self.path)
            self.weights_before_save = before
            self.weights_after_save = pl_module.weights()


def test_checkpoints_saved_during_validation_hold_the_training_weights(tmp_path):
    ema_cb = EMACallback(stds=STDS, evaluate_with=0.10)
    record = Record(ema_cb, at=[TRAIN_BATCHES])
    saver = SaveDuringValidation(tmp_path / "during.ckpt")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit = trainer(
        tmp_path, [saver, ema_cb, ckpt, record], max_steps=TRAIN_BATCHES, enable_checkpointing=True
    )
    fit.fit(Net(), TRAIN, VAL)
    training = {n: p.float() for n, p in record.params[-1].items()}
    profile = record.profiles[TRAIN_BATCHES][0.10]
    assert not torch.equal(training["net.0.weight"], profile["net.0.weight"])
    # The saving hook ran with the profile in, before and after the save.
    assert_weights_equal(saver.weights_before_save, profile)
    assert_weights_equal(saver.weights_after_save, profile)
    for path in (saver.path, tmp_path / "ckpt" / "last.ckpt"):
        saved = torch.load(path, weights_only=False)
        assert_weights_equal(saved["state_dict"], training)
        state = saved["callbacks"]["EMACallback"]
        assert state["last_step"] == TRAIN_BATCHES
        assert_weights_equal(
            {n: v[1] for n, v in state["ema"]["shadows"].items()},
            profile,
        )


def _resumable_run(root, store, ckpt_path=None, max_steps=2 * TRAIN_BATCHES):
    ema_cb = EMACallback(
        stds=STDS, snapshots=str(store), snapshot_every=4, evaluate_with=0.10, per_step=BATCH
    )
    model = Net()
    fit = trainer(
        root,
        [ema_cb, ModelCheckpoint(dirpath=root / "ckpt", save_last=True)],
        max_steps=max_steps,
        enable_checkpointing=True,
    )
    fit.fit(model, TRAIN, VAL, ckpt_path=ckpt_path)
    return model, ema_cb


def test_resume_from_last_checkpoint_is_bitwise(tmp_path):
    whole, whole_cb = _resumable_run(tmp_path / "whole", tmp_path / "whole-snaps")
    run = tmp_path / "split"
    _, first_cb = _resumable_run(run, tmp_path / "split-snaps", max_steps=TRAIN_BATCHES)
    assert first_cb.ema.num_updates == TRAIN_BATCHES
    resumed, resumed_cb = _resumable_run(run, tmp_path / "split-snaps", ckpt_path="last")
    assert_weights_equal(resumed.weights(), whole.weights())
    assert_states_equal(resumed_cb.ema.state_dict(), whole_cb.ema.state_dict())
    assert resumed_cb.tracker.last_step == whole_cb.tracker.last_step == 2 * TRAIN_BATCHES
    names = sorted(p.name for p in (tmp_path / "whole-snaps").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "split-snaps").iterdir())
    assert len(names) == 3 * len(STDS)  # steps 4, 8, 12
    for name in names:
        a = (tmp_path / "whole-snaps" / name).read_bytes()
        assert a == (tmp_path / "split-snaps" / name).read_bytes(), name


class SaveBeforeEMA(Callback):
    """Saves at the end of batch ``at``, before EMACallback's hook runs (placed first)."""

    def __init__(self, path, at):
        self.path, self.at = path, at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            trainer.save_checkpoint(self.path)


def test_checkpoint_taken_before_the_callback_runs_holds_that_step(tmp_path):
    ema_cb = EMACallback(stds=STDS)
    path = tmp_path / "early.ckpt"
    whole = Net()
    # At the end of an epoch: Lightning resumes a plain DataLoader at an epoch's start.
    saver = SaveBeforeEMA(path, TRAIN_BATCHES)
    trainer(tmp_path, [saver, ema_cb], max_steps=2 * TRAIN_BATCHES).fit(whole, TRAIN)
    state = torch.load(path, weights_only=False)["callbacks"]["EMACallback"]
    assert state["last_step"] == TRAIN_BATCHES
    assert state["ema"]["num_updates"] == TRAIN_BATCHES
    resumed_cb = EMACallback(stds=STDS)
    resumed = Net()
    fit = trainer(tmp_path, [resumed_cb], max_steps=2 * TRAIN_BATCHES)
    fit.fit(resumed, TRAIN, ckpt_path=path)
    assert_weights_equal(resumed.weights(), whole.weights())
    assert_states_equal(resumed_cb.ema.state_dict(), ema_cb.ema.state_dict())


def test_a_second_fit_continues_the_ema_and_sanity_checks_with_training_weights(tmp_path):
    ema_cb = EMACallback(stds=STDS, evaluate_with=0.10)
    record = Record()
    model = Net()
    fit = trainer(tmp_path, [ema_cb, record], max_steps=TRAIN_BATCHES, num_sanity_val_steps=1)
    fit.fit(model, TRAIN, VAL)
    after_first = model.weights()
    fit.fit_loop.epoch_loop.max_steps = 2 * TRAIN_BATCHES
    fit.fit(model, TRAIN, VAL)
    # The second fit's sanity check ran with a profile available, and did not use it.
    sanity = [v for v in model.val_steps if v[0]]
    assert len(sanity) == 2
    assert_weights_equal(sanity[1][2], after_first)
    assert record.steps == list(range(1, 2 * TRAIN_BATCHES + 1))
    assert_matches_oracle(ema_cb.ema, record, 1.0)
    # A new trainer counts from step 0 again: the EMA refuses to go back in time.
    again = trainer(tmp_path, [ema_cb], max_steps=TRAIN_BATCHES)
    with pytest.raises(TrackingError, match="starts at optimizer step 0"):
        again.fit(model, TRAIN)


def test_resuming_without_the_ema_state_raises(tmp_path):
    path = tmp_path / "plain.ckpt"
    fit = trainer(tmp_path, [], max_steps=3)
    fit.fit(Net(), TRAIN)
    fit.save_checkpoint(path)
    resumed = trainer(tmp_path, [EMACallback(stds=STDS)], max_steps=6)
    with pytest.raises(StateError, match=r"resumes at optimizer step 3 but the EMA has seen 0"):
        resumed.fit(Net(), TRAIN, ckpt_path=path)


def test_snapshots_every_n_steps_list_and_reconstruct(tmp_path):
    store = tmp_path / "snaps"
    ema_cb = EMACallback(
        stds=STDS, snapshots=str(store), snapshot_every=2, unit="samples", per_step=BATCH
    )
    record = Record(ema_cb, at=[4])
    trainer(tmp_path, [ema_cb, record], max_steps=7).fit(Net(), TRAIN)
    assert ema_cb.tracker.writer is None  # closed at the end of training
    infos = sorted(phema.SnapshotStore(str(store)).list(), key=lambda i: (i.step, i.std))
    assert [(i.step, i.t, i.std, i.t_unit) for i in infos] == [
        (s, s * BATCH, std, "samples") for s in (2, 4, 6) for std in STDS
    ]
    store_ = phema.SnapshotStore(str(store))
    for info in infos:
        assert info.gamma == pytest.approx(gamma_of(info.std), rel=1e-9)
        if info.step == 4:
            loaded = store_.load(info)
            want = {n: v.to(torch.float16) for n, v in record.profiles[4][info.std].items()}
            assert_weights_equal(loaded, want)
    # The stored profiles reconstruct: the last one (0.10 at t=48) comes back from all six.
    snaps = [phema.Snapshot(i.t, i.std, store_.load(i)) for i in infos]
    last = infos[-1]
    outs, solution = phema.reconstruct_in_memory(snaps, [phema.PowerProfile(last.t, 0.10)])
    assert solution.fits[0].rel_error < 1e-6
    for n, v in store_.load(last).items():
        torch.testing.assert_close(outs[0][n], v.float(), rtol=0, atol=1e-3)


def test_test_stage_and_evaluation_from_a_checkpoint_use_the_profile(tmp_path):
    ema_cb = EMACallback(stds=STDS, evaluate_with=0.05)
    model = Net()
    fit = trainer(
        tmp_path,
        [ema_cb, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)],
        max_steps=TRAIN_BATCHES,
        enable_checkpointing=True,
    )
    fit.fit(model, TRAIN)
    profile = ema_cb.ema.profile_state_dict(0.05)
    training = model.weights()
    fit.test(model, VAL)
    assert_weights_equal(model.test_steps[-1][0], profile)
    assert_weights_equal(model.weights(), training)  # swapped back after the test
    # A new trainer and callback evaluate a checkpoint with the EMA saved in it.
    fresh, fresh_cb = Net(), EMACallback(stds=STDS, evaluate_with=0.05)
    trainer(tmp_path, [fresh_cb]).test(fresh, VAL, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert_weights_equal(fresh.test_steps[-1][0], profile)
    assert_weights_equal(fresh.weights(), training)


def test_invalid_options_fail_at_construction():
    with pytest.raises(TrackingError, match=r"evaluate_with=0.2 is not a tracked std"):
        EMACallback(stds=(0.05, 0.10), evaluate_with=0.2)
    with pytest.raises(ProfileError):
        EMACallback(stds=(0.05, 0.5))
    with pytest.raises(TrackingError, match="needs snapshot_every"):
        EMACallback(snapshots="memory://x")
    with pytest.raises(TrackingError, match="stds is empty"):
        EMACallback(stds=())
    with pytest.raises(TrackingError, match="made when fitting starts"):
        _ = EMACallback().ema


def test_missing_lightning_names_the_extra(monkeypatch):
    for name in ("lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # None: "import name" raises
    monkeypatch.delitem(sys.modules, "phema.integrations.lightning")  # restored afterwards
    with pytest.raises(ImportError, match=r"pip install 'torch-phema\[lightning\]'"):
        importlib.import_module("phema.integrations.lightning")


def test_guide_example_runs(tmp_path, monkeypatch):
    """docs/lightning.md's first python block, with tiny stand-ins for its names, twice."""
    guide = Path(__file__).resolve().parents[2] / "docs" / "lightning.md"
    code = re.search(r"```python\n(.*?)```", guide.read_text(), re.DOTALL).group(1)
    # The guide's schedule is a real run's; shrink it (and fail if the guide changes it).
    assert code.count("snapshot_every=1000") == 1
    assert code.count("max_steps=100_000") == 1
    code = code.replace("snapshot_every=1000", "snapshot_every=2")
    monkeypatch.chdir(tmp_path)

    class MyModel(Net):
        steps_taken = 0

        def training_step(self, batch, batch_idx):
            MyModel.steps_taken += 1
            return super().training_step(batch, batch_idx)

    names = {}
    for max_steps in (4, 6):  # the second run resumes from the first's last.ckpt
        MyModel.steps_taken = 0
        names = {"MyModel": MyModel, "train_loader": TRAIN, "val_loader": VAL}
        run = code.replace("max_steps=100_000", f"max_steps={max_steps}")
        exec(compile(run, str(guide), "exec"), names)
    assert MyModel.steps_taken == 2
    assert names["ema_callback"].ema.num_updates == 6
    assert len(phema.SnapshotStore("runs/exp1/snapshots").list()) == 3 * len(STDS)
    saved = torch.load(tmp_path / "ema-0.10.pt")
    assert_weights_equal(saved, names["ema_callback"].ema.profile_state_dict(0.10))


WORKER = Path(__file__).with_name("lightning_worker.py")


@pytest.mark.slow
def test_ddp_two_ranks(tmp_path):
    """Two ranks under torchrun: a whole EMA per rank, then one split across the ranks."""
    done = run_torchrun([str(WORKER), str(tmp_path)], 2, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    plain = torch.load(tmp_path / "plain" / "ema-rank0.pt")
    assert plain["num_updates"] == 8
    for mode in ("plain", "partition"):
        out = tmp_path / mode
        results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        for r in results:
            assert r["global_step"] == 8
            assert r["sharded"] == (mode == "partition")
            assert r["validated"] == [True]  # validation at step 8 saw the 0.10 profile
        # Both ranks hold the same EMA, and the partitioned one is the whole one, split.
        for r in range(2):
            assert_states_equal(torch.load(out / f"ema-rank{r}.pt"), plain)
        saved = torch.load(out / "ckpt" / "last.ckpt", weights_only=False)
        assert_states_equal(saved["callbacks"]["EMACallback"]["ema"], plain)
        # Each snapshot exists once; whole ones are written by rank 0 alone.
        store = phema.SnapshotStore(str(out / "snaps"))
        listed = store.list()
        assert sorted((i.step, i.std) for i in listed) == [(s, std) for s in (4, 8) for std in STDS]
        assert results[0]["written"] == sorted(Path(i.path).name for i in listed)
        assert results[1]["written"] == []
        last = next(i for i in listed if i.step == 8 and i.std == 0.10)
        for n, v in store.load(last).items():
            assert torch.equal(v, plain["shadows"][n][1].to(torch.float16)), n


def test_snapshot_write_failures_are_raised_by_fit(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    ema_cb = EMACallback(stds=STDS, snapshots=str(tmp_path / "file" / "snaps"), snapshot_every=2)
    fit = trainer(tmp_path, [ema_cb], max_steps=2)  # one snapshot: its failure comes at the end
    with pytest.raises(phema.StorageError, match="could not be written"):
        fit.fit(Net(), TRAIN)
    assert ema_cb.ema.num_updates == 2
    # A run that fails otherwise raises its own error, with the write failure as a note.
    ema_cb = EMACallback(stds=STDS, snapshots=str(tmp_path / "file" / "snaps"), snapshot_every=2)
    fit = trainer(tmp_path, [ema_cb], max_steps=4, val_check_interval=2)
    with pytest.raises(RuntimeError, match="validation failed") as raised:
        fit.fit(Net(fail_validation_at=2), TRAIN, VAL)
    notes = getattr(raised.value, "__notes__", [])
    assert any("could not be written" in n for n in notes), notes
