"""Official EDM2 snapshot pickles as :class:`~edm2_reference.network.Precond` networks.

An official ``network-snapshot-<kimg>-<std>.pkl`` (or the official reconstruction tool's
``phema-<kimg>-<std>.pkl``) records the network's constructor keyword arguments
(``_init_kwargs``: ``img_resolution``, ``img_channels``, ``label_dim``, ``model_channels``,
``dropout``, ``use_fp16``, ...) next to its tensors. :func:`load_official_network` indexes the
file with :mod:`phema.pickles` (nothing in it is imported or executed; no ``pickle.load``),
builds ``Precond(**init_kwargs)``, reads each tensor by its byte range (exact ranged reads
through a :class:`~phema.store.SnapshotStore` of the file's folder: local, ``s3://``, ``hf://``,
``https://``; a file replaced mid-read is a ``ChangedError``) and loads them with ``load_state_dict(strict=True)``. Constructor
arguments this network does not know are refused by name, before anything is read.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch

from edm2_reference.network import Precond
from phema.errors import PhemaError
from phema.pickles import PersistentObject, PickleIndex, index_snapshot, read_tensor
from phema.store import SnapshotStore

__all__ = [
    "LATENT_ENCODER",
    "RGB_ENCODER",
    "OfficialNetwork",
    "OfficialNetworkError",
    "load_official_network",
    "precond_kwargs",
]

RGB_ENCODER = "StandardRGBEncoder"
"""The pixel-space encoder of the img64 models (``x / 127.5 - 1``); also the default."""
LATENT_ENCODER = "StabilityVAEEncoder"
"""The latent encoder of the img512 models (Stable Diffusion's VAE, not included here)."""

_POSITIONAL = ("img_resolution", "img_channels", "label_dim")
_SEQUENCES = ("channel_mult", "attn_resolutions", "resample_filter")


class OfficialNetworkError(PhemaError, ValueError):
    """An official snapshot that cannot be turned into a :class:`Precond` here."""


@dataclass(frozen=True)
class OfficialNetwork:
    """A loaded official network and what its snapshot says about it.

    Attributes:
        net: The frozen :class:`Precond` with the snapshot's weights (float32 parameters).
        encoder: The encoder's class name (``"StandardRGBEncoder"`` when the file has none).
        init_kwargs: The constructor arguments the network was built with.
        index: The pickle index (tensor byte ranges, bytes read for indexing, ...).
    """

    net: Precond
    encoder: str
    init_kwargs: dict[str, Any]
    index: PickleIndex


def _accepted() -> list[str]:
    params = inspect.signature(Precond.__init__).parameters
    return [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_KEYWORD]


def precond_kwargs(
    init_kwargs: dict[str, Any], init_args: tuple[Any, ...] = (), *, where: str = "snapshot"
) -> dict[str, Any]:
    """``Precond`` keyword arguments from a snapshot's recorded constructor arguments.

    Positional arguments map to ``img_resolution, img_channels, label_dim``; lists become
    tuples. Raises :class:`OfficialNetworkError` naming every argument ``Precond`` does not take
    (and the ones it does), a duplicated or missing required argument, or extra positionals.
    """
    if len(init_args) > len(_POSITIONAL):
        raise OfficialNetworkError(
            f"{where}: {len(init_args)} positional constructor arguments recorded; "
            f"Precond takes at most {len(_POSITIONAL)} ({', '.join(_POSITIONAL)})"
        )
    kwargs = dict(init_kwargs)
    for name, value in zip(_POSITIONAL, init_args, strict=False):
        if name in kwargs:
            raise OfficialNetworkError(f"{where}: {name} recorded both by position and by name")
        kwargs[name] = value
    accepted = _accepted()
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise OfficialNetworkError(
            f"{where}: the network was built with constructor argument(s) this Precond does not "
            f"know: {', '.join(unknown)}; known: {', '.join(accepted)}"
        )
    missing = [n for n in _POSITIONAL if n not in kwargs]
    if missing:
        raise OfficialNetworkError(f"{where}: no {', '.join(missing)} recorded for the network")
    for name in _SEQUENCES:
        if isinstance(kwargs.get(name), list):
            kwargs[name] = tuple(kwargs[name])
    return kwargs


def _encoder(index: PickleIndex, where: str) -> str:
    enc = index.extras.get("encoder")
    if enc is None:  # the official sampler's default
        return RGB_ENCODER
    if not isinstance(enc, PersistentObject):
        raise OfficialNetworkError(f"{where}: its encoder is not a persistent object record")
    return enc.class_name


def load_official_network(
    source: str,
    *,
    device: torch.device | str = "cpu",
    require_rgb: bool = False,
) -> OfficialNetwork:
    """Build and load the ``Precond`` of an official snapshot pickle at ``source``.

    ``source`` is a local path or any fsspec URL; the file is read by positioned (ranged)
    reads: the pickle structure for the index, then each tensor's bytes once. With
    ``require_rgb``, a latent model (``StabilityVAEEncoder``) or any other non-RGB encoder is
    refused before the tensors are read.

    Raises:
        OfficialNetworkError: Unknown constructor arguments, a class other than ``Precond``,
            a non-RGB encoder under ``require_rgb``, or tensors that do not fit.
        phema.errors.PickleError: The file is not a well-formed official snapshot.
    """
    folder, sep, name = source.rstrip("/").rpartition("/")
    store = SnapshotStore(folder if sep else ".")
    path = f"{store.backend.pin(store.root).rstrip('/')}/{name}"  # a Hub commit, pinned
    size, identity = store.backend.identity_of(path)

    def read_at(offset: int, n: int) -> bytes:  # from the version indexed, or ChangedError
        return store.read_range(path, offset, offset + n, identity)

    index = index_snapshot(read_at, size, source)
    if index.class_name != "Precond":
        raise OfficialNetworkError(
            f"{source}: its network is a {index.class_name!r}, not an EDM2 Precond"
        )
    encoder = _encoder(index, source)
    if require_rgb and encoder != RGB_ENCODER:
        why = (
            "a latent model: decoding its samples needs the Stable Diffusion VAE "
            "(stabilityai/sd-vae-ft-mse), which edm2_reference does not include"
            if encoder == LATENT_ENCODER
            else "an encoder edm2_reference does not know"
        )
        raise OfficialNetworkError(f"{source}: its encoder is {encoder} ({why})")
    kwargs = precond_kwargs(index.init_kwargs, index.init_args, where=source)
    # names and shapes first, on the meta device (no memory): file-supplied sizes
    # (model_channels=10**6) must not reach the allocator before they are checked
    _check_fit(_build(kwargs, source, torch.device("meta")), index, source)
    net = _build(kwargs, source, None)
    state = {key: read_tensor(read_at, t) for key, t in index.tensors.items()}
    net.load_state_dict(state, strict=True)
    return OfficialNetwork(net.to(device).freeze(), encoder, kwargs, index)


def _build(kwargs: dict[str, Any], where: str, device: torch.device | None) -> Precond:
    """``Precond(**kwargs)`` (on ``device``, else the default), its failures as our error."""
    try:
        if device is None:
            return Precond(**kwargs)
        with device:
            return Precond(**kwargs)
    except (TypeError, ValueError, RuntimeError, MemoryError) as exc:
        raise OfficialNetworkError(
            f"{where}: Precond({kwargs}) fails: {type(exc).__name__}: {exc}".split("\n")[0]
        ) from None


def _check_fit(net: Precond, index: PickleIndex, where: str) -> None:
    """Refuse, before reading any tensor, names or shapes that differ from ``net``'s."""
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    have = {k: t.shape for k, t in index.tensors.items()}
    problems: list[str] = []

    def show(items: list[str]) -> str:
        return ", ".join(items[:5]) + (" ..." if len(items) > 5 else "")

    if missing := sorted(set(want) - set(have)):
        problems.append(f"missing {len(missing)}: {show(missing)}")
    if extra := sorted(set(have) - set(want)):
        problems.append(f"unexpected {len(extra)}: {show(extra)}")
    if shapes := [f"{k} {have[k]} != {want[k]}" for k in want if k in have and have[k] != want[k]]:
        problems.append(f"shape mismatches {len(shapes)}: {show(shapes)}")
    if problems:
        raise OfficialNetworkError(
            f"{where}: its tensors do not fit Precond(**init_kwargs): {'; '.join(problems)}"
        )
