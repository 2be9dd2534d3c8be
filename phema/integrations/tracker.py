r"""The framework-neutral part of every integration: EMA, snapshot schedule and state.

A framework calls :meth:`EMATracker.start` once the model is final (on its device,
in its dtype, wrapped and sharded), :meth:`EMATracker.step` after every optimizer
step, and round-trips :meth:`EMATracker.state_dict` through its checkpoints. The
time after optimizer step :math:`s` is :math:`t = s \cdot \text{per\_step}` in the
unit ``unit`` (``per_step = 1`` counts steps; the global batch size counts
samples), so the profiles do not depend on how often the framework calls in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from phema._tracked import is_dtensor
from phema.errors import StateError, TrackingError
from phema.profiles import sigma_rel_to_gamma
from phema.tracking import BufferPolicy, PowerFunctionEMA, unwrap_module
from phema.writer import SnapshotWriter

__all__ = ["TRACKER_FORMAT", "EMATracker"]

#: ``format`` key of :meth:`EMATracker.state_dict`.
TRACKER_FORMAT = "phema.tracker/1"


class EMATracker:
    """A :class:`PowerFunctionEMA`, its snapshot writer and schedule, driven by hooks.

    Args:
        stds: Relative stds of the tracked profiles.
        snapshots: Store URL (or path) for snapshots; ``None`` writes none.
        snapshot_every: Write a snapshot every this many optimizer steps (required
            with ``snapshots``).
        unit: Unit of the EMA time, recorded in snapshots (``"steps"``, ``"samples"``).
        per_step: Time per optimizer step in ``unit`` (1 for steps; the global batch
            size for samples).
        dtype: Storage dtype of snapshots (default float16, as EDM2 stores them).
        buffers: Buffer policy of the EMA (:data:`~phema.tracking.BufferPolicy`).
        partition: Passed to :class:`PowerFunctionEMA` (DDP: each rank tracks its rows).
        evaluate_with: Std of the profile to evaluate with, or ``None`` for the
            training weights; must be one of ``stds``.
        storage_options: Passed to fsspec for ``snapshots``.

    Raises:
        ProfileError: If a std is outside ``(0, 0.2887]``.
        TrackingError: If ``stds`` is empty, ``snapshots`` has no ``snapshot_every``,
            ``per_step`` is not positive or ``evaluate_with`` is not a tracked std.
    """

    def __init__(
        self,
        stds: Sequence[float] = (0.05, 0.10),
        *,
        snapshots: str | None = None,
        snapshot_every: int | None = None,
        unit: str = "steps",
        per_step: float = 1.0,
        dtype: torch.dtype = torch.float16,
        buffers: BufferPolicy = "copy",
        partition: bool = False,
        evaluate_with: float | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.stds = tuple(float(s) for s in stds)
        if not self.stds:
            raise TrackingError("stds is empty: pass at least one profile, e.g. (0.05, 0.10)")
        sigma_rel_to_gamma(self.stds)  # a bad std fails here, not when training starts
        if not (math.isfinite(per_step) and per_step > 0):
            raise TrackingError(f"per_step must be finite and > 0, got {per_step}")
        if snapshots is not None and (snapshot_every is None or snapshot_every < 1):
            raise TrackingError(
                f"snapshots={snapshots!r} needs snapshot_every >= 1 (optimizer steps between "
                f"snapshots), got {snapshot_every}"
            )
        if evaluate_with is not None and not any(
            math.isclose(evaluate_with, s, rel_tol=1e-9) for s in self.stds
        ):
            raise TrackingError(
                f"evaluate_with={evaluate_with} is not a tracked std; tracked stds are {self.stds}"
            )
        self.snapshots = snapshots
        self.snapshot_every = snapshot_every
        self.unit = unit
        self.per_step = float(per_step)
        self.dtype = dtype
        self.buffers: BufferPolicy = buffers
        self.partition = partition
        self.evaluate_with = evaluate_with
        self.storage_options = dict(storage_options or {})
        self.ema: PowerFunctionEMA | None = None
        self.writer: SnapshotWriter | None = None
        self.last_step = 0
        self._pending: Mapping[str, Any] | None = None

    def start(self, module: nn.Module, *, per_step: float | None = None) -> PowerFunctionEMA:
        """Create the EMA over ``module`` (once) and apply a state loaded before it existed.

        Args:
            module: The model, final (on its device, cast, wrapped, sharded).
            per_step: Replaces ``per_step`` when given (frameworks that learn the global
                batch size only when training starts); only before the EMA exists.

        Raises:
            TrackingError: If the EMA exists already over another module.
        """
        if self.ema is not None and self.ema.module is not unwrap_module(module):
            raise TrackingError(
                "this tracker's EMA already tracks another model; use one tracker per model"
            )
        if per_step is not None and self.ema is None:
            if not (math.isfinite(per_step) and per_step > 0):
                raise TrackingError(f"per_step must be finite and > 0, got {per_step}")
            self.per_step = float(per_step)
        if self.ema is None:
            self.ema = PowerFunctionEMA(
                module, self.stds, buffers=self.buffers, partition=self.partition
            )
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.load_state_dict(pending)
        if self.snapshots is not None and self.writer is None:
            self.writer = SnapshotWriter(
                self.snapshots, dtype=self.dtype, t_unit=self.unit, **self.storage_options
            )
        return self.ema

    @property
    def has_state(self) -> bool:
        """Whether :meth:`state_dict` has a state: the EMA exists, or a loaded one waits."""
        return self.ema is not None or self._pending is not None

    def _require(self) -> PowerFunctionEMA:
        if self.ema is None:
            raise TrackingError("the EMA does not exist yet: call start(module) first")
        return self.ema

    def step(self, optimizer_steps: int) -> None:
        """Fold the weights after optimizer step ``optimizer_steps`` (1-based, global) in.

        The step the EMA saw last is ignored (a framework calling again for the same
        step, e.g. after each micro-batch of an accumulated step); a snapshot is written
        when ``optimizer_steps`` reaches or passes a multiple of ``snapshot_every``.

        Raises:
            TrackingError: If ``optimizer_steps`` is below the last step seen (a step
                counter that went back: a new trainer given a used tracker).
        """
        ema = self._require()
        if optimizer_steps < self.last_step:
            raise TrackingError(
                f"optimizer step {optimizer_steps} comes after step {self.last_step}: the step "
                "count went back (a used EMA given to a new trainer?); make a new tracker"
            )
        if optimizer_steps == self.last_step:
            return
        ema.update(optimizer_steps * self.per_step)
        previous, self.last_step = self.last_step, optimizer_steps
        every = self.snapshot_every
        # a multiple of snapshot_every reached or passed (steps may advance by more than
        # one per call, e.g. two optimizers per batch under manual optimisation)
        if (
            self.writer is not None
            and every is not None
            and optimizer_steps // every > (previous // every)
        ):
            self.writer.save(ema, step=optimizer_steps)

    def swap_in(self) -> bool:
        """Swap ``evaluate_with``'s weights in when set and the EMA has a profile yet.

        Returns whether it swapped (``False`` before the first update, e.g. during a
        framework's sanity-check evaluation, or without ``evaluate_with``).
        """
        ema = self.ema
        if self.evaluate_with is None or ema is None or ema.num_updates == 0:
            return False
        ema.swap_in(self.evaluate_with)
        return True

    def swap_out(self) -> None:
        """Restore the training weights if a profile is swapped in."""
        if self.ema is not None and self.ema.swapped_std is not None:
            self.ema.swap_out()

    def state_dict(self, *, full: bool = False) -> dict[str, Any]:
        """The EMA's state plus the schedule; loads back with :meth:`load_state_dict`.

        Before :meth:`start` it is the state loaded and waiting for the EMA, if any.

        Args:
            full: Gather a sharded or partitioned EMA's shadows into plain tensors (a
                collective: every rank calls it), for frameworks that save one rank's
                ``torch.save`` of it; they load back into any layout.
        """
        if self.ema is None and self._pending is not None:
            return dict(self._pending)
        ema = self._require()
        state = ema.state_dict()
        if full and any(is_dtensor(v) for v in state["shadows"].values()):
            shadows = state["shadows"]
            state["shadows"] = {
                n: v.full_tensor() if is_dtensor(v) else v for n, v in shadows.items()
            }
        return {
            "format": TRACKER_FORMAT,
            "last_step": self.last_step,
            "per_step": self.per_step,
            "unit": self.unit,
            "ema": state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; before :meth:`start` it is kept until then."""
        if state.get("format") != TRACKER_FORMAT:
            raise StateError(
                f"not a phema tracker state (format {state.get('format')!r}, expected "
                f"{TRACKER_FORMAT!r})"
            )
        missing = [k for k in ("last_step", "per_step", "unit", "ema") if k not in state]
        if missing:
            raise StateError(f"the phema tracker state lacks {missing}; it is damaged")
        if state["unit"] != self.unit or state["per_step"] != self.per_step:
            raise StateError(
                f"the checkpoint's EMA time is {state['per_step']} {state['unit']} per step, "
                f"this run's is {self.per_step} {self.unit}: resume with the same unit and "
                "per_step (the global batch size must not change)"
            )
        if self.ema is None:
            self._pending = state
            return
        self.ema.load_state_dict(state["ema"])
        self.last_step = int(state["last_step"])

    def close(self, *, restore: bool = True) -> None:
        """Wait for pending snapshots; raises the first write failure.

        Args:
            restore: Also give the model its training weights back if a profile is
                swapped in (``False`` when the model's weights were replaced since, e.g.
                by a checkpoint loaded after a failed evaluation).
        """
        if restore:
            self.swap_out()
        if self.writer is not None:
            writer, self.writer = self.writer, None
            writer.close()
