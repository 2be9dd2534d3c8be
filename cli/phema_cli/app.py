"""Root of the ``phema`` command: sub-commands, version, and one-line errors."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

import phema
from phema_cli import demo

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


def main() -> None:
    """Console-script entry: run the app, turning phema errors into one line and exit 1."""
    try:
        app()
    except phema.PhemaError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(1) from None
