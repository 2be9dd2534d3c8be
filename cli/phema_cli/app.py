"""Root of the ``phema`` command: sub-commands, version, and one-line errors."""

from __future__ import annotations

import os
import warnings
from typing import Annotated

import typer
from rich.console import Console

import phema
from phema_cli import demo, store_cmds

app = typer.Typer(
    name="phema",
    help="Post-hoc EMA for PyTorch: choose your EMA length after training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"phema {phema.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Post-hoc EMA for PyTorch: choose your EMA length after training."""


app.command(name="demo")(demo.demo)
app.command(name="ls")(store_cmds.ls)
app.command(name="plan")(store_cmds.plan_cmd)
app.command(name="reconstruct")(store_cmds.reconstruct_cmd)
app.command(name="clean")(store_cmds.clean)


def _warn_line(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: object = None,
    line: str | None = None,
) -> None:
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False)


# Errors of optional backends, matched by name so that their packages stay optional.
_CREDENTIAL_HINTS = {
    "NoCredentialsError": "; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or an AWS profile",
    "PartialCredentialsError": "; set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
}


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__
    return seen


def main() -> None:
    """Console-script entry: phema and I/O errors become one line on stderr and exit 1.

    Set ``PHEMA_DEBUG=1`` to get the traceback instead.
    """
    warnings.showwarning = _warn_line
    try:
        app()
    except Exception as exc:
        known = isinstance(exc, phema.PhemaError | OSError)
        hint = next(
            (
                _CREDENTIAL_HINTS[type(e).__name__]
                for e in _chain(exc)
                if type(e).__name__ in _CREDENTIAL_HINTS
            ),
            None,
        )
        if os.environ.get("PHEMA_DEBUG") or not (known or hint):
            raise
        err_console.print(f"[bold red]error:[/] {exc}{hint or ''}", highlight=False)
        err_console.print("(set PHEMA_DEBUG=1 for the traceback)", style="dim", highlight=False)
        raise SystemExit(1) from None
