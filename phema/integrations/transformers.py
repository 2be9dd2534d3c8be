"""Hugging Face ``Trainer`` integration: :class:`EMACallback`, a ready ``TrainerCallback``.

How it hooks in (transformers 4.46 to 5.x):

- ``on_train_begin`` creates the EMA over ``trainer.model`` (by then on its device and
  wrapped, and, when resuming, holding the checkpoint's weights) and, when
  ``state.global_step > 0`` (a resumed run: the Trainer restores its state before this
  event), loads the EMA state saved with the checkpoint.
- ``on_step_end`` fires once per optimizer step (gradient accumulation counted once);
  the EMA folds the weights in at time ``state.global_step * per_step`` and writes a
  snapshot every ``snapshot_every`` steps.
- ``on_save`` fires right after the Trainer wrote ``<output_dir>/checkpoint-<step>/``:
  the EMA state goes into that folder as ``phema_ema.pt`` (``torch.save``, written to a
  temporary name and renamed, so a half-written file is never seen). Checkpoint
  rotation (``save_total_limit``) deletes the folder with the file, and the callback
  keeps no path, so nothing points to a deleted folder.
- ``on_train_end`` waits for the snapshot writer and raises its failures.

**Evaluating with a profile.** The Trainer has no event before an evaluation, only
after one (``on_evaluate``). Two ways are offered:

- ``evaluate_with=std``: the Trainer's own periodic evaluations (``eval_strategy``)
  use the profile. In ``_maybe_log_save_evaluate`` the Trainer logs, then evaluates,
  then saves, and the decision to evaluate is already in ``control.should_evaluate``
  when ``on_step_end`` / ``on_epoch_end`` run (``DefaultFlowCallback`` comes first). So
  the callback swaps the profile in there and the training weights back in
  ``on_evaluate``: the checkpoint saved after the evaluation holds the training weights,
  and so does the next step. Metrics, ``metric_for_best_model`` and
  ``load_best_model_at_end`` then rank checkpoints by the profile's metrics while
  checkpoints hold training weights. ``eval_on_start`` uses the training weights
  (also on resume). An ``eval_dataset`` dict is refused at its first evaluation: the
  Trainer evaluates its datasets one after another with no event before each. If the evaluation raises, the exception leaves ``train()`` with the
  profile in the model: call ``callback.tracker.swap_out()`` before using it.
- ``with callback.swapped(std): trainer.evaluate()``: any time, during or after
  training (the training weights come back on exit, also on an exception).

**Resuming.** Callbacks are not told which checkpoint ``train(resume_from_checkpoint=...)``
loaded. The callback looks in ``args.resume_from_checkpoint`` when it is set (as the
Hugging Face example scripts set it), else in ``<output_dir>/checkpoint-<global_step>``,
the folder the Trainer wrote for that step (which is also what
``resume_from_checkpoint=True`` picks). The state must be for exactly that step, and
when the folder has a ``trainer_state.json`` its log history must be the resumed run's.
A resumed run (``global_step > 0``) whose EMA state is missing or does not match is an
error naming the folder and the fix, never a silently fresh EMA. The state is read with
``torch.load(weights_only=True)``. A ``train()`` that starts at step 0 starts a new EMA.

**Several processes.** The process that writes the Trainer's checkpoints
(``args.should_save``: the main process, or each node's with ``save_on_each_node``)
writes the state of an unsharded EMA; every process reads it back on resume. A sharded
EMA (``partition=True`` under DDP, or FSDP2) is saved as one file per rank,
``phema_ema-rank<r>-of-<w>.pt``, and resumes on the same number of processes. The
snapshot writer already writes from rank 0 only (or as shards).
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from phema._dist import world
from phema._tracked import is_dtensor
from phema.errors import StateError, TrackingError
from phema.integrations.tracker import EMATracker
from phema.tracking import BufferPolicy, PowerFunctionEMA

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:  # pragma: no cover - exercised without transformers only
    raise ImportError(
        "phema.integrations.transformers needs Hugging Face transformers: "
        "pip install 'torch-phema[transformers]'"
    ) from exc

__all__ = ["STATE_FORMAT", "STATE_NAME", "EMACallback"]

#: File name of the EMA state in a checkpoint folder (unsharded EMA).
STATE_NAME = "phema_ema.pt"
#: ``format`` key of the state file.
STATE_FORMAT = "phema.transformers/1"


class EMACallback(TrainerCallback):
    """Track power-function EMA profiles of a ``Trainer``'s model, with snapshots and resume.

    Args:
        stds: Relative stds of the tracked profiles.
        snapshots: Store URL (or path) for snapshots; ``None`` writes none.
        snapshot_every: Write a snapshot every this many optimizer steps (required with
            ``snapshots``).
        unit: Unit of the EMA time: ``"steps"`` (optimizer steps), ``"samples"`` or any
            other name with ``per_step`` given.
        per_step: Time per optimizer step in ``unit``. Default: 1 for ``"steps"``; for
            ``"samples"`` the Trainer's global batch size, ``train_batch_size x
            gradient_accumulation_steps x world_size`` (a short last batch counts as
            full; with tensor, context or sequence parallelism pass it yourself). Only
            the snapshots' times depend on it: the profiles are the same in any unit.
        dtype: Storage dtype of snapshots (default float16).
        buffers: Buffer policy of the EMA (:data:`~phema.tracking.BufferPolicy`).
        partition: Under DDP, each rank tracks its rows only (see
            :class:`~phema.tracking.PowerFunctionEMA`).
        evaluate_with: Std of the profile the Trainer's periodic evaluations use, or
            ``None`` for the training weights; must be one of ``stds``.
        storage_options: Passed to fsspec for ``snapshots``.

    Example:
        >>> callback = EMACallback(stds=(0.05, 0.10), evaluate_with=0.10)
        >>> trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,
        ...                   callbacks=[callback])  # doctest: +SKIP
        >>> trainer.train()  # doctest: +SKIP
        >>> with callback.swapped(0.05):  # doctest: +SKIP
        ...     metrics = trainer.evaluate()
    """

    def __init__(
        self,
        stds: Sequence[float] = (0.05, 0.10),
        *,
        snapshots: str | None = None,
        snapshot_every: int | None = None,
        unit: str = "steps",
        per_step: float | None = None,
        dtype: torch.dtype = torch.float16,
        buffers: BufferPolicy = "copy",
        partition: bool = False,
        evaluate_with: float | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if per_step is None and unit not in ("steps", "samples"):
            raise TrackingError(
                f"unit={unit!r} needs per_step (its amount per optimizer step); only 'steps' "
                "and 'samples' have a default"
            )
        if per_step is not None and not (math.isfinite(per_step) and per_step > 0):
            raise TrackingError(f"per_step must be finite and > 0, got {per_step}")
        self.per_step = per_step
        self._options: dict[str, Any] = {
            "stds": tuple(stds),
            "snapshots": snapshots,
            "snapshot_every": snapshot_every,
            "unit": unit,
            "dtype": dtype,
            "buffers": buffers,
            "partition": partition,
            "evaluate_with": evaluate_with,
            "storage_options": storage_options,
        }
        self.tracker = EMATracker(**self._options)  # validates the options now
        self._auto_swapped = False

    @property
    def ema(self) -> PowerFunctionEMA | None:
        """The :class:`PowerFunctionEMA` (``None`` until training begins)."""
        return self.tracker.ema

    def _time_per_step(self, args: Any, state: Any) -> float:
        if self.per_step is not None:
            return float(self.per_step)
        if self.tracker.unit == "steps":
            return 1.0
        batch = args.train_batch_size
        if args.auto_find_batch_size and state.train_batch_size:
            batch = state.train_batch_size  # the size the finder settled on
        return float(batch * args.gradient_accumulation_steps * args.world_size)

    # ---- Trainer events -------------------------------------------------------------------

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Create the EMA over the model; load its state when the run resumes."""
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise TrackingError(
                "EMACallback needs the Trainer's model (got none in on_train_begin)"
            )
        if self.tracker.ema is not None:  # another train() call: a new EMA (and writer)
            # the model may hold newly loaded weights: never swap old ones back into it
            self.tracker.close(restore=False)
            self.tracker = EMATracker(**self._options)
        self._auto_swapped = False
        self.tracker.start(model, per_step=self._time_per_step(args, state))
        if state.global_step > 0:
            self._resume(args, state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Fold the weights after this optimizer step in; swap the profile in for evaluation."""
        self._restore_auto_swap()
        self.tracker.step(state.global_step)
        self._maybe_swap_in(control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Swap the profile in when the Trainer evaluates at the end of the epoch."""
        self._maybe_swap_in(control)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Give the model its training weights back after a periodic evaluation.

        Raises:
            TrackingError: If the evaluation was of one dataset of an ``eval_dataset``
                dict: the Trainer evaluates the next one at once, with no event before
                it, so it could not have the profile.
        """
        was_swapped = self._auto_swapped
        self._restore_auto_swap()
        metrics = kwargs.get("metrics") or {}
        if was_swapped and _one_of_several(metrics):
            raise TrackingError(
                f"evaluate_with={self.tracker.evaluate_with} cannot cover an eval_dataset dict: "
                "the Trainer evaluates its datasets one after another with no event before "
                "each, so only the first would use the profile (its metrics are logged; the "
                "training weights are back). Pass one eval_dataset, or evaluate each with "
                "`with callback.swapped(std): trainer.evaluate(dataset)`"
            )

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Never train on the profile's weights (an evaluation another callback cancelled)."""
        self._restore_auto_swap()

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Write the EMA state into the checkpoint folder the Trainer just wrote."""
        if self._auto_swapped:
            self._restore_auto_swap()
            raise TrackingError(
                f"checkpoint {self._folder(args, state)} was saved while the EMA profile "
                f"{self.tracker.evaluate_with} was swapped in for an evaluation that did not "
                "run (a callback after EMACallback cleared control.should_evaluate); put "
                "EMACallback after such callbacks"
            )
        ema = self.tracker.ema
        if ema is None or (not ema.sharded and not args.should_save):
            return
        folder = self._folder(args, state)
        rank, size = world()
        if ema.sharded:
            os.makedirs(folder, exist_ok=True)  # every rank writes; rank 0 may not be there yet
        elif not os.path.isdir(folder):
            raise TrackingError(
                f"the Trainer's checkpoint folder {folder} does not exist at on_save; EMACallback "
                "writes the EMA state into args.output_dir/checkpoint-<step> and cannot follow "
                "checkpoints saved elsewhere (hyperparameter search runs)"
            )
        path = os.path.join(folder, _state_name(ema, rank, size))
        payload = {
            "format": STATE_FORMAT,
            "rank": rank,
            "world_size": size,
            "tracker": _local_state(self.tracker.state_dict()),
        }
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Wait for pending snapshots; raises the first write failure."""
        self._auto_swapped = False
        self.tracker.close()

    # ---- evaluation -----------------------------------------------------------------------

    def _maybe_swap_in(self, control: Any) -> None:
        ema = self.tracker.ema
        if control.should_evaluate and ema is not None and ema.swapped_std is None:
            self._auto_swapped = self.tracker.swap_in()

    def _restore_auto_swap(self) -> None:
        if self._auto_swapped:
            self._auto_swapped = False
            self.tracker.swap_out()

    @contextmanager
    def swapped(self, std: float | None = None) -> Iterator[nn.Module]:
        """Context manager: the model holds profile ``std``'s weights inside the block.

        For ``trainer.evaluate()`` (or anything else) with a profile, during or after
        training; the training weights come back on exit, also when the block raises.

        Args:
            std: The profile; default ``evaluate_with``.
        """
        ema = self.tracker.ema
        if ema is None:
            raise TrackingError("the EMA does not exist yet: it is created when training begins")
        chosen = self.tracker.evaluate_with if std is None else std
        if chosen is None:
            raise TrackingError(f"pass the std to evaluate with, one of {ema.stds}")
        with ema.swapped(chosen) as module:
            yield module

    # ---- resume ---------------------------------------------------------------------------

    @staticmethod
    def _folder(args: Any, state: Any) -> str:
        return os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")

    def _resume(self, args: Any, state: Any) -> None:
        ema = self.tracker.ema
        assert ema is not None
        step = state.global_step
        given = args.resume_from_checkpoint
        folder = given if isinstance(given, str) and given else self._folder(args, state)
        rank, size = world()
        path = os.path.join(folder, _state_name(ema, rank, size))
        fix = (
            "The Trainer does not tell callbacks which checkpoint it resumes from: EMACallback "
            "reads args.resume_from_checkpoint when it is set, else "
            f"args.output_dir/{PREFIX_CHECKPOINT_DIR}-<global_step>. To resume from a checkpoint "
            "elsewhere, set TrainingArguments(resume_from_checkpoint=<that folder>) too; a "
            "checkpoint saved without EMACallback holds no EMA to resume"
        )
        if not os.path.isfile(path):
            stem = STATE_NAME.removesuffix(".pt")
            others = sorted(glob.glob(os.path.join(glob.escape(folder), f"{stem}*.pt")))
            held = f" (the folder holds {[os.path.basename(o) for o in others]})" if others else ""
            raise StateError(
                f"training resumes at global step {step}, but the EMA state {path} does not "
                f"exist{held}, so the EMA cannot be restored. {fix}"
            )
        _check_same_run(folder, state, fix)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise StateError(f"the EMA state {path} cannot be read: {exc}") from exc
        saved = payload.get("tracker") if isinstance(payload, dict) else None
        if not isinstance(saved, dict) or payload.get("format") != STATE_FORMAT:
            raise StateError(f"{path} is not a phema EMACallback state ({STATE_FORMAT})")
        if int(saved.get("last_step", -1)) != step:
            raise StateError(
                f"{path} holds the EMA after step {saved.get('last_step')}, but training "
                f"resumes at step {step}. {fix}"
            )
        if ema.sharded and int(payload["world_size"]) != size:
            raise StateError(
                f"{path} is a sharded EMA state saved by {payload['world_size']} processes; "
                f"resume with that many (this run has {size})"
            )
        self.tracker.load_state_dict(_global_state(saved, self.tracker.state_dict()))


def _one_of_several(metrics: Mapping[str, Any]) -> bool:
    """Whether ``metrics`` are one dataset's of an ``eval_dataset`` dict.

    A single dataset's keys are ``eval_loss``, ``eval_runtime``...; the Trainer prefixes
    each dataset of a dict with its name: ``eval_<name>_runtime``.
    """
    return "eval_runtime" not in metrics and any(
        k.startswith("eval_") and k.endswith("_runtime") for k in metrics
    )


def _state_name(ema: PowerFunctionEMA, rank: int, size: int) -> str:
    if not ema.sharded:
        return STATE_NAME
    stem = STATE_NAME.removesuffix(".pt")
    return f"{stem}-rank{rank:05d}-of-{size:05d}.pt"


def _check_same_run(folder: str, state: Any, fix: str) -> None:
    """Refuse a folder whose ``trainer_state.json`` is another run's (other log history)."""
    try:
        with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as f:
            stored = json.load(f)
    except FileNotFoundError:
        return
    # compared as JSON text: a NaN (a logged grad_norm) equals itself there
    same_log = json.dumps(stored.get("log_history"), sort_keys=True) == json.dumps(
        state.log_history, sort_keys=True
    )
    if stored.get("global_step") != state.global_step or not same_log:
        raise StateError(
            f"{folder} is not the checkpoint this run resumed from (its trainer_state.json has "
            f"another step or log history), so its EMA state is not this run's. {fix}"
        )


def _local_state(state: dict[str, Any]) -> dict[str, Any]:
    """The tracker state with DTensor shadows as this rank's plain rows (weights_only)."""
    shadows = state["ema"]["shadows"]
    if not any(is_dtensor(v) for v in shadows.values()):
        return state
    local = {n: v.to_local() if is_dtensor(v) else v for n, v in shadows.items()}
    return {**state, "ema": {**state["ema"], "shadows": local}}


def _global_state(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with its rows put back into DTensors placed as this EMA's (``current``)."""
    template = current["ema"]["shadows"]
    if not any(is_dtensor(v) for v in template.values()):
        return saved
    from torch.distributed.tensor import DTensor

    rows = saved["ema"]["shadows"]
    missing = sorted(set(template) - set(rows))
    if missing:
        raise StateError(f"the saved EMA state lacks {missing[:5]}")
    shadows = {}
    for name, like in template.items():
        value = rows[name]
        if not is_dtensor(like):
            shadows[name] = value
            continue
        local = like.to_local()
        if value.shape != local.shape or value.dtype != local.dtype:
            raise StateError(
                f"saved rows of {name!r} are {value.dtype} {tuple(value.shape)}, this rank "
                f"holds {local.dtype} {tuple(local.shape)}"
            )
        shadows[name] = DTensor.from_local(
            value.to(local.device),
            like.device_mesh,
            like.placements,
            run_check=False,
            shape=like.shape,
            stride=like.stride(),
        )
    return {**saved, "ema": {**saved["ema"], "shadows": shadows}}
