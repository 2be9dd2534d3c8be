"""``phema demo``: train a small model with PowerFunctionEMA, then pick EMA lengths post hoc.

The demo trains a small MLP on a synthetic regression task whose data it makes
itself, tracks the profiles 0.05 and 0.10 with :class:`phema.PowerFunctionEMA`,
keeps in-memory snapshots of both every few steps, and afterwards synthesises
other stds from those snapshots. For comparison it also tracks every target std
directly during training, so the table shows how close the post-hoc result is,
next to the bound that the solver's fit error guarantees: by Cauchy-Schwarz,
``||theta_hat - theta_q|| <= rel_error * ||q|| * ||theta||_L2(0, T)``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Annotated

import torch
import typer
from rich.table import Table
from torch import Tensor, nn

import phema
from phema_cli.console import note, out_console

STORED_STDS = (0.05, 0.10)
#: What the demo table's columns mean.
DEMO_LEGEND = (
    "post-hoc: the weights reconstructed from snapshots of the stored profiles; tracked: "
    "the same profile tracked directly while training (the reference); rel. param diff: "
    "||post-hoc - tracked|| / ||tracked|| over all parameters; bound: the most that "
    "difference can be, rel. L2 error x ||target profile|| x ||weights over time|| / "
    "||tracked|| (Cauchy-Schwarz); fit rel. L2 error and L1 norm: the solver's fit (see "
    "phema plan)."
)
TARGET_STDS = (0.03, 0.05, 0.075, 0.10, 0.15, 0.20)


@dataclass(frozen=True)
class Row:
    """One line of the demo table."""

    std: float
    val_loss_posthoc: float
    val_loss_tracked: float
    param_rel_diff: float
    rel_bound: float
    fit_rel_error: float
    l1_norm: float
    issues: tuple[str, ...]


def _task(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 1, generator=gen)

    def sample(n: int) -> tuple[Tensor, Tensor]:
        x = torch.randn(n, 16, generator=gen)
        y = torch.sin(x @ w) + 0.3 * torch.randn(n, 1, generator=gen)
        return x, y

    return (*sample(4096), *sample(2048))


def _val_loss(net: nn.Module, state: dict[str, Tensor], x: Tensor, y: Tensor) -> float:
    saved = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(state)
    with torch.no_grad():
        loss = float(nn.functional.mse_loss(net(x), y))
    net.load_state_dict(saved)
    return loss


def run_demo(steps: int, snapshot_every: int, seed: int) -> tuple[float, list[Row]]:
    """Train, snapshot, reconstruct; returns the raw model's val loss and one row per std."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_val, y_val = _task(seed)
    net = nn.Sequential(
        nn.Linear(16, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1)
    )
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ema = phema.PowerFunctionEMA(net, stds=STORED_STDS)
    truth = phema.PowerFunctionEMA(net, stds=TARGET_STDS)
    snapshots: list[phema.Snapshot] = []
    gen = torch.Generator().manual_seed(seed + 1)
    path_sq = 0.0  # ||theta||^2 in L2(0, T), for the Cauchy-Schwarz error bound
    for step in range(1, steps + 1):
        idx = torch.randint(0, x_tr.shape[0], (32,), generator=gen)
        loss = nn.functional.mse_loss(net(x_tr[idx]), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        opt.step()
        ema.update(step)
        truth.update(step)
        path_sq += sum(float(p.detach().square().sum()) for p in net.parameters())
        if step % snapshot_every == 0:
            snapshots.extend(ema.snapshot())
    targets = [phema.PowerProfile(float(steps), s) for s in TARGET_STDS]
    outputs, solution = phema.reconstruct_in_memory(snapshots, targets, warn=False)
    raw = _val_loss(net, net.state_dict(), x_val, y_val)
    rows = []
    for std, out, fit in zip(TARGET_STDS, outputs, solution.fits, strict=True):
        tracked = truth.profile_state_dict(std)
        diff = math.sqrt(sum(float((out[k] - tracked[k]).square().sum()) for k in out))
        norm = math.sqrt(sum(float(tracked[k].square().sum()) for k in out))
        rows.append(
            Row(
                std,
                _val_loss(net, out, x_val, y_val),
                _val_loss(net, tracked, x_val, y_val),
                diff / norm,
                fit.rel_error * math.sqrt(fit.target.norm2() * path_sq) / norm,
                fit.rel_error,
                fit.l1_norm,
                fit.issues,
            )
        )
    return raw, rows


def demo(
    steps: Annotated[int, typer.Option(min=100, help="Training steps.")] = 3000,
    snapshot_every: Annotated[
        int, typer.Option(min=1, help="Steps between in-memory snapshots.")
    ] = 100,
    seed: Annotated[int, typer.Option(help="Seed for data, init and batches.")] = 0,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON object per std instead of a table.")
    ] = False,
) -> None:
    """Train a small model with PowerFunctionEMA (stds 0.05, 0.10), then reconstruct others."""
    if snapshot_every > steps:
        raise typer.BadParameter(f"--snapshot-every {snapshot_every} exceeds --steps {steps}")
    raw, rows = run_demo(steps, snapshot_every, seed)
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row.__dict__))
        return
    table = Table(
        title=f"Post-hoc EMA from profiles {STORED_STDS}, snapshots every {snapshot_every} "
        f"of {steps} steps (raw model val. loss {raw:.4f})"
    )
    for col in (
        "std",
        "val loss post-hoc",
        "val loss tracked",
        "rel. param diff",
        "bound",
        "fit rel. L2 error",
        "L1 norm",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            f"{r.std:.3f}",
            f"{r.val_loss_posthoc:.5f}",
            f"{r.val_loss_tracked:.5f}",
            f"{r.param_rel_diff:.2e}",
            f"{r.rel_bound:.2e}",
            f"{r.fit_rel_error:.2e}",
            f"{r.l1_norm:.2f}",
        )
    out_console.print(table)
    note(DEMO_LEGEND, style="dim")
    for r in rows:
        if r.issues:
            note(f"note, std {r.std:.3f}: {'; '.join(r.issues)}")
