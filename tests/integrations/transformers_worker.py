"""Run under torchrun (2 processes, gloo) by test_transformers.py: EMACallback under DDP.

``python transformers_worker.py OUT MODE`` with MODE ``plain`` (a whole EMA on every
rank) or ``partition`` (``partition=True``: each rank tracks its rows). Three Trainer
runs of 8 optimizer steps with a checkpoint every 4 and evaluations with the 0.10
profile every 4: ``full`` straight through, ``stopped`` after step 4, and ``resumed``
from ``stopped``'s checkpoint-4 into a differently initialised model. Each rank writes
``OUT/<run>-rank<r>.pt``: its model parameters, every profile gathered whole, the EMA's
time and update count, and the eval losses logged. Snapshots (every 2 steps) go to
``OUT/snaps-full`` and, for the stopped and resumed runs, ``OUT/snaps-run``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

STDS = (0.05, 0.10)


class Net(nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = nn.Linear(6, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.out(torch.tanh(self.hidden(x)))
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 6, generator=g)
        self.y = (self.x[:, :3].sum(1) > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def run(out: Path, mode: str, name: str, *, seed: int, stop_at: int | None, resume) -> None:
    import torch.distributed as dist
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from phema.integrations.transformers import EMACallback

    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == stop_at:
                control.should_training_stop = True

    cb = EMACallback(
        STDS,
        snapshots=str(out / ("snaps-full" if name == "full" else "snaps-run")),
        snapshot_every=2,
        partition=mode == "partition",
        unit="samples",
        evaluate_with=0.10,
    )
    args = TrainingArguments(
        output_dir=str(out / ("full" if name == "full" else "run")),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=8,
        learning_rate=0.05,
        lr_scheduler_type="constant",
        max_steps=8,
        save_strategy="steps",
        save_steps=4,
        eval_strategy="steps",
        eval_steps=4,
        logging_steps=1,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=7,
    )
    callbacks = [cb] if stop_at is None else [cb, StopAt()]
    trainer = Trainer(
        model=Net(seed),
        args=args,
        train_dataset=Pairs(64, seed=1),
        eval_dataset=Pairs(16, seed=2),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    ema = cb.ema
    assert ema is not None
    rank = dist.get_rank()
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
            "profiles": {s: ema.profile(s, full=True) for s in STDS},  # a collective
            "t": ema.t,
            "num_updates": ema.num_updates,
            "sharded": ema.sharded,
            "per_step": cb.tracker.per_step,
            "eval_losses": [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h],
        },
        out / f"{name}-rank{rank}.pt",
    )
    dist.barrier()


def main() -> None:
    out, mode = Path(sys.argv[1]), sys.argv[2]
    run(out, mode, "full", seed=0, stop_at=None, resume=None)
    run(out, mode, "stopped", seed=0, stop_at=4, resume=None)
    run(out, mode, "resumed", seed=3, stop_at=None, resume=str(out / "run" / "checkpoint-4"))
    # Leave no gloo threads behind at exit (an abort there fails the run); the frameworks
    # start the process group and do not end it.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
