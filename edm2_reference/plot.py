"""The EMA sweep figure of ``python -m edm2_reference.evaluate --plot``, and its sample grid.

:func:`plot_sweep` draws quality (FD) against the EMA length (``std``, :math:`\\sigma_\\text{rel}`)
from the rows ``--json`` prints, like the EDM2 paper's EMA sweep: the post-hoc EMA curve with
its bootstrap interval as a band, a dashed horizontal line per network without a std (e.g.
the raw training weights), and a dotted one at the real-vs-real level (held-out real images
against the reference set at the same n). It needs matplotlib (the ``plot`` extra), imported
only when a plot is made, and draws on a bare :class:`matplotlib.figure.Figure` with the Agg
canvas, so pyplot's global state and backend are never touched.

:func:`save_best_worst_grid` writes the samples of two rows side by side (the best EMA on
the left, the worst on the right, the same seeds in the same places) with
:func:`edm2_reference.sampler.save_image_grid`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from edm2_reference.sampler import save_image_grid
from phema.errors import PhemaError

__all__ = [
    "REAL_VS_REAL",
    "PlotError",
    "SweepPlot",
    "grid_path",
    "plot_sweep",
    "require_matplotlib",
    "save_best_worst_grid",
]

Array = NDArray[np.float64]


class PlotError(PhemaError, ValueError):
    """The sweep cannot be plotted (matplotlib missing, no EMA rows, too few images)."""


@dataclass(frozen=True)
class SweepPlot:
    """What :func:`plot_sweep` drew, read back from the figure's artists.

    ``std``, ``fd``: the curve's points; ``fd_lo``, ``fd_hi``: the band's lower and upper
    edge at each std; ``levels``: the y of each horizontal line by its legend label;
    ``diff``, ``diff_lo``, ``diff_hi``: the lower panel's points and error-bar ends.
    """

    std: Array
    fd: Array
    fd_lo: Array
    fd_hi: Array
    levels: dict[str, float] = field(default_factory=dict)
    #: The lower panel: each EMA row's FD minus the best one's, and its paired interval.
    diff: Array = field(default_factory=lambda: np.zeros(0))
    diff_lo: Array = field(default_factory=lambda: np.zeros(0))
    diff_hi: Array = field(default_factory=lambda: np.zeros(0))


REAL_VS_REAL = "real-vs-real (held out)"
"""Legend label of the real-vs-real line."""


def _float(row: Mapping[str, Any], key: str) -> float:
    value = row.get(key)
    if not isinstance(value, int | float):
        raise PlotError(f"row {row.get('label')!r} has no number {key!r} (got {value!r})")
    return float(value)


def require_matplotlib() -> None:
    """Raise :class:`PlotError` naming the fix when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise PlotError(
            f"--plot needs matplotlib ({exc}); install it with pip install 'torch-phema[plot]'"
        ) from exc


def plot_sweep(
    rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str | None = None
) -> SweepPlot:
    """Write the FD-vs-EMA-std figure of ``rows`` (``evaluate --json`` objects) to ``path``.

    Rows with a ``std`` make the curve (sorted by std; ``fd`` with the band ``fd_lo`` ..
    ``fd_hi``); rows without one a dashed line at their ``fd``; the first row's
    ``fd_baseline`` the dotted real-vs-real line. The x axis is linear in the std, as in
    the paper's figure. Returns the drawn values (:class:`SweepPlot`).
    """
    ema = sorted((r for r in rows if r.get("std") is not None), key=lambda r: _float(r, "std"))
    if not ema:
        raise PlotError(
            "no row has an EMA std to plot against; pass a folder of phema reconstructions (URL)"
        )
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 6.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax, ax_diff = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    x = np.array([_float(r, "std") for r in ema])
    y = np.array([_float(r, "fd") for r in ema])
    lo = np.array([_float(r, "fd_lo") for r in ema])
    hi = np.array([_float(r, "fd_hi") for r in ema])
    level = rows[0].get("level", 0.95)
    (curve,) = ax.plot(x, y, "o-", color="C0", label="post-hoc EMA")
    band = ax.fill_between(
        x, lo, hi, color="C0", alpha=0.25, linewidth=0, label=f"{level:.0%} interval"
    )
    lines = []
    for k, r in enumerate(r for r in rows if r.get("std") is None):
        label = f"{r.get('label', r.get('network'))}"
        lines.append(ax.axhline(_float(r, "fd"), ls="--", color=f"C{k + 1}", label=label))
    lines.append(ax.axhline(_float(rows[0], "fd_baseline"), ls=":", color="k", label=REAL_VS_REAL))
    ax.set_ylabel(f"FD, n = {rows[0].get('n')} (lower is better)")
    ax.set_title(title or "Post-hoc EMA sweep")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    diff = _diff_panel(ax_diff, ema, x, y - min(_float(r, "fd") for r in rows))
    ax_diff.set_xlabel("EMA length (std, relative)")
    fig.savefig(os.fspath(path), dpi=120)
    return _read_back(curve, band, lines, diff)


