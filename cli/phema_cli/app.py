"""Root of the ``phema`` command: sub-commands, version, and one-line errors."""

from __future__ import annotations

from typing import Annotated

import typer

import phema
from phema_cli import convert_cmd, demo, plan_cmds, store_cmds
from phema_cli.errors import run_app

app = typer.Typer(
    name="phema",
    help="Post-hoc EMA for PyTorch: choose your EMA length after training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags as flags, defaults shown, no markup read
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 1 a failure at run time, 2 an invalid command line. "
    "PHEMA_DEBUG=1 shows tracebacks.",
)


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
app.command(name="plan")(plan_cmds.plan_cmd)
app.command(name="reconstruct")(plan_cmds.reconstruct_cmd)
app.command(name="clean")(store_cmds.clean)
app.command(name="convert")(convert_cmd.convert_cmd)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: every expected failure is one line on stderr.

    Exit codes: 0 success, 1 a failure at run time (store, network, file), 2 an
    invalid command line or flag value, 130 interrupted (:mod:`phema_cli.errors`).
    Set ``PHEMA_DEBUG=1`` to get the traceback instead of the line; under torchrun
    each line names its rank.
    """
    run_app(app, argv, "phema")
