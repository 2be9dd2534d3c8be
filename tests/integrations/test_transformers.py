"""phema.integrations.transformers.EMACallback under a real Hugging Face Trainer (CPU).

Every run uses a tiny plain ``nn.Module`` and random tensors, so nothing is downloaded.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

import phema  # noqa: E402
from phema.errors import StateError, TrackingError  # noqa: E402
from phema.integrations.transformers import STATE_NAME, EMACallback  # noqa: E402

DOCS = Path(__file__).resolve().parents[2] / "docs"
STDS = (0.05, 0.10)


class TinyNet(nn.Module):
    """A classifier whose forward takes the batch's keys, as the Trainer calls it."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8)  # buffers: the profiles copy the live statistics
        self.out = nn.Linear(8, 3)

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.out(torch.tanh(self.norm(self.hidden(x))))
        result = {"logits": logits}
        if labels is not None:
            result["loss"] = F.cross_entropy(logits, labels)
        return result


class Pairs(torch.utils.data.Dataset):
    """Random inputs with labels from a fixed rule, so training makes progress."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x[:, :3].sum(1) > 0).long() + (self.x[:, 3] > 1).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


TRAIN = Pairs(64, seed=1)
EVAL = Pairs(24, seed=2)


def make_args(out: Path, **kw) -> TrainingArguments:
    base = {
        "output_dir": str(out),
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": len(EVAL),  # one batch: eval_loss is one forward
        "learning_rate": 0.05,
        "lr_scheduler_type": "constant",
        "max_steps": 8,
        "save_strategy": "no",
        "logging_steps": 1,
        "report_to": [],
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 7,
        "data_seed": 7,
    }
    base.update(kw)
    return TrainingArguments(**base)


def make_trainer(out: Path, callbacks, model=None, **kw) -> Trainer:
    return Trainer(
        model=model if model is not None else TinyNet(),
        args=make_args(out, **kw),
        train_dataset=TRAIN,
        eval_dataset=EVAL,
        callbacks=callbacks,
    )


class Recorder(TrainerCallback):
    """The model's parameters (float64 copies) after every optimizer step.

    Placed before EMACallback in ``callbacks``, it sees the training weights before any
    profile is swapped in for an evaluation.
    """

    def __init__(self) -> None:
        self.params: dict[int, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, model=None, **kw):
        self.params[state.global_step] = {
            n: p.detach().to(torch.float64).clone() for n, p in model.named_parameters()
        }


class StopAt(TrainerCallback):
    """Stops training after optimizer step ``step`` (stands for a crash after a save)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            control.should_training_stop = True


def eval_loss_of(state_dict: dict[str, torch.Tensor]) -> float:
    """The eval loss of a fresh TinyNet loaded with ``state_dict``, computed here."""
    net = TinyNet(seed=123)
    net.load_state_dict(state_dict)
    net.eval()
    with torch.no_grad():
        return float(net(EVAL.x, EVAL.y)["loss"])


def oracle_gamma(std: float) -> float:
    """Exponent of the power-function profile of relative std ``std`` (EDM2's cubic)."""
    roots = np.roots([1.0, 7.0, 16.0 - std**-2, 12.0 - std**-2])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-12))


def oracle_profile(trajectory: list[dict[str, torch.Tensor]], times: list[float], std: float):
    """Power-function EMA over the trajectory in float64: weight of the weights after step i is
    (t_i^(g+1) - t_(i-1)^(g+1)) / t_n^(g+1), with t_0 = 0."""
    g1 = oracle_gamma(std) + 1.0
    t_end = times[-1] ** g1
    out = {n: torch.zeros_like(v) for n, v in trajectory[0].items()}
    prev = 0.0
    for params, t in zip(trajectory, times, strict=True):
        w = (t**g1 - prev**g1) / t_end
        prev = t
        for n, v in params.items():
            out[n] += w * v
    return out


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n], b[n]), n


# ---- profiles ------------------------------------------------------------------------------


