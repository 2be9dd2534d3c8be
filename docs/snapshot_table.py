"""Print the table of docs/guide.md: how well stored profiles fit other stds, by snapshot count.

Every row stores snapshots of the stds 0.05 and 0.10 at n evenly spaced times
``T/n, 2T/n, ..., T``; every column is a target std at the final time ``T``. Each cell
is the solver's relative L2 error of the fit (``phema.fit_profiles``) and, after the
slash, the L1 norm of its coefficients (how much snapshot noise it amplifies). Nothing
depends on T or the time unit: the fit is scale-free in time.

    python docs/snapshot_table.py
"""

from __future__ import annotations

import numpy as np

import phema

STORED = (0.05, 0.10)
TARGETS = (0.02, 0.03, 0.04, 0.07, 0.15, 0.20, 0.25)
COUNTS = (2, 4, 8, 16, 32, 64, 128)


def table() -> str:
    """The markdown table, one row per snapshot count."""
    head = "| snapshot times | " + " | ".join(f"std {s:.2f}" for s in TARGETS) + " |"
    rows = [head, "|" + " --- |" * (len(TARGETS) + 1)]
    for n in COUNTS:
        times = np.repeat(np.arange(1, n + 1) / n, len(STORED))
        stds = np.tile(STORED, n)
        targets = [phema.PowerProfile(1.0, s) for s in TARGETS]
        fits = phema.fit_profiles(times, stds, targets, warn=False).fits
        cells = [f"{f.rel_error:.1e} / {f.l1_norm:.0f}" for f in fits]
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(table())
