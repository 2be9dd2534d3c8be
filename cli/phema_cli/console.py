"""Where the ``phema`` command writes, and how text from users and stores gets there.

Results go to stdout, everything else (progress, notes, warnings, errors) to stderr.
Text that a user or a store controls (paths, URLs, file names, metadata, error
messages) is never read as rich markup: ``runs/[red]x`` prints as ``runs/[red]x``.
:func:`plain` wraps such text for tables; :func:`note` and :func:`error` print
whole lines without markup, on one line whatever the terminal's width.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

__all__ = ["err_console", "error", "note", "out_console", "plain", "show"]

out_console = Console()
err_console = Console(stderr=True)


def _printable(text: str) -> str:
    r"""``text`` with control characters (terminal escapes) spelled out, as ``\x1b``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def plain(value: object) -> Text:
    """``value`` as literal text for a rich table cell or title (control characters escaped)."""
    return Text(_printable(str(value)))


def show(renderable: object) -> None:
    """A table (or any renderable) on stdout: fitted to a terminal, unfolded in a pipe or file."""
    if out_console.is_terminal:
        out_console.print(renderable)
    else:  # rich would fold names at 80 columns
        Console(file=out_console.file, width=240).print(renderable)


def note(message: str, *, style: str | None = None) -> None:
    """One literal line on stderr."""
    err_console.print(Text(_printable(message), style=style or ""), soft_wrap=True, highlight=False)


def error(message: str) -> None:
    """``error: <message>`` as one literal line on stderr (line breaks become spaces)."""
    line = Text("error: ", style="bold red")
    line.append(_printable(" ".join(str(message).split())))
    err_console.print(line, soft_wrap=True, highlight=False)
