"""Training throughput of the EDM2 reference client, and the share of it spent on phema.

A step loop equivalent to ``edm2_reference.train`` (one process, one round per step):
noise drawn with ``draw_noise``, the learned-uncertainty ``edm2_loss`` forward and
backward, the loss read back (``float``, as the training loop does for its log),
non-finite gradient entries zeroed, the preset's learning-rate schedule and an Adam
step; then, on the "EMA on" path, ``phema.PowerFunctionEMA.update(nimg)`` with the
preset's profiles (stds 0.05, 0.10) and, every so often, ``phema.SnapshotWriter.save``
to a local temporary folder (fp32 snapshots, the training loop's default). Images
and labels are fixed random tensors already on the device, so data loading is not
part of a step.

Cases:

* CPU: ``digits8`` at its preset batch (128) and ``mnist28`` (batch 128; 32 with
  ``--quick``), the preset networks with 10 classes, fp32.
* CUDA (when a GPU is present; otherwise one ``"skipped": "no CUDA device"`` line):
  ``img64-s`` with ``label_dim=1000``, 32 images per step (the per-GPU share of the
  preset's 2048-image batch), the preset's fp16 trunk; every timing is bracketed by
  ``torch.cuda.synchronize()``.

What is measured per case (one JSON line per figure):

1. ``step``: median/min/max ms of the training step without EMA (after warm-up
   steps), and images/s.
2. ``ema_update``: ms per ``ema.update(t)``, timed right after each step, and its
   share of the step.
3. ``snapshot_save``: ms per ``writer.save(ema)``, the training-thread part only
   (copying every profile's state on the device and queueing it); each call is
   timed with the queue empty and the previous write finished, the background
   write is drained untimed. Its share of the step is amortised over the preset's
   snapshot cadence (``snapshot_nimg / global batch`` steps per snapshot) and,
   as a worst case, over one save every ``--save-every`` steps.
4. ``end_to_end``: the wall-clock cost with everything included, background
   writes too. Blocks of ``--block`` steps run in three variants: ``off`` (no
   EMA), ``ema`` (an update after every step) and ``ema_snapshots`` (also one
   save every ``--save-every`` steps, the first after the block's first step; the
   writer is closed, i.e. every queued snapshot is written, before the clock
   stops). A round runs one block of each, the order rotating from round to
   round, and ratios are taken against the ``off`` block of the same round so
   that drift cancels. Reported: steps/s per variant, the median/min/max ratios,
   the ratio predicted from lines 1-3, and ``save_in_loop_ms``, the training time
   one save costs inside the loop (``ema_snapshots`` minus ``ema``, per save: the
   training-thread part plus the background write competing with training).
5. ``summary``: EMA + saving relative to the training step at the preset's
   snapshot cadence, from the per-call figures (``ema_plus_save_share``) and from
   the end-to-end figures (``ema_plus_save_share_end_to_end``: the ``ema``
   slowdown plus ``save_in_loop_ms`` amortised over the cadence, with
   ``end_to_end_se``, the standard error of the median ``ema`` ratio estimated
   from its median absolute deviation), against the target (under 2%): the
   end-to-end verdict is ``true``/``false`` only when the figure is more than two
   standard errors from the target, ``null`` (not resolved) otherwise; and the
   worst case, one save every ``--save-every`` steps.

6. ``demo`` (``--cases demo``, or the default list): ``bash scripts/edm2_demo.sh`` run
   whole in a temporary folder (``--quick``: its ``--quick`` form), one line per phase
   (train, reconstruct, sample, evaluate) with its wall time and share of the total, and
   a ``demo_total`` line against the 10-minute budget. The phases' times are the ones the
   script prints itself (whole seconds, by bash's ``SECONDS``).

Run::

    python3 benchmarks/train_throughput.py            # a few minutes on 2 CPU cores
    python3 benchmarks/train_throughput.py --quick    # under a minute
    python3 benchmarks/train_throughput.py --device cuda   # img64-s on a GPU
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import torch
from _common import device_name, emit, sig, summarize, synchronize, time_call

import phema
from edm2_reference.loss import draw_noise, edm2_loss
from edm2_reference.presets import build_precond, get_preset

BENCH = "train_throughput"
TARGET_SHARE = 0.02  # EMA + snapshot saving, as a share of step time


@dataclass(frozen=True)
class Plan:
    """One case: which network, how big a step, and how many of each measurement."""

    preset: str
    device: str
    batch: int  # images per step in this process
    global_batch: int  # images per optimizer step over all ranks: sets the snapshot cadence
    label_dim: int
    warmup: int  # untimed steps first
    steps: int  # timed steps (with an EMA update after each)
    saves: int  # timed isolated saves
    rounds: int  # end-to-end rounds (one block of each variant)
    block: int  # steps per end-to-end block
    save_every: int  # one save per this many steps in "ema_snapshots" blocks (worst case)


def plans(args: argparse.Namespace) -> list[Plan]:
    """The cases to run, sized for ``--quick`` or the full run, with command-line overrides."""
    q = args.quick
    mnist_batch = args.mnist_batch or (32 if q else 128)
    out = [
        Plan(
            "digits8", "cpu", batch=128, global_batch=128, label_dim=10,
            warmup=3 if q else 5, steps=10 if q else 30, saves=3 if q else 6,
            rounds=2 if q else 12, block=10 if q else 20, save_every=10,
        ),
        Plan(
            "mnist28", "cpu", batch=mnist_batch, global_batch=mnist_batch, label_dim=10,
            warmup=2, steps=5 if q else 10, saves=2 if q else 4,
            rounds=1 if q else 4, block=10, save_every=10,
        ),
        # One rank's share of the preset's 2048-image batch: the cadence counts global steps.
        Plan(
            "img64-s", "cuda", batch=args.gpu_batch, global_batch=2048, label_dim=1000,
            warmup=3 if q else 5, steps=10 if q else 30, saves=2 if q else 5,
            rounds=2 if q else 5, block=10 if q else 20, save_every=10,
        ),
    ]  # fmt: skip
    over = {k: getattr(args, k) for k in ("steps", "saves", "rounds", "block", "save_every")}
    over = {k: v for k, v in over.items() if v is not None}
    out = [replace(p, **over) for p in out]
    devices = {"auto": ("cpu", "cuda"), "cpu": ("cpu",), "cuda": ("cuda",)}[args.device]
    return [p for p in out if p.device in devices and p.preset in args.cases]


class StepLoop:
    """The training step of ``edm2_reference.train`` for one process and one round."""

    def __init__(self, plan: Plan, device: torch.device, seed: int = 0) -> None:
        preset = get_preset(plan.preset)
        self.cfg = preset.training
        self.plan = plan
        self.device = device
        net_cfg = preset.network
        # As the training loop: the preset's fp16 trunk on CUDA only.
        overrides = {} if device.type == "cuda" else {"use_fp16": False}
        torch.manual_seed(seed)
        self.net = build_precond(preset, label_dim=plan.label_dim, **overrides).to(device)
        self.net.train()
        self.use_fp16 = bool(self.net.use_fp16 and device.type == "cuda")
        self.params = list(self.net.parameters())
        self.optimizer = torch.optim.Adam(
            self.params, lr=0.0, betas=self.cfg.adam_betas, eps=self.cfg.adam_eps
        )
        self.shape = (net_cfg.img_channels, net_cfg.img_resolution, net_cfg.img_resolution)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        self.images = torch.rand((plan.batch, *self.shape), generator=gen, device=device) * 2 - 1
        classes = torch.randint(plan.label_dim, (plan.batch,), generator=gen, device=device)
        self.labels = torch.nn.functional.one_hot(classes, plan.label_dim).float()
        self.noise_gen = gen
        self.nimg = 0
        self.steps = 0

    def step(self) -> float:
        """One optimizer step; returns the mean loss (read back, as the training loop does)."""
        cfg = self.cfg
        lr = cfg.learning_rate(self.nimg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        draw = draw_noise(
            self.noise_gen,
            self.plan.batch,
            self.shape,
            p_mean=cfg.p_mean,
            p_std=cfg.p_std,
            xflip=cfg.xflip,
            device=self.device,
        )
        per_image = edm2_loss(self.net, self.images, self.labels, draw)
        loss = per_image.sum() * (cfg.loss_scaling / self.plan.batch)
        loss.backward()  # type: ignore[no-untyped-call]
        value = float(per_image.detach().sum()) / self.plan.batch
        for p in self.params:
            if p.grad is not None:
                if cfg.loss_scaling != 1.0:
                    p.grad.div_(cfg.loss_scaling)
                torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.nimg += self.plan.global_batch
        self.steps += 1
        return value


def median_se(values: list[float]) -> float | None:
    """Standard error of the median of ``values``, from their median absolute deviation.

    ``1.4826 * MAD`` estimates the standard deviation robustly (one disturbed round
    does not inflate it), and the median of ``n`` normal samples has a standard error
    of ``1.2533 * sigma / sqrt(n)``. ``None`` (unknown) for fewer than two values.
    """
    if len(values) < 2:
        return None
    mid = statistics.median(values)
    mad = statistics.median(abs(v - mid) for v in values)
    return 1.4826 * 1.2533 * mad / len(values) ** 0.5


def clear_folder(folder: str) -> None:
    """Delete the snapshot files written so far (img64-s snapshots are ~1.1 GB each)."""
    for entry in os.scandir(folder):
        if entry.is_file():
            os.unlink(entry.path)


def measure_step_and_ema(
    loop: StepLoop, ema: phema.PowerFunctionEMA
) -> tuple[list[float], list[float]]:
    """Seconds per training step and per EMA update right after it."""
    step_s, ema_s = [], []
    for _ in range(loop.plan.steps):
        step_s.append(time_call(loop.step, loop.device))
        t = float(loop.nimg)
        ema_s.append(time_call(lambda t=t: ema.update(t), loop.device))
    return step_s, ema_s


def measure_saves(loop: StepLoop, ema: phema.PowerFunctionEMA, folder: str) -> list[float]:
    """Seconds per ``writer.save(ema)`` with an empty queue; the writes are drained untimed."""
    out = []
    for _ in range(loop.plan.saves):
        loop.step()  # a new time, so that every snapshot gets its own files
        ema.update(float(loop.nimg))
        writer = phema.SnapshotWriter(folder, t_unit="images")
        out.append(time_call(lambda w=writer: w.save(ema, step=loop.steps), loop.device))
        writer.close()
        clear_folder(folder)
    return out


#: End-to-end variants: nothing, EMA updates only, EMA updates and snapshots.
VARIANTS = ("off", "ema", "ema_snapshots")


def run_block(loop: StepLoop, ema: phema.PowerFunctionEMA, folder: str, variant: str) -> float:
    """Wall-clock seconds of ``block`` steps of one variant, background writes included."""
    plan = loop.plan
    updates = variant != "off"
    writer = phema.SnapshotWriter(folder, t_unit="images") if variant == "ema_snapshots" else None
    synchronize(loop.device)
    start = time.perf_counter()
    for i in range(plan.block):
        loop.step()
        if updates:
            ema.update(float(loop.nimg))
        if writer is not None and i % plan.save_every == 0:  # first save after the first step
            writer.save(ema, step=loop.steps)
    if writer is not None:
        writer.close()  # every queued snapshot is on disk before the clock stops
    synchronize(loop.device)
    elapsed = time.perf_counter() - start
    clear_folder(folder)
    return elapsed


def measure_end_to_end(
    loop: StepLoop, ema: phema.PowerFunctionEMA, folder: str
) -> dict[str, list[float]]:
    """Seconds per block of each variant, over rounds whose order rotates."""
    out: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(loop.plan.rounds):
        shift = r % len(VARIANTS)
        for variant in VARIANTS[shift:] + VARIANTS[:shift]:
            out[variant].append(run_block(loop, ema, folder, variant))
    return out


def run_case(plan: Plan, quick: bool = False) -> None:
    """Build the case, measure, and emit its lines."""
    device = torch.device(plan.device)
    case = plan.preset
    loop = StepLoop(plan, device)
    cfg = loop.cfg
    ema = phema.PowerFunctionEMA(loop.net, stds=cfg.ema_stds)
    steps_per_snapshot = cfg.snapshot_nimg / plan.global_batch
    emit(
        BENCH,
        case,
        device,
        section="setup",
        params=sum(p.numel() for p in loop.params),
        tensors=len(loop.params),
        batch=plan.batch,
        global_batch=plan.global_batch,
        image_shape=list(loop.shape),
        label_dim=plan.label_dim,
        trunk_dtype="float16" if loop.use_fp16 else "float32",
        ema_stds=list(cfg.ema_stds),
        snapshot_nimg=cfg.snapshot_nimg,
        steps_per_snapshot=sig(steps_per_snapshot),
        device_name=device_name(device),
    )
    with tempfile.TemporaryDirectory(prefix="phema-train-bench-") as folder:
        for _ in range(plan.warmup):
            loop.step()
            ema.update(float(loop.nimg))
        warm = phema.SnapshotWriter(folder, t_unit="images")
        warm.save(ema, step=loop.steps)  # first-call costs (allocations, thread start)
        warm.close()
        clear_folder(folder)

        step_s, ema_s = measure_step_and_ema(loop, ema)
        save_s = measure_saves(loop, ema, folder)
        blocks = measure_end_to_end(loop, ema, folder)

    step_ms = statistics.median(step_s) * 1e3
    ema_ms = statistics.median(ema_s) * 1e3
    save_ms = statistics.median(save_s) * 1e3
    n = plan.save_every
    per_snapshot = save_ms / steps_per_snapshot  # training-thread save cost per step
    emit(
        BENCH,
        f"{case}/step",
        device,
        section="step",
        batch=plan.batch,
        **summarize(step_s),
        images_per_s=sig(plan.batch / (step_ms / 1e3), 4),
    )
    emit(
        BENCH,
        f"{case}/ema_update",
        device,
        section="ema",
        profiles=len(cfg.ema_stds),
        **summarize(ema_s),
        share_of_step=sig(ema_ms / step_ms, 3),
    )
    emit(
        BENCH,
        f"{case}/snapshot_save",
        device,
        section="save",
        part="training thread (profile copies + queueing)",
        **summarize(save_s),
        ratio_to_step=sig(save_ms / step_ms, 3),
        steps_per_snapshot=sig(steps_per_snapshot),
        share_at_preset_cadence=sig(per_snapshot / step_ms, 3),
        worst_case_save_every=n,
        share_at_worst_case=sig(save_ms / n / step_ms, 3),
    )

    # Per round, relative to the "off" block of the same round: drift cancels.
    off = blocks["off"]
    ratio_ema = [e / o for e, o in zip(blocks["ema"], off, strict=True)]
    ratio_all = [a / o for a, o in zip(blocks["ema_snapshots"], off, strict=True)]
    saves_per_block = len(range(0, plan.block, n))
    # Extra seconds per save in the loop (training-thread part + background write
    # competing with training), from the difference of the two "on" variants.
    save_in_loop = [
        (a - e) / saves_per_block
        for a, e in zip(blocks["ema_snapshots"], blocks["ema"], strict=True)
    ]
    r_ema, r_all = statistics.median(ratio_ema), statistics.median(ratio_all)
    save_in_loop_ms = statistics.median(save_in_loop) * 1e3
    emit(
        BENCH,
        f"{case}/end_to_end",
        device,
        section="end_to_end",
        rounds=plan.rounds,
        block_steps=plan.block,
        save_every=n,
        steps_per_s_off=sig(plan.block / statistics.median(off), 4),
        steps_per_s_ema=sig(plan.block / statistics.median(blocks["ema"]), 4),
        steps_per_s_ema_snapshots=sig(plan.block / statistics.median(blocks["ema_snapshots"]), 4),
        images_per_s_off=sig(plan.batch * plan.block / statistics.median(off), 4),
        ratio_ema_median=sig(r_ema, 4),
        ratio_ema_min=sig(min(ratio_ema), 4),
        ratio_ema_max=sig(max(ratio_ema), 4),
        ratio_ema_snapshots_median=sig(r_all, 4),
        ratio_ema_snapshots_min=sig(min(ratio_all), 4),
        ratio_ema_snapshots_max=sig(max(ratio_all), 4),
        slowdown_pct=sig((r_all - 1) * 100, 3),
        predicted_ratio=sig(1 + (ema_ms + save_ms / n) / step_ms, 4),
        save_in_loop_ms=sig(save_in_loop_ms, 4),
    )
    share = (ema_ms + per_snapshot) / step_ms
    share_e2e = (r_ema - 1) + save_in_loop_ms / steps_per_snapshot / step_ms
    se = median_se(ratio_ema)
    meets_e2e: bool | None = None  # the run's noise does not resolve it: more --rounds
    if se is not None and share_e2e + 2 * se < TARGET_SHARE:
        meets_e2e = True
    elif se is not None and share_e2e - 2 * se >= TARGET_SHARE:
        meets_e2e = False
    se_all = median_se(ratio_all)
    emit(
        BENCH,
        f"{case}/summary",
        device,
        section="summary",
        quick=quick,
        steps_per_snapshot=sig(steps_per_snapshot),
        ema_plus_save_share=sig(share, 3),
        ema_plus_save_share_end_to_end=sig(share_e2e, 3),
        end_to_end_se=sig(se, 3) if se is not None else None,
        target_share=TARGET_SHARE,
        meets_target=share < TARGET_SHARE,
        meets_target_end_to_end=meets_e2e,
        worst_case_save_every=n,
        worst_case_share=sig((ema_ms + save_ms / n) / step_ms, 3),
        worst_case_slowdown_pct=sig((r_all - 1) * 100, 3),
        worst_case_slowdown_se_pct=sig(se_all * 100, 3) if se_all is not None else None,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="fewer steps, mnist28 at batch 32")
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: the CPU cases, then img64-s on CUDA when available",
    )
    p.add_argument(
        "--cases",
        nargs="+",
        choices=("digits8", "mnist28", "img64-s", "demo"),
        default=["digits8", "mnist28", "img64-s", "demo"],
    )
    p.add_argument("--mnist-batch", type=int, help="mnist28 images per step (default 128)")
    p.add_argument("--gpu-batch", type=int, default=32, help="img64-s images per step")
    p.add_argument("--steps", type=int, help="timed steps per case")
    p.add_argument("--saves", type=int, help="timed isolated saves per case")
    p.add_argument("--rounds", type=int, help="end-to-end rounds (one block per variant)")
    p.add_argument("--block", type=int, help="steps per end-to-end block")
    p.add_argument("--save-every", type=int, help="steps per save in the 'on' blocks (10)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    for key in ("mnist_batch", "steps", "saves", "rounds", "block", "save_every"):
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} must be positive")
    if args.gpu_batch < 1:
        p.error("--gpu-batch must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the selected cases and print JSON lines."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for plan in plans(args):
        if plan.device == "cuda" and not torch.cuda.is_available():
            emit(BENCH, plan.preset, "cuda", skipped="no CUDA device")
            continue
        run_case(plan, args.quick)
    if "demo" in args.cases and args.device != "cuda":
        run_demo(args.quick)


DEMO_BUDGET_S = 600  # the demo's budget on 2 CPU cores (README)


def run_demo(quick: bool) -> None:
    """``scripts/edm2_demo.sh`` end to end: wall time per phase, share, total vs the budget."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="phema-demo-") as out:
        cmd = ["bash", os.path.join(root, "scripts", "edm2_demo.sh"), "--no-install"]
        cmd += ["--out", out, *(["--quick"] if quick else [])]
        env = dict(os.environ, PYTHON=sys.executable)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - start
    m = re.search(r"wall time: (.*); total (\d+) s", proc.stderr)
    if proc.returncode or m is None:
        raise RuntimeError(f"the demo failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    phases = [(name, int(sec)) for name, sec in re.findall(r"(\w+) (\d+) s", m[1])]
    total = int(m[2])
    for name, sec in phases:
        emit(BENCH, "demo", "cpu", phase=name, seconds=sec, share=sig(sec / max(total, 1), 3))
    emit(
        BENCH,
        "demo_total",
        "cpu",
        quick=quick,
        seconds=total,
        wall_s=sig(wall, 4),
        budget_s=DEMO_BUDGET_S,
        within_budget=total <= DEMO_BUDGET_S,
    )


if __name__ == "__main__":
    main()
