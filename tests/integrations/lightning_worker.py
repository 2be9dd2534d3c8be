"""Run under torchrun (2 processes, gloo) by test_lightning.py: EMACallback under DDP.

``python lightning_worker.py OUT``: two fits of the same model with
``strategy="ddp"``, 8 optimizer steps each, validation with the 0.10 profile at the
end. ``plain`` keeps a whole EMA on every rank and snapshots to ``OUT/plain/snaps``;
``partition`` splits it across the ranks (``partition=True``, sharded snapshots to
``OUT/partition/snaps``). Each rank writes ``OUT/<mode>/rank<r>.json`` (global step,
the snapshot files its writer wrote, whether validation saw the profile) and
``OUT/<mode>/ema-rank<r>.pt`` (its EMA state, gathered); rank 0's ``ModelCheckpoint``
writes ``OUT/<mode>/ckpt/last.ckpt``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

STDS = (0.05, 0.10)


def loader(n: int, seed: int, batch_size: int) -> DataLoader[Any]:
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))
    return DataLoader(data, batch_size=batch_size)


def fit(out: Path, partition: bool) -> None:
    import lightning.pytorch as L
    import torch.distributed as dist
    from lightning.pytorch.callbacks import Callback, ModelCheckpoint

    from phema.integrations.lightning import EMACallback

    ema_cb = EMACallback(
        stds=STDS,
        snapshots=str(out / "snaps"),
        snapshot_every=4,
        evaluate_with=0.10,
        partition=partition,
    )

    class Net(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
            self.validated: list[bool] = []

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            return F.mse_loss(self.net(x), y)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            if not self.trainer.sanity_checking:  # the weights are the profile's now
                profile = ema_cb.ema.profile(0.10)  # a collective when partitioned
                self.validated.append(
                    all(torch.equal(p, profile[n]) for n, p in self.named_parameters())
                )

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    class KeepWriter(Callback):  # EMACallback closes its writer at the end of training
        writer: Any = None

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.writer = ema_cb.tracker.writer

    keep = KeepWriter()
    model = Net()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=8,
        callbacks=[ema_cb, keep, ModelCheckpoint(dirpath=out / "ckpt", save_last=True)],
        default_root_dir=out,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
        deterministic=True,
        num_sanity_val_steps=1,
    )
    # 128 samples: 64 per rank, 8 batches of 8, one epoch of 8 optimizer steps.
    trainer.fit(model, loader(128, 0, 8), loader(16, 1, 16))
    rank = dist.get_rank()
    state = ema_cb.state_dict()["ema"]  # gathered when partitioned: every rank calls it
    torch.save(state, out / f"ema-rank{rank}.pt")
    result = {
        "global_step": trainer.global_step,
        "sharded": ema_cb.ema.sharded,
        "written": sorted(Path(p).name for p in keep.writer.written),
        "validated": model.validated,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def main() -> None:
    out = Path(sys.argv[1])
    for mode in ("plain", "partition"):
        fit(out / mode, partition=mode == "partition")
    # Leave no gloo threads behind at exit (an abort there fails the run); the frameworks
    # start the process group and do not end it.
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
