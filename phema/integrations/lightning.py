"""``EMACallback``: post-hoc EMA for a Lightning ``Trainer`` in one callback.

The callback drives an :class:`~phema.integrations.tracker.EMATracker` from
Lightning's hooks. Where each step happens, and why (Lightning 2.6's order in
``Trainer._run``: ``setup`` and ``configure_model`` hooks, a checkpoint's callback
state for most strategies, then ``strategy.setup`` (precision cast, device move,
DDP wrap), ``on_fit_start``, the checkpoint for FSDP / ModelParallel / DeepSpeed,
the sanity check, ``on_train_start``):

- **Create** the EMA in ``on_fit_start``: the first hook after ``strategy.setup``,
  so the model is final (on its device, in its dtype, sharded by ``configure_model``).
  A state restored from a checkpoint before that is held by the tracker and applied
  when the EMA is made; one restored after it is applied at once. The order does not
  matter. ``trainer.validate`` / ``trainer.test`` without a fit make it at the start
  of evaluation (the model is final there too), with a checkpoint's state if one was
  given.
- **Update** in ``on_train_batch_end`` with ``trainer.global_step``: the number of
  optimizer steps (``optimizer.step()`` calls under manual optimization, so one batch
  that steps two optimizers is one update). The tracker ignores a step it has seen, so
  batches that only accumulate gradients change nothing.
- **Evaluate** with ``evaluate_with``'s weights from ``on_validation_start`` to
  ``on_validation_end`` (and the test equivalents): callback hooks run before the
  module's, so the module's ``validation_step`` and ``on_validation_epoch_end`` see
  the profile; ``ModelCheckpoint`` is always ordered after other callbacks, so its
  ``on_validation_end`` runs with the training weights back. Should any other code save
  a checkpoint while the profile is swapped in, ``on_save_checkpoint`` replaces the
  model's weights in it by the training ones. The sanity check (before any step) is
  never swapped; an exception restores the training weights in ``on_exception``.
- **State** goes through Lightning's callback ``state_dict`` / ``load_state_dict``
  under ``state_key`` ``"EMACallback"``: Lightning stores it in
  ``checkpoint["callbacks"]``, warns when a checkpoint holds the state of a callback
  that is missing, and refuses two such callbacks in one trainer. Resuming from a
  checkpoint without it raises instead of starting a new EMA half way through.
- **Snapshots** are written every ``snapshot_every`` optimizer steps; ``on_train_end``
  waits for them and raises any write failure.

Under DDP every rank runs the callback: every rank keeps the EMA and updates it, the
writer writes whole snapshots from rank 0 and sharded ones (FSDP2, ``partition=True``)
from every rank.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from phema.errors import StateError, TrackingError
from phema.integrations.tracker import EMATracker
from phema.tracking import BufferPolicy, PowerFunctionEMA

__all__ = ["EMACallback"]


def _import_lightning() -> Any:
    """``lightning.pytorch``, else the standalone ``pytorch_lightning`` package."""
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError(
        "phema.integrations.lightning needs Lightning: pip install 'torch-phema[lightning]' "
        "(or pip install lightning)"
    )


_pl = _import_lightning()
Callback: Any = _pl.Callback


class EMACallback(Callback):
    """Track power-function EMA profiles of the model during ``Trainer.fit``.

    Args:
        stds: Relative stds of the tracked profiles.
        snapshots: Store URL (or path) for snapshots; ``None`` writes none.
        snapshot_every: Write a snapshot every this many optimizer steps.
        unit: Unit of the EMA time (``"steps"``, ``"samples"``...), stored in snapshots.
        per_step: Time per optimizer step in ``unit`` (1 for steps, the global batch
            size for samples).
        dtype: Storage dtype of snapshots.
        buffers: Buffer policy of the EMA (:data:`~phema.tracking.BufferPolicy`).
        partition: DDP: each rank tracks ``1/world_size`` of the rows.
        evaluate_with: Std of the profile validation and test run with; ``None``
            keeps the training weights. Must be one of ``stds``.
        submodule: Track only this submodule of the ``LightningModule`` (e.g.
            ``"net"``: snapshot keys are then the network's own); ``""`` tracks the
            whole module.
        storage_options: Passed to fsspec for ``snapshots``.

    Raises:
        TrackingError: If ``evaluate_with`` is not a tracked std, ``snapshots`` has no
            ``snapshot_every`` or ``per_step`` is not positive.
        ProfileError: If a std is outside ``(0, 0.2887]``.

    Example:
        Track two profiles, write snapshots every 1000 steps, validate with one::

            ema = EMACallback(
                stds=(0.05, 0.10), snapshots="runs/exp1", snapshot_every=1000,
                evaluate_with=0.10,
            )
            trainer = lightning.pytorch.Trainer(max_steps=100_000, callbacks=[ema])
            trainer.fit(model, train_loader, val_loader)
            torch.save(ema.ema.profile_state_dict(0.10), "ema-0.10.pt")
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
        submodule: str = "",
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.tracker = EMATracker(
            stds,
            snapshots=snapshots,
            snapshot_every=snapshot_every,
            unit=unit,
            per_step=per_step,
            dtype=dtype,
            buffers=buffers,
            partition=partition,
            evaluate_with=evaluate_with,
            storage_options=storage_options,
        )
        self.submodule = submodule
        self._trainer: Any = None
        self._warned = False

    @property
    def ema(self) -> PowerFunctionEMA:
        """The :class:`~phema.tracking.PowerFunctionEMA` (made when fitting starts)."""
        if self.tracker.ema is None:
            raise TrackingError("the EMA is made when fitting starts (on_fit_start)")
        return self.tracker.ema

    def _start(self, pl_module: Any) -> None:
        target: nn.Module = pl_module.get_submodule(self.submodule)
        self.tracker.start(target)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Keep the trainer: :meth:`state_dict` reads its step."""
        self._trainer = trainer

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Restore the training weights and close the writer (raises write failures)."""
        self._trainer = None
        self.tracker.close()

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Make the EMA: the model is on its device, cast and wrapped now."""
        self._start(pl_module)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Refuse a step count that does not continue the EMA's.

        Raises:
            StateError: The run resumes from a checkpoint without the EMA's state.
            TrackingError: The trainer counts from an earlier step than the EMA has
                seen (a used callback given to a new ``Trainer``).
        """
        step, seen = trainer.global_step, self.tracker.last_step
        if step < seen:
            raise TrackingError(
                f"the trainer starts at optimizer step {step} but this EMACallback has "
                f"already seen {seen}: use a new EMACallback with a new Trainer (or "
                "resume the trainer from a checkpoint of this run)"
            )
        if step > seen:
            raise StateError(
                f"training resumes at optimizer step {step} but the EMA has seen {seen}: "
                f"the checkpoint holds no {self.state_key!r} "
                "callback state (saved without this callback, with weights_only=True, or "
                "under another state_key). A new EMA would weight the resumed weights as "
                "if they were the whole run; resume from a checkpoint with the EMA state"
            )

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Fold the weights in after each optimizer step (repeats are ignored)."""
        self.tracker.step(trainer.global_step)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """Wait for pending snapshots; raises the first write failure."""
        self.tracker.close()

    def _swap_in(self, trainer: Any, pl_module: Any) -> None:
        if self.tracker.evaluate_with is None or trainer.sanity_checking:
            return
        if self.tracker.ema is None:  # trainer.validate / test without fit
            self._start(pl_module)
        if not self.tracker.swap_in() and not self._warned:
            self._warned = True
            warnings.warn(
                f"evaluate_with={self.tracker.evaluate_with} but the EMA has no profile "
                "yet (no optimizer step, no checkpoint state): evaluating with the "
                "training weights",
                stacklevel=2,
            )

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        """Swap ``evaluate_with``'s weights in (not during the sanity check)."""
        self._swap_in(trainer, pl_module)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        """Put the training weights back, before any ``ModelCheckpoint`` saves."""
        self.tracker.swap_out()

    def on_test_start(self, trainer: Any, pl_module: Any) -> None:
        """Swap ``evaluate_with``'s weights in."""
        self._swap_in(trainer, pl_module)

    def on_test_end(self, trainer: Any, pl_module: Any) -> None:
        """Put the training weights back."""
        self.tracker.swap_out()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Restore the training weights; flush a whole-snapshot writer.

        A write failure is added to ``exception`` as a note rather than raised over it.
        A sharded writer is left open: closing it would wait for ranks that may be gone.
        """
        self.tracker.swap_out()
        ema, writer = self.tracker.ema, self.tracker.writer
        if writer is None or (ema is not None and ema.sharded):
            return
        try:
            self.tracker.close()
        except Exception as err:
            exception.add_note(f"phema: while closing the snapshot writer: {err}")

    def state_dict(self) -> dict[str, Any]:
        """The tracker's state (sharded shadows gathered: every rank must call it)."""
        ema = self.tracker.ema
        if ema is None:  # a state loaded and waiting for the EMA, or none
            return self.tracker.state_dict() if self.tracker.has_state else {}
        trainer = self._trainer
        if (
            trainer is not None
            and trainer.training
            and not trainer.sanity_checking
            and ema.swapped_std is None
        ):
            # A checkpoint taken between an optimizer step and on_train_batch_end (by
            # code that runs before this callback) must hold that step.
            self.tracker.step(trainer.global_step)
        # Lightning saves callback states from rank 0 with torch.save: gather the rows.
        return self.tracker.state_dict(full=True)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; before the EMA exists it is applied when it is made.

        An empty state (saved before the EMA existed) restores nothing; resuming training
        from it past step 0 is refused at ``on_train_start``.
        """
        if not state_dict:
            return
        self.tracker.load_state_dict(state_dict)

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        """Save the training weights, not the profile, if one is swapped in now."""
        ema = self.tracker.ema
        if ema is None or ema.swapped_std is None or "state_dict" not in checkpoint:
            return
        self.tracker.swap_out()
        try:
            weights = trainer.strategy.lightning_module_state_dict()
            checkpoint["state_dict"] = {
                k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in weights.items()
            }
        finally:
            self.tracker.swap_in()
