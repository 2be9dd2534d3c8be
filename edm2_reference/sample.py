"""Sample images from a trained network, a phema snapshot or a phema reconstruction.

``python -m edm2_reference.sample --net runs/d8/ema/phema-ema-...-0.1000.safetensors
--preset digits8 --seeds 0-63 --out grid.png`` (``--help`` for every flag) draws one image per seed with the Heun
sampler (:func:`edm2_reference.sampler.edm_sampler`: 32 steps, sigma 0.002..80, rho 7 by
default; ``--churn`` adds EDM stochasticity; ``--gnet`` and ``--guidance`` guide with a
second network) and writes a PNG grid. Networks are built from the preset and loaded
from safetensors or a training checkpoint (any fsspec URL), the latter read with
``torch.load(weights_only=True)``, then frozen: they cannot enter training mode, so
forced weight normalisation can never rewrite the loaded (EMA) weights.

An official EDM2 snapshot pickle (``--net network-snapshot-...pkl``, a local path or any
fsspec URL, read by ranged reads) is built from its own recorded constructor arguments, so
``--preset``, ``--data`` and ``--uncond`` do not apply to it, and loaded through the safe reader
:mod:`phema.pickles` (see :mod:`edm2_reference.official`); only pixel-space (img64,
``StandardRGBEncoder``) snapshots can be sampled: latent (img512) ones need a VAE.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Annotated

import fsspec
import safetensors.torch
import torch
import typer

from edm2_reference import cli
from edm2_reference.data import load_dataset
from edm2_reference.network import Precond
from edm2_reference.official import load_official_network
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

    ``source``: a ``.safetensors`` file (phema snapshot or reconstruction, or a plain
    state dict) or a ``training-state-*.pt`` checkpoint, at any fsspec URL.
    """
    net = build_precond(
        preset,
        label_dim=label_dim,
        img_resolution=img_resolution,
        img_channels=img_channels,
        use_fp16=False,
    )
    data = _read(source)
    try:
        if source.endswith(".pt"):
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            tensors = state["net"] if isinstance(state, dict) and "net" in state else state
        else:
            tensors = safetensors.torch.load(data)
    except Exception as exc:  # not weights: torch.load's and safetensors' own errors
        kind = "a training state (.pt)" if source.endswith(".pt") else "safetensors"
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise NetworkLoadError(
            f"{source} cannot be read as {kind} ({type(exc).__name__}: {first})"
        ) from exc
    if not isinstance(tensors, dict):
        raise NetworkLoadError(f"{source} holds no state dict of tensors")
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


def _read(source: str) -> bytes:
    """The bytes at ``source`` (any fsspec URL); a :class:`NetworkLoadError` naming it if not."""
    try:
        with fsspec.open(source, "rb") as f:
            data: bytes = f.read()
    except FileNotFoundError:
        raise NetworkLoadError(
            f"{source} does not exist; pass a .safetensors file (any URL) or a "
            "training-state-*.pt checkpoint"
        ) from None
    except Exception as exc:  # unknown protocol, permissions, network, credentials
        raise NetworkLoadError(f"cannot read {source}: {type(exc).__name__}: {exc}") from exc
    return data


def _is_pickle(source: str) -> bool:
    return source.split("?", 1)[0].endswith(".pkl")


def _official(source: str, device: torch.device | str) -> Precond:
    """The frozen network of an official snapshot pickle (pixel-space models only)."""
    try:
        return load_official_network(source, device=device, require_rgb=True).net
    except FileNotFoundError:
        raise NetworkLoadError(f"{source} does not exist") from None
    except PhemaError:
        raise
    except OSError as exc:  # permissions, network, credentials
        raise NetworkLoadError(f"cannot read {source}: {type(exc).__name__}: {exc}") from exc


