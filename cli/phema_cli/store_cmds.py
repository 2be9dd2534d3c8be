"""``phema ls`` and ``phema clean``: what a store holds, and what interrupted writes left."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.table import Table

from phema._listing import ReconstructionInfo, SnapshotInfo, mixing
from phema.store import SnapshotStore
from phema_cli.console import error, note, plain, show
from phema_cli.options import JsonOpt, UrlArg, check_finite


def ls(url: UrlArg, as_json: JsonOpt = False) -> None:
    """List a store: its snapshots (time, std, step, size, layout) and any reconstructions.

    A folder of official EDM2 network-snapshot-<kimg>-<std>.pkl files is a store too
    (local, s3://, hf:// or https://): each is indexed without running anything in it.

    Files that are not valid phema files are named, one line each on stderr, after the
    valid ones are listed (exit code 1). Snapshots that do not belong with the rest of
    the store (another model, dtype, time unit) are listed and flagged.
    """
    store = SnapshotStore(url)
    found = store.scan()
    infos, outputs = found.snapshots, found.outputs
    odd = {id(i): why for i, why in mixing(infos)}
    if as_json:
        _ls_json(found.snapshots, found.outputs, odd)
    else:
        _ls_tables(url, infos, outputs, odd)
        pickles = [i for i in infos if i.index_bytes]
        if pickles:
            read, total = sum(i.index_bytes for i in pickles), sum(i.size for i in pickles)
            note(
                f"{len(pickles)} official EDM2 pickle(s), indexed without running anything in "
                f"them: read {read:,} of {total:,} bytes ({100 * read / total:.2g}%)"
            )
        if odd:
            info = next(i for i in infos if id(i) in odd)
            note(
                f"! {len(odd)} of {len(infos)} snapshots do not belong with the rest "
                f"(e.g. {info.url}: {odd[id(info)]}); plan and reconstruct refuse this store "
                "until one run's files are moved to another folder",
                style="yellow",
            )
    stale = store.leftovers(older_than=3600.0)
    if stale:
        note(
            f"note: {len(stale)} file(s) left by interrupted writes; `phema clean {url}` removes them"
        )
    for problem in found.problems:
        error(str(problem.error))
    if found.problems:
        raise typer.Exit(1)


def _ls_json(
    infos: list[SnapshotInfo], outputs: list[ReconstructionInfo], odd: dict[int, str]
) -> None:
    for i in infos:
        row = {
            "kind": "snapshot",
            "file": i.url,
            "t": i.t,
            "t_unit": i.t_unit,
            "std": i.std,
            "gamma": i.gamma,
            "step": i.step,
            "bytes": i.size,
            "layout": i.layout,
            "shards": len(i.shards) if not i.index_bytes else 0,
            "index_bytes": i.index_bytes or None,
            "mixed": odd.get(id(i)),
        }
        typer.echo(json.dumps(row))
    for r in outputs:
        row = {
            "kind": "reconstruction",
            "file": r.url,
            "t": r.t,
            "t_unit": r.t_unit,
            "std": r.std,
            "bytes": r.size,
            "shards": len(r.shards),
            "inputs": len(r.coefficients),
            **r.fit,
        }
        typer.echo(json.dumps(row))


def _ls_tables(
    url: str, infos: list[SnapshotInfo], outputs: list[ReconstructionInfo], odd: dict[int, str]
) -> None:
    if infos or not outputs:
        table = Table(title=plain(f"{len(infos)} snapshots in {url}"))
        # written by several ranks: how many files (an official pickle is its own one shard)
        sharded = any(i.shards and not i.index_bytes for i in infos)
        cols = ("t", "unit", "std", "step", "bytes", *(("shards",) if sharded else ()))
        for col in (*cols, "layout", "file"):
            left = col in ("unit", "layout", "file")
            table.add_column(col, justify="left" if left else "right", overflow="fold")
        for i in infos:
            shards = (str(len(i.shards) if not i.index_bytes else ""),) if sharded else ()
            mark = " !" if id(i) in odd else ""
            table.add_row(
                f"{i.t:g}",
                plain(i.t_unit),
                f"{i.std:.4g}",
                str(i.step or ""),
                f"{i.size:,}",
                *shards,
                plain(i.layout + mark),
                plain(i.url.rsplit("/", 1)[-1]),
                style="yellow" if mark else None,
            )
        show(table)
    if outputs:
        plural = "" if len(outputs) == 1 else "s"
        table = Table(title=plain(f"{len(outputs)} reconstruction{plural} in {url}"))
        for col in ("t", "unit", "std", "inputs", "rel. L2 error", "bytes", "file"):
            left = col in ("unit", "file")
            table.add_column(col, justify="left" if left else "right", overflow="fold")
        for r in outputs:
            table.add_row(
                f"{r.t:g}",
                plain(r.t_unit),
                f"{r.std:.4g}",
                str(len(r.coefficients)),
                f"{r.fit.get('rel_error', float('nan')):.3g}",
                f"{r.size:,}",
                plain(r.url.rsplit("/", 1)[-1]),
            )
        show(table)


def clean(
    url: UrlArg,
    older_than: Annotated[
        float,
        typer.Option("--older-than", help="Only files untouched for this many minutes."),
    ] = 60.0,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="List what would go; delete nothing.")
    ] = False,
) -> None:
    """Delete what interrupted writes left in a local store (temporary files, unused shards).

    Remote stores need no cleaning by phema: an interrupted S3 upload stays invisible
    (a bucket lifecycle rule for incomplete multipart uploads removes it), and the Hub
    publishes whole commits only.
    """
    check_finite(older_than, "--older-than", or_low=True)
    store = SnapshotStore(url)
    if not store.is_local:
        raise typer.BadParameter(
            f"{url} is not a local folder; phema clean cleans local stores only (interrupted "
            "S3 uploads stay invisible: a bucket lifecycle rule for incomplete multipart "
            "uploads removes them; the Hub keeps no partial files)",
            param_hint="'URL'",
        )
    found = store.leftovers(older_than=older_than * 60.0)
    for path in found:
        if not dry_run:
            os.unlink(path)
        typer.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    if not found:
        note(f"no files left by interrupted writes older than {older_than:g} min in {url}")