def _diff_panel(ax: Any, ema: Sequence[Mapping[str, Any]], x: Array, d: Array) -> list[Any]:
    """FD minus the best row's (``d``), with the paired bootstrap interval of that difference.

    The rows share seeds and reference images, so the difference is far less noisy than
    either FD: a row whose interval lies above 0 is worse than the best beyond the
    uncertainty (filled), one whose interval holds 0 is not (hollow).
    """
    lo = np.array([_float(r, "fd_vs_best_lo") for r in ema])
    hi = np.array([_float(r, "fd_vs_best_hi") for r in ema])
    bars = ax.vlines(x, lo, hi, color="C0", lw=1.5)
    worse = lo > 0
    (filled,) = ax.plot(x[worse], d[worse], "o", color="C0", label="worse than the best")
    (hollow,) = ax.plot(
        x[~worse], d[~worse], "o", mfc="white", color="C0", label="not significantly worse"
    )
    ax.axhline(0.0, color="k", lw=0.8)
    ax.set_ylabel("FD minus the best's\n(paired interval)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="upper center")
    return [bars, filled, hollow]


def _read_back(curve: Any, band: Any, lines: Sequence[Any], diff: Sequence[Any]) -> SweepPlot:
    """The values on the figure: the curve, the band's edges, the lines' y, the lower panel."""
    xs = np.asarray(curve.get_xdata(), dtype=np.float64)
    verts = np.concatenate([p.vertices for p in band.get_paths()])
    edge_lo = np.array([verts[verts[:, 0] == x, 1].min() for x in xs])
    edge_hi = np.array([verts[verts[:, 0] == x, 1].max() for x in xs])
    levels = {str(line.get_label()): float(line.get_ydata()[0]) for line in lines}
    bars, *points = diff
    ends = {float(seg[0][0]): (float(seg[0][1]), float(seg[1][1])) for seg in bars.get_segments()}
    at = {
        float(px): float(py)
        for line in points
        for px, py in zip(line.get_xdata(), line.get_ydata(), strict=True)
    }
    return SweepPlot(
        xs,
        np.asarray(curve.get_ydata(), dtype=np.float64),
        edge_lo,
        edge_hi,
        levels,
        diff=np.array([at[float(x)] for x in xs]),
        diff_lo=np.array([min(ends[float(x)]) for x in xs]),
        diff_hi=np.array([max(ends[float(x)]) for x in xs]),
    )


def grid_path(plot_path: str | os.PathLike[str]) -> str:
    """The sample grid's file beside the plot: ``sweep.png`` -> ``sweep-grid.png``."""
    root, ext = os.path.splitext(os.fspath(plot_path))
    return f"{root}-grid{ext or '.png'}"


def save_best_worst_grid(
    best: Tensor,
    worst: Tensor,
    path: str | os.PathLike[str],
    *,
    per_side: int = 4,
    rows: int = 8,
    scale: int | None = None,
) -> tuple[int, int]:
    """Write ``best`` and ``worst`` images (``[-1, 1]``, ``(N, C, H, W)``) side by side as a PNG.

    Grid row :math:`r` holds images :math:`r k .. r k + k - 1` (:math:`k` = ``per_side``) of
    ``best``, a grey spacer, then the same indices of ``worst``: equal seeds sit in mirrored
    places. ``scale`` defaults to ``max(1, 64 // H)`` (8x8 digits at 8x). Returns the grid's
    ``(rows, cols)`` in images.
    """
    count = per_side * rows
    if len(best) < count or len(worst) < count or best.shape[1:] != worst.shape[1:]:
        raise PlotError(
            f"the grid needs {count} images of one shape per side, got {tuple(best.shape)} and "
            f"{tuple(worst.shape)}; sample more (--n) or pass smaller per_side / rows"
        )
    spacer = torch.zeros((1, *best.shape[1:]), dtype=best.dtype)
    tiles = [
        torch.cat(
            [
                best[r * per_side : (r + 1) * per_side],
                spacer,
                worst[r * per_side : (r + 1) * per_side],
            ]
        )
        for r in range(rows)
    ]
    h = best.shape[2]
    return save_image_grid(
        torch.cat(tiles).cpu(),
        os.fspath(path),
        ncols=2 * per_side + 1,
        scale=scale or max(1, 64 // h),
        padding=1,
    )
