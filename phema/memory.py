r"""In-memory snapshots and reconstruction: the solver applied to tensors you already hold.

A reconstruction of target :math:`j` is the weighted sum of snapshot tensors

.. math::

    \hat\theta_j = \sum_i c_{ij}\, \hat\theta^{(i)},

with :math:`c` from :func:`phema.solver.fit_profiles`, accumulated in float32
(float64 when the snapshots are float64) whatever the snapshots' storage dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from phema.errors import SolverError
from phema.solver import Solution, fit_profiles
from phema.targets import Profile

__all__ = ["Snapshot", "reconstruct_in_memory"]


@dataclass(frozen=True)
class Snapshot:
    """One stored profile: training time ``t``, relative std ``std`` and its tensors."""

    t: float
    std: float
    tensors: Mapping[str, Tensor]


def _check_layouts(snapshots: Sequence[Snapshot]) -> None:
    ref = snapshots[0].tensors
    for i, snap in enumerate(snapshots[1:], start=1):
        if snap.tensors.keys() != ref.keys():
            diff = sorted(set(snap.tensors) ^ set(ref))[:5]
            raise SolverError(
                f"snapshot {i} (t={snap.t:g}, std={snap.std:g}) holds other tensors than "
                f"snapshot 0: {diff} differ"
            )
        for name, value in snap.tensors.items():
            if value.shape != ref[name].shape:
                raise SolverError(
                    f"snapshot {i} (t={snap.t:g}, std={snap.std:g}): tensor {name!r} has shape "
                    f"{tuple(value.shape)}, snapshot 0 has {tuple(ref[name].shape)}"
                )


def reconstruct_in_memory(
    snapshots: Sequence[Snapshot],
    targets: Sequence[Profile],
    *,
    constraint: Literal["rescale", "exact"] = "rescale",
    warn: bool = True,
) -> tuple[list[dict[str, Tensor]], Solution]:
    """Synthesise each target profile from snapshots held in memory.

    Args:
        snapshots: Stored profiles, any order and mix of times and stds; all must
            hold the same tensor names and shapes.
        targets: Profiles to build (see :mod:`phema.targets`).
        constraint: Passed to :func:`~phema.solver.fit_profiles`.
        warn: Passed to :func:`~phema.solver.fit_profiles`.

    Returns:
        One ``{name: tensor}`` per target (float32, or float64 for float64 snapshots),
        and the :class:`~phema.solver.Solution` with coefficients and fit quality.

    Raises:
        SolverError: If the snapshots' layouts differ or the request cannot be solved.
    """
    if not snapshots:
        raise SolverError("no snapshots given")
    _check_layouts(snapshots)
    solution = fit_profiles(
        [s.t for s in snapshots],
        [s.std for s in snapshots],
        targets,
        constraint=constraint,
        warn=warn,
    )
    outputs: list[dict[str, Tensor]] = []
    for j in range(len(targets)):
        out: dict[str, Tensor] = {}
        for name, ref in snapshots[0].tensors.items():
            acc_dtype = torch.promote_types(ref.dtype, torch.float32)
            acc = torch.zeros(ref.shape, dtype=acc_dtype, device=ref.device)
            for i, snap in enumerate(snapshots):
                c = float(solution.weights[i, j])
                if c != 0.0:
                    acc.add_(snap.tensors[name].to(acc_dtype), alpha=c)
            out[name] = acc
        outputs.append(out)
    return outputs, solution
