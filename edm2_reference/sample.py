"""Sample images from a trained network, a phema snapshot or a phema reconstruction.

``python -m edm2_reference.sample --net runs/d8/ema/phema-ema-...-0.1000.safetensors
--preset digits8 --seeds 0-63 --out grid.png`` draws one image per seed with the Heun
sampler (:func:`edm2_reference.sampler.edm_sampler`: 32 steps, sigma 0.002..80, rho 7 by
default; ``--churn`` adds EDM stochasticity; ``--gnet`` and ``--guidance`` guide with a
second network) and writes a PNG grid. Networks are built from the preset and loaded
from safetensors (any fsspec URL) or a training checkpoint read with
``torch.load(weights_only=True)``, then frozen: they cannot enter training mode, so
forced weight normalisation can never rewrite the loaded (EMA) weights.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import fsspec
import safetensors.torch
import torch

from edm2_reference.data import load_dataset
from edm2_reference.network import Precond
from edm2_reference.presets import build_precond, get_preset
from edm2_reference.sampler import generate, save_image_grid
from phema.errors import PhemaError
from phema.store import atomic_write

__all__ = ["NetworkLoadError", "load_network", "main", "parse_seeds"]


class NetworkLoadError(PhemaError, ValueError):
    """Weights that do not fit the network the flags describe."""


def load_network(
    source: str,
    preset: str,
    *,
    label_dim: int,
    img_resolution: int,
    img_channels: int,
    device: torch.device | str = "cpu",
) -> Precond:
    """A frozen :class:`Precond` of ``preset`` with the weights in ``source``.

    ``source``: a ``.safetensors`` file at any fsspec URL (phema snapshot or
    reconstruction, or a plain state dict), or a ``training-state-*.pt`` checkpoint.
    """
    net = build_precond(
        preset,
        label_dim=label_dim,
        img_resolution=img_resolution,
        img_channels=img_channels,
        use_fp16=False,
    )
    if source.endswith(".pt"):
        state = torch.load(source, map_location="cpu", weights_only=True)
        tensors = state["net"] if isinstance(state, dict) and "net" in state else state
    else:
        try:
            with fsspec.open(source, "rb") as f:
                tensors = safetensors.torch.load(f.read())
        except FileNotFoundError:
            raise NetworkLoadError(f"{source} does not exist") from None
    try:
        net.load_state_dict(tensors)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise NetworkLoadError(
            f"{source} does not fit preset {preset!r} with label_dim={label_dim}, "
            f"{img_resolution}x{img_resolution}x{img_channels} ({first}); pass the flags the "
            "network was trained with (--preset, --data or --uncond)"
        ) from None
    return net.to(device).freeze()


def parse_seeds(text: str) -> list[int]:
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]``."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return seeds


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m edm2_reference.sample``."""
    p = argparse.ArgumentParser(prog="python -m edm2_reference.sample", description=__doc__)
    p.add_argument("--net", required=True, help="safetensors (any URL) or training-state .pt")
    p.add_argument("--gnet", help="guiding network (same kinds of source)")
    p.add_argument("--guidance", type=float, default=1.0, help="guidance weight w (1: off)")
    p.add_argument("--preset", default="digits8")
    p.add_argument("--data", help="dataset the net was trained on (sets shape and labels)")
    p.add_argument("--uncond", action="store_true", help="the net was trained without labels")
    p.add_argument("--class", dest="class_idx", type=int, help="class of every image")
    p.add_argument("--seeds", default="0-63", help="e.g. 0-63 or 1,5,9")
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--churn", type=float, default=0.0, help="S_churn (0: deterministic)")
    p.add_argument("--out", required=True, help="PNG grid to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of the grid")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if os.path.exists(a.out) and not a.overwrite:
        p.error(f"{a.out} exists; pass --overwrite to replace it")
    if a.guidance != 1.0 and not a.gnet:
        p.error("--guidance other than 1 needs --gnet")
    data = load_dataset(a.data or get_preset(a.preset).dataset or "digits")
    c, h, _ = data.shape
    label_dim = 0 if a.uncond else data.label_dim
    nets = [
        load_network(
            src, a.preset, label_dim=label_dim, img_resolution=h, img_channels=c, device=a.device
        )
        for src in ([a.net, a.gnet] if a.gnet else [a.net])
    ]
    images = generate(
        nets[0],
        parse_seeds(a.seeds),
        data.shape,
        num_classes=label_dim,
        class_idx=a.class_idx,
        gnet=nets[1] if a.gnet else None,
        device=a.device,
        num_steps=a.steps,
        guidance=a.guidance,
        S_churn=a.churn,
    )
    with atomic_write(os.path.abspath(a.out)) as f:  # the grid appears whole or not at all
        save_image_grid(images, f, scale=a.scale, padding=a.scale)
    print(f"{len(images)} images -> {a.out}")  # noqa: T201


if __name__ == "__main__":
    main()