def test_profiles_equal_float64_oracle_with_gradient_accumulation(tmp_path):
    rec = Recorder()
    cb = EMACallback(STDS, unit="samples")  # per_step: 4 per device x 2 accumulated x 1
    make_trainer(tmp_path, [rec, cb], gradient_accumulation_steps=2).train()

    steps = sorted(rec.params)
    assert steps == list(range(1, 9))  # on_step_end: optimizer steps only
    ema = cb.ema
    assert ema is not None
    assert ema.num_updates == 8  # one update per optimizer step, not per micro-batch
    assert cb.tracker.per_step == 8.0
    assert ema.t == 8 * 8.0
    trajectory = [rec.params[s] for s in steps]
    times = [8.0 * s for s in steps]
    eps32 = torch.finfo(torch.float32).eps
    for std in STDS:
        want = oracle_profile(trajectory, times, std)
        got = ema.profile(std)
        for name, value in want.items():
            # fp32 shadows: each of the 8 lerps rounds once (<= eps/2 of the magnitude), so
            # the error stays below steps x eps x max|theta| (a few 1e-7 relative)
            scale = max(float(v[name].abs().max()) for v in trajectory)
            err = float((got[name].double() - value).abs().max())
            assert err <= len(steps) * eps32 * scale, (std, name, err)
        # the profile is not the last weights nor the uniform average: the weighting matters
        last = trajectory[-1]["out.weight"]
        assert float((got["out.weight"].double() - last).abs().max()) > 1e-4
    # a different std gives a different average
    assert not torch.allclose(ema.profile(0.05)["out.weight"], ema.profile(0.10)["out.weight"])


def test_import_error_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "phema.integrations.transformers")
    with pytest.raises(ImportError, match=r"pip install 'torch-phema\[transformers\]'"):
        importlib.import_module("phema.integrations.transformers")


def test_unit_options(tmp_path):
    with pytest.raises(TrackingError, match="per_step"):
        EMACallback(STDS, unit="tokens")
    with pytest.raises(TrackingError, match="per_step"):
        EMACallback(STDS, per_step=0.0)
    with pytest.raises(TrackingError, match="not a tracked std"):
        EMACallback(STDS, evaluate_with=0.2)
    cb = EMACallback(STDS, unit="tokens", per_step=512.0)
    make_trainer(tmp_path, [cb], max_steps=3).train()
    assert cb.ema is not None
    assert cb.ema.t == 3 * 512.0


def test_a_second_train_from_step_0_starts_a_new_ema(tmp_path):
    rec = Recorder()
    cb = EMACallback(STDS)
    trainer = make_trainer(tmp_path, [rec, cb], max_steps=3)
    trainer.train()
    first = cb.ema
    trainer.train()  # the Trainer starts again at step 0, from the trained weights
    assert cb.ema is not first
    assert cb.ema is not None
    assert cb.ema.num_updates == 3
    # the new EMA averages the second run's weights only
    times = [1.0, 2.0, 3.0]
    want = oracle_profile([rec.params[s] for s in (1, 2, 3)], times, 0.10)
    got = cb.ema.profile(0.10)
    for name, value in want.items():
        torch.testing.assert_close(got[name].double(), value, rtol=0, atol=1e-6)


# ---- evaluation with a profile ---------------------------------------------------------------


class EvalProbe(TrainerCallback):
    """After each periodic evaluation (placed after EMACallback): the metrics, the weights
    the model holds again, and the eval loss of a fresh model loaded with the profile."""

    def __init__(self, cb: EMACallback, std: float | None) -> None:
        self.cb, self.std = cb, std
        self.seen: list[tuple[int, float, float | None, dict[str, torch.Tensor]]] = []

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kw):
        ema = self.cb.ema
        independent = None
        if self.std is not None and ema is not None:
            independent = eval_loss_of(ema.profile_state_dict(self.std))
        self.seen.append((state.global_step, metrics["eval_loss"], independent, params_of(model)))


def _periodic_eval_run(out: Path, evaluate_with: float | None):
    rec = Recorder()
    cb = EMACallback(STDS, evaluate_with=evaluate_with)
    probe = EvalProbe(cb, evaluate_with)
    trainer = make_trainer(
        out,
        [rec, cb, probe],
        max_steps=7,  # evaluations at 3 and 6 (steps) and 7 (the end)
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
    )
    trainer.train()
    return trainer, rec, cb, probe