def parse_seeds(text: str) -> list[int]:
    """``"0-3,8"`` -> ``[0, 1, 2, 3, 8]``; ``ValueError`` for anything else."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        seeds.extend(range(int(lo), int(hi) + 1) if hi else [int(lo)])
    return seeds


def _seeds(text: str) -> list[int]:
    try:
        seeds = parse_seeds(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a seed list like 0-63 or 1,5,9") from None
    if not seeds:
        raise typer.BadParameter(f"{text!r} has no seeds (a range runs low-high, e.g. 0-63)")
    return seeds


_DEVICE = cli.default_device()  # --device's default, read once at import

app = cli.new_app()


@app.command(epilog=cli.EPILOG)
def command(
    net: Annotated[
        str,
        typer.Option(
            help="Weights to sample from: .safetensors (any URL), a training-state .pt, or an "
            "official EDM2 snapshot .pkl (built from its own recorded arguments).",
            show_default=False,
        ),
    ],
    out: Annotated[str, typer.Option(help="PNG grid to write.", show_default=False)],
    gnet: Annotated[
        str | None,
        typer.Option(help="Guiding network for --guidance (same kinds of source)."),
    ] = None,
    guidance: Annotated[float, cli.number_option("Guidance weight w; 1 is off.")] = 1.0,
    preset: cli.PresetOpt = "digits8",
    data: cli.DataOpt = None,
    uncond: cli.UncondOpt = False,
    class_idx: Annotated[
        int | None,
        cli.count_option(
            0, "Class of every image.", "--class", show_default="a random class per seed"
        ),
    ] = None,
    seeds: Annotated[
        str, typer.Option(help="One image per seed: a range and/or list, e.g. 0-63 or 1,5,9.")
    ] = "0-63",
    steps: Annotated[int, cli.count_option(1, "Sampler steps (2 x steps - 1 calls).")] = 32,
    churn: Annotated[float, cli.number_option("S_churn; 0 is deterministic.", 0.0)] = 0.0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing --out.")
    ] = False,
    scale: Annotated[int, cli.count_option(1, "Pixel upscaling of the grid.")] = 4,
    batch: Annotated[int, cli.count_option(1, "Images per sampler batch (memory).")] = 64,
    device: cli.DeviceOpt = _DEVICE,
) -> None:
    """Sample images from a trained network, a phema snapshot or a phema reconstruction
    (Heun sampler) and write them as one PNG grid, an image per seed.

    The network is built from --preset and the shape and labels of --data, then loaded
    from a .safetensors file (any fsspec URL) or a training-state-*.pt checkpoint. An
    official EDM2 snapshot .pkl is built from its own recorded arguments instead (pixel-space
    models only) and read without executing anything in it.
    """
    seed_list = _seeds(seeds)
    if guidance != 1.0 and not gnet:
        raise typer.BadParameter(
            f"{guidance:g} needs a guiding network: pass --gnet", param_hint="'--guidance'"
        )
    if os.path.exists(out) and not overwrite:
        raise cli.CommandError(f"{out} exists; pass --overwrite to replace it")
    official = {src: _official(src, device) for src in (net, gnet) if src and _is_pickle(src)}
    if net in official:  # an official net brings its own shape and labels
        first = official[net]
        c, h, label_dim = first.img_channels, first.img_resolution, first.label_dim
        whose = f"{net} (label_dim {label_dim})"
    else:
        dataset = load_dataset(data or get_preset(preset).dataset or "digits")
        c, h, _ = dataset.shape
        label_dim = 0 if uncond else dataset.label_dim
        whose = "an unconditional net (--uncond)"
    if class_idx is not None and class_idx >= label_dim:
        why = f"pass 0 to {label_dim - 1}" if label_dim else f"{whose} has no classes"
        raise typer.BadParameter(f"{class_idx} is not a class; {why}", param_hint="'--class'")
    shape = (c, h, h)
    nets = [
        official[src]
        if src in official
        else load_network(
            src, preset, label_dim=label_dim, img_resolution=h, img_channels=c, device=device
        )
        for src in ([net, gnet] if gnet else [net])
    ]
    with cli.progress() as bar:
        task = bar.add_task("sampling", total=len(seed_list))
        images = generate(
            nets[0],
            seed_list,
            shape,
            num_classes=label_dim,
            class_idx=class_idx,
            batch_size=batch,
            gnet=nets[1] if gnet else None,
            device=device,
            progress=lambda n: bar.advance(task, n),
            num_steps=steps,
            guidance=guidance,
            S_churn=churn,
        )
        bar.update(task, completed=len(seed_list))  # the steps' fractions may not add up exactly
    target = os.path.abspath(out)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with atomic_write(target) as f:  # the grid appears whole or not at all
        save_image_grid(images, f, scale=scale, padding=scale)
    typer.echo(f"{len(images)} images -> {out}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m edm2_reference.sample`` (``argv`` default: ``sys.argv[1:]``)."""
    cli.run_app(app, argv, "python -m edm2_reference.sample")


if __name__ == "__main__":
    main()
