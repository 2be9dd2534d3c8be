"""Checked reading of the ``phema.*`` metadata of listed files (snapshots and outputs).

A value that a later step would trip over is refused here, naming the file and the
key, so that listing, planning and reconstruction never fail on it anonymously:

* ``phema.t`` finite and ``>= 0`` (0 holds the initial weights; an output's ``t`` is
  ``> 0``); ``phema.std`` in ``[1e-100, sqrt(1/12)]``;
* ``phema.gamma`` finite, ``>= 0``, and the exponent of ``phema.std``: phema writes
  both from one value and their round trip is exact to a few ulp, so a relative
  difference above :data:`GAMMA_RTOL` means a file that was edited or written by a
  tool that disagrees about the profile;
* ``phema.step`` empty or a non-negative integer; ``phema.t_unit`` a short string;
* ``phema.copied`` a JSON list of distinct names of the file's tensors;
* an output's ``phema.coefficients`` (file name -> finite number) and ``phema.fit``
  (finite ``rel_error``, ``l1_norm``, ``condition``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from typing import Any

from phema import _json
from phema.errors import FormatError
from phema.profiles import STD_MAX, STD_MIN, sigma_rel_to_gamma

#: Largest relative difference between ``phema.gamma`` and the exponent of ``phema.std``.
GAMMA_RTOL = 1e-9
#: Longest ``phema.t_unit``.
MAX_UNIT = 64
_HEX16 = re.compile(r"[0-9a-f]{16}")
_FIT_KEYS = ("rel_error", "l1_norm", "condition")


def gamma_disagrees(std: float, gamma: float) -> float | None:
    """The exponent of ``std`` if ``gamma`` is not it (within :data:`GAMMA_RTOL`), else None."""
    expected = float(sigma_rel_to_gamma(std))
    ok = gamma >= 0 and abs(gamma - expected) <= GAMMA_RTOL * max(expected, 1.0)
    return None if ok else expected


def _get(meta: Mapping[str, str], key: str, source: str) -> str:
    try:
        return meta[key]
    except KeyError:
        raise FormatError(
            f"{source}: metadata {key} is missing; not a complete phema file"
        ) from None


def _number(meta: Mapping[str, str], key: str, source: str) -> float:
    text = _get(meta, key, source)
    try:
        value = float(text) if len(text) <= 64 else math.nan
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise FormatError(f"{source}: metadata {key}={_json.short(text)} is not a finite number")
    return value


def _time(meta: Mapping[str, str], source: str, *, positive: bool) -> float:
    t = _number(meta, "phema.t", source)
    if t < 0 or (positive and t == 0):
        need = "> 0" if positive else ">= 0"
        raise FormatError(f"{source}: metadata phema.t={t!r} must be {need}")
    return t


def _std(meta: Mapping[str, str], source: str) -> float:
    std = _number(meta, "phema.std", source)
    if not STD_MIN <= std <= STD_MAX:
        raise FormatError(
            f"{source}: metadata phema.std={std!r} is outside [{STD_MIN:g}, {STD_MAX:.6f}]: "
            "not a power-function profile's relative std"
        )
    return std


def _unit(meta: Mapping[str, str], source: str) -> str:
    unit = _get(meta, "phema.t_unit", source)
    if len(unit) > MAX_UNIT or not unit.isprintable():
        raise FormatError(
            f"{source}: metadata phema.t_unit={_json.short(unit)} is not a short printable name"
        )
    return unit


def _layout(meta: Mapping[str, str], source: str) -> str:
    layout = _get(meta, "phema.layout", source)
    if not _HEX16.fullmatch(layout):
        raise FormatError(
            f"{source}: metadata phema.layout={_json.short(layout)} is not a 16-digit hex hash"
        )
    return layout


def snapshot_fields(meta: Mapping[str, str], source: str, names: Collection[str]) -> dict[str, Any]:
    """``t, std, gamma, t_unit, step, layout, copied`` of a snapshot, checked.

    ``names`` are the snapshot's tensor names (``copied`` must name some of them).
    """
    std = _std(meta, source)
    gamma = _number(meta, "phema.gamma", source)
    expected = gamma_disagrees(std, gamma)
    if expected is not None:
        raise FormatError(
            f"{source}: metadata phema.gamma={gamma!r} disagrees with phema.std={std!r} "
            f"(whose exponent is {expected!r}); the file was edited or written by another tool"
        )
    step_text = _get(meta, "phema.step", source)
    if step_text and not (step_text.isdigit() and step_text.isascii() and len(step_text) <= 19):
        raise FormatError(
            f"{source}: metadata phema.step={_json.short(step_text)} is not a non-negative integer"
        )
    copied = _json.array(
        _json.loads(_get(meta, "phema.copied", source), f"{source}: metadata phema.copied"),
        f"{source}: metadata phema.copied",
    )
    for name in copied:
        if not isinstance(name, str) or name not in names:
            raise FormatError(
                f"{source}: metadata phema.copied names {_json.short(name)}, which is not a "
                "tensor of the file"
            )
    if len(set(copied)) != len(copied):
        raise FormatError(f"{source}: metadata phema.copied repeats a name")
    return {
        "t": _time(meta, source, positive=False),
        "std": std,
        "gamma": gamma,
        "t_unit": _unit(meta, source),
        "step": int(step_text) if step_text else None,
        "layout": _layout(meta, source),
        "copied": tuple(copied),
    }


def output_fields(meta: Mapping[str, str], source: str) -> dict[str, Any]:
    """``t, std, t_unit, coefficients, fit`` of an output of :func:`phema.reconstruct`, checked."""
    where = f"{source}: metadata phema.coefficients"
    coefs = _json.obj(_json.loads(_get(meta, "phema.coefficients", source), where), where)
    coefficients = {
        name: _json.finite(c, f"{where}[{_json.short(name)}]") for name, c in coefs.items()
    }
    where = f"{source}: metadata phema.fit"
    fit = _json.obj(_json.loads(_get(meta, "phema.fit", source), where), where)
    for key in _FIT_KEYS:
        if key not in fit:
            raise FormatError(f"{where} lacks {key}")
    return {
        "t": _time(meta, source, positive=True),
        "std": _std(meta, source),
        "t_unit": _unit(meta, source),
        "coefficients": coefficients,
        "fit": {k: _json.finite(fit[k], f"{where}[{k!r}]") for k in _FIT_KEYS},
    }
