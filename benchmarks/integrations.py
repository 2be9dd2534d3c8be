"""What the framework integrations add to each EMA update: per-step overhead vs a bare call.

Each case owns an identical model and a ``PowerFunctionEMA`` of the same profiles
(stds 0.05 and 0.10) and performs one real EMA update per optimizer step:

* ``bare``: ``ema.update(t)`` called directly (the reference);
* ``tracker``: ``EMATracker.step(step)``, the part both callbacks share;
* ``lightning``: ``EMACallback.on_train_batch_end`` as Lightning calls it, with a
  trainer whose ``global_step`` advances once per optimizer step; with ``--accumulate k``
  the hook also runs k - 1 times per step for batches that only accumulate (no update);
* ``transformers``: ``EMACallback.on_step_end`` with the Trainer's own
  ``TrainingArguments``, ``TrainerState`` and ``TrainerControl``.

The hooks are called directly, so the figures are the integration's own cost, not the
framework's dispatch, which is the same for any callback. No snapshots are written (a
snapshot's cost is ``SnapshotWriter.save``'s, measured by ``train_throughput.py``).
Cases are interleaved over rounds in a rotating order; each round times ``--calls``
consecutive steps per case. Per case, the figures are:

* ``us_per_step_*``: min/median/max over rounds of µs per optimizer step, update
  included;
* ``own_us``: the integration's own cost per step, measured in a second pass in which
  every EMA's ``update`` does nothing (so no memory traffic makes noise): the case's
  median minus the bare call's median;
* ``overhead`` = ``own_us`` / the bare update's least time per step: the share of the
  update's own cost the integration adds (target < 5%);
* ``paired_ratio_*``: median and quartiles over rounds of (case / bare - 1) in the
  first pass, each round's case paired with that round's bare time: the same
  quantity measured directly, with the spread a noisy machine gives it.

The integration's cost is a fixed one per step, so ``--tiny``, where the update itself
is cheapest, is the strictest test of the target.

    python benchmarks/integrations.py            # ~1.1M-parameter MLP, 8 tensors
    python benchmarks/integrations.py --tiny     # ~5k parameters: fixed costs dominate
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from types import SimpleNamespace

import torch
from _common import emit, sig
from torch import nn

import phema
from phema.integrations.tracker import EMATracker

BENCH = "integrations"
STDS = (0.05, 0.10)
TARGET = 0.05


def build(tiny: bool) -> nn.Module:
    width = 32 if tiny else 512
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(64, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, width),
        nn.GELU(),
        nn.Linear(width, 64),
    )


Step = Callable[[int], None]
Case = tuple[Step, phema.PowerFunctionEMA]


def bare_case(model: nn.Module) -> Case:
    ema = phema.PowerFunctionEMA(model, STDS)
    return (lambda s: ema.update(float(s))), ema


def tracker_case(model: nn.Module) -> Case:
    tracker = EMATracker(STDS)
    return tracker.step, tracker.start(model)


def lightning_case(model: nn.Module, accumulate: int) -> Case | str:
    try:
        from phema.integrations.lightning import EMACallback
    except ImportError as exc:
        return f"lightning not installed ({exc})"
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

    module = Module()
    callback = EMACallback(STDS, submodule="net")
    trainer = SimpleNamespace(global_step=0, sanity_checking=False, training=True)
    callback.setup(trainer, module, "fit")
    callback.on_fit_start(trainer, module)

    def step(s: int) -> None:
        for _ in range(accumulate - 1):  # batches that only accumulate gradients
            callback.on_train_batch_end(trainer, module, None, None, 0)
        trainer.global_step = s
        callback.on_train_batch_end(trainer, module, None, None, 0)

    return step, callback.ema


def transformers_case(model: nn.Module, workdir: str) -> Case | str:
    try:
        from transformers import TrainerControl, TrainerState, TrainingArguments

        from phema.integrations.transformers import EMACallback
    except ImportError as exc:
        return f"transformers not installed ({exc})"
    args = TrainingArguments(output_dir=workdir, report_to=[], use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    callback = EMACallback(STDS)
    callback.on_train_begin(args, state, control, model=model)
    assert callback.ema is not None

    def step(s: int) -> None:
        state.global_step = s
        callback.on_step_end(args, state, control, model=model)

    return step, callback.ema


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--tiny", action="store_true", help="a ~6k-parameter model")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    p.add_argument("--calls", type=int, default=500, help="optimizer steps per case per round")
    p.add_argument("--accumulate", type=int, default=1, help="Lightning batches per step")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    return p.parse_args(argv)


def measure(cases: dict[str, Step], rounds: int, calls: int, first: int) -> dict[str, list[float]]:
    """µs per step of each case in each round (interleaved, rotating order, one warm-up)."""
    per_step: dict[str, list[float]] = {name: [] for name in cases}
    names = list(cases)
    step = first
    for r in range(rounds + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            fn = cases[name]
            start = time.perf_counter_ns()
            for s in range(step, step + calls):
                fn(s)
            elapsed = time.perf_counter_ns() - start
            if r:
                per_step[name].append(elapsed / calls / 1e3)
        step += calls  # every case sees the same step numbers in a round
    return per_step


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the frameworks' deprecation notices
    params = sum(p.numel() for p in build(args.tiny).parameters())
    with tempfile.TemporaryDirectory() as workdir:
        made: dict[str, Case | str] = {
            "bare": bare_case(build(args.tiny)),
            "tracker": tracker_case(build(args.tiny)),
            "lightning": lightning_case(build(args.tiny), args.accumulate),
            "transformers": transformers_case(build(args.tiny), workdir),
        }
        for name, why in made.items():
            if isinstance(why, str):
                emit(BENCH, name, skipped=why)
        cases = {k: v for k, v in made.items() if not isinstance(v, str)}
        steps = {k: fn for k, (fn, _) in cases.items()}
        real = measure(steps, args.rounds, args.calls, first=1)
        for _fn, ema in cases.values():  # the integrations' own cost: updates do nothing
            ema.update = lambda t: None  # type: ignore[method-assign]
        own = measure(steps, args.rounds, args.calls, first=1 + (args.rounds + 1) * args.calls)
    update_us = min(real["bare"])
    worst = ("", -math.inf)
    for name in cases:
        values = real[name]
        # paired with the bare case of the same round: drifts of the machine cancel
        paired = [v / b - 1 for v, b in zip(values, real["bare"], strict=True)]
        q1, q2, q3 = statistics.quantiles(paired, n=4)
        own_us = statistics.median(own[name]) - statistics.median(own["bare"])
        overhead = own_us / update_us
        if name != "bare" and overhead > worst[1]:
            worst = (name, overhead)
        emit(
            BENCH,
            name,
            params=params,
            us_per_step_min=sig(min(values)),
            us_per_step_median=sig(statistics.median(values)),
            us_per_step_max=sig(max(values)),
            own_us=sig(own_us, 3),
            overhead=sig(overhead, 3),
            paired_ratio_median=sig(q2, 3),
            paired_ratio_q1=sig(q1, 3),
            paired_ratio_q3=sig(q3, 3),
            rounds=args.rounds,
            calls=args.calls,
            accumulate=args.accumulate,
        )
    emit(
        BENCH,
        "summary",
        params=params,
        update_us=sig(update_us),
        worst_case=worst[0],
        worst_overhead=sig(worst[1], 3),
        target=TARGET,
        meets_target=bool(worst[1] < TARGET),
    )


if __name__ == "__main__":
    main(sys.argv[1:])