def test_periodic_evaluation_uses_profile_and_checkpoints_hold_training_weights(tmp_path):
    trainer, rec, _cb, probe = _periodic_eval_run(tmp_path / "ema", evaluate_with=0.10)
    plain, _rec0, _, probe0 = _periodic_eval_run(tmp_path / "plain", evaluate_with=None)

    assert [s for s, *_ in probe.seen] == [3, 6, 7]
    for (step, loss, independent, held), (step0, loss0, _, _) in zip(
        probe.seen, probe0.seen, strict=True
    ):
        assert step == step0
        # eval_loss is the profile's, computed by an independent model (same float32 ops)
        assert loss == pytest.approx(independent, rel=1e-6, abs=0)
        # ... and not the training weights' (what the run without evaluate_with reports)
        assert abs(loss - loss0) > 1e-4
        # right after the evaluation the model holds the training weights again
        want = {n: v.float() for n, v in rec.params[step].items()}
        assert_bitwise(held, want)
    # the checkpoints saved right after evaluations hold the training weights
    for step in (3, 6):
        saved = load_file(str(tmp_path / "ema" / f"checkpoint-{step}" / "model.safetensors"))
        for n, v in rec.params[step].items():
            assert torch.equal(saved[n], v.float()), (step, n)
    # evaluating with a profile changes nothing in training: same final model, bitwise
    assert_bitwise(params_of(trainer.model), params_of(plain.model))
    # the log records the profile's metrics
    logged = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert logged == [loss for _, loss, *_ in probe.seen]


def test_an_eval_dataset_dict_is_refused_after_its_first_dataset(tmp_path):
    """The Trainer evaluates a dict's datasets back to back: the second could not have the
    profile, so the callback stops at the first one's on_evaluate, weights restored."""
    rec = Recorder()
    cb = EMACallback(STDS, evaluate_with=0.10)
    trainer = Trainer(
        model=TinyNet(),
        args=make_args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=3),
        train_dataset=TRAIN,
        eval_dataset={"a": EVAL, "b": EVAL},
        callbacks=[rec, cb],
    )
    with pytest.raises(TrackingError, match="cannot cover an eval_dataset dict"):
        trainer.train()
    assert cb.ema.swapped_std is None
    want = {n: v.float() for n, v in rec.params[3].items()}
    assert_bitwise(params_of(trainer.model), want)  # the training weights after step 3
    logged = [h for h in trainer.state.log_history if "eval_a_loss" in h or "eval_b_loss" in h]
    assert [sorted(k for k in h if k.endswith("_loss")) for h in logged] == [["eval_a_loss"]]
    # the same datasets one by one, each under the profile, work
    with cb.swapped(0.10):
        metrics = [trainer.evaluate(EVAL, metric_key_prefix=f"eval_{n}") for n in "ab"]
    assert metrics[0]["eval_a_loss"] == metrics[1]["eval_b_loss"]


def test_swapped_context_for_trainer_evaluate(tmp_path):
    cb = EMACallback(STDS)
    trainer = make_trainer(tmp_path, [cb], max_steps=6)
    with pytest.raises(TrackingError, match="does not exist yet"), cb.swapped(0.05):
        pass
    trainer.train()
    before = params_of(trainer.model)
    trained = trainer.evaluate()["eval_loss"]
    assert trained == pytest.approx(eval_loss_of(trainer.model.state_dict()), rel=1e-6, abs=0)
    assert cb.ema is not None
    for std in STDS:
        with cb.swapped(std) as module:
            assert module is trainer.model
            loss = trainer.evaluate()["eval_loss"]
        assert loss == pytest.approx(eval_loss_of(cb.ema.profile_state_dict(std)), rel=1e-6)
        assert abs(loss - trained) > 1e-4
        assert_bitwise(params_of(trainer.model), before)  # training weights restored
    with pytest.raises(TrackingError, match="pass the std"), cb.swapped():
        pass

    # restored also when the evaluation raises
    def evaluate_then_fail():
        with cb.swapped(0.05):
            trainer.evaluate()
            raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        evaluate_then_fail()
    assert_bitwise(params_of(trainer.model), before)


