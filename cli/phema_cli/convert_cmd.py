"""``phema convert``: official EDM2 snapshot pickles or ema-pytorch checkpoints -> a store.

Every flag and every input name is checked, and no output may exist (unless
``--overwrite``), before anything is written; progress goes to stderr.
"""

from __future__ import annotations

from typing import Annotated

import typer

from phema.convert import Source, convert
from phema.errors import OptionError
from phema.store import SnapshotStore
from phema_cli.console import note
from phema_cli.options import check_count, parse_stds


def convert_cmd(
    src: Annotated[
        str,
        typer.Argument(
            help="Local folder of network-snapshot-<kimg>-<std>.pkl (official EDM2) or "
            "<index>.<step>.pt (ema-pytorch PostHocEMA) files.",
            show_default=False,
        ),
    ],
    out: Annotated[
        str, typer.Option("--out", help="The phema store to write (any URL).", show_default=False)
    ],
    stds: Annotated[
        str | None,
        typer.Option(
            "--stds",
            help="ema-pytorch: the sigma_rels of PostHocEMA, in its order, e.g. 0.05,0.28.",
            show_default=False,
        ),
    ] = None,
    gammas: Annotated[
        str | None,
        typer.Option(
            "--gammas", help="ema-pytorch: its gammas instead of --stds.", show_default=False
        ),
    ] = None,
    update_every: Annotated[
        int | None,
        typer.Option(
            "--update-every",
            help="ema-pytorch: the update_every it ran with (its default is 100); only 1 is exact.",
            show_default=False,
        ),
    ] = None,
    allow_inexact: Annotated[
        bool,
        typer.Option(
            "--allow-inexact", help="Convert update_every > 1 checkpoints anyway (with a warning)."
        ),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing snapshots in --out.")
    ] = False,
) -> None:
    """Convert snapshots of another tool into a phema store, tensors unchanged.

    Official pickles are read without executing them; times in images from the name's
    kimg (the multiple of 1024 the training loop wrote). ema-pytorch checkpoints at step
    s hold the power-function profile at time s + 1 (steps); give their --stds (or
    --gammas) and --update-every, which the files do not record.
    """
    std_list = parse_stds(stds) if stds is not None else None
    gamma_list = _parse_gammas(gammas) if gammas is not None else None
    if std_list is not None and gamma_list is not None:
        raise typer.BadParameter("give --stds or --gammas, not both", param_hint="'--gammas'")
    if update_every is not None:
        check_count(update_every, "--update-every", 1, 2**40)
    store = SnapshotStore(out)

    def progress(s: Source, name: str) -> None:
        note(f"{s.path} -> {store.url.rstrip('/')}/{name}")

    try:
        written = convert(
            src,
            store,
            stds=std_list,
            gammas=gamma_list,
            update_every=update_every,
            allow_inexact=allow_inexact,
            overwrite=overwrite,
            progress=progress,
        )
    except OptionError as exc:
        given = "'--gammas'" if gamma_list is not None else "'--stds'"
        flag = "'--update-every'" if "update_every" in str(exc) else given
        raise typer.BadParameter(str(exc), param_hint=flag) from None
    note(f"converted {len(written)} snapshot(s) into {store.url}")


def _parse_gammas(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(v > -1 and v == v and v != float("inf") for v in values):
        raise typer.BadParameter(
            f"{text!r} is not a comma-separated list of gammas > -1", param_hint="'--gammas'"
        )
    return values
