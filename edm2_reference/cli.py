"""What the commands of edm2_reference share: one-line errors, flag parsers, progress, JSON lines.

``train``, ``sample`` and ``evaluate`` follow the ``phema`` command's conventions: results on
stdout (a table, or JSON lines with ``--json``), progress and warnings on stderr, and every
expected failure as one line on stderr, ``error: ...``, with exit status 2 for a bad flag
value and 1 for a failure at run time. ``PHEMA_DEBUG=1`` re-raises for the traceback.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import torch
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from edm2_reference.presets import PRESETS
from phema.errors import PhemaError
from phema_cli import console
from phema_cli.errors import run_app

__all__ = [
    "PRESET_HELP",
    "CommandError",
    "DataOpt",
    "DeviceOpt",
    "PresetOpt",
    "UncondOpt",
    "check_preset",
    "count",
    "count_option",
    "default_device",
    "device",
    "device_option",
    "err_console",
    "new_app",
    "number",
    "number_option",
    "out_console",
    "print_json",
    "progress",
    "run_app",
]

out_console, err_console = console.out_console, console.err_console

EPILOG = "Expected failures print one line, 'error: ...'; set PHEMA_DEBUG=1 for the traceback."


class CommandError(PhemaError, RuntimeError):
    """A failure at run time that the message explains (exit status 1)."""


def new_app() -> typer.Typer:
    """A typer app for one command, with plain-text help (no markup; flags read as flags).

    The installed typer's rich help shows a type (``<bool>``) beside every flag; click's
    plain layout does not, and it prints help strings as they are.
    """
    return typer.Typer(
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )


# Flag parsers: each names the value it rejects, so that the error line shows it verbatim.


def count(lo: int) -> Callable[[str], int]:
    """A parser of whole numbers ``>= lo``."""

    def parse(text: str) -> int:
        try:
            value = int(str(text))
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not a whole number") from None
        if value < lo:
            raise typer.BadParameter(f"{value} is too small; pass {lo} or more")
        return value

    return parse


def number(lo: float | None = None) -> Callable[[str], float]:
    """A parser of finite numbers ``>= lo``."""

    def parse(text: str) -> float:
        try:
            value = float(str(text))
        except ValueError:
            raise typer.BadParameter(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise typer.BadParameter(f"{text!r} is not finite; pass a finite number")
        if lo is not None and value < lo:
            raise typer.BadParameter(f"{text!r} is too small; pass {lo:g} or more")
        return value

    return parse


def check_preset(name: str) -> str:
    """The preset flag's validation: a name in :data:`~edm2_reference.presets.PRESETS`."""
    if name not in PRESETS:
        raise typer.BadParameter(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return name


PRESET_HELP = f"Network and training preset, one of: {', '.join(PRESETS)}."


def device(text: str) -> str:
    """A parser of torch device names that exist here (``cuda`` needs a GPU)."""
    try:
        dev = torch.device(str(text))
    except RuntimeError:
        raise typer.BadParameter(f"{text!r} is not a torch device; pass e.g. cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise typer.BadParameter(f"{text!r}: no CUDA device here; pass --device cpu")
    return str(text)


def default_device() -> str:
    """``cuda`` where a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# Option declarations: the flags that several commands share, as ``Annotated`` types (the
# default stays at each command's parameter), and the makers of the common kinds of option.


def count_option(lo: int, help: str, *names: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` of whole numbers ``>= lo`` (:func:`count`), shown as ``<int>``.

    ``names``: the flag's names where not the parameter's; ``kwargs`` go to ``typer.Option``.
    """
    return typer.Option(*names, parser=count(lo), metavar="<int>", help=help, **kwargs)


def number_option(help: str, lo: float | None = None, **kwargs: Any) -> Any:
    """A ``typer.Option`` of finite numbers ``>= lo`` (:func:`number`), shown as ``<float>``."""
    return typer.Option(parser=number(lo), metavar="<float>", help=help, **kwargs)


def device_option(**kwargs: Any) -> Any:
    """The ``--device`` option (:func:`device`); ``kwargs`` go to ``typer.Option``."""
    return typer.Option(parser=device, metavar="<device>", help="Torch device.", **kwargs)


PresetOpt = Annotated[str, typer.Option(callback=check_preset, help=PRESET_HELP)]
"""``--preset``: a name in :data:`~edm2_reference.presets.PRESETS`."""

DataOpt = Annotated[
    str | None,
    typer.Option(
        help="Training data (sets image shape and classes): digits, mnist, or a PNG folder, "
        "ZIP or .npz.",
        show_default="the preset's dataset",
    ),
]
"""``--data``: the dataset a network is (or was) trained on; ``None``: the preset's."""

UncondOpt = Annotated[
    bool, typer.Option("--uncond", help="An unconditional network (trained without class labels).")
]
"""``--uncond``: no class labels."""

DeviceOpt = Annotated[str, device_option()]
"""``--device``: a torch device that exists here."""


# Progress and results.


class _Count(ProgressColumn):
    """``done/total unit``, in whole units."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        total = f"{task.total:,.0f}" if task.total is not None else "?"
        return Text(f"{task.completed:,.0f}/{total} {self.unit}", style="progress.download")


class _Rate(ProgressColumn):
    """Units per second over rich's recent window (over the whole task once finished)."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        shown = "?" if speed is None else f"{speed:,.1f}"
        return Text(f"{shown} {self.unit}/s", style="progress.data.speed")


@contextmanager
def progress(
    console: Console | None = None, *, unit: str = "images", enabled: bool = True
) -> Iterator[Progress]:
    """A progress bar on stderr: done/total, units/s, elapsed time and ETA.

    On a terminal it redraws in place; elsewhere (logs, pipes) rich prints it once, in its
    final state. Print through ``bar.console`` while it runs. ``enabled=False`` (e.g. ranks
    other than 0) shows nothing. If the block raises, the bar is dropped, so that the error
    line is the last word on stderr.
    """
    bar = Progress(
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        _Count(unit),
        _Rate(unit),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console or err_console,
        disable=not enabled,
    )
    with bar:
        try:
            yield bar
        except BaseException:
            bar.live.transient = True
            raise


def _plain(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def print_json(row: dict[str, Any]) -> None:
    """One JSON object per line on stdout (non-finite numbers as null)."""
    typer.echo(json.dumps({k: _plain(v) for k, v in row.items()}))
