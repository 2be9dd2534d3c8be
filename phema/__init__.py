"""phema: post-hoc EMA for PyTorch.

Track several power-function EMA profiles during training with
:class:`PowerFunctionEMA`, then synthesise any other profile (std, time) after
training with the float64 least-squares solver in :mod:`phema.solver`:
:func:`reconstruct` streams a store of snapshots into new profiles, :func:`load` reads
one back into a model.
"""

from phema.errors import (
    ChangedError,
    ExistsError,
    FormatError,
    IllPosedWarning,
    NonFiniteError,
    OptionError,
    PhemaError,
    ProfileError,
    SolverError,
    StateError,
    StorageError,
    TrackingError,
)
from phema.loading import load
from phema.memory import Snapshot, reconstruct_in_memory
from phema.profiles import (
    STD_MAX,
    gamma_to_sigma_rel,
    power_beta,
    power_inner,
    power_weight,
    sigma_rel_to_gamma,
)
from phema.solver import Fit, Solution, fit_profiles, solve_weights
from phema.store import ReconstructionInfo, SnapshotInfo, SnapshotStore
from phema.streaming import Plan, Reconstruction, plan, reconstruct, write_plan
from phema.targets import ExponentialProfile, PowerProfile, Profile
from phema.tracking import BufferPolicy, PowerFunctionEMA, unwrap_module
from phema.writer import SnapshotWriter

__version__ = "0.1.0"

__all__ = [
    "STD_MAX",
    "BufferPolicy",
    "ChangedError",
    "ExistsError",
    "ExponentialProfile",
    "Fit",
    "FormatError",
    "IllPosedWarning",
    "NonFiniteError",
    "OptionError",
    "PhemaError",
    "Plan",
    "PowerFunctionEMA",
    "PowerProfile",
    "Profile",
    "ProfileError",
    "Reconstruction",
    "ReconstructionInfo",
    "Snapshot",
    "SnapshotInfo",
    "SnapshotStore",
    "SnapshotWriter",
    "Solution",
    "SolverError",
    "StateError",
    "StorageError",
    "TrackingError",
    "fit_profiles",
    "gamma_to_sigma_rel",
    "load",
    "plan",
    "power_beta",
    "power_inner",
    "power_weight",
    "reconstruct",
    "reconstruct_in_memory",
    "sigma_rel_to_gamma",
    "solve_weights",
    "unwrap_module",
    "write_plan",
]
