"""Training-state checkpoints: written atomically by rank 0, read back without unpickling code.

A checkpoint is ``training-state-<nimg 12 digits>.pt`` in the run folder, saved with
``torch.save`` and loaded with ``torch.load(weights_only=True)``: it holds only tensors,
numbers, strings and plain containers (the network's and Adam's state dicts, the EMA's
``state_dict()``, the image count and the settings that must not change on resume).
"""

from __future__ import annotations

import os
import re
from typing import Any

import torch

from phema.errors import PhemaError
from phema.store import atomic_write

__all__ = ["CheckpointError", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

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
    saved = state.get("settings", {})
    diff = {k: (saved.get(k), v) for k, v in expect.items() if saved.get(k) != v}
    if diff:
        pretty = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(
            f"{path} was made with other settings ({pretty}); rerun with the same ones, "
            "or use a new --outdir"
        )
    return state
