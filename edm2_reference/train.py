"""EDM2 training loop: DDP, the learned-uncertainty loss, phema snapshots, exact resume.

Run ``python -m edm2_reference.train --preset digits8 --outdir runs/d8`` (or the same under
``torchrun --nproc_per_node=N``). Time is counted in images (``nimg``). Every step:

1. The step's global batch is images ``[nimg, nimg + B)`` of the run's fixed order
   (:func:`edm2_reference.data.global_order`), and its noise (levels, noise, flips) is drawn
   for the whole global batch from a generator seeded by ``(seed, step)``. Rank ``r`` of
   ``W`` takes global positions ``r, r + W, ...``, split into rounds of ``--batch-gpu``
   (gradient accumulation, DDP sync on the last round only). So the maths of a step does
   not depend on the number of processes or on ``--batch-gpu``, and a resumed run repeats
   an uninterrupted one exactly. (Dropout masks come from a per-rank generator, so runs with
   dropout agree across process counts only in distribution.)
2. The gradient of the mean per-image loss; non-finite gradient entries are zeroed; Adam
   with ``lr = lr_ref / sqrt(max(nimg / (t_ref B), 1)) * min(nimg / rampup, 1)``, taken at
   ``nimg`` before the step.
3. Rank 0 alone updates the :class:`phema.PowerFunctionEMA` at ``t = nimg`` after the step
   (no redundant copies on other ranks), queues snapshots to phema's store every
   ``--snapshot`` images, and writes checkpoints every ``--checkpoint`` images and at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch.nn.parallel import DistributedDataParallel

from edm2_reference.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from edm2_reference.data import ImageDataset, global_order, load_dataset
from edm2_reference.distributed import World, init_world
from edm2_reference.loss import draw_noise, edm2_loss
from edm2_reference.network import Precond
from edm2_reference.presets import TrainingConfig, build_precond, get_preset
from phema import PowerFunctionEMA, SnapshotWriter
from phema.store import snapshot_name

__all__ = ["TrainResult", "TrainSettings", "main", "train"]


@dataclass(frozen=True)
class TrainSettings:
    """Everything a run depends on. ``None`` fields take the preset's value."""

    preset: str = "digits8"
    data: str | None = None
    outdir: str = "runs/edm2"
    snapshots: str | None = None  # phema store URL; default <outdir>/snapshots
    cond: bool = True
    seed: int = 0
    batch: int | None = None
    batch_gpu: int | None = None
    duration: int | None = None  # images
    lr: float | None = None
    rampup: int | None = None  # images
    decay_batches: int | None = None
    snapshot: int | None = None  # images between snapshots
    checkpoint: int | None = None  # images between checkpoints
    status: int | None = None  # images between status lines
    ema_stds: tuple[float, ...] | None = None
    snapshot_dtype: str = "float32"
    device: str | None = None
    precision: str = "auto"  # auto (preset's fp16 trunk on CUDA) | fp32 | bf16
    stop_at: int | None = None  # end this invocation at this image count (resumable)
    network: dict[str, Any] = field(default_factory=dict)  # NetworkConfig overrides

    def training(self) -> TrainingConfig:
        """The preset's training config with this run's overrides."""
        cfg = get_preset(self.preset).training
        over = {
            "batch_size": self.batch,
            "lr_ref": self.lr,
            "rampup_nimg": self.rampup,
            "decay_batches": self.decay_batches,
            "duration_nimg": self.duration,
            "snapshot_nimg": self.snapshot,
            "checkpoint_nimg": self.checkpoint,
            "status_nimg": self.status,
            "ema_stds": self.ema_stds,
        }
        return replace(cfg, **{k: v for k, v in over.items() if v is not None})  # type: ignore[arg-type]


@dataclass
class TrainResult:
    """What a finished invocation reports (rank 0)."""

    nimg: int
    losses: list[tuple[int, float]]
    snapshots: list[str]
    net: Precond


