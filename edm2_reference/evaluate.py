"""The post-hoc EMA curve: sample from each reconstructed EMA length and measure its quality.

``python -m edm2_reference.evaluate runs/d8/ema --data digits`` finds every phema
reconstruction (``phema-ema-*.safetensors``) at the URL, draws ``--n`` images from each
with the same seeds, and reports the Frechet distance and KID in the feature space of a
small classifier trained on the same data (:mod:`edm2_reference.metrics`), always beside
the real-vs-real baseline at the same sample count. ``--net`` adds other networks (e.g.
the raw training weights from a checkpoint) to the table.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from edm2_reference.data import load_dataset
from edm2_reference.metrics import cached_classifier, evaluate
from edm2_reference.presets import get_preset
from edm2_reference.sample import load_network
from edm2_reference.sampler import generate
from phema.store import SnapshotStore

__all__ = ["find_reconstructions", "main"]


def find_reconstructions(url: str) -> list[tuple[float, str]]:
    """``(std, url)`` of every phema reconstruction at ``url``, by std."""
    return sorted((r.std, r.url) for r in SnapshotStore(url).reconstructions())


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m edm2_reference.evaluate``."""
    p = argparse.ArgumentParser(prog="python -m edm2_reference.evaluate", description=__doc__)
    p.add_argument("url", nargs="?", help="folder (any URL) holding phema reconstructions")
    p.add_argument("--net", action="append", default=[], help="another network (label=source)")
    p.add_argument("--preset", default="digits8")
    p.add_argument("--data", help="dataset (default: the preset's)")
    p.add_argument("--uncond", action="store_true")
    p.add_argument("--n", type=int, default=500, help="images per network")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--classifier", default="runs/classifier-{data}.safetensors")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    data = load_dataset(a.data or get_preset(a.preset).dataset or "digits")
    c, h, _ = data.shape
    label_dim = 0 if a.uncond else data.label_dim
    entries: list[tuple[str, float | None, str]] = [
        (f"ema std {s:.3f}", s, src) for s, src in (find_reconstructions(a.url) if a.url else [])
    ]
    for item in a.net:
        label, _, src = item.rpartition("=")
        entries.append((label or src, None, src))
    if not entries:
        p.error(f"no phema-ema-*.safetensors at {a.url!r} and no --net given")
    path = a.classifier.format(data=os.path.basename(str(data.name)) or "data")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    classifier = cached_classifier(data, path)
    console = Console(stderr=True)
    table = Table(title=f"quality per network ({a.n} samples each, {a.steps} Heun steps)")
    for col in ("network", "FD", "FD real-vs-real", "KID", "KID real-vs-real"):
        table.add_column(col, justify="left" if col == "network" else "right")
    seeds = list(range(a.n))
    for label, std, src in entries:
        net = load_network(
            src, a.preset, label_dim=label_dim, img_resolution=h, img_channels=c, device=a.device
        )
        images = generate(
            net,
            seeds,
            data.shape,
            num_classes=label_dim,
            batch_size=500,
            device=a.device,
            num_steps=a.steps,
        )
        rep = evaluate(classifier, images.cpu(), data, n=a.n, kid_subset_size=min(1000, a.n))
        if a.json:
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
            print(json.dumps(row))  # noqa: T201
        table.add_row(
            label,
            f"{rep.fd:.3f}",
            f"{rep.fd_baseline:.3f}",
            f"{rep.kid:.4f}",
            f"{rep.kid_baseline:.4f}",
        )
    console.print(table)


if __name__ == "__main__":
    main()
