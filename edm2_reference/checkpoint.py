"""Training-state checkpoints: written atomically, read back with the settings checked first.

A checkpoint is ``training-state-<nimg 12 digits>.pt`` in the run folder, saved with
``torch.save`` and loaded with ``torch.load(weights_only=True)``: it holds only tensors,
numbers, strings and plain containers.

* One process: the file holds everything (the network's and Adam's state dicts, the EMA's
  ``state_dict()``, the image count and the settings that must not change on resume);
  rank 0 writes it (:func:`save_checkpoint`).
* Several processes (DDP with a partitioned EMA, or FSDP2): the network, Adam and EMA states
  are saved by every rank with ``torch.distributed.checkpoint`` into the folder
  ``training-state-<nimg>.dcp`` beside the file, which then holds only the counters, the
  settings and the folder's name (:func:`save_sharded_checkpoint`). The folder is written
  under a temporary name and renamed by rank 0 once every rank is done; the file is written
  last, so a checkpoint is seen only when all its parts are there, and a crash at any point
  leaves the previous one the latest. Every rank must see the run folder (a shared file
  system, as for the snapshot store). DCP reads its ``.metadata`` file with ``pickle``:
  resume only from run folders you trust, as with any DCP checkpoint.

:func:`save_training_state` and :func:`restore_training_state` move the training loop's
state (network, Adam, EMA, counters) into and out of these checkpoints whatever the layout
(one process, DDP or FSDP2): DCP parts reshard onto any number of processes, and a
one-process file loads into DDP as is and into FSDP2 as a full state.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from edm2_reference.distributed import World
from edm2_reference.network import Precond
from phema import PowerFunctionEMA
from phema._local import fsync_dir
from phema.errors import PhemaError
from phema.store import atomic_write

__all__ = [
    "CheckpointError",
    "checkpoint_path",
    "latest_checkpoint",
    "load_checkpoint",
    "load_sharded_parts",
    "restore_training_state",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "save_training_state",
    "sharded_folder",
]

_NAME = re.compile(r"^training-state-(\d{12})\.pt$")


class CheckpointError(PhemaError, ValueError):
    """A checkpoint that cannot be resumed from (corrupt, or made with other settings)."""


def checkpoint_path(run_dir: str, nimg: int) -> str:
    """Where the checkpoint after ``nimg`` images goes."""
    return os.path.join(run_dir, f"training-state-{nimg:012d}.pt")


def save_checkpoint(run_dir: str, nimg: int, state: dict[str, Any]) -> str:
    """Write ``state`` atomically (temp file, fsync, rename); returns the path."""
    os.makedirs(run_dir, exist_ok=True)
    path = checkpoint_path(run_dir, nimg)
    with atomic_write(path) as f:
        torch.save(state, f)
    return path


def latest_checkpoint(run_dir: str) -> str | None:
    """The checkpoint with the most images in ``run_dir``, or None."""
    if not os.path.isdir(run_dir):
        return None
    found = sorted(n for n in os.listdir(run_dir) if _NAME.match(n))
    return os.path.join(run_dir, found[-1]) if found else None


def load_checkpoint(path: str, expect: dict[str, Any]) -> dict[str, Any]:
    """Load ``path`` safely and check that its ``settings`` agree with ``expect``."""
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a training state ({exc})") from exc
    # runs from before the held-out split trained on all the data (--held-out 0 resumes them)
    saved = {"held_out": 0.0, **state.get("settings", {})}
    diff = {k: (saved.get(k), v) for k, v in expect.items() if saved.get(k) != v}
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"{path} was made with other settings ({pretty}); rerun with the same ones, "
            "or use a new --outdir"
        )
    return state


def sharded_folder(nimg: int) -> str:
    """Name of the folder holding the sharded parts of the checkpoint after ``nimg`` images."""
    return f"training-state-{nimg:012d}.dcp"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextmanager
def _one_process_quietly() -> Iterator[None]:
    """DCP without a process group warns that it assumes one process: that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded_checkpoint(
    run_dir: str, nimg: int, state: dict[str, Any], parts: dict[str, Any]
) -> str:
    """Every rank: save ``parts`` with DCP, then (rank 0) publish ``state`` naming them.

    ``parts`` are state dicts whose tensors may be DTensors (each rank writes its shards;
    replicated tensors are written once). They go to a temporary folder, which rank 0
    renames to :func:`sharded_folder` after every rank has finished, replacing a leftover of
    that name; then rank 0 writes the checkpoint file (``state`` plus ``"sharded"``, the
    folder's name) atomically. Collective: every rank must call it. Returns the file's path.
    """
    final = os.path.join(run_dir, sharded_folder(nimg))
    tmp = os.path.join(run_dir, f".{sharded_folder(nimg)}.tmp")
    if _rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash mid-save
    _barrier()
    with _one_process_quietly():
        dcp_save(parts, checkpoint_id=tmp)  # returns on every rank once rank 0 wrote .metadata
    _barrier()
    path = checkpoint_path(run_dir, nimg)
    if _rank() == 0:
        if os.path.exists(final):  # parts of a save that crashed before its file was written
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(run_dir)
        save_checkpoint(run_dir, nimg, {**state, "sharded": sharded_folder(nimg)})
    _barrier()
    return path


