"""Exceptions and warnings raised by phema.

Every error derives from :class:`PhemaError` *and* from the builtin a caller would
catch anyway (``ValueError``, ``RuntimeError``), so ``except ValueError`` keeps
working for code that does not know about phema.
"""

from __future__ import annotations

__all__ = [
    "ChangedError",
    "ExistsError",
    "FormatError",
    "IllPosedWarning",
    "NonFiniteError",
    "OptionError",
    "PhemaError",
    "PickleError",
    "ProfileError",
    "SolverError",
    "StateError",
    "StorageError",
    "TrackingError",
]


class PhemaError(Exception):
    """Base class of every error raised by phema."""


class OptionError(PhemaError, ValueError):
    """An option of a phema call is out of its range (window size, reads in flight...)."""


class ProfileError(PhemaError, ValueError):
    """A profile parameter (std, gamma, time, half-life) is out of its valid range."""


class SolverError(PhemaError, ValueError):
    """A reconstruction request cannot be solved (no usable snapshot, duplicates, singular)."""


class TrackingError(PhemaError, RuntimeError):
    """``PowerFunctionEMA`` was used inconsistently (time going back, a parameter moved)."""


class StateError(PhemaError, ValueError):
    """A saved EMA state does not match the tracker it is loaded into."""


class FormatError(PhemaError, ValueError):
    """A snapshot file is not a valid safetensors file of the expected layout."""


class PickleError(FormatError):
    """An EDM2 snapshot pickle is malformed or holds something the safe reader refuses.

    The message names the file, the byte offset and the problem (an opcode, a global
    off the allowlist, a length past the end of the file...).
    """


class NonFiniteError(PhemaError, ValueError):
    """A snapshot holds NaN or infinite values, so a reconstruction from it would too."""


class StorageError(PhemaError, OSError):
    """A store cannot be read or written (missing URL, permissions, mixed layouts)."""


class ExistsError(StorageError, FileExistsError):
    """A file that is never overwritten without being asked is already in the store."""


class ChangedError(StorageError):
    """A stored file changed between the moment it was listed and the moment it was read."""


class IllPosedWarning(UserWarning):
    """A reconstruction request is solvable but poorly posed; the message gives the fit quality."""