def test_evaluation_that_raises_leaves_profile_until_swap_out(tmp_path):
    def broken_metrics(_):
        raise ValueError("metric failed")

    rec = Recorder()
    cb = EMACallback(STDS, evaluate_with=0.05)
    trainer = make_trainer(tmp_path, [rec, cb], max_steps=4, eval_strategy="steps", eval_steps=2)
    trainer.compute_metrics = broken_metrics
    with pytest.raises(ValueError, match="metric failed"):
        trainer.train()
    assert cb.ema is not None
    assert cb.ema.swapped_std == 0.05
    cb.tracker.swap_out()
    assert_bitwise(params_of(trainer.model), {n: v.float() for n, v in rec.params[2].items()})


# ---- resume ----------------------------------------------------------------------------------


def _snapshot_tensors(url: str) -> dict[tuple[float, float, int | None], dict[str, torch.Tensor]]:
    store = phema.SnapshotStore(url)
    return {(i.t, i.std, i.step): store.load(i) for i in store.list()}


def _resume_run(out: Path, snaps: Path, *, stop_at: int | None, resume=None, seed: int = 0, **kw):
    cb = EMACallback(STDS, snapshots=str(snaps), snapshot_every=2, unit="samples")
    callbacks = [cb] if stop_at is None else [cb, StopAt(stop_at)]
    kw = {"save_strategy": "steps", "save_steps": 2, **kw}
    trainer = make_trainer(out, callbacks, model=TinyNet(seed), **kw)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb


def test_resume_is_bitwise_and_snapshots_match(tmp_path):
    full, full_cb = _resume_run(tmp_path / "full", tmp_path / "full-snaps", stop_at=None)
    # stopped after step 7 (a crash after the save at 6); rotation keeps two checkpoints
    _, part_cb = _resume_run(tmp_path / "a", tmp_path / "a-snaps", stop_at=7, save_total_limit=2)
    assert part_cb.tracker.last_step == 7
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["checkpoint-4", "checkpoint-6"]
    assert (tmp_path / "a" / "checkpoint-4" / STATE_NAME).is_file()
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.copytree(tmp_path / "a-snaps", tmp_path / "b-snaps")

    # from checkpoint-4 (=<folder>) and checkpoint-6 (=True), into models initialised otherwise
    folder = str(tmp_path / "a" / "checkpoint-4")
    runs = [
        _resume_run(tmp_path / "a", tmp_path / "a-snaps", stop_at=None, resume=folder, seed=5),
        _resume_run(tmp_path / "b", tmp_path / "b-snaps", stop_at=None, resume=True, seed=6),
    ]
    want_state = full_cb.tracker.state_dict()
    want_snaps = _snapshot_tensors(str(tmp_path / "full-snaps"))
    assert sorted((k[2], k[0]) for k in want_snaps) == [
        (s, s * 4.0) for s in (2, 2, 4, 4, 6, 6, 8, 8)
    ]
    for (trainer, cb), snaps in zip(runs, ("a-snaps", "b-snaps"), strict=True):
        assert_bitwise(params_of(trainer.model), params_of(full.model))
        state = cb.tracker.state_dict()
        assert state["last_step"] == 8
        assert state["ema"]["num_updates"] == 8
        assert state["ema"]["t"] == want_state["ema"]["t"]
        assert_bitwise(state["ema"]["shadows"], want_state["ema"]["shadows"])
        # the snapshot at step 6 the stopped run wrote is written again, with the same bytes
        got_snaps = _snapshot_tensors(str(tmp_path / snaps))
        assert got_snaps.keys() == want_snaps.keys()
        for key, tensors in want_snaps.items():
            assert_bitwise(got_snaps[key], tensors)


