"""The post-hoc EMA curve: sample from each reconstructed EMA length and measure its quality.

``python -m edm2_reference.evaluate runs/d8/ema --data digits`` finds every phema
reconstruction (``phema-ema-*.safetensors``) at the URL, draws ``--n`` images from each
with the same seeds, and reports the Frechet distance and KID in the feature space of a
small classifier (:mod:`edm2_reference.metrics`), always beside the real-vs-real baseline
at the same sample count. ``--net`` adds other networks (e.g. the raw training weights from
a checkpoint) to the table.

The data are split by :func:`edm2_reference.data.holdout_split` (``--held-out`` of them,
seed 0): the classifier is trained on the training part, the one the diffusion model must
be trained on, and samples are compared with held-out images only (``n`` reference and
``n`` baseline images), so the real-vs-real figure means "as good as real images the model
never saw" and memorisation cannot pass for quality.

Each FD and KID comes with a bootstrap interval (``--resamples`` replicates seeded by
``--seed``, :func:`edm2_reference.bootstrap.compare_rows`), and each row is tested against
the best row with a paired bootstrap of the difference: rows marked ``~best`` are not
significantly different from it. The table goes to stdout (``--json``: one JSON object per
network instead), progress to stderr; ``--plot sweep.png`` draws FD against the EMA std
(:mod:`edm2_reference.plot`) and writes ``sweep-grid.png`` beside it, the samples of the
best EMA (left) and the worst (right).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text
from torch import Tensor

from edm2_reference import cli
from edm2_reference.bootstrap import BOOTSTRAP_RESAMPLES, SweepQuality, evaluate_sweep
from edm2_reference.data import HELD_OUT_FRACTION, HELD_OUT_SEED, holdout_split, load_dataset
from edm2_reference.metrics import cached_classifier
from edm2_reference.presets import get_preset
from edm2_reference.sample import load_network
from edm2_reference.sampler import generate
from phema.store import SnapshotStore

__all__ = ["LEGEND", "find_reconstructions", "main", "sweep_rows"]


def find_reconstructions(url: str) -> list[tuple[float, str]]:
    """``(std, url)`` of every phema reconstruction at ``url``, by std."""
    return sorted((r.std, r.url) for r in SnapshotStore(url).reconstructions())


LEGEND = (
    "FD: Frechet distance between Gaussians fitted to the classifier features of the n "
    "samples and of n held-out real images (lower is better; with several sets of n samples, "
    "the mean over the sets). KID: kernel distance (unbiased "
    "squared MMD, cubic polynomial kernel) between the same features. [lo, hi]: {level:.0%} "
    "bootstrap interval ({resamples} resamples of samples and real images, seed {seed}). "
    "best: least FD; ~best: not significantly different from it (paired bootstrap of the "
    "difference). real-vs-real: the same measures between two disjoint sets of n held-out "
    "real images, the floor at this n."
)


def sweep_rows(
    entries: Sequence[tuple[str, float | None, str]], quality: SweepQuality
) -> list[dict[str, Any]]:
    """One ``--json`` object per network, ``entries`` being ``(label, std, source)`` in row order.

    Keys: ``label`` (also as ``network``), ``std`` (None for a ``--net``), ``source``, ``n``,
    ``fd``/``fd_lo``/``fd_hi``, ``kid``/``kid_lo``/``kid_hi``, the real-vs-real
    ``fd_baseline``/``kid_baseline`` with their ``_lo``/``_hi``, the paired difference to
    the best row ``fd_vs_best_lo``/``_hi`` (and KID's), ``best_fd``/``best_kid`` (whether
    this row is the best), ``fd_tied``/``kid_tied`` (not significantly different from the
    best), and ``level``, ``resamples``, ``seed`` of the bootstrap, ``sets`` of n per row.
    """
    if len(entries) != len(quality.rows):
        raise ValueError(f"{len(entries)} entries for {len(quality.rows)} measured rows")
    out = []
    for k, ((label, std, src), row) in enumerate(zip(entries, quality.rows, strict=True)):
        out.append(
            {
                "label": label,
                "network": label,
                "std": std,
                "source": src,
                "n": quality.n,
                "fd": row.fd.value,
                "fd_lo": row.fd.lo,
                "fd_hi": row.fd.hi,
                "kid": row.kid.value,
                "kid_lo": row.kid.lo,
                "kid_hi": row.kid.hi,
                "fd_baseline": quality.fd_baseline.value,
                "fd_baseline_lo": quality.fd_baseline.lo,
                "fd_baseline_hi": quality.fd_baseline.hi,
                "kid_baseline": quality.kid_baseline.value,
                "kid_baseline_lo": quality.kid_baseline.lo,
                "kid_baseline_hi": quality.kid_baseline.hi,
                "fd_vs_best_lo": row.fd_vs_best.lo,
                "fd_vs_best_hi": row.fd_vs_best.hi,
                "kid_vs_best_lo": row.kid_vs_best.lo,
                "kid_vs_best_hi": row.kid_vs_best.hi,
                "best_fd": k == quality.best_fd,
                "best_kid": k == quality.best_kid,
                "fd_tied": row.fd_tied,
                "kid_tied": row.kid_tied,
                "level": quality.level,
                "resamples": quality.resamples,
                "seed": quality.seed,
                "sets": quality.sets,
            }
        )
    return out


def _figure(value: float, lo: float, hi: float) -> str:
    """``value`` over ``[lo, hi]`` (two lines), 4 significant digits each."""
    return f"{value:.4g}\n[{lo:.4g}, {hi:.4g}]"


def _mark(best: bool, tied: bool) -> str:
    return "best" if best else "~best" if tied else ""


def _entries(url: str | None, nets: list[str]) -> list[tuple[str, float | None, str]]:
    """``(label, std or None, source)`` of every network to measure."""
    found = find_reconstructions(url) if url else []
    entries: list[tuple[str, float | None, str]] = [(f"ema std {s:.3f}", s, u) for s, u in found]
    for item in nets:
        label, _, src = item.rpartition("=")
        if not src:
            raise typer.BadParameter(
                f"{item!r} names no network; pass label=source or source", param_hint="'--net'"
            )
        entries.append((label or src, None, src))
    if url and not found and not nets:
        raise cli.CommandError(
            f"no phema reconstructions (phema-ema-*.safetensors) in {url}; write them with "
            f"'phema reconstruct SNAPSHOTS --std 0.05,0.1 --out {url}', or pass --net"
        )
    return entries


app = cli.new_app()


@app.command(epilog=cli.EPILOG)
def command(
    url: Annotated[
        str | None,
        typer.Argument(
            metavar="URL",
            help="Folder (any URL) holding phema reconstructions, e.g. runs/digits8/ema.",
            show_default=False,
        ),
    ] = None,
    net: Annotated[
        list[str] | None,
        typer.Option(
            metavar="<[label=]source>",
            help="Another network, as label=source or source (.safetensors or training-state "
            ".pt); repeatable.",
            show_default=False,
        ),
    ] = None,
    preset: cli.PresetOpt = "digits8",
    data: cli.DataOpt = None,
    uncond: cli.UncondOpt = False,
    n: Annotated[
        int,
        cli.count_option(
            2,
            "Images per network (and real images per set; the held-out data must hold 2n).",
            "--n",
        ),
    ] = 400,
    steps: Annotated[int, cli.count_option(1, "Heun sampler steps.")] = 32,
    classifier: Annotated[
        str,
        typer.Option(
            help="Where the metric's classifier is cached ({data}: the dataset's name); "
            "trained there on first use."
        ),
    ] = "runs/classifier-{data}.safetensors",
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per network on stdout, no table.")
    ] = False,
    held_out: Annotated[
        float,
        cli.number_option(
            "Share of the data held out of training and used as the real images (seed 0); "
            "must match the split the network was trained with.",
        ),
    ] = HELD_OUT_FRACTION,
    resamples: Annotated[
        int, cli.count_option(2, "Bootstrap resamples for the intervals and comparisons.")
    ] = BOOTSTRAP_RESAMPLES,
    seed: Annotated[
        int, cli.count_option(0, "Seed of the real-image shuffle and of the bootstrap.")
    ] = 0,
    sets: Annotated[
        int,
        cli.count_option(
            1,
            "Sample sets of --n images per network (seeds 0 to sets x n - 1); each set is "
            "measured against the same real images and the figures averaged: less noise, "
            "the same expectation as one set.",
        ),
    ] = 1,
    plot: Annotated[
        str | None,
        typer.Option(
            metavar="<png>",
            help="Write FD against EMA std (with intervals, raw-weights and real-vs-real "
            "lines) here, and the best and worst EMA's samples to <name>-grid.png beside it.",
            show_default=False,
        ),
    ] = None,
    device: cli.DeviceOpt = "cpu",
) -> None:
    """Measure sample quality per network: every phema reconstruction in URL (the post-hoc
    EMA curve) and any --net, each sampled with the same seeds and compared with held-out
    real images (FD and KID in the features of a small classifier trained on the training
    part), with bootstrap intervals, beside the real-vs-real baseline at the same sample
    count. The table goes to stdout; --json prints one JSON object per network instead.
    """
    if not url and not net:
        raise typer.BadParameter("give a folder of reconstructions (URL) or --net")
    if not 0.0 < held_out < 1.0:
        raise typer.BadParameter(
            f"{held_out} is not a fraction in (0, 1); pass e.g. {HELD_OUT_FRACTION}",
            param_hint="'--held-out'",
        )
    entries = _entries(url, net or [])
    if plot:
        from edm2_reference.plot import require_matplotlib

        require_matplotlib()
        if all(std is None for _, std, _ in entries):
            raise typer.BadParameter(
                "the sweep plot needs EMA rows with a std; give a folder of phema "
                "reconstructions (URL) or drop --plot",
                param_hint="'--plot'",
            )
    dataset = load_dataset(data or get_preset(preset).dataset or "digits")
    train_part, held = holdout_split(dataset, held_out, HELD_OUT_SEED)
    if n > len(held) // 2:
        raise typer.BadParameter(
            f"{n} needs 2 x {n} held-out real images and {dataset.name} holds out "
            f"{len(held)} of {len(dataset)} (--held-out {held_out}); pass --n "
            f"{len(held) // 2} or less, or a larger --held-out",
            param_hint="'--n'",
        )
    c, h, _ = dataset.shape
    label_dim = 0 if uncond else dataset.label_dim
    path = classifier.format(data=os.path.basename(str(dataset.name)) or "data")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cli.err_console.print(
        f"metric classifier: {path} (trained on the {len(train_part)} training images); "
        f"real images: {len(held)} held out",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    features = cached_classifier(train_part, path)
    seeds = list(range(sets * n))
    samples: list[Tensor] = []
    with cli.progress() as bar:
        task = bar.add_task("sampling", total=len(seeds) * len(entries))
        for k, (label, _std, src) in enumerate(entries):
            bar.update(task, description=label)
            model = load_network(
                src, preset, label_dim=label_dim, img_resolution=h, img_channels=c, device=device
            )
            images = generate(
                model,
                seeds,
                dataset.shape,
                num_classes=label_dim,
                batch_size=500,
                device=device,
                progress=lambda done: bar.advance(task, done),
                num_steps=steps,
            )
            bar.update(task, completed=len(seeds) * (k + 1))
            samples.append(images.cpu())
    cli.err_console.print(f"bootstrap: {resamples} resamples", markup=False, highlight=False)
    quality = evaluate_sweep(
        features, samples, held, n=n, seed=seed, resamples=resamples, sets=sets
    )
    rows = sweep_rows(entries, quality)
    if as_json:
        for row in rows:
            cli.print_json(row)
    else:
        _print_table(rows, n, steps, quality)
    if plot:
        _plot(rows, samples, plot)


def _print_table(rows: list[dict[str, Any]], n: int, steps: int, quality: SweepQuality) -> None:
    """The human-readable table with the real-vs-real row last, and the legend."""
    sets = f"{quality.sets} sets of {n}" if quality.sets > 1 else f"{n}"
    table = Table(title=f"quality per network ({sets} samples each, {steps} Heun steps)")
    for col in ("network", "FD [lo, hi]", "", "KID [lo, hi]", ""):
        # Wrap rather than cut a long value where the width is fixed (80 columns in logs).
        table.add_column(col, justify="left" if col == "network" else "right", overflow="fold")
    for r in rows:
        table.add_row(
            Text(r["label"]),
            _figure(r["fd"], r["fd_lo"], r["fd_hi"]),
            _mark(r["best_fd"], r["fd_tied"]),
            _figure(r["kid"], r["kid_lo"], r["kid_hi"]),
            _mark(r["best_kid"], r["kid_tied"]),
        )
    b = quality
    table.add_row(
        Text("real-vs-real"),
        _figure(b.fd_baseline.value, b.fd_baseline.lo, b.fd_baseline.hi),
        "",
        _figure(b.kid_baseline.value, b.kid_baseline.lo, b.kid_baseline.hi),
        "",
    )
    cli.out_console.print(table)
    legend = LEGEND.format(level=b.level, resamples=b.resamples, seed=b.seed)
    cli.out_console.print(Text(legend), soft_wrap=False)


def _plot(rows: list[dict[str, Any]], samples: list[Tensor], path: str) -> None:
    """``--plot``: the sweep figure, and the best and worst EMA rows' samples beside it."""
    from edm2_reference.plot import grid_path, plot_sweep, save_best_worst_grid

    plot_sweep(rows, path)
    ema = [k for k, r in enumerate(rows) if r["std"] is not None] or list(range(len(rows)))
    best = min(ema, key=lambda k: rows[k]["fd"])
    worst = max(ema, key=lambda k: rows[k]["fd"])
    per_side = min(4, len(samples[best]))
    grid_rows = min(8, len(samples[best]) // per_side)
    grid = grid_path(path)
    save_best_worst_grid(samples[best], samples[worst], grid, per_side=per_side, rows=grid_rows)
    cli.err_console.print(
        f"wrote {path}; {grid}: left {rows[best]['label']} (least FD), right "
        f"{rows[worst]['label']} (greatest FD), seeds 0-{per_side * grid_rows - 1}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m edm2_reference.evaluate`` (``argv`` default: ``sys.argv[1:]``)."""
    cli.run_app(app, argv, "python -m edm2_reference.evaluate")


if __name__ == "__main__":
    main()
