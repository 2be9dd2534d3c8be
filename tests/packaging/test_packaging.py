"""The package as a user gets it: a built wheel in a clean environment, and the set-up
scripts on a machine whose system Python refuses pip installs (PEP 668)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import phema

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
#: The torch already installed here, so that new environments take the same build.
TORCH = f"torch=={torch.__version__}"


def _run(cmd, cwd, env=None, timeout=900):
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _clean_env(**extra):
    """This process's environment without anything that points at an environment or the tree."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("VIRTUAL_ENV", "CONDA_PREFIX", "PYTHON", "PYTHONPATH", "PYTHONHOME")
    }
    return {**env, **extra}


def _tracked_files(dest: Path) -> None:
    """Copy the project as a fresh clone would have it (tracked and new unignored files)."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def test_wheel_installs_and_runs_from_a_clean_environment(tmp_path):
    project = tmp_path / "src"
    _tracked_files(project)
    _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path, project], tmp_path
    )
    (wheel,) = tmp_path.glob("torch_phema-*.whl")
    assert wheel.name.startswith(f"torch_phema-{phema.__version__}-py3-none-any")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp_path)
    py, bindir = venv / "bin" / "python", venv / "bin"
    _run([py, "-m", "pip", "install", "-q", TORCH, wheel], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = _clean_env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")

    version = _run([bindir / "phema", "--version"], elsewhere, env).stdout
    assert version.strip() == f"phema {phema.__version__}"
    probe = textwrap.dedent(
        """
        import json, importlib.metadata as md, importlib.util as iu
        import phema, phema_cli, edm2_reference, phema.integrations.tracker
        dist = md.distribution("torch-phema")
        print(json.dumps({
            "files": [m.__file__ for m in (phema, phema_cli, edm2_reference)],
            "license": dist.metadata["License-Expression"],
            "license_files": [str(f) for f in dist.files if "licenses" in str(f)],
            "typed": iu.find_spec("phema").submodule_search_locations[0],
            "stray": [n for n in ("cli", "tests", "benchmarks") if iu.find_spec(n)],
            "version": phema.__version__,
        }))
        """
    )
    got = json.loads(_run([py, "-c", probe], elsewhere, env).stdout)
    site = str(venv / "lib")
    assert all(f.startswith(site) for f in got["files"]), got["files"]  # not the source tree
    assert got["license"] == "Apache-2.0"
    assert got["license_files"] == [f"torch_phema-{phema.__version__}.dist-info/licenses/LICENSE"]
    assert (Path(got["typed"]) / "py.typed").is_file()
    assert got["stray"] == []
    assert got["version"] == phema.__version__

    demo = _run([bindir / "phema", "demo"], elsewhere, env).stdout
    assert "post-hoc" in demo
    assert "0.100" in demo


# A python3 that behaves like a system Python marked externally managed: it runs, makes
# virtual environments, and refuses `pip install` outside one.
_MANAGED = """#!/bin/sh
case " $* " in
  *" -m pip "*install*)
    if [ -z "$VIRTUAL_ENV" ]; then
      echo "error: externally-managed-environment" >&2
      exit 1
    fi;;
esac
exec {real} "$@"
"""


def test_setup_script_makes_and_reuses_a_project_venv(tmp_path):
    project = tmp_path / "src"
    _tracked_files(project)
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    real = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    assert real.is_file()
    shim = fake_bin / "python3"
    shim.write_text(_MANAGED.format(real=real))
    shim.chmod(0o755)
    env = _clean_env(PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    # the shim really refuses, so a script that installed into it would fail here
    refused = subprocess.run(
        [shim, "-m", "pip", "install", "six"], env=env, capture_output=True, text=True
    )
    assert refused.returncode == 1
    assert "externally-managed" in refused.stderr

    first = _run(["bash", "scripts/install.sh"], project, env)
    assert "creating the project's own in .venv" in first.stderr
    venv_py = project / ".venv" / "bin" / "python"
    assert venv_py.is_file()
    where = _run([venv_py, "-c", "import phema; print(phema.__file__)"], tmp_path, env).stdout
    assert where.strip() == str(project / "phema" / "__init__.py")  # editable, from the tree
    version = _run([project / ".venv" / "bin" / "phema", "--version"], tmp_path, env).stdout
    assert version.strip() == f"phema {phema.__version__}"

    again = _run(["bash", "scripts/install.sh"], project, env)
    assert "creating" not in again.stderr
    assert "using the project's virtual environment .venv" in again.stderr