def _mix(*keys: int) -> int:
    """A 63-bit seed from integers (no Python ``hash``: it is salted per process)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(_mix(seed, 1 << 20, step))
    return gen


def _crossed(nimg: int, batch: int, every: int) -> bool:
    """Whether the step that ended at ``nimg`` crossed a multiple of ``every``."""
    return nimg // every > (nimg - batch) // every


def _autocast(world: World, precision: str) -> contextlib.AbstractContextManager[Any]:
    if precision == "bf16" and world.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train(settings: TrainSettings, console: Console | None = None) -> TrainResult:
    """Run (or resume) training as ``settings`` say; returns at the end or at ``stop_at``."""
    world = init_world(settings.device)
    console = console or Console(stderr=True)
    cfg = settings.training()
    preset = get_preset(settings.preset)
    dataset: ImageDataset = load_dataset(settings.data or preset.dataset or "digits")
    label_dim = dataset.label_dim if settings.cond else 0
    if cfg.batch_size % world.size:
        raise ValueError(f"--batch {cfg.batch_size} is not divisible by {world.size} processes")
    per_rank = cfg.batch_size // world.size
    batch_gpu = min(settings.batch_gpu or per_rank, per_rank)
    if per_rank % batch_gpu:
        raise ValueError(f"--batch-gpu {batch_gpu} must divide the per-process batch {per_rank}")
    overrides = dict(settings.network)
    if settings.precision != "auto" or world.device.type != "cuda":
        overrides.setdefault("use_fp16", False)
    c, h, _ = dataset.shape
    torch.manual_seed(settings.seed)  # the same initial weights on every rank
    net = build_precond(
        preset, label_dim=label_dim, img_resolution=h, img_channels=c, **overrides
    ).to(world.device)
    net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.0, betas=cfg.adam_betas, eps=cfg.adam_eps)
    ema = PowerFunctionEMA(net, stds=cfg.ema_stds) if world.is_main else None
    expect = {
        "preset": settings.preset,
        "data": dataset.name,
        "cond": settings.cond,
        "seed": settings.seed,
        "batch": cfg.batch_size,
        "network": json.dumps(overrides, sort_keys=True),
    }
    nimg, step, elapsed = 0, 0, 0.0
    resume = latest_checkpoint(settings.outdir)
    if resume is not None:
        state = load_checkpoint(resume, expect)
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        nimg, step, elapsed = int(state["nimg"]), int(state["step"]), float(state["elapsed"])
        if world.is_main:
            console.print(f"resumed from {resume} at {nimg} images", highlight=False)
    ddp = (
        DistributedDataParallel(
            net, device_ids=[world.device] if world.device.type == "cuda" else None
        )
        if world.size > 1
        else None
    )
    store_url = settings.snapshots or os.path.join(settings.outdir, "snapshots")
    writer = None
    if world.is_main:  # the only rank that writes snapshots
        dtype = getattr(torch, settings.snapshot_dtype)
        writer = SnapshotWriter(
            store_url, dtype=dtype if dtype != torch.float32 else None, t_unit="images"
        )
    end = (
        cfg.duration_nimg if settings.stop_at is None else min(settings.stop_at, cfg.duration_nimg)
    )
    losses: list[tuple[int, float]] = []
    stats_path = os.path.join(settings.outdir, "stats.jsonl")
    window: dict[str, float] = {
        "loss": 0.0,
        "n": 0,
        "ema_s": 0.0,
        "snap_s": 0.0,
        "t0": time.perf_counter(),
    }
    try:
        while nimg < end:
            lr = cfg.learning_rate(nimg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            order = global_order(len(dataset), settings.seed, nimg, nimg + cfg.batch_size)
            draw = draw_noise(
                _step_generator(settings.seed, step, world.device),
                cfg.batch_size,
                dataset.shape,
                p_mean=cfg.p_mean,
                p_std=cfg.p_std,
                xflip=cfg.xflip,
                device=world.device,
            )
            torch.manual_seed(_mix(settings.seed, world.rank, step))  # dropout, per rank
            mine = torch.arange(world.rank, cfg.batch_size, world.size)
            step_loss = 0.0
            rounds = per_rank // batch_gpu
            for r in range(rounds):
                rows = mine[r * batch_gpu : (r + 1) * batch_gpu]
                idx = order[rows.numpy()]
                images = dataset.images(idx).to(world.device)
                labels = dataset.one_hot(idx).to(world.device) if label_dim else None
                # DDP all-reduces gradients on the last round only.
                with (
                    ddp.no_sync()
                    if ddp is not None and r < rounds - 1
                    else contextlib.nullcontext(),
                    _autocast(world, settings.precision),
                ):
                    per_image = edm2_loss(
                        ddp or net, images, labels, draw.take(rows.to(world.device))
                    )
                    loss = per_image.sum() * (cfg.loss_scaling / per_rank)
                loss.backward()  # type: ignore[no-untyped-call]
                step_loss += float(per_image.detach().sum())
            for p in net.parameters():
                if p.grad is not None:
                    if cfg.loss_scaling != 1.0:
                        p.grad.div_(cfg.loss_scaling)
                    torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0, out=p.grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            nimg += cfg.batch_size
            step += 1
            mean_loss = world.all_mean(step_loss / per_rank)
            losses.append((nimg, mean_loss))
            window["loss"] += mean_loss
            window["n"] += 1
            if ema is not None and writer is not None:
                t0 = time.perf_counter()
                ema.update(float(nimg))
                window["ema_s"] += time.perf_counter() - t0
                # After a resume, snapshots written before the crash are already there.
                if _crossed(nimg, cfg.batch_size, cfg.snapshot_nimg) and not all(
                    writer.store.exists(snapshot_name(nimg, s)) for s in cfg.ema_stds
                ):
                    t0 = time.perf_counter()
                    writer.save(ema, step=step)
                    window["snap_s"] += time.perf_counter() - t0
            if _crossed(nimg, cfg.batch_size, cfg.checkpoint_nimg) or nimg >= end:
                _checkpoint(
                    settings.outdir, world, net, optimizer, ema, nimg, step, elapsed, expect
                )
            if _crossed(nimg, cfg.batch_size, cfg.status_nimg) or nimg >= end:
                elapsed = _status(world, console, stats_path, window, nimg, step, lr, elapsed)
    finally:
        if writer is not None:
            writer.close()
    world.barrier()
    return TrainResult(nimg, losses, list(writer.written) if writer else [], net)


def _checkpoint(
    outdir: str,
    world: World,
    net: Precond,
    optimizer: torch.optim.Optimizer,
    ema: PowerFunctionEMA | None,
    nimg: int,
    step: int,
    elapsed: float,
    expect: dict[str, Any],
) -> None:
    if world.is_main and ema is not None:
        state = {
            "net": net.state_dict(),
            "optimizer": optimizer.state_dict(),
            "ema": ema.state_dict(),
            "nimg": nimg,
            "step": step,
            "elapsed": elapsed,
            "settings": expect,
        }
        save_checkpoint(outdir, nimg, state)
    world.barrier()


def _status(
    world: World,
    console: Console,
    stats_path: str,
    window: dict[str, float],
    nimg: int,
    step: int,
    lr: float,
    elapsed: float,
) -> float:
    now = time.perf_counter()
    span = now - window["t0"]
    elapsed += span
    n = max(int(window["n"]), 1)
    row = {
        "nimg": nimg,
        "step": step,
        "loss": window["loss"] / n,
        "lr": lr,
        "sec_per_step": span / n,
        "ema_share": window["ema_s"] / span if span else 0.0,
        "snapshot_share": window["snap_s"] / span if span else 0.0,
        "elapsed_s": elapsed,
    }
    if world.is_main:
        os.makedirs(os.path.dirname(stats_path) or ".", exist_ok=True)
        with open(stats_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        console.print(
            f"nimg {nimg:>10,}  step {step:>7}  loss {row['loss']:8.4f}  lr {lr:.3e}  "
            f"{row['sec_per_step'] * 1e3:7.1f} ms/step  ema {row['ema_share']:.2%}  "
            f"snap {row['snapshot_share']:.2%}",
            highlight=False,
        )
    window.update(loss=0.0, n=0, ema_s=0.0, snap_s=0.0, t0=time.perf_counter())
    return elapsed


def _images(text: str) -> int:
    """``"160Ki"`` -> 163840, ``"2Mi"``, ``"5000"``."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 10**6}
    for suffix, scale in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)


