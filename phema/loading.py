"""Load a reconstruction (or a snapshot) back: the tensors, or straight into a model.

An output of :func:`phema.reconstruct` is a safetensors file whose tensor names are
the model's ``state_dict`` names (DDP and ``torch.compile`` prefixes never appear),
so it loads ``strict=True`` into the model it was tracked on::

    phema.load("runs/exp1-ema/phema-ema-000000100000-0.1000.safetensors", model)

Any fsspec URL works (``s3://``, ``hf://``, ``memory://``). The file is read once
(sharded outputs: every shard checked against the manifest first) and each tensor is
cast to the dtype of the model's tensor it replaces.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from phema.errors import FormatError
from phema.store import SnapshotStore
from phema.tracking import unwrap_module

__all__ = ["load"]


def load(
    url: str, module: nn.Module | None = None, *, strict: bool = True, **storage_options: Any
) -> dict[str, Tensor]:
    """Tensors of one phema file; loaded into ``module`` too when one is given.

    Args:
        url: A reconstruction output or snapshot (``.safetensors``; a sharded one by
            its manifest's name), local path or fsspec URL.
        module: A model to load the tensors into (wrappers are unwrapped). A module
            sharded with FSDP2 needs ``set_model_state_dict`` instead.
        strict: Passed to ``load_state_dict``: every key must match.
        **storage_options: Passed to fsspec (e.g. S3 credentials).

    Returns:
        ``{name: tensor}`` as stored (float16/32 as reconstructed; copied buffers as is).

    Raises:
        StorageError: If the file cannot be read. FormatError: If it is not a phema file
            or its names do not fit ``module`` (missing or unexpected keys named).
    """
    folder, sep, name = url.rstrip("/").rpartition("/")
    store = SnapshotStore(folder if sep else ".", **storage_options)
    tensors = store.load(store.info(name))
    if module is not None:
        target = unwrap_module(module)
        try:
            target.load_state_dict(tensors, strict=strict)
        except RuntimeError as exc:
            expected = set(target.state_dict())
            missing = sorted(expected - set(tensors))
            extra = sorted(set(tensors) - expected)
            sizes = [
                ln.strip().rstrip(".") for ln in str(exc).splitlines() if "size mismatch" in ln
            ]
            parts = []
            if missing:
                parts.append(f"missing {len(missing)} keys, e.g. {missing[:3]}")
            if extra:
                parts.append(f"{len(extra)} unexpected keys, e.g. {extra[:3]}")
            if sizes:
                parts.append(f"{len(sizes)} of other shapes, e.g. {sizes[0]}")
            hint = (
                "strict=False loads the matching keys only"
                if (missing or extra) and not sizes
                else "a file of another model or another configuration"
            )
            detail = "; ".join(parts) or str(exc).splitlines()[0]
            raise FormatError(
                f"{url} does not fit {type(target).__name__}: {detail}. Was it made from this "
                f"model? ({hint})"
            ) from exc
    return tensors
