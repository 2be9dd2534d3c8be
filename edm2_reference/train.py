"""EDM2 training loop: DDP or FSDP2, the learned-uncertainty loss, phema snapshots, exact resume.

Run ``python -m edm2_reference.train --preset digits8 --outdir runs/d8`` (or the same under
``torchrun --nproc_per_node=N``, with ``--fsdp`` to shard the network). Time is counted in
images (``nimg``). Every step:

1. The step's global batch is images ``[nimg, nimg + B)`` of the run's fixed order
   (:func:`edm2_reference.data.global_order`), and its noise (levels, noise, flips) is drawn
   for the whole global batch from a generator seeded by ``(seed, step)``. Rank ``r`` of
   ``W`` takes global positions ``r, r + W, ...``, split into rounds of ``--batch-gpu``
   (gradient accumulation, gradient sync on the last round only). So the maths of a step
   does not depend on the number of processes, on ``--batch-gpu`` or on ``--fsdp``, and a
   resumed run repeats an uninterrupted one exactly. (Dropout masks come from a per-rank
   generator, so runs with dropout agree across process counts only in distribution.)
2. The gradient of the mean per-image loss: each rank's loss is its images' sum over ``B /
   W``, and DDP's all-reduce or FSDP2's reduce-scatter averages over ranks. Non-finite
   gradient entries are zeroed; Adam with ``lr = lr_ref / sqrt(max(nimg / (t_ref B), 1)) *
   min(nimg / rampup, 1)``, taken at ``nimg`` before the step. Under ``--fsdp`` every
   :class:`~edm2_reference.network.Block` and then the root are ``fully_shard``-ed; the 0-d
   gains (which ``fully_shard`` cannot shard) stay replicated and their gradients are
   averaged by the loop, and forced weight normalisation is applied to the shards before each
   forward (:func:`edm2_reference.mp.normalize_weights_`), as DDP's forward applies it to the
   whole weights (:mod:`edm2_reference.fsdp`).
3. A :class:`phema.PowerFunctionEMA` is updated at ``t = nimg`` after the step. One process
   tracks the whole network and writes single-file snapshots; with several, every rank
   tracks its rows (``partition=True`` under DDP, the FSDP2 shards under ``--fsdp``) and
   writes its shard of each snapshot (every ``--snapshot`` images). Checkpoints are written
   every ``--checkpoint`` images and at the end (:mod:`edm2_reference.checkpoint`: one file
   for one process; DCP parts from every rank plus a small file for several).

This module owns the loop (:class:`TrainSettings` in, :class:`TrainResult` out, via
:func:`train`) and its start, resume, snapshot and status lines. The command line (flags,
help, the summary) is :mod:`edm2_reference.train_cli`; :func:`main` and :func:`parse_args`
here call it, so that ``python -m edm2_reference.train`` runs it.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from rich.console import Console
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from edm2_reference import cli
from edm2_reference.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    restore_training_state,
    save_training_state,
)
from edm2_reference.data import (
    HELD_OUT_FRACTION,
    ImageDataset,
    global_order,
    holdout_split,
    load_dataset,
)
from edm2_reference.distributed import World, init_world
from edm2_reference.fsdp import average_grads, before_sharded_forward, local_part, shard_network
from edm2_reference.loss import draw_noise, edm2_loss
from edm2_reference.network import Precond
from edm2_reference.presets import TrainingConfig, build_precond, get_preset
from phema import PowerFunctionEMA, SnapshotWriter
from phema.store import snapshot_name

__all__ = ["TrainResult", "TrainSettings", "main", "parse_args", "train"]


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
    fsdp: bool = False  # shard the network with FSDP2 instead of DDP (several processes)
    held_out: float = HELD_OUT_FRACTION  # share of the data kept out of training (0: none)
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
    snapshots: list[str]  # the snapshot files this rank published (rank 0 under sharding)
    net: Precond  # sharded with fully_shard under --fsdp


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


def train(
    settings: TrainSettings, console: Console | None = None, *, show_progress: bool = False
) -> TrainResult:
    """Run (or resume) training as ``settings`` say; returns at the end or at ``stop_at``.

    Rank 0 writes a start line and status lines to ``console`` (default: stderr) and, with
    ``show_progress``, a progress bar with images/s and ETA.
    """
    world = init_world(settings.device)
    console = console or cli.err_console
    cfg = settings.training()
    preset = get_preset(settings.preset)
    full: ImageDataset = load_dataset(settings.data or preset.dataset or "digits")
    # the held-out part is what edm2_reference.evaluate compares samples with
    dataset = holdout_split(full, settings.held_out)[0] if settings.held_out else full
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
    num_params = sum(p.numel() for p in net.parameters())
    fsdp = settings.fsdp and world.size > 1
    if settings.fsdp and not fsdp and world.is_main:
        _log(console, "--fsdp: one process, nothing to shard; training unsharded")
    replicated = shard_network(net, world) if fsdp else []
    optimizer = torch.optim.Adam(net.parameters(), lr=0.0, betas=cfg.adam_betas, eps=cfg.adam_eps)
    # Made after fully_shard; with several processes every rank tracks its rows only.
    ema = PowerFunctionEMA(net, stds=cfg.ema_stds, partition=world.size > 1)
    expect = {
        "preset": settings.preset,
        "data": dataset.name,
        "cond": settings.cond,
        "seed": settings.seed,
        "batch": cfg.batch_size,
        "network": json.dumps(overrides, sort_keys=True),
        "held_out": settings.held_out,
    }
    nimg, step, elapsed = 0, 0, 0.0
    resume = latest_checkpoint(settings.outdir)
    if resume is not None:
        state = load_checkpoint(resume, expect)
        restore_training_state(resume, state, net, optimizer, ema, fsdp)
        nimg, step, elapsed = int(state["nimg"]), int(state["step"]), float(state["elapsed"])
        if world.is_main:
            written_by = int(state.get("world_size", 1))
            note = (
                f" (written by {written_by} processes, now {world.size}: the sums run in "
                "another order, so this run repeats an uninterrupted one only up to rounding)"
                if written_by != world.size
                else ""
            )
            _log(console, f"resumed from {resume} at {nimg:,} images{note}")
    ddp = (
        DistributedDataParallel(
            net, device_ids=[world.device] if world.device.type == "cuda" else None
        )
        if world.size > 1 and not fsdp
        else None
    )
    model: nn.Module = ddp if ddp is not None else net
    store_url = settings.snapshots or os.path.join(settings.outdir, "snapshots")
    # One process writes whole snapshots; with several, every rank writes its shards.
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
    if world.is_main:
        procs = (
            f"{world.size} processes{' (FSDP2)' if fsdp else ''}" if world.size > 1 else "1 process"
        )
        _log(
            console,
            f"training {settings.preset} ({num_params:,} parameters) on {dataset.name} "
            f"({len(dataset):,} images, {c}x{h}x{dataset.shape[2]}"
            f"{f'; {len(full) - len(dataset):,} held out' if settings.held_out else ''}"
            f"{'' if label_dim else ', no labels'}), batch {cfg.batch_size} on {procs} "
            f"({world.device}), images {nimg:,} to {end:,}; EMA snapshots every "
            f"{cfg.snapshot_nimg:,} images to {store_url}; status lines every {cfg.status_nimg:,} images",
        )
    with (
        cli.progress(console, enabled=show_progress and world.is_main and nimg < end) as bar,
        contextlib.closing(writer),
    ):
        task = bar.add_task("training", total=end, completed=nimg)
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
                last = r == rounds - 1
                if fsdp:
                    before_sharded_forward(net, sync=last)
                # DDP all-reduces (FSDP2 reduce-scatters) gradients on the last round only.
                with (
                    ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext(),
                    _autocast(world, settings.precision),
                ):
                    per_image = edm2_loss(model, images, labels, draw.take(rows.to(world.device)))
                    loss = per_image.sum() * (cfg.loss_scaling / per_rank)
                loss.backward()  # type: ignore[no-untyped-call]
                step_loss += float(per_image.detach().sum())
            if replicated:
                average_grads(replicated, world)
            for p in net.parameters():
                if p.grad is not None:
                    grad = local_part(p.grad)
                    if cfg.loss_scaling != 1.0:
                        grad.div_(cfg.loss_scaling)
                    torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0, out=grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            nimg += cfg.batch_size
            step += 1
            mean_loss = world.all_mean(step_loss / per_rank)
            losses.append((nimg, mean_loss))
            window["loss"] += mean_loss
            window["n"] += 1
            t0 = time.perf_counter()
            ema.update(float(nimg))
            window["ema_s"] += time.perf_counter() - t0
            if _crossed(nimg, cfg.batch_size, cfg.snapshot_nimg) and _snapshot_due(
                writer, world, console, nimg, cfg.ema_stds
            ):
                t0 = time.perf_counter()
                writer.save(ema, step=step)
                window["snap_s"] += time.perf_counter() - t0
            if _crossed(nimg, cfg.batch_size, cfg.checkpoint_nimg) or nimg >= end:
                save_training_state(
                    settings.outdir, world, net, optimizer, ema, nimg, step, elapsed, expect, fsdp
                )
            if _crossed(nimg, cfg.batch_size, cfg.status_nimg) or nimg >= end:
                elapsed = _status(world, console, stats_path, window, nimg, step, lr, elapsed)
            bar.update(task, completed=nimg)
    world.barrier()
    return TrainResult(nimg, losses, list(writer.written), net)


def _log(console: Console, line: str) -> None:
    """One line as is: no rich markup (paths may hold brackets), no wrapping in logs."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def _snapshot_due(
    writer: SnapshotWriter,
    world: World,
    console: Console,
    nimg: int,
    stds: tuple[float, ...],
) -> bool:
    """Whether to write the snapshots at ``nimg``: not the ones a resumed run finds written.

    One process rewrites a partly written set (the store accepts a file that exists with the
    same bytes). With several, rank 0 looks and every rank follows it, since a sharded
    snapshot is written by every rank or none, and never twice: a set that a crash left
    incomplete is skipped, with a warning naming the missing profiles.
    """
    names = [snapshot_name(nimg, s) for s in stds]
    if world.size == 1:
        return not all(writer.store.exists(n) for n in names)
    found = [n for n in names if writer.store.exists(n)] if world.is_main else []
    have = world.from_main(len(found))
    if 0 < have < len(names) and world.is_main:
        missing = ", ".join(n for n in names if n not in found)
        _log(
            console,
            f"warning: snapshots at {nimg} images were partly written before a crash; "
            f"{missing} will be missing (a sharded snapshot is never written twice)",
        )
    return have == 0


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
        _log(
            console,
            f"nimg {nimg:>10,}  step {step:>7}  loss {row['loss']:8.4f}  lr {lr:.3e}  "
            f"{row['sec_per_step'] * 1e3:7.1f} ms/step  ema {row['ema_share']:.2%}  "
            f"snap {row['snapshot_share']:.2%}",
        )
    window.update(loss=0.0, n=0, ema_s=0.0, snap_s=0.0, t0=time.perf_counter())
    return elapsed


def parse_args(argv: Sequence[str] | None = None) -> TrainSettings:
    """Command-line flags -> :class:`TrainSettings` (:func:`edm2_reference.train_cli.parse_args`)."""
    from edm2_reference import train_cli  # here: train_cli imports this module

    return train_cli.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m edm2_reference.train``: :func:`edm2_reference.train_cli.main`."""
    from edm2_reference import train_cli  # here: train_cli imports this module

    train_cli.main(argv)


if __name__ == "__main__":
    main()
