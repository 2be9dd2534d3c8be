"""Running a command so that every expected failure is one line: ``error: <what and the fix>``.

Used by ``phema`` and by the ``python -m edm2_reference.*`` commands. Exit codes:
0 success, 1 a failure at run time (a store, a file, the network, credentials),
2 an invalid command line or flag value, 130 interrupted. Anything else is a bug
and keeps its traceback; ``PHEMA_DEBUG=1`` keeps the traceback of every failure.
Messages are printed literally (no rich markup) on one line, and each distinct
warning once.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Sequence

import typer

from phema.errors import PhemaError
from phema_cli.console import error, note

__all__ = ["describe", "rank_prefix", "run_app"]

#: Packages whose errors mean "the store or server could not be used", matched by
#: name so that the optional backends stay optional.
NETWORK = frozenset(
    {"aiobotocore", "aiohttp", "boto3", "botocore", "httpcore", "httpx", "httpx2", "requests"}
    | {"urllib3", "huggingface_hub", "s3fs", "fsspec", "gcsfs", "adlfs"}
)
# The fix for errors of optional backends, by class name.
HINTS = {
    "NoCredentialsError": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or an AWS profile",
    "PartialCredentialsError": "set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "EndpointConnectionError": "check the network and the endpoint (AWS_ENDPOINT_URL)",
    "ConnectError": "check the network, the endpoint (HF_ENDPOINT) and any proxy",
    "ClientConnectorError": "check the network and the endpoint",
    "ConnectTimeout": "the server did not answer; check the network or retry later",
    "ReadTimeout": "the server stopped answering; retry later",
    "GatedRepoError": "accept the repository's terms on the Hub and log in (HF_TOKEN)",
    "RepositoryNotFoundError": "check the repository's name; log in (HF_TOKEN) if it is private",
    "LocalEntryNotFoundError": "the Hub cannot be reached and nothing is cached; go online",
    "OfflineModeIsEnabled": "unset HF_HUB_OFFLINE to reach the Hub",
}


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from, or while handling."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def describe(exc: BaseException) -> tuple[int, str] | None:
    """``(exit code, message)`` of an expected failure; None for a bug (keep the traceback)."""
    if isinstance(exc, typer.Abort | KeyboardInterrupt):
        return 130, "interrupted"
    if isinstance(exc, typer.TyperException):  # usage errors, bad flag values: exit 2
        ctx = getattr(exc, "ctx", None)
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        return int(getattr(exc, "exit_code", 2)), exc.format_message() + where
    chain = _chain(exc)
    hint = next((HINTS[type(e).__name__] for e in chain if type(e).__name__ in HINTS), "")
    hint = f"; {hint}" if hint and hint not in str(exc) else ""
    if isinstance(exc, PhemaError):
        return 1, f"{exc}{hint}"
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else f"{exc.filename}"
        return 1, f"{target}: {exc.strerror}{hint}"
    if type(exc).__name__.startswith("Dist") and type(exc).__module__.startswith("torch"):
        hint = "; check MASTER_ADDR, MASTER_PORT and that every rank was started (torchrun)"
        return 1, f"{type(exc).__name__}: {exc}{hint}"
    if isinstance(exc, OSError) or any(type(e).__module__.split(".")[0] in NETWORK for e in chain):
        return 1, f"{type(exc).__name__}: {exc}{hint}"
    return None


def rank_prefix() -> str:
    """``"rank 1: "`` under torchrun (``WORLD_SIZE > 1``), else ``""``: whose line it is."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ""
    return f"rank {os.environ.get('RANK', '0')}: "


def run_app(app: typer.Typer, argv: Sequence[str] | None, prog_name: str) -> None:
    """Run ``app`` on ``argv`` (default ``sys.argv[1:]``); expected failures exit 1, 2 or 130.

    Returns normally on success (and after ``--help``), so that ``main([...])`` can be
    called from Python; any other outcome raises ``SystemExit``. Under torchrun each
    error line names its rank (:func:`rank_prefix`).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    shown = warnings.showwarning
    said: set[str] = set()

    def warn_line(message: Warning | str, *_: object, **__: object) -> None:
        text = " ".join(str(message).split())
        if text not in said:  # a plan and the pass it leads to may warn alike: say it once
            said.add(text)
            note(f"warning: {text}", style="yellow")

    warnings.showwarning = warn_line
    try:
        code = app(args=args, prog_name=prog_name, standalone_mode=False)
    except (Exception, KeyboardInterrupt) as exc:
        known = describe(exc)
        if os.environ.get("PHEMA_DEBUG") or known is None:
            raise
        error(rank_prefix() + known[1])
        raise SystemExit(known[0]) from None
    finally:
        warnings.showwarning = shown
    if isinstance(code, int) and code:
        raise SystemExit(code)
