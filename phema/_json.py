"""Strict JSON for everything phema reads from a file: headers and metadata values.

A file in a store may come from anyone, so its JSON is held to what phema itself
writes and to what the safetensors reference parser accepts, and never crashes
the reader with anything but :class:`~phema.errors.FormatError`:

* no duplicate object keys (Python's ``json`` keeps the last one silently);
* no ``NaN``/``Infinity`` and no number that overflows a float (``1e400``);
* an integer too long for Python's int-digits limit, or nesting deep enough to
  exhaust the parser's recursion, is an invalid file (not a ``ValueError`` or a
  ``RecursionError``);
* every string encodable as UTF-8 (a lone surrogate such as ``"\\ud800"`` is not).

Parsing stays linear: the only Python-level hook runs once per object (the
duplicate check), and strings are checked for surrogates only when the text
holds an escape that could make one.

The helpers :func:`uint`, :func:`finite` and :func:`text` check the type of one
parsed value exactly (``true`` is not an integer, ``24.7`` and ``"3"`` are not
either), naming the value in the error.
"""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any, TypeGuard

from phema.errors import FormatError

#: A ``\\uXXXX`` escape of a UTF-16 surrogate: the only way JSON text spells one.
_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")


class _Bad(Exception):
    """Raised inside the decoder's hooks; turned into a FormatError by :func:`loads`."""


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _Bad(f"duplicate key {short(key)}")
            seen.add(key)
    return out


def _float(spelled: str) -> float:
    value = float(spelled)
    if not math.isfinite(value):
        raise _Bad(f"number {spelled[:24]!r} overflows a float")
    return value


def _constant(name: str) -> float:
    raise _Bad(f"{name} is not a valid JSON number")


_DECODER = json.JSONDecoder(object_pairs_hook=_pairs, parse_float=_float, parse_constant=_constant)


def _check_strings(value: Any) -> None:
    """Encode every string of a parsed value as UTF-8 (no recursion: any depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # UnicodeEncodeError on a lone surrogate
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def loads(data: str | bytes, where: str) -> Any:
    """Parse ``data`` strictly (module docstring); errors name ``where``.

    Raises:
        FormatError: ``"<where> is not valid JSON (<why>)"``.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        value, end = _DECODER.raw_decode(text, _skip_space(text, 0))
        if _skip_space(text, end) != len(text):
            raise _Bad(f"extra data at character {end}")
        if _SURROGATE.search(text):
            _check_strings(value)
    except _Bad as exc:
        raise FormatError(f"{where} is not valid JSON ({exc})") from None
    except RecursionError:
        raise FormatError(f"{where} is not valid JSON (nested too deeply)") from None
    except (UnicodeDecodeError, UnicodeEncodeError) as exc:
        raise FormatError(f"{where} is not valid UTF-8 JSON ({exc.reason})") from None
    except ValueError as exc:  # json.JSONDecodeError, or an integer past the digits limit
        why = "an integer has too many digits" if "integer string" in str(exc) else str(exc)
        raise FormatError(f"{where} is not valid JSON ({why})") from None
    return value


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\n\r":
        pos += 1
    return pos


def short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters for an error message."""
    if isinstance(value, str | bytes) and len(value) > limit:
        value = value[:limit]
        return repr(value) + "..."
    spelled = repr(value) if not isinstance(value, list | dict) or len(value) < 16 else ""
    if not spelled:
        return f"<{type(value).__name__} of {len(value)} items>"
    return spelled if len(spelled) <= limit else spelled[:limit] + "..."


#: Integers in headers (sizes, offsets, dims) are below this, as in safetensors (u64).
UINT_LIMIT = 1 << 64


def is_uint(value: object) -> TypeGuard[int]:
    """Whether ``value`` is an integer (not a bool) in ``[0, 2**64)``."""
    return type(value) is int and 0 <= value < UINT_LIMIT


def uint(value: Any, where: str) -> int:
    """``value`` if it is an integer (not a bool) in ``[0, 2**64)``."""
    if not is_uint(value):
        raise FormatError(f"{where} must be an integer in [0, 2**64), got {short(value)}")
    return value


def finite(value: Any, where: str) -> float:
    """``value`` as a float if it is a finite JSON number (not a bool)."""
    big = type(value) is int and abs(value) > sys.float_info.max
    if type(value) not in (int, float) or big or not math.isfinite(value):
        raise FormatError(f"{where} must be a finite number, got {short(value)}")
    return float(value)


def text(value: Any, where: str) -> str:
    """``value`` if it is a string."""
    if not isinstance(value, str):
        raise FormatError(f"{where} must be a string, got {short(value)}")
    return value


def obj(value: Any, where: str) -> dict[str, Any]:
    """``value`` if it is a JSON object."""
    if not isinstance(value, dict):
        raise FormatError(f"{where} must be a JSON object, got {type(value).__name__}")
    return value


def array(value: Any, where: str) -> list[Any]:
    """``value`` if it is a JSON array."""
    if not isinstance(value, list):
        raise FormatError(f"{where} must be a JSON array, got {type(value).__name__}")
    return value
