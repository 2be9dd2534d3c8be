"""The reference client's commands as a user runs them: one-line errors, help, output streams."""

import json
import os
import subprocess
import sys

import pytest

from edm2_reference.presets import PRESETS
from edm2_reference.train import parse_args

pytestmark = pytest.mark.slow  # the commands in subprocesses

COMMANDS = ("train", "sample", "evaluate")


def _run(command, *args, debug=False, cwd=None):
    env = {k: v for k, v in os.environ.items() if k != "PHEMA_DEBUG"}
    if debug:
        env["PHEMA_DEBUG"] = "1"
    return subprocess.run(
        [sys.executable, "-m", f"edm2_reference.{command}", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=cwd,
        check=False,
    )


def _error_line(proc, code, *verbatim):
    """The one ``error:`` line on stderr, which exits ``code`` and holds each of ``verbatim``."""
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), lines[0]
    for text in verbatim:
        assert text in lines[0], lines[0]
    return lines[0]


def test_an_unknown_preset_is_a_usage_error_listing_the_presets():
    line = _error_line(_run("train", "--preset", "bogus"), 2, "'bogus'")
    assert all(name in line for name in PRESETS)


def test_a_missing_network_file_is_named(tmp_path):
    proc = _run("sample", "--net", "missing.safetensors", "--out", str(tmp_path / "g.png"))
    _error_line(proc, 1, "missing.safetensors")


def test_markup_in_a_path_is_printed_verbatim(tmp_path):
    proc = _run("sample", "--net", "runs/[red]x.safetensors", "--out", str(tmp_path / "g.png"))
    _error_line(proc, 1, "runs/[red]x.safetensors")


def test_markup_in_a_flag_value_is_printed_verbatim():
    _error_line(_run("evaluate", "--preset", "[bold]y", "--net", "n.pt"), 2, "'[bold]y'")


def test_evaluate_names_a_missing_folder(tmp_path):
    missing = str(tmp_path / "no [red]such")
    _error_line(_run("evaluate", missing), 1, missing)


@pytest.mark.parametrize(
    ("command", "flag", "value"),
    [
        ("evaluate", "--n", "0"),
        ("evaluate", "--steps", "-3"),
        ("sample", "--steps", "0"),
        ("sample", "--churn", "nan"),
        ("train", "--batch", "-64"),
    ],
)
def test_bad_flag_values_exit_2_naming_the_value(tmp_path, command, flag, value):
    required = {"sample": ["--net", "n.pt", "--out", "g.png"], "evaluate": ["--net", "n.pt"]}
    proc = _run(command, *required.get(command, []), f"{flag}={value}", cwd=tmp_path)
    _error_line(proc, 2, flag, value)


def test_an_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "[red]grid.png"
    out.write_bytes(b"not replaced")
    proc = _run("sample", "--net", "missing.safetensors", "--out", str(out))
    _error_line(proc, 1, str(out), "--overwrite")
    assert out.read_bytes() == b"not replaced"


def test_phema_debug_gives_the_traceback(tmp_path):
    proc = _run(
        "sample", "--net", "missing.safetensors", "--out", str(tmp_path / "g.png"), debug=True
    )
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr
    assert "NetworkLoadError: missing.safetensors" in proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_help_is_plain_text_with_defaults_and_presets(command):
    proc = _run(command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # help wraps at the terminal's width
    assert "``" not in text
    assert ":func:" not in text
    assert ":mod:" not in text
    assert "<bool>" not in text  # flags read as flags
    assert "[default: digits8]" in text
    assert all(name in text for name in PRESETS)
    assert "PHEMA_DEBUG" in text
    flag = {"train": "--fsdp", "sample": "--overwrite", "evaluate": "--json"}[command]
    assert f" {flag} " in text


def test_main_takes_argv_and_exits_like_the_command(capsys):
    from edm2_reference.train import main

    with pytest.raises(SystemExit) as info:
        main(["--preset", "bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    settings = parse_args(["--duration", "64Ki", "--ema-stds", "0.05,0.2", "--uncond"])
    assert settings.duration == 64 * 1024
    assert settings.ema_stds == (0.05, 0.2)
    assert not settings.cond


@pytest.mark.slow
def test_evaluate_prints_json_lines_or_a_table_on_stdout(run):
    common = ["--n", "20", "--steps", "2", "--classifier", str(run / "classifier.safetensors")]
    raw = f"[b]raw={run / 'training-state-000000000256.pt'}"
    proc = _run("evaluate", str(run / "ema"), "--net", raw, "--json", *common)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["network"] for r in rows] == ["ema std 0.070", "ema std 0.090", "[b]raw"]
    assert all(r["n"] == 20 and r["fd"] >= 0 for r in rows)
    assert "error" not in proc.stderr
    proc = _run("evaluate", str(run / "ema"), *common)
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "ema std 0.090" in text
    assert "real-vs-real" in text
    assert "real-vs-real: the same measures" in text  # the legend under the table
    assert "real-vs-real" not in proc.stderr


@pytest.mark.slow
def test_train_reports_progress_on_stderr_and_the_result_on_stdout(tmp_path):
    outdir = tmp_path / "[red]run"
    flags = ["--batch=32", "--duration=256", "--rampup=128", "--snapshot=128", "--status=64"]
    proc = _run("train", f"--outdir={outdir}", *flags)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("done at 256 images: 4 snapshot files")
    assert str(outdir) in proc.stdout
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("training digits8 (722,539 parameters) on digits")
    assert sum(line.startswith("nimg ") for line in lines) == 4  # status every 64 images
    # Not a terminal: the bar is printed once, in its final state.
    bars = [line for line in lines if "images/s" in line]
    assert len(bars) == 1
    assert "256/256 images" in bars[0]
    assert len(lines) == 6
