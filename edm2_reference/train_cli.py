"""The command line of ``python -m edm2_reference.train``: flags, help, ``parse_args``, ``main``.

It owns the typer command (option declarations, help texts, the parsers of image counts and
EMA stds), turns the flags into a :class:`~edm2_reference.train.TrainSettings`, checks the
batch flags against ``torchrun``'s process count, and runs
:func:`~edm2_reference.train.train`, printing the summary on stdout (rank 0). The training
loop is :mod:`edm2_reference.train`, whose ``main`` and ``parse_args`` call the ones here.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Annotated, Any, Literal

import torch
import torch.distributed as dist
import typer

from edm2_reference import cli
from edm2_reference.data import HELD_OUT_FRACTION
from edm2_reference.train import TrainSettings, train
from phema.errors import PhemaError
from phema.profiles import sigma_rel_to_gamma

__all__ = ["app", "main", "parse_args"]


_UNITS = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 1000, "M": 10**6}


def _images(text: str) -> int:
    """``"160Ki"`` -> 163840, ``"2Mi"``, ``"5000"``; ``ValueError`` otherwise."""
    for suffix, scale in _UNITS.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * scale)
    return int(text)


def _image_count(lo: int) -> Callable[[str], int]:
    """A flag parser of image counts (``5000``, ``160Ki``, ``2Mi``) ``>= lo``."""

    def parse(text: str) -> int:
        try:
            value = _images(str(text).strip())
        except (ValueError, OverflowError):
            raise typer.BadParameter(
                f"{text!r} is not an image count like 5000, 160Ki or 2Mi"
            ) from None
        if value < lo:
            raise typer.BadParameter(f"{text!r} is too small; pass {lo} or more")
        return value

    return parse


def _held_out(text: str) -> float:
    """``"0.5"`` -> 0.5: a fraction in [0, 1) of the data kept out of training."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value < 1.0:
        raise typer.BadParameter(f"{text!r} is not a fraction in [0, 1); pass e.g. 0.5 or 0")
    return value


def _stds(text: str) -> tuple[float, ...]:
    """``"0.05,0.1"`` -> ``(0.05, 0.1)``: distinct relative stds that phema can track."""
    try:
        stds = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    if not stds:
        raise typer.BadParameter(f"{text!r}: give at least one std, e.g. 0.05,0.1")
    if len(set(stds)) != len(stds):
        raise typer.BadParameter(f"{text!r}: the stds repeat")
    try:
        sigma_rel_to_gamma(stds)
    except PhemaError as exc:
        raise typer.BadParameter(f"{text!r}: {exc}") from None
    return stds


_PRESETS_VALUE = "the preset's"


def _images_option(lo: int, help: str, **kwargs: Any) -> Any:
    """A ``typer.Option`` of image counts ``>= lo`` (:func:`_image_count`)."""
    return typer.Option(parser=_image_count(lo), metavar="<images>", help=help, **kwargs)


app = cli.new_app()