def load_sharded_parts(path: str, state: dict[str, Any], parts: dict[str, Any]) -> None:
    """Load the sharded parts of the checkpoint file ``path`` into ``parts``, in place.

    ``state`` is the file's content (:func:`load_checkpoint`); ``parts`` are this run's
    state dicts, whose tensors say which rows each rank reads (DCP reshards as needed).
    Collective when a process group is initialised.
    """
    folder = os.path.join(os.path.dirname(path), str(state["sharded"]))
    if not os.path.isdir(folder):
        raise CheckpointError(f"{path} names the folder {folder} of its parts, which is missing")
    try:
        with _one_process_quietly():
            dcp_load(parts, checkpoint_id=folder)
    except Exception as exc:
        raise CheckpointError(f"{folder}: the parts of {path} cannot be loaded ({exc})") from exc


def save_training_state(
    outdir: str,
    world: World,
    net: Precond,
    optimizer: torch.optim.Optimizer,
    ema: PowerFunctionEMA,
    nimg: int,
    step: int,
    elapsed: float,
    expect: dict[str, Any],
    fsdp: bool,
) -> None:
    """Checkpoint the run after ``nimg`` images: ``net``, Adam, ``ema`` and the counters.

    One process writes one file (:func:`save_checkpoint`, ``expect`` as its settings);
    several write DCP parts and rank 0 the file naming them (:func:`save_sharded_checkpoint`,
    with the world size and ``fsdp``). Collective when there are several processes.
    """
    if world.size == 1:
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
        return
    meta = {
        "nimg": nimg,
        "step": step,
        "elapsed": elapsed,
        "settings": expect,
        "world_size": world.size,
        "fsdp": fsdp,
    }
    save_sharded_checkpoint(outdir, nimg, meta, _parts(net, optimizer, ema))


def restore_training_state(
    path: str,
    state: dict[str, Any],
    net: Precond,
    optimizer: torch.optim.Optimizer,
    ema: PowerFunctionEMA,
    fsdp: bool,
) -> None:
    """Load the checkpoint ``path`` (content ``state``) into this run, whatever wrote it.

    DCP parts reshard onto any number of processes; a one-process file loads into DDP as
    is (the partitioned EMA takes each rank's rows) and into FSDP2 as a full state.
    """
    if "sharded" in state:
        parts = _parts(net, optimizer, ema)
        load_sharded_parts(path, state, parts)
        set_model_state_dict(net, parts["net"])
        set_optimizer_state_dict(net, optimizer, parts["optimizer"])
        ema.load_state_dict(parts["ema"])
    elif fsdp:
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(net, state["net"], options=full)
        osd = _by_name(net, state["optimizer"])
        set_optimizer_state_dict(net, optimizer, osd, options=full)
        ema.load_state_dict(state["ema"])
    else:
        net.load_state_dict(state["net"])
        optimizer.load_state_dict(state["optimizer"])
        ema.load_state_dict(state["ema"])


def _parts(net: Precond, optimizer: torch.optim.Optimizer, ema: PowerFunctionEMA) -> dict[str, Any]:
    """The states a multi-process checkpoint saves with DCP (sharded or replicated tensors)."""
    return {
        "net": get_model_state_dict(net),
        "optimizer": get_optimizer_state_dict(net, optimizer),
        "ema": ema.state_dict(),
    }


def _by_name(net: Precond, osd: dict[str, Any]) -> dict[str, Any]:
    """A ``optimizer.state_dict()`` of ``net.parameters()`` keyed by parameter name (as DCP's)."""
    names = [n for n, _ in net.named_parameters()]
    return {
        "state": {names[int(i)]: s for i, s in osd["state"].items()},
        "param_groups": [
            {**g, "params": [names[int(i)] for i in g["params"]]} for g in osd["param_groups"]
        ],
    }