def parse_args(argv: list[str] | None = None) -> TrainSettings:
    """Command-line flags -> :class:`TrainSettings`."""
    p = argparse.ArgumentParser(
        prog="python -m edm2_reference.train", description=__doc__.split("\n")[0]
    )
    p.add_argument("--preset", default="digits8")
    p.add_argument(
        "--data", help="digits | mnist | a PNG folder, ZIP or .npz (default: the preset's)"
    )
    p.add_argument(
        "--outdir", default="runs/edm2", help="checkpoints, stats.jsonl; resumes from here"
    )
    p.add_argument(
        "--snapshots", help="phema store URL for EMA snapshots (default <outdir>/snapshots)"
    )
    p.add_argument("--uncond", action="store_true", help="train without class labels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, help="total batch over all processes")
    p.add_argument("--batch-gpu", type=int, help="per-process batch per round (accumulation)")
    p.add_argument("--duration", type=_images, help="images to train on, e.g. 160Ki")
    p.add_argument("--lr", type=float)
    p.add_argument("--rampup", type=_images)
    p.add_argument("--decay-batches", type=int)
    p.add_argument("--snapshot", type=_images, help="images between EMA snapshots")
    p.add_argument("--checkpoint", type=_images, help="images between checkpoints")
    p.add_argument("--status", type=_images, help="images between status lines")
    p.add_argument("--ema-stds", help="comma-separated, e.g. 0.05,0.1")
    p.add_argument(
        "--snapshot-dtype", default="float32", choices=["float32", "float16", "bfloat16"]
    )
    p.add_argument("--device")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--stop-at", type=_images, help="end this invocation at this image count")
    a = p.parse_args(argv)
    return TrainSettings(
        preset=a.preset,
        data=a.data,
        outdir=a.outdir,
        snapshots=a.snapshots,
        cond=not a.uncond,
        seed=a.seed,
        batch=a.batch,
        batch_gpu=a.batch_gpu,
        duration=a.duration,
        lr=a.lr,
        rampup=a.rampup,
        decay_batches=a.decay_batches,
        snapshot=a.snapshot,
        checkpoint=a.checkpoint,
        status=a.status,
        ema_stds=tuple(float(s) for s in a.ema_stds.split(",")) if a.ema_stds else None,
        snapshot_dtype=a.snapshot_dtype,
        device=a.device,
        precision=a.precision,
        stop_at=a.stop_at,
    )


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``python -m edm2_reference.train``."""
    settings = parse_args(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["WORLD_SIZE"])))
    result = train(settings)
    if int(os.environ.get("RANK", "0")) == 0:
        Console(stderr=True).print(
            f"done at {result.nimg} images; {len(result.snapshots)} snapshot files written",
            highlight=False,
        )
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
