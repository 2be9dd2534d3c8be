"""Arguments and flag values shared by the ``phema`` sub-commands, checked before any work.

Every invalid value is a ``typer.BadParameter`` (exit code 2) naming the flag and
the value as given, with the fix; nothing has been read or written by then.
"""

from __future__ import annotations

import math
from typing import Annotated

import typer

from phema.profiles import STD_MAX, STD_MIN

__all__ = ["JsonOpt", "UrlArg", "check_count", "check_finite", "parse_stds"]

UrlArg = Annotated[
    str,
    typer.Argument(
        help="Snapshot store: a path, file://, memory://, s3://, hf://user/repo/folder",
        show_default=False,
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help="Print JSON lines on stdout instead of a table.")
]


def parse_stds(text: str) -> list[float]:
    """``"0.05,0.1"`` -> ``[0.05, 0.1]``, each a valid relative std; else exit 2."""
    parts = [x.strip() for x in text.split(",") if x.strip()]
    try:
        stds = [float(x) for x in parts]
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of numbers, e.g. --std 0.05,0.1",
            param_hint="'--std'",
        ) from None
    if not stds:
        raise typer.BadParameter("give at least one std, e.g. --std 0.05,0.1", param_hint="'--std'")
    for spelled, std in zip(parts, stds, strict=True):
        if not (math.isfinite(std) and STD_MIN <= std <= STD_MAX):
            hint = "; a percentage? write 5% as 0.05" if 1 <= std <= 100 else ""
            raise typer.BadParameter(
                f"std {spelled} is not a relative std in [{STD_MIN:g}, {STD_MAX:.6f}]{hint}",
                param_hint="'--std'",
            )
    if len(set(stds)) != len(stds):
        raise typer.BadParameter(f"stds repeat in {text!r}", param_hint="'--std'")
    return stds


def check_finite(
    value: float | None,
    flag: str,
    *,
    low: float = 0.0,
    high: float = math.inf,
    or_low: bool = False,
) -> None:
    """Exit 2 unless ``value`` is None or a finite number in ``(low, high]``.

    With ``or_low`` the range is ``[low, high]``.
    """
    if value is None:
        return
    above = value >= low if or_low else value > low
    if not (math.isfinite(value) and above and value <= high):
        bound = f"at most {high:g}" if math.isfinite(high) else "finite"
        raise typer.BadParameter(
            f"{value!r} must be a number {'>=' if or_low else '>'} {low:g} and {bound}",
            param_hint=f"'{flag}'",
        )


def check_count(value: int, flag: str, low: int, high: int) -> None:
    """Exit 2 unless ``low <= value <= high``."""
    if not low <= value <= high:
        raise typer.BadParameter(f"{value} is not in [{low}, {high}]", param_hint=f"'{flag}'")
