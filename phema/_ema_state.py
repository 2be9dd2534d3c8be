"""Checks that a saved ``PowerFunctionEMA`` state fits the EMA it is loaded into.

A state holds, per averaged tensor, its ``K`` shadows stacked as ``[K, *shape]``:
a plain tensor (unsharded EMA) or a DTensor sharded on dim 1 (sharded or
partitioned EMA). Loading takes this process's rows ``[r0, r1)`` of dim 1 from a
plain tensor, or the local part of a DTensor laid out as this EMA's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from phema._tracked import Piece, is_dtensor, shard_placements
from phema.errors import StateError

__all__ = ["STATE_FORMAT", "STATE_VERSION", "check_header", "check_names", "local_rows"]

STATE_FORMAT = "phema.PowerFunctionEMA"
STATE_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def check_header(state: Mapping[str, Any], stds: tuple[float, ...], buffers: str) -> None:
    """Format, version, stds and buffer policy of ``state`` against the EMA's."""
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise StateError(
            f"not a PowerFunctionEMA state (format={state.get('format')!r}, "
            f"version={state.get('version')!r}); expected {STATE_FORMAT!r} v{STATE_VERSION}"
        )
    saved = tuple(float(s) for s in state["stds"])
    if saved != stds:
        raise StateError(
            f"saved stds {saved} differ from this EMA's {stds}; "
            "construct PowerFunctionEMA with the saved stds"
        )
    if state["buffers"] != buffers:
        raise StateError(f"saved buffer policy {state['buffers']!r} differs from {buffers!r}")


def local_rows(name: str, value: Tensor, piece: Piece, k: int, dtype: torch.dtype) -> Tensor:
    """This process's rows of a saved shadow ``[k, *shape]`` of ``piece``, checked."""
    saved: Any = value
    if is_dtensor(saved):
        if piece.kind == "full" or tuple(saved.placements) != shard_placements(piece, 1):
            raise StateError(
                f"saved shadow {name!r} is sharded as {tuple(saved.placements)}, which "
                "does not match this EMA; load it with torch.distributed.checkpoint into "
                "this EMA's state_dict() first"
            )
        local: Tensor = saved.to_local()
    else:
        whole = piece.kind == "full" or not piece.shape  # a 0-d tensor is held whole
        local = value if whole else value[:, piece.r0 : piece.r1]
    got, want = tuple(value.shape), (k, *piece.shape)
    if got != want or value.dtype != dtype or tuple(local.shape) != (k, *piece.local_shape):
        raise StateError(f"saved shadow {name!r} is {value.dtype} {got}, expected {dtype} {want}")
    return local


def check_names(saved: set[str], expected: set[str]) -> None:
    if saved == expected:
        return
    missing = sorted(expected - saved)
    unexpected = sorted(saved - expected)
    hint = ""
    stripped = {n.split(".", 1)[1] if n.startswith(_WRAPPER_PREFIXES) else n for n in saved}
    if stripped == expected:
        hint = "; the saved names carry a DDP/compile prefix: save from an unwrapped module"
    raise StateError(
        f"saved EMA state does not match the module: missing {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        f"{' ...' if len(unexpected) > 5 else ''}{hint}"
    )
