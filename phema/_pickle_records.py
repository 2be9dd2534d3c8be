"""The allowlist of pickle globals, and the data-only records that stand in for what they build.

:data:`ALLOWED` maps each global an official EDM2 snapshot uses to a marker kind (a
:class:`Global` on the VM's stack); :data:`STORAGE_TYPES` are the storage classes allowed
inside a nested storage blob. The records hold what the real call would have been given,
and nothing here runs or imports anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_NP1, _NP2 = "numpy.core.", "numpy._core."
ALLOWED: dict[tuple[str, str], str] = {
    ("dnnlib.util", "EasyDict"): "easydict",
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): "persistent",
    ("torch.nn.modules.container", "ModuleDict"): "moduledict",
    ("collections", "OrderedDict"): "ordereddict",
    ("torch._utils", "_rebuild_parameter"): "parameter",
    ("torch._utils", "_rebuild_parameter_with_state"): "parameter",
    ("torch._utils", "_rebuild_tensor_v2"): "tensor",
    ("torch.storage", "_load_from_bytes"): "storage",
    ("numpy", "ndarray"): "ndarray",
    ("numpy", "dtype"): "dtype",
    **{(p + "multiarray", "_reconstruct"): "np_reconstruct" for p in (_NP1, _NP2)},
    **{(p + "numeric", "_frombuffer"): "np_frombuffer" for p in (_NP1, _NP2)},
}
#: Storage classes allowed inside a nested storage blob: name -> (dtype name, item size).
STORAGE_TYPES = {
    "HalfStorage": ("float16", 2),
    "BFloat16Storage": ("bfloat16", 2),
    "FloatStorage": ("float32", 4),
    "DoubleStorage": ("float64", 8),
}
#: numpy dtypes allowed (plain number types), as ``numpy.dtype`` pickles their names.
NP_DTYPES = {"b1", "i1", "u1", "i2", "u2", "i4", "u4", "i8", "u8", "f2", "f4", "f8", "c8", "c16"}


@dataclass(frozen=True)
class Global:
    kind: str  # a value of ALLOWED, or "storage_type"
    name: str
    dtype: str = ""
    itemsize: int = 0


class EasyDict(dict[Any, Any]):
    """Stand-in for ``dnnlib.util.EasyDict``: a plain dict."""


@dataclass(eq=False)
class ModuleObject:
    """A torch module rebuilt from NEWOBJ + BUILD (``ModuleDict``): its class and ``__dict__``."""

    class_name: str
    state: dict[Any, Any] | None = None


@dataclass(eq=False)
class PersistentObject:
    """What ``_reconstruct_persistent_obj(meta)`` would have built, never built: the record."""

    class_name: str
    state: dict[Any, Any]
    module_sha256: str


@dataclass(eq=False)
class Storage:
    """One torch storage: element type and where its raw data lies in the file."""

    dtype: str
    itemsize: int
    numel: int
    offset: int


@dataclass(eq=False)
class TensorRef:
    storage: Storage
    storage_offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    parameter: bool = False


@dataclass(eq=False)
class DType:
    spec: str
    byteorder: str = "="


@dataclass(eq=False)
class NumpyArray:
    """A numpy array; ``array`` is filled by BUILD (``_reconstruct``) or at once (``_frombuffer``)."""

    array: np.ndarray[Any, Any] | None = None


@dataclass(eq=False)
class StorageRef:
    """The persistent id of a legacy storage blob: ``('storage', type, key, location, numel, None)``."""

    dtype: str
    itemsize: int
    key: str
    numel: int
