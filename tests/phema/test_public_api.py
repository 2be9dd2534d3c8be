"""The public surface is pinned, and importing phema pulls in no CLI or storage extras."""

import subprocess
import sys

import pytest

import phema

EXPECTED = {
    "STD_MAX",
    "ChangedError",
    "ExistsError",
    "BufferPolicy",
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
    "Snapshot",
    "Reconstruction",
    "ReconstructionInfo",
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
}


def test_all_is_pinned():
    assert set(phema.__all__) == EXPECTED
    for name in phema.__all__:
        assert hasattr(phema, name), name
    # the streaming engine is reached from the top level; its module is phema.streaming
    from phema.streaming import reconstruct

    assert phema.reconstruct is reconstruct


def test_errors_are_also_builtins():
    assert issubclass(phema.ProfileError, ValueError)
    assert issubclass(phema.SolverError, ValueError)
    assert issubclass(phema.StateError, ValueError)
    assert issubclass(phema.TrackingError, RuntimeError)
    assert issubclass(phema.FormatError, ValueError)
    assert issubclass(phema.StorageError, OSError)
    assert issubclass(phema.ExistsError, FileExistsError)
    assert issubclass(phema.ExistsError, phema.StorageError)
    assert issubclass(phema.ChangedError, phema.StorageError)
    for cls in (
        phema.FormatError,
        phema.ProfileError,
        phema.SolverError,
        phema.StateError,
        phema.StorageError,
        phema.TrackingError,
    ):
        assert issubclass(cls, phema.PhemaError)


@pytest.mark.slow
def test_import_is_light():
    code = (
        "import sys, phema; "
        "heavy = [m for m in ('typer', 'rich', 's3fs', 'huggingface_hub', 'phema_cli', 'lightning', "
        "'transformers', 'accelerate') "
        "if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
