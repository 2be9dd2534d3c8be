"""``phema plan`` and ``phema reconstruct``: new EMA profiles from a store, from the shell.

Both check every flag, list the store and solve before any tensor byte is read;
``reconstruct`` also checks that its outputs do not exist (unless ``--overwrite``)
and that a local destination is writable, so that a run fails before its progress
bar starts, not after it.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Annotated

import typer
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
from phema.errors import OptionError, StorageError
from phema.store import SnapshotStore
from phema.streaming import WINDOW_BYTES, Plan, plan, write_plan
from phema_cli.console import err_console, note, out_console, plain, show
from phema_cli.options import JsonOpt, UrlArg, check_count, check_finite, parse_stds
from phema_cli.plot import save_plan_plot

StdOpt = Annotated[
    str,
    typer.Option(
        "--std", help="Target stds, comma-separated fractions, e.g. 0.05,0.1.", show_default=False
    ),
]
AtOpt = Annotated[
    float | None,
    typer.Option(
        "--at",
        help="Target time, in the store's unit; default: the latest snapshot's time.",
        show_default=False,
    ),
]
AfterOpt = Annotated[
    bool,
    typer.Option(
        "--allow-after-last",
        help="Accept an --at after the last snapshot (no snapshot covers the end: poor fits).",
    ),
]

#: What the plan table's columns mean.
LEGEND = (
    "rel. error: ||target - achieved|| / ||target|| of the EMA profile (below 0.05 is "
    "good); L1: sum of |coefficients| (1 = a plain average, larger amplifies snapshot "
    "noise); cond: condition number of the snapshots' Gram matrix; coefficients: the "
    "largest, by snapshot (t, std)."
)


def _make_plan(url: str, stds: list[float], at: float | None, after_last: bool) -> Plan:
    """The plan, refusing an ``--at`` after the last snapshot unless asked."""
    check_finite(at, "--at")
    try:
        return plan(SnapshotStore(url), stds, at=at, after_last=after_last)
    except OptionError as exc:  # the one option plan checks: --at after the last snapshot
        message = str(exc).replace("at=", "", 1).replace("after_last=True", "--allow-after-last")
        raise typer.BadParameter(message, param_hint="'--at'") from None


def _top(p: Plan, j: int, n: int = 3) -> str:
    coefs = sorted(
        ((w[j], i) for i, w in zip(p.inputs, p.weights, strict=True) if w[j] != 0.0),
        key=lambda x: -abs(x[0]),
    )
    shown = ", ".join(f"{c:+.3g} (t={i.t:g}, std {i.std:.4g})" for c, i in coefs[:n])
    return shown + (f", +{len(coefs) - n} more" if len(coefs) > n else "")


def plan_cmd(
    url: UrlArg,
    std: StdOpt,
    at: AtOpt = None,
    allow_after_last: AfterOpt = False,
    as_json: JsonOpt = False,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            help="Also draw target vs achieved profiles into this PNG.",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --plot file.")
    ] = False,
) -> None:
    """Show each output's coefficients and fit quality before any tensor byte is read."""
    stds = parse_stds(std)
    if plot is not None and os.path.exists(plot) and not overwrite:
        raise StorageError(f"{plot} exists; choose another --plot path or pass --overwrite")
    p = _make_plan(url, stds, at, allow_after_last)
    if plot is not None:
        save_plan_plot(p, plot, overwrite=overwrite)
        note(f"plot written to {plot}")
    if as_json:
        for j, (s, fit) in enumerate(zip(stds, p.fits, strict=True)):
            row = {
                "std": s,
                "t": p.t,
                "rel_error": fit.rel_error,
                "l1_norm": fit.l1_norm,
                "condition": fit.condition,
                "issues": list(fit.issues),
                "coefficients": {
                    os.path.basename(i.path): w[j] for i, w in zip(p.inputs, p.weights, strict=True)
                },
                "skipped": [os.path.basename(i.path) for i in p.skipped],
            }
            typer.echo(json.dumps(row))
        return
    title = f"plan at t={p.t:g}: reads {len(p.inputs)} snapshots, {p.bytes_to_read:,} bytes"
    if p.skipped:
        title += f" ({len(p.skipped)} more too little weighted to matter)"
    table = Table(title=plain(title))
    for col in ("std", "rel. error", "L1", "cond", "coefficients", "issues"):
        table.add_column(col, justify="left" if col in ("coefficients", "issues") else "right")
    for j, (s, fit) in enumerate(zip(stds, p.fits, strict=True)):
        table.add_row(
            f"{s:.4g}",
            f"{fit.rel_error:.3g}",
            f"{fit.l1_norm:.3g}",
            f"{fit.condition:.3g}",
            plain(_top(p, j)),
            plain("; ".join(fit.issues)),
        )
    show(table)
    note(LEGEND, style="dim")