def test_resume_without_matching_ema_state_is_a_clear_error(tmp_path):
    _resume_run(tmp_path / "a", tmp_path / "a-snaps", stop_at=4)
    folder = tmp_path / "a" / "checkpoint-4"

    # the state file is missing (a checkpoint saved without EMACallback, or a crash before
    # on_save): an error naming the file and the fix, not a fresh EMA
    shutil.copytree(tmp_path / "a", tmp_path / "gone")
    (tmp_path / "gone" / "checkpoint-4" / STATE_NAME).unlink()
    with pytest.raises(StateError) as err:
        _resume_run(tmp_path / "gone", tmp_path / "s1", stop_at=None, resume=True)
    assert str(tmp_path / "gone" / "checkpoint-4" / STATE_NAME) in str(err.value)
    assert "resume_from_checkpoint" in str(err.value)

    # a checkpoint outside output_dir: the callback says where it looked ...
    with pytest.raises(StateError, match=re.escape(str(tmp_path / "elsewhere" / "checkpoint-4"))):
        _resume_run(tmp_path / "elsewhere", tmp_path / "s2", stop_at=None, resume=str(folder))
    # ... and finds it through args.resume_from_checkpoint
    _, cb = _resume_run(
        tmp_path / "elsewhere",
        tmp_path / "s3",
        stop_at=None,
        resume=str(folder),
        resume_from_checkpoint=str(folder),
    )
    assert cb.ema is not None
    assert cb.ema.num_updates == 8
    assert cb.tracker.last_step == 8

    # output_dir/checkpoint-4 exists but is another run's (its log history differs)
    _resume_run(tmp_path / "other", tmp_path / "s4", stop_at=4, seed=9)
    with pytest.raises(StateError, match="not the checkpoint this run resumed from"):
        _resume_run(tmp_path / "other", tmp_path / "s5", stop_at=None, resume=str(folder))

    # a state saved at another step than the one resumed
    shutil.copytree(tmp_path / "a", tmp_path / "step")
    shutil.copy(folder.parent / "checkpoint-2" / STATE_NAME, tmp_path / "step" / "checkpoint-4")
    with pytest.raises(StateError, match="after step 2, but training resumes at step 4"):
        _resume_run(tmp_path / "step", tmp_path / "s6", stop_at=None, resume=True)

    # a pickled object (never unpickled: weights_only) or another torch file is refused
    state_path = tmp_path / "step" / "checkpoint-4" / STATE_NAME
    for name, content in (("pickled", TinyNet()), ("foreign", {"format": "other"})):
        torch.save(content, state_path)
        with pytest.raises(StateError, match=re.escape(str(state_path))):
            _resume_run(tmp_path / "step", tmp_path / f"s-{name}", stop_at=None, resume=True)

    # a NaN in the log history (a logged grad_norm) is still the same run's history
    shutil.copytree(tmp_path / "a", tmp_path / "nan")
    state_file = tmp_path / "nan" / "checkpoint-4" / "trainer_state.json"
    saved = json.loads(state_file.read_text())
    saved["log_history"][0]["grad_norm"] = float("nan")
    state_file.write_text(json.dumps(saved))
    _, cb = _resume_run(tmp_path / "nan", tmp_path / "s7", stop_at=None, resume=True)
    assert cb.tracker.last_step == 8


# ---- snapshots -------------------------------------------------------------------------------


class ProfileProbe(TrainerCallback):
    """Every profile after optimizer step ``step`` (placed after EMACallback)."""

    def __init__(self, cb: EMACallback, step: int) -> None:
        self.cb, self.step = cb, step
        self.profiles: dict[float, dict[str, torch.Tensor]] = {}

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            ema = self.cb.ema
            self.profiles = {
                s: {
                    k: v.half() if v.is_floating_point() else v  # buffers too, as stored
                    for k, v in ema.profile_state_dict(s).items()
                }
                for s in STDS
            }


def test_snapshots_every_n_steps(tmp_path):
    url = str(tmp_path / "snaps")
    cb = EMACallback(STDS, snapshots=url, snapshot_every=3, unit="samples")
    probe = ProfileProbe(cb, step=6)
    make_trainer(tmp_path / "out", [cb, probe], max_steps=10, gradient_accumulation_steps=2).train()
    assert cb.tracker.writer is None  # closed at on_train_end

    infos = phema.SnapshotStore(url).list()
    per_step = 4 * 2  # global batch: 4 per device x 2 accumulated
    assert [(i.step, i.t, i.std) for i in infos] == [
        (s, float(s * per_step), std) for s in (3, 6, 9) for std in STDS
    ]
    assert {i.t_unit for i in infos} == {"samples"}
    store = phema.SnapshotStore(url)
    for info in infos:
        if info.step == 6:
            got = store.load(info)
            want = probe.profiles[info.std]
            assert got["out.weight"].dtype == torch.float16
            assert_bitwise(got, want)


