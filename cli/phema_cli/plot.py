"""``phema plan --plot``: target vs achieved EMA profiles as a PNG (needs matplotlib)."""

from __future__ import annotations

import os

import numpy as np

from phema.errors import PhemaError
from phema.store import atomic_write
from phema.streaming import Plan

__all__ = ["PlotError", "save_plan_plot"]


class PlotError(PhemaError, RuntimeError):
    """The plot could not be made (matplotlib missing, unwritable path)."""


def save_plan_plot(the_plan: Plan, path: str, *, overwrite: bool = False, num: int = 2001) -> None:
    """Draw each output's target profile (dashed) and the achieved one (solid) into ``path``.

    The x axis is the time as a fraction of the target time ``t``; the y axis the weight
    per unit of that fraction, ``t * p(tau)``, so that each curve integrates to 1.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotError(
            f"--plot needs matplotlib ({exc}); install it with pip install 'torch-phema[plot]'"
        ) from None
    if os.path.exists(path) and not overwrite:
        raise PlotError(f"{path} exists; choose another --plot path or pass --overwrite")
    tau = np.linspace(0.0, the_plan.t, num)
    target, achieved = the_plan.curves(tau)
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for j, (std, fit) in enumerate(zip(the_plan.stds, the_plan.fits, strict=True)):
        color = f"C{j % 10}"
        label = f"std {std:.4g} (rel. L2 error {fit.rel_error:.2g})"
        ax.plot(tau / the_plan.t, target[j] * the_plan.t, "--", color=color, lw=1.2)
        ax.plot(tau / the_plan.t, achieved[j] * the_plan.t, "-", color=color, lw=1.6, label=label)
    ax.set_xlabel(f"training time / t  (t = {the_plan.t:g})")
    ax.set_ylabel("EMA weight density (per unit of time / t)")
    ax.set_title(f"target (dashed) vs achieved (solid) from {len(the_plan.inputs)} snapshots")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with atomic_write(path, overwrite=overwrite) as f:  # never replaces, even racing
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)