def _join_torchrun() -> bool:
    """Join the process group torchrun describes (gloo); whether there is more than one rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or "MASTER_ADDR" not in os.environ:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return True


def reconstruct_cmd(
    url: UrlArg,
    std: StdOpt,
    out: Annotated[
        str, typer.Option("--out", help="Where the outputs go (any URL).", show_default=False)
    ],
    at: AtOpt = None,
    allow_after_last: AfterOpt = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace existing outputs.")
    ] = False,
    window_mb: Annotated[
        float, typer.Option("--window-mb", help="Bytes read per snapshot at a time, MiB.")
    ] = WINDOW_BYTES / (1 << 20),
    inflight: Annotated[
        int,
        typer.Option("--inflight", help="Reads in flight (and snapshots per summed block)."),
    ] = 8,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            help="Torch threads for the arithmetic (reads have their own); 0: torch's.",
        ),
    ] = 1,
    as_json: JsonOpt = False,
    sharded: Annotated[
        bool,
        typer.Option(
            "--sharded", help="Under torchrun: leave each output as the ranks' shards + a manifest."
        ),
    ] = False,
) -> None:
    """Make new EMA profiles from a store in one pass over its snapshots.

    Under torchrun (WORLD_SIZE > 1) every process reads and sums its own ~1/N of the
    bytes and rank 0 writes the outputs, the same files one process writes.
    """
    stds = parse_stds(std)
    check_finite(window_mb, "--window-mb", low=2.0**-20, high=2.0**20, or_low=True)  # 1 B..1 TiB
    check_count(inflight, "--inflight", 1, 256)
    check_count(threads, "--threads", 0, 1024)
    if sharded and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise typer.BadParameter(
            "needs several processes: run under torchrun", param_hint="'--sharded'"
        )
    parallel = _join_torchrun()
    try:
        _reconstruct(
            url, stds, out, at, allow_after_last, overwrite, window_mb, inflight, threads,
            as_json, parallel, sharded,
        )  # fmt: skip
    finally:
        if parallel:
            import torch.distributed as dist

            dist.destroy_process_group()


def _check_out(the_plan: Plan, out: SnapshotStore, overwrite: bool) -> None:
    """Refuse existing outputs and an unwritable local destination, before any read."""
    if out.is_local:
        folder = os.path.abspath(out.root)
        probe = folder
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
            raise StorageError(
                f"cannot write the outputs to {out.url}: {probe} is not a writable folder"
            )
    if overwrite:
        return
    for name in the_plan.names:
        if out.exists(name):
            raise StorageError(
                f"{out.url.rstrip('/')}/{name} exists; pass --overwrite to replace it"
            )


def _reconstruct(
    url: str,
    stds: list[float],
    out: str,
    at: float | None,
    after_last: bool,
    overwrite: bool,
    window_mb: float,
    inflight: int,
    threads: int,
    as_json: bool,
    parallel: bool,
    sharded: bool,
) -> None:
    rank = int(os.environ.get("RANK", "0")) if parallel else 0
    make = functools.partial(_make_plan, url, stds, at, after_last)
    the_plan = parallel_plan(make) if parallel else make()  # one rank failing stops all
    out_store = SnapshotStore(out)
    if rank == 0 and not parallel:
        _check_out(the_plan, out_store, overwrite)
    run = functools.partial(
        write_plan,
        the_plan,
        SnapshotStore(url),
        out_store,
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
            row = {
                "std": s,
                "url": res.url,
                "rel_error": res.fit.rel_error,
                "l1_norm": res.fit.l1_norm,
            }
            typer.echo(json.dumps(row))
        else:
            out_console.print(
                plain(f"std {s:.4g} -> {res.url} (rel. L2 error {res.fit.rel_error:.3g})"),
                soft_wrap=True,
            )