# ---- the guides' code ------------------------------------------------------------------------


def _guide_block(name: str, index: int = 0) -> str:
    text = (DOCS / name).read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)[index]


def _shrink(code: str, **subs: str) -> str:
    """The block with its long schedule made short; every text replaced must be there."""
    for old, new in subs.items():
        assert old in code, old
        code = code.replace(old, new)
    return code


def test_transformers_guide_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = _shrink(
        _guide_block("transformers.md"),
        **{
            "max_steps=100_000": "max_steps=12",
            "eval_steps=5000": "eval_steps=6",
            "save_steps=5000": "save_steps=6",
            "snapshot_every=1000": "snapshot_every=4",
            "report_to=[],": "report_to=[], use_cpu=True, disable_tqdm=True, per_device_eval_batch_size=24,",
        },
    )
    ns = {"model": TinyNet(), "train_dataset": TRAIN, "eval_dataset": EVAL}
    exec(compile(code, "docs/transformers.md", "exec"), ns)

    cb, trainer = ns["ema_callback"], ns["trainer"]
    per_step = trainer.args.per_device_train_batch_size  # one process, no accumulation
    infos = phema.SnapshotStore("runs/exp1/snapshots").list()
    assert [(i.step, i.t) for i in infos] == [(s, s * per_step) for s in (4, 8, 12) for _ in STDS]
    for step in (6, 12):
        assert (tmp_path / "runs" / "exp1" / f"checkpoint-{step}" / STATE_NAME).is_file()
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 3
    assert evals[-1] == ns["metrics"]["eval_loss"]
    assert ns["metrics"]["eval_loss"] == pytest.approx(
        eval_loss_of(cb.ema.profile_state_dict(0.05)), rel=1e-6
    )
    saved = torch.load("runs/exp1/ema-0.10.pt", weights_only=True)
    assert_bitwise(saved, cb.ema.profile_state_dict(0.10))

    # after training: a profile rebuilt from the snapshots (times in the store's unit)
    # matches the tracked one up to the snapshots' float16 rounding
    (out,) = phema.reconstruct("runs/exp1/snapshots", [0.10], "runs/exp1/ema")
    net = TinyNet(seed=3)
    phema.load(out.path, net)
    want = cb.ema.profile(0.10)
    for name, value in net.named_parameters():
        torch.testing.assert_close(value.detach(), want[name], rtol=2e-3, atol=1e-3)


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _run_accelerate_guide(code: str, *, num_epochs: int, resume_from: str | None, seed: int):
    """Runs the guide's block with fresh stand-ins; returns its namespace and the loss and
    tracker state seen by each ``evaluate`` call."""
    _reset_accelerate()
    model = TinyNet(seed)
    seen: list[tuple[float, float, dict]] = []
    ns: dict = {}

    def evaluate(net):
        ema = ns["tracker"].ema
        net.eval()
        with torch.no_grad():
            loss = float(net(EVAL.x, EVAL.y)["loss"])
        net.train()
        seen.append((loss, eval_loss_of(ema.profile_state_dict(0.10)), ns["tracker"].state_dict()))

    ns.update(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
        dataloader=torch.utils.data.DataLoader(TRAIN, batch_size=4),
        evaluate=evaluate,
        num_epochs=num_epochs,
        resume_from=resume_from,
    )
    exec(compile(code, "docs/accelerate.md", "exec"), ns)
    return ns, seen


