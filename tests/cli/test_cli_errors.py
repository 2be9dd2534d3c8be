"""Every expected failure of the ``phema`` command is one literal line with the right exit code.

Most cases run the command's entry point in this process (``phema_cli.app.main``,
output captured); a few run the installed console script, to show the two agree.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import phema
from phema.format import serialize
from phema.store import snapshot_metadata, snapshot_name

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from clirun import run_cli

from phema_cli.errors import describe


def _one_error(lines, *needles):
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _save(store, t, std, tensors=None, **override):
    tensors = tensors or {"w": torch.full((3,), t), "b": torch.ones(2)}
    meta = snapshot_metadata(
        tensors,
        t=t,
        std=std,
        gamma=float(phema.sigma_rel_to_gamma(std)),
        t_unit="steps",
        step=int(t),
    )
    meta.update(override)
    store.write(snapshot_name(t, std), serialize(tensors, meta))


@pytest.fixture
def store_dir(tmp_path):
    root = tmp_path / "run"
    store = phema.SnapshotStore(str(root))
    for t in (100.0, 200.0, 300.0, 400.0):
        for std in (0.05, 0.10):
            _save(store, t, std)
    return root


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["plan", "STORE", "--std", "nan"], "std nan"),
        (["plan", "STORE", "--std", "abc"], "'abc'"),
        (["plan", "STORE", "--std", "0.5"], "std 0.5"),
        (["plan", "STORE", "--std", "5"], "5% as 0.05"),
        (["plan", "STORE", "--std", "0"], "std 0"),
        (["plan", "STORE", "--std", "0.1,0.1"], "repeat"),
        (["plan", "STORE", "--std", "0.1", "--at", "inf"], "'--at'"),
        (["plan", "STORE", "--std", "0.1", "--at", "-5"], "-5.0"),
        (["reconstruct", "STORE", "--std", "0.1", "--out", "OUT", "--window-mb", "inf"], "inf"),
        (["reconstruct", "STORE", "--std", "0.1", "--out", "OUT", "--window-mb", "0"], "0.0"),
        (["reconstruct", "STORE", "--std", "0.1", "--out", "OUT", "--window-mb", "1e-9"], "1e-09"),
        (["reconstruct", "STORE", "--std", "0.1", "--out", "OUT", "--inflight", "0"], "0"),
        (["reconstruct", "STORE", "--std", "0.1"], "--out"),
        (["reconstruct", "STORE", "--std", "0.1", "--out", "OUT", "--sharded"], "torchrun"),
        (["plan", "STORE", "--std", "0.1", "--at", "500"], "--allow-after-last"),
        (["clean", "s3://bucket/run"], "local"),
        (["no-such-command"], "no-such-command"),
    ],
)
def test_invalid_flag_values_exit_2_with_one_line(capsys, store_dir, tmp_path, args, shown):
    args = [
        str(store_dir) if a == "STORE" else str(tmp_path / "out") if a == "OUT" else a for a in args
    ]
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    _one_error(err, shown)
    assert not (tmp_path / "out").exists()  # nothing read, nothing written


def test_text_in_brackets_is_shown_as_given(capsys, tmp_path):
    code, _, err = run_cli(capsys, "ls", "runs/[bold]exp")
    assert code == 1
    _one_error(err, "runs/[bold]exp does not exist")
    # A store (and its files) whose names hold brackets list verbatim.
    root = tmp_path / "[red]run"
    store = phema.SnapshotStore(str(root))
    _save(store, 100.0, 0.05)
    os.rename(root / snapshot_name(100.0, 0.05), root / "phema-[b]x.safetensors")
    code, out, err = run_cli(capsys, "ls", root)
    assert code == 0, err
    assert "[red]run" in out
    assert "phema-[b]x.safetensors" in out
    # Terminal escapes in a file name are shown spelled out, never sent to the terminal.
    os.rename(root / "phema-[b]x.safetensors", root / "phema-\x1b[2Jx.safetensors")
    code, out, err = run_cli(capsys, "ls", root)
    assert code == 0, err
    assert "\x1b" not in out
    assert "phema-\\x1b[2Jx.safetensors" in out
    # An output folder with brackets is the folder written and the folder reported.
    _save(store, 200.0, 0.05)
    dest = tmp_path / "runs" / "[red]ema"
    code, out, err = run_cli(capsys, "reconstruct", root, "--std", "0.05", "--out", dest)
    assert code == 0, err
    assert str(dest) in out
    assert len(list(dest.iterdir())) == 1


def test_help_shows_flags_as_flags_and_no_markup(capsys):
    for command in ("ls", "plan", "reconstruct", "clean", "demo"):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0
        assert "<bool>" not in out
        assert "``" not in out
    code, out, _ = run_cli(capsys, "reconstruct", "--help")
    assert "--overwrite" in out
    assert "--allow-after-last" in out
    assert "[default: 8]" in out  # defaults shown


def test_existing_outputs_are_refused_before_any_read(capsys, store_dir, tmp_path, monkeypatch):
    dest = tmp_path / "out"
    code, _, err = run_cli(capsys, "reconstruct", store_dir, "--std", "0.07", "--out", dest)
    assert code == 0, err
    reads = []
    original = phema.SnapshotStore.read_into
    monkeypatch.setattr(
        phema.SnapshotStore,
        "read_into",
        lambda self, *a, **k: reads.append(a) or original(self, *a, **k),
    )
    code, _, err = run_cli(capsys, "reconstruct", store_dir, "--std", "0.07", "--out", dest)
    assert code == 1
    _one_error(err, str(dest), "exists; pass --overwrite to replace it")
    assert "overwrite=True" not in err[0]
    assert reads == []  # refused before the pass, and before its progress bar


def test_an_unwritable_destination_is_named_before_any_read(capsys, store_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(
        capsys, "reconstruct", store_dir, "--std", "0.07", "--out", blocker / "out"
    )
    assert code == 1
    _one_error(err, f"cannot write the outputs to {blocker / 'out'}")


def test_plot_errors_name_the_users_path(capsys, store_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    png = tmp_path / "missing" / "p.png"
    code, _, err = run_cli(capsys, "plan", store_dir, "--std", "0.07", "--plot", png)
    assert code == 1
    _one_error(err, f"cannot write {png}")
    assert ".tmp-" not in err[0]
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    code, _, err = run_cli(capsys, "plan", store_dir, "--std", "0.07", "--plot", tmp_path / "p.png")
    assert code == 1
    _one_error(err, "pip install 'torch-phema[plot]'")


@pytest.mark.filterwarnings("default::phema.errors.IllPosedWarning")  # the CLI prints it
def test_after_last_is_allowed_when_asked_and_warnings_print_once(capsys, store_dir, tmp_path):
    dest = tmp_path / "out"
    args = ("reconstruct", store_dir, "--std", "0.07", "--out", dest, "--at", "500")
    code, out, err = run_cli(capsys, *args, "--allow-after-last")
    assert code == 0, err
    warned = [line for line in err if line.startswith("warning:")]
    assert len(warned) == 1, err  # the plan's warning, once
    assert "no snapshot at t=500" in warned[0]
    assert "phema-ema-000000000500-0.0700.safetensors" in out


def test_ls_lists_good_files_names_bad_ones_and_flags_mixed_stores(capsys, store_dir):
    store = phema.SnapshotStore(str(store_dir))
    _save(store, 500.0, 0.05, tensors={"w": torch.ones(4), "b": torch.ones(2)})  # other layout
    (store_dir / "phema-broken.safetensors").write_bytes(b"\x10" + bytes(7) + b"{")
    _save(store, 600.0, 0.05, **{"phema.std": "[/]"})
    code, out, err = run_cli(capsys, "ls", store_dir)
    assert code == 1
    assert "9 snapshots" in out
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 2
    assert any("phema-broken.safetensors" in e for e in errors)
    assert any("phema.std='[/]'" in e for e in errors)  # the value shown, brackets and all
    assert any("1 of 9 snapshots do not belong" in line for line in err)
    code, out, _ = run_cli(capsys, "ls", store_dir, "--json")
    rows = [json.loads(line) for line in out.splitlines()]
    assert sum(r["mixed"] is not None for r in rows) == 1
    code, _, err = run_cli(capsys, "plan", store_dir, "--std", "0.07")
    assert code == 1
    _one_error(err)  # refuses the store, naming the first bad file


def test_plan_shows_coefficients_by_snapshot_with_a_legend(capsys, store_dir):
    code, out, err = run_cli(capsys, "plan", store_dir, "--std", "0.1")
    assert code == 0, err
    assert "+1 (t=400, std 0.1)" in out  # a stored profile: one snapshot, weight exactly 1
    assert "reads 1 snapshots" in out
    assert any(line.startswith("rel. error:") and "cond:" in line for line in err)


def test_describe_keeps_bugs_and_names_backend_errors():
    no_credentials = type("NoCredentialsError", (Exception,), {"__module__": "botocore.exceptions"})
    code, message = describe(no_credentials("Unable to locate credentials"))
    assert code == 1
    assert "AWS_ACCESS_KEY_ID" in message
    assert describe(PermissionError(13, "Permission denied", "runs/[x]")) == (
        1,
        "runs/[x]: Permission denied",
    )
    assert describe(KeyError("a bug")) is None  # bugs keep their traceback


def _script(*args, env=None):
    exe = shutil.which("phema")
    cmd = [exe] if exe else [sys.executable, "-m", "phema_cli"]
    return subprocess.run(
        [*cmd, *map(str, args)], capture_output=True, text=True, env=env, timeout=120, check=False
    )


@pytest.mark.slow
def test_unreachable_servers_are_one_line_from_the_console_script(tmp_path, store_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_"))}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_x", HF_HUB_DISABLE_TELEMETRY="1")
    env.update(
        AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="y", AWS_ENDPOINT_URL="http://127.0.0.1:9"
    )
    cases = [
        (("ls", "hf://user/repo/run"), "hf://user/repo/run"),
        (
            ("reconstruct", store_dir, "--std", "0.07", "--out", "hf://user/repo/run"),
            "hf://user/repo/run",
        ),
        (("ls", "s3://bucket/run"), "s3://bucket/run"),
        (
            ("reconstruct", store_dir, "--std", "0.07", "--out", "s3://bucket/run"),
            "s3://bucket/run",
        ),
    ]
    for args, shown in cases:
        out = _script(*args, env=env)
        assert out.returncode == 1, out.stderr
        lines = [line for line in out.stderr.splitlines() if line.strip() and "reading" not in line]
        _one_error(lines, shown)
    debug = _script("ls", "hf://user/repo/run", env={**env, "PHEMA_DEBUG": "1"})
    assert "Traceback" in debug.stderr


@pytest.mark.slow
def test_console_script_agrees_with_the_entry_point(store_dir):
    out = _script("plan", store_dir, "--std", "nan")
    assert out.returncode == 2
    _one_error(out.stderr.splitlines(), "std nan")
    assert Path(shutil.which("phema") or sys.executable).exists()


def test_errors_under_torchrun_name_their_rank(capsys, store_dir, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    code, _, err = run_cli(capsys, "plan", store_dir, "--std", "nan")
    assert code == 2
    _one_error(err, "error: rank 1: ", "std nan")
    dist_error = type("DistNetworkError", (RuntimeError,), {"__module__": "torch.distributed"})
    code, message = describe(dist_error("connect to 10.0.0.1:29500 timed out"))
    assert code == 1
    assert "MASTER_ADDR" in message


def test_an_unreadable_file_is_named_and_the_others_still_list(capsys, store_dir, monkeypatch):
    backend = type(phema.SnapshotStore(str(store_dir)).backend)
    head = backend.head

    def refuse(self, path, want):
        if path.endswith(snapshot_name(100.0, 0.05)):
            raise PermissionError(13, "Permission denied", path)
        return head(self, path, want)

    monkeypatch.setattr(backend, "head", refuse)  # root reads any file: refuse one by hand
    code, out, err = run_cli(capsys, "ls", store_dir)
    assert code == 1
    assert "7 snapshots" in out
    _one_error(err, snapshot_name(100.0, 0.05), "Permission denied")


def test_ls_json_takes_only_the_known_fit_keys(capsys, tmp_path):
    store = phema.SnapshotStore(str(tmp_path / "run"))
    tensors = {"w": torch.ones(3)}
    meta = {
        "phema.format": "1",
        "phema.kind": "reconstruction",
        "phema.t": "100.0",
        "phema.std": "0.1",
        "phema.t_unit": "steps",
        "phema.coefficients": "{}",
        "phema.fit": '{"rel_error": 0.5, "l1_norm": 1, "condition": 2, "file": 1, "kind": 2}',
    }
    store.write("phema-ema-000000000100-0.1000.safetensors", serialize(tensors, meta))
    code, out, err = run_cli(capsys, "ls", tmp_path / "run", "--json")
    assert code == 0, err
    (row,) = [json.loads(line) for line in out.splitlines()]
    assert row["kind"] == "reconstruction"  # a crafted fit key cannot overwrite a field
    assert row["file"].endswith("phema-ema-000000000100-0.1000.safetensors")
    assert row["rel_error"] == 0.5
