"""The post-hoc EMA curve: sample from each reconstructed EMA length and measure its quality.

``python -m edm2_reference.evaluate runs/d8/ema --data digits`` finds every phema
reconstruction (``phema-ema-*.safetensors``) at the URL, draws ``--n`` images from each
with the same seeds, and reports the Frechet distance and KID in the feature space of a
small classifier trained on the same data (:mod:`edm2_reference.metrics`), always beside
the real-vs-real baseline at the same sample count. ``--net`` adds other networks (e.g.
the raw training weights from a checkpoint) to the table. The table goes to stdout
(``--json``: one JSON object per network instead), progress to stderr.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from edm2_reference import cli
from edm2_reference.data import load_dataset
from edm2_reference.metrics import cached_classifier, evaluate
from edm2_reference.presets import get_preset
from edm2_reference.sample import load_network
from edm2_reference.sampler import generate
from phema.store import SnapshotStore

__all__ = ["LEGEND", "find_reconstructions", "main"]


def find_reconstructions(url: str) -> list[tuple[float, str]]:
    """``(std, url)`` of every phema reconstruction at ``url``, by std."""
    return sorted((r.std, r.url) for r in SnapshotStore(url).reconstructions())


LEGEND = (
    "FD: Frechet distance between Gaussians fitted to the classifier features of the n "
    "samples and of n real images (lower is better). KID: kernel distance (unbiased squared "
    "MMD, cubic polynomial kernel) between the same features. real-vs-real: the same "
    "measures between two disjoint sets of n real images, the floor at this n."
)


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
            2, "Images per network (and real images per set; the data must hold 2n).", "--n"
        ),
    ] = 500,
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
    device: cli.DeviceOpt = "cpu",
) -> None:
    """Measure sample quality per network: every phema reconstruction in URL (the post-hoc
    EMA curve) and any --net, each sampled with the same seeds and compared with real images
    (FD and KID in the features of a small classifier trained on the data), beside the
    real-vs-real baseline at the same sample count. The table goes to stdout; --json prints
    one JSON object per network instead.
    """
    if not url and not net:
        raise typer.BadParameter("give a folder of reconstructions (URL) or --net")
    entries = _entries(url, net or [])
    dataset = load_dataset(data or get_preset(preset).dataset or "digits")
    if n > len(dataset) // 2:
        raise typer.BadParameter(
            f"{n} needs 2 x {n} real images and {dataset.name} has {len(dataset)}; "
            f"pass --n {len(dataset) // 2} or less",
            param_hint="'--n'",
        )
    c, h, _ = dataset.shape
    label_dim = 0 if uncond else dataset.label_dim
    path = classifier.format(data=os.path.basename(str(dataset.name)) or "data")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cli.err_console.print(
        f"metric classifier: {path}", markup=False, highlight=False, soft_wrap=True
    )
    features = cached_classifier(dataset, path)
    table = Table(title=f"quality per network ({n} samples each, {steps} Heun steps)")
    for col in ("network", "FD", "FD real-vs-real", "KID", "KID real-vs-real"):
        # Wrap rather than cut a long value where the width is fixed (80 columns in logs).
        table.add_column(col, justify="left" if col == "network" else "right", overflow="fold")
    seeds = list(range(n))
    with cli.progress() as bar:
        task = bar.add_task("sampling", total=n * len(entries))
        for k, (label, std, src) in enumerate(entries):
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
            bar.update(task, completed=n * (k + 1))
            rep = evaluate(features, images.cpu(), dataset, n=n, kid_subset_size=min(1000, n))
            if as_json:
                row = {
                    "network": label,
                    "std": std,
                    "source": src,
                    "n": rep.n,
                    "fd": rep.fd,
                    "kid": rep.kid,
                    "fd_baseline": rep.fd_baseline,
                    "kid_baseline": rep.kid_baseline,
                }
                cli.print_json(row)
            table.add_row(
                Text(label),
                f"{rep.fd:.3f}",
                f"{rep.fd_baseline:.3f}",
                f"{rep.kid:.4f}",
                f"{rep.kid_baseline:.4f}",
            )
    if not as_json:
        cli.out_console.print(table)
        cli.out_console.print(Text(LEGEND), soft_wrap=False)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m edm2_reference.evaluate`` (``argv`` default: ``sys.argv[1:]``)."""
    cli.run_app(app, argv, "python -m edm2_reference.evaluate")


if __name__ == "__main__":
    main()