def test_accelerate_guide_resumes_bitwise(tmp_path, monkeypatch):
    pytest.importorskip("accelerate")
    monkeypatch.chdir(tmp_path)
    code = _shrink(_guide_block("accelerate.md"), **{"snapshot_every=1000": "snapshot_every=4"})
    try:
        full, full_seen = _run_accelerate_guide(code, num_epochs=3, resume_from=None, seed=0)
        # 64 samples in batches of 4, 2 accumulated: 8 optimizer steps per epoch
        assert full["tracker"].last_step == 24
        assert full["tracker"].ema.num_updates == 24
        assert full["tracker"].per_step == 8.0
        for loss, independent, _ in full_seen:  # evaluate() saw the 0.10 profile
            assert loss == pytest.approx(independent, rel=1e-6)
        store = phema.SnapshotStore("runs/exp1/snapshots")
        assert [(i.step, i.t) for i in store.list()] == [
            (s, s * 8.0) for s in range(4, 25, 4) for _ in STDS
        ]
        epoch0 = full_seen[0][2]

        # load_state into fresh objects gives the EMA as saved after epoch 0, bitwise
        loaded, _ = _run_accelerate_guide(
            code, num_epochs=1, resume_from="runs/exp1/epoch-0", seed=4
        )
        state = loaded["tracker"].state_dict()
        assert state["last_step"] == 8
        assert state["ema"]["t"] == epoch0["ema"]["t"]
        assert_bitwise(state["ema"]["shadows"], epoch0["ema"]["shadows"])

        # resumed after epoch 0 and trained on: the uninterrupted run's model and EMA
        resumed, _ = _run_accelerate_guide(
            code, num_epochs=3, resume_from="runs/exp1/epoch-0", seed=5
        )
        assert_bitwise(params_of(resumed["model"]), params_of(full["model"]))
        got, want = resumed["tracker"].state_dict(), full["tracker"].state_dict()
        assert got["last_step"] == 24
        assert got["ema"]["num_updates"] == 24
        assert_bitwise(got["ema"]["shadows"], want["ema"]["shadows"])

        # the guide's pickle-free variant round-trips the state too
        ns = {**full, "folder": "runs/exp1/epoch-2", "torch": torch}
        exec(compile(_guide_block("accelerate.md", 1), "docs/accelerate.md", "exec"), ns)
        again = ns["tracker"].state_dict()
        assert_bitwise(again["ema"]["shadows"], want["ema"]["shadows"])
    finally:
        _reset_accelerate()


# ---- several processes -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["plain", "partition"])
def test_ddp_two_processes_resume(tmp_path, mode):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from launch import run_torchrun

    worker = Path(__file__).with_name("transformers_worker.py")
    done = run_torchrun([str(worker), str(tmp_path), mode], 2, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    ckpt = tmp_path / "run" / "checkpoint-4"
    files = sorted(p.name for p in ckpt.glob("phema_ema*.pt"))
    if mode == "plain":  # one whole state, written by the main process only
        assert files == [STATE_NAME]
    else:  # each rank's rows
        assert files == ["phema_ema-rank00000-of-00002.pt", "phema_ema-rank00001-of-00002.pt"]
    results = {
        (name, r): torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True)
        for name in ("full", "resumed")
        for r in (0, 1)
    }
    full = results["full", 0]
    assert full["sharded"] == (mode == "partition")
    assert full["per_step"] == 4 * 2  # 4 per device x 2 processes
    assert full["num_updates"] == 8
    assert full["t"] == 8 * 8.0
    assert len(full["eval_losses"]) == 2
    for key, got in results.items():
        assert_bitwise(got["params"], full["params"])  # DDP: the same weights on every rank
        for std in STDS:
            assert_bitwise(got["profiles"][std], full["profiles"][std])
        assert got["num_updates"] == 8, key
        assert got["eval_losses"][-1] == full["eval_losses"][-1], key
    snaps_full = _snapshot_tensors(str(tmp_path / "snaps-full"))
    snaps_run = _snapshot_tensors(str(tmp_path / "snaps-run"))
    assert sorted(k[2] for k in snaps_full) == [2, 2, 4, 4, 6, 6, 8, 8]
    assert snaps_run.keys() == snaps_full.keys()
    for key, tensors in snaps_full.items():
        assert_bitwise(snaps_run[key], tensors)
