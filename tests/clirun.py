"""Run the ``phema`` command in this process, as tests do."""

from __future__ import annotations

from typing import Any

from phema_cli.app import main


def run_cli(capsys: Any, *args: object) -> tuple[int, str, list[str]]:
    """``(exit code, stdout, stderr lines)`` of ``phema *args`` run in this process."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, [line for line in out.err.splitlines() if line.strip()]