@app.command(epilog=cli.EPILOG)
def command(
    ctx: typer.Context,
    preset: cli.PresetOpt = "digits8",
    data: cli.DataOpt = None,
    outdir: Annotated[
        str, typer.Option(help="Checkpoints and stats.jsonl; a rerun resumes from here.")
    ] = "runs/edm2",
    snapshots: Annotated[
        str | None,
        typer.Option(
            help="phema store URL for the EMA snapshots (s3://, hf://, ...).",
            show_default="OUTDIR/snapshots",
        ),
    ] = None,
    uncond: cli.UncondOpt = False,
    seed: Annotated[int, cli.count_option(0, "Seed of everything.")] = 0,
    batch: Annotated[
        int | None,
        cli.count_option(1, "Total batch over all processes.", show_default=_PRESETS_VALUE),
    ] = None,
    batch_gpu: Annotated[
        int | None,
        cli.count_option(
            1,
            "Per-process images per round (gradient accumulation).",
            show_default="the per-process batch",
        ),
    ] = None,
    duration: Annotated[
        int | None, _images_option(1, "Images to train on.", show_default=_PRESETS_VALUE)
    ] = None,
    lr: Annotated[
        float | None,
        cli.number_option("Reference learning rate.", 0.0, show_default=_PRESETS_VALUE),
    ] = None,
    rampup: Annotated[
        int | None,
        _images_option(0, "Linear learning-rate warm-up.", show_default=_PRESETS_VALUE),
    ] = None,
    decay_batches: Annotated[
        int | None,
        cli.count_option(
            1,
            "Batches before the inverse-square-root decay starts.",
            show_default=_PRESETS_VALUE,
        ),
    ] = None,
    snapshot: Annotated[
        int | None,
        _images_option(1, "Images between EMA snapshots.", show_default=_PRESETS_VALUE),
    ] = None,
    checkpoint: Annotated[
        int | None,
        _images_option(1, "Images between checkpoints.", show_default=_PRESETS_VALUE),
    ] = None,
    status: Annotated[
        int | None,
        _images_option(1, "Images between status lines.", show_default=_PRESETS_VALUE),
    ] = None,
    ema_stds: Annotated[
        str | None,
        typer.Option(
            help="Relative stds of the tracked EMA profiles, e.g. 0.05,0.1.",
            show_default=_PRESETS_VALUE,
        ),
    ] = None,
    snapshot_dtype: Annotated[
        Literal["float32", "float16", "bfloat16"], typer.Option(help="Dtype of snapshot files.")
    ] = "float32",
    device: Annotated[
        str | None, cli.device_option(show_default="cuda if present, else cpu")
    ] = None,
    precision: Annotated[
        Literal["auto", "fp32", "bf16"],
        typer.Option(help="auto: the preset's fp16 trunk on CUDA, fp32 elsewhere."),
    ] = "auto",
    stop_at: Annotated[
        int | None, _images_option(1, "End this invocation at this image count (resume later).")
    ] = None,
    fsdp: Annotated[
        bool,
        typer.Option(
            "--fsdp",
            help="Shard the network with FSDP2 instead of DDP (torchrun, several processes).",
        ),
    ] = False,
    held_out: Annotated[
        float,
        typer.Option(
            "--held-out",
            help="Share of the data kept out of training (a seeded split) for "
            "edm2_reference.evaluate to compare samples with; 0 trains on everything.",
            parser=lambda text: _held_out(text),
            metavar="FRACTION",
        ),
    ] = HELD_OUT_FRACTION,
) -> None:
    """Train EDM2 Config G with phema streaming post-hoc EMA snapshots; resumable (rerun the
    same command), and runs under torchrun --nproc_per_node=N with the same maths for any
    process count.

    Times are counted in images (5000, 160Ki = 160 x 1024, 2Mi). Unset hyper-parameters take
    the preset's values. A progress bar with images/s and ETA and a status line every
    --status images go to stderr; the summary goes to stdout.
    """
    settings = _settings(ctx.params)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    _check_batch(settings, world_size)
    if world_size > 1 and not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    result = train(settings, show_progress=True)
    if int(os.environ.get("RANK", "0")) == 0:
        store = settings.snapshots or os.path.join(settings.outdir, "snapshots")
        typer.echo(
            f"done at {result.nimg:,} images: {len(result.snapshots)} snapshot files "
            f"written to {store}, checkpoints and stats.jsonl in {settings.outdir}"
        )


def _settings(params: dict[str, Any]) -> TrainSettings:
    """Parsed flags -> :class:`TrainSettings`."""
    stds = params["ema_stds"]
    return TrainSettings(
        preset=params["preset"],
        data=params["data"],
        outdir=params["outdir"],
        snapshots=params["snapshots"],
        cond=not params["uncond"],
        seed=params["seed"],
        batch=params["batch"],
        batch_gpu=params["batch_gpu"],
        duration=params["duration"],
        lr=params["lr"],
        rampup=params["rampup"],
        decay_batches=params["decay_batches"],
        snapshot=params["snapshot"],
        checkpoint=params["checkpoint"],
        status=params["status"],
        ema_stds=_stds(stds) if stds is not None else None,
        snapshot_dtype=params["snapshot_dtype"],
        device=params["device"],
        precision=params["precision"],
        stop_at=params["stop_at"],
        fsdp=params["fsdp"],
        held_out=params["held_out"],
    )


def _check_batch(settings: TrainSettings, world_size: int) -> None:
    """The batch flags against the process count: ``typer.BadParameter`` (exit 2) if off."""
    total = settings.training().batch_size
    if total % world_size:
        raise typer.BadParameter(
            f"{total} is not divisible by the {world_size} processes; pass a multiple",
            param_hint="'--batch'",
        )
    per_rank = total // world_size
    if settings.batch_gpu is not None and per_rank % min(settings.batch_gpu, per_rank):
        raise typer.BadParameter(
            f"{settings.batch_gpu} does not divide the per-process batch {per_rank}",
            param_hint="'--batch-gpu'",
        )


def parse_args(argv: Sequence[str] | None = None) -> TrainSettings:
    """Command-line flags -> :class:`TrainSettings` (``typer.BadParameter`` on bad values)."""
    command_ = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    with command_.make_context("python -m edm2_reference.train", args) as ctx:
        return _settings(ctx.params)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``python -m edm2_reference.train`` (``argv`` default: ``sys.argv[1:]``)."""
    try:
        cli.run_app(app, argv, "python -m edm2_reference.train")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
