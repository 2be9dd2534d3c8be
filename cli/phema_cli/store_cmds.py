"""``phema ls``, ``phema plan`` and ``phema reconstruct``: snapshot stores from the shell."""

from __future__ import annotations

import functools
import json
import os
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from phema._parallel import parallel_plan
from phema.reconstruct import WINDOW_BYTES, plan, write_plan
from phema.store import SnapshotStore, check_layouts
from phema_cli.plot import save_plan_plot

out_console = Console()
err_console = Console(stderr=True)

UrlArg = Annotated[
    str,
    typer.Argument(help="Snapshot store: a path, file://, memory://, s3://, hf://user/repo/folder"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON on stdout instead of a table.")]


def parse_stds(text: str) -> list[float]:
    """``"0.05,0.1"`` -> ``[0.05, 0.1]``; raises ``typer.BadParameter`` (exit 2) otherwise."""
    try:
        stds = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    if not stds:
        raise typer.BadParameter("give at least one std, e.g. --std 0.05,0.1")
    if len(set(stds)) != len(stds):
        raise typer.BadParameter(f"stds repeat in {text!r}")
    return stds


StdOpt = Annotated[
    str, typer.Option("--std", help="Target stds, comma-separated fractions, e.g. 0.05,0.1.")
]
AtOpt = Annotated[
    float | None,
    typer.Option("--at", help="Target time (a snapshot's time); default: the latest snapshot."),
]


def ls(url: UrlArg, as_json: JsonOpt = False) -> None:
    """List a store: its snapshots (time, std, step, size, layout) and any reconstructions."""
    store = SnapshotStore(url)
    infos, outputs = store.contents()
    check_layouts(infos)
    if as_json:
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
                "shards": len(i.shards),
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
        return
    if infos or not outputs:
        table = Table(title=f"{len(infos)} snapshots in {url}")
        sharded = any(i.shards for i in infos)  # written by several ranks: how many files
        cols = ("t", "unit", "std", "step", "bytes", *(("shards",) if sharded else ()))
        for col in (*cols, "layout", "file"):
            table.add_column(col, justify="left" if col in ("unit", "layout", "file") else "right")
        for i in infos:
            name = i.url.rsplit("/", 1)[-1]
            shards = (str(len(i.shards) or ""),) if sharded else ()
            table.add_row(
                f"{i.t:g}",
                i.t_unit,
                f"{i.std:.4g}",
                str(i.step or ""),
                f"{i.size:,}",
                *shards,
                i.layout,
                name,
            )
        out_console.print(table)
    if outputs:
        plural = "" if len(outputs) == 1 else "s"
        table = Table(title=f"{len(outputs)} reconstruction{plural} in {url}")
        for col in ("t", "unit", "std", "inputs", "rel. L2 error", "bytes", "file"):
            table.add_column(col, justify="left" if col in ("unit", "file") else "right")
        for r in outputs:
            table.add_row(
                f"{r.t:g}",
                r.t_unit,
                f"{r.std:.4g}",
                str(len(r.coefficients)),
                f"{r.fit.get('rel_error', float('nan')):.3g}",
                f"{r.size:,}",
                r.url.rsplit("/", 1)[-1],
            )
        out_console.print(table)
    stale = store.leftovers(older_than=3600.0)
    if stale:
        err_console.print(
            f"note: {len(stale)} file(s) left by interrupted writes; `phema clean {url}` "
            "removes them",
            highlight=False,
        )


def clean(
    url: UrlArg,
    older_than: Annotated[
        float, typer.Option(min=0.0, help="Only files untouched for this many minutes.")
    ] = 60.0,
    dry_run: Annotated[bool, typer.Option(help="List what would go; delete nothing.")] = False,
) -> None:
    """Delete what interrupted writes left in a local store (temporary files, unused shards)."""
    store = SnapshotStore(url)
    found = store.leftovers(older_than=older_than * 60.0)
    for path in found:
        if not dry_run:
            os.unlink(path)
        typer.echo(f"{'would remove' if dry_run else 'removed'} {path}")
    if not found:
        err_console.print(
            f"no files left by interrupted writes older than {older_than:g} min in {url}",
            highlight=False,
        )


def _join_torchrun() -> bool:
    """Join the process group torchrun describes (gloo); whether there is more than one rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return True


def plan_cmd(
    url: UrlArg,
    std: StdOpt,
    at: AtOpt = None,
    as_json: JsonOpt = False,
    plot: Annotated[
        str | None,
        typer.Option("--plot", help="Also draw target vs achieved profiles into this PNG."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --plot file.")] = False,
) -> None:
    """Show the coefficients and fit quality of each output before any tensor byte is read."""
    stds = parse_stds(std)
    p = plan(SnapshotStore(url), stds, at=at)
    if plot is not None:
        save_plan_plot(p, plot, overwrite=overwrite)
        err_console.print(f"plot written to {plot}", highlight=False)
    table = Table(title=f"plan at t={p.t:g}: {len(p.inputs)} snapshots, {p.bytes_to_read:,} bytes")
    for col in ("std", "rel. L2 error", "L1 norm", "cond", "largest |c|", "issues"):
        table.add_column(col, justify="left" if col == "issues" else "right")
    for j, (s, fit) in enumerate(zip(stds, p.fits, strict=True)):
        coefs = {i.url.rsplit("/", 1)[-1]: w[j] for i, w in zip(p.inputs, p.weights, strict=True)}
        if as_json:
            row = {
                "std": s,
                "t": p.t,
                "rel_error": fit.rel_error,
                "l1_norm": fit.l1_norm,
                "condition": fit.condition,
                "issues": list(fit.issues),
                "coefficients": coefs,
            }
            typer.echo(json.dumps(row))
            continue
        table.add_row(
            f"{s:.4g}",
            f"{fit.rel_error:.3g}",
            f"{fit.l1_norm:.3g}",
            f"{fit.condition:.3g}",
            f"{max(abs(c) for c in coefs.values()):.3g}",
            "; ".join(fit.issues),
        )
    if as_json:
        return
    out_console.print(table)


def reconstruct_cmd(
    url: UrlArg,
    std: StdOpt,
    out: Annotated[str, typer.Option("--out", help="Where the outputs go (any URL).")],
    at: AtOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace existing outputs.")] = False,
    window_mb: Annotated[
        float, typer.Option(min=0.001, help="Bytes read per snapshot at a time, MiB.")
    ] = WINDOW_BYTES / (1 << 20),
    inflight: Annotated[
        int, typer.Option(min=1, help="Reads in flight (and snapshots per summed block).")
    ] = 8,
    threads: Annotated[
        int,
        typer.Option(
            min=0, help="Torch threads for the arithmetic (reads have their own); 0: torch's."
        ),
    ] = 1,
    as_json: JsonOpt = False,
    sharded: Annotated[
        bool,
        typer.Option(help="Under torchrun: leave each output as the ranks' shards + a manifest."),
    ] = False,
) -> None:
    """Make new EMA profiles from a store in one pass over its snapshots.

    Under torchrun (WORLD_SIZE > 1) every process reads and sums its own ~1/N of the
    bytes and rank 0 writes the outputs, the same files one process writes.
    """
    stds = parse_stds(std)
    parallel = _join_torchrun()
    try:
        _reconstruct(
            url, stds, out, at, overwrite, window_mb, inflight, threads, as_json, parallel, sharded
        )
    finally:
        if parallel:
            import torch.distributed as dist

            dist.destroy_process_group()


def _reconstruct(
    url: str,
    stds: list[float],
    out: str,
    at: float | None,
    overwrite: bool,
    window_mb: float,
    inflight: int,
    threads: int,
    as_json: bool,
    parallel: bool,
    sharded: bool,
) -> None:
    rank = int(os.environ.get("RANK", "0")) if parallel else 0
    src = SnapshotStore(url)
    make = functools.partial(plan, src, stds, at=at)
    the_plan = parallel_plan(make) if parallel else make()  # one rank failing stops all
    run = functools.partial(
        write_plan,
        the_plan,
        src,
        out,
        overwrite=overwrite,
        window_bytes=int(window_mb * (1 << 20)),
        max_inflight=inflight,
        threads=threads or None,
        parallel=parallel,
        sharded=sharded,
    )
    if rank != 0:  # every rank reads its share; rank 0 reports
        run()
        return
    columns = (
        TextColumn("reading"),
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=False) as bar:
        total = None if parallel else the_plan.bytes_to_read  # this rank reads ~1/N of it
        task = bar.add_task("read", total=total)
        results = run(progress=lambda n: bar.advance(task, n))
    for s, res in zip(stds, results, strict=True):
        if as_json:
            typer.echo(
                json.dumps(
                    {
                        "std": s,
                        "url": res.url,
                        "rel_error": res.fit.rel_error,
                        "l1_norm": res.fit.l1_norm,
                    }
                )
            )
        else:
            out_console.print(
                f"std {s:.4g} -> {res.url} (rel. L2 error {res.fit.rel_error:.3g})",
                highlight=False,
            )
