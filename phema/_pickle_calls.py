"""What the allowed globals build: REDUCE, NEWOBJ, BUILD and BINPERSID on their markers.

:class:`SnapshotVM` is the VM that reads an EDM2 snapshot: a global of the allowlist
(:mod:`phema._pickle_records`) becomes a :class:`Global` marker, and a call on a marker
checks its arguments and returns one of the data-only records, never calling anything.
``_load_from_bytes(blob)`` runs nested VMs over the blob's header only (fetched in growing
pieces) and records where the storage's raw data lies; numpy arrays are read whole.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from typing import Any, TypeGuard

import numpy as np

from phema._pickle_io import FileBytes, FileSource, MemSource, NeedMore
from phema._pickle_records import (
    ALLOWED,
    NP_DTYPES,
    STORAGE_TYPES,
    DType,
    EasyDict,
    Global,
    ModuleObject,
    NumpyArray,
    PersistentObject,
    Storage,
    StorageRef,
    TensorRef,
)
from phema._pickle_vm import MAX_TEXT, VM, short
from phema.errors import PickleError

BLOB_HEADER_MAX = 1 << 16
STORAGE_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_NDIM = 32  # dimensions of a tensor or array
MAX_DIM = 1 << 62  # bound on each dimension, and on the product of the nonzero ones


class SnapshotVM(VM):
    """The VM with the allowlist: globals, calls and persistent ids build records."""

    def global_(self, module: object, name: object) -> Global:
        if not isinstance(module, str) or not isinstance(name, str):
            raise self.fail("STACK_GLOBAL needs two strings")
        if self.blob:
            if module == "torch" and name in STORAGE_TYPES:
                return Global("storage_type", name, *STORAGE_TYPES[name])
        elif (module, name) in ALLOWED:
            return Global(ALLOWED[(module, name)], f"{module}.{name}")
        raise self.fail(f"global {short(module + '.' + name, 120)} is not allowed")

    def reduce(self, func: object, args: object) -> object:
        if not isinstance(func, Global) or not isinstance(args, tuple):
            raise self.fail(f"REDUCE of {short(func)} with {short(args)}")
        a, kind, n = args, func.kind, len(args)
        if kind == "ordereddict" and n == 0:
            return OrderedDict()
        if kind == "persistent" and n == 1 and isinstance(a[0], dict):
            return self.persistent(a[0])
        if kind == "storage" and n == 1 and isinstance(a[0], FileBytes):
            return self.storage(a[0])
        if kind == "tensor" and n in (6, 7) and isinstance(a[0], Storage):
            return self.tensor(a)
        if kind == "parameter" and n in (3, 4) and isinstance(a[0], TensorRef):
            if not isinstance(a[1], bool) or not isinstance(a[2], dict) or a[2]:
                raise self.fail(f"{func.name}: requires_grad or hooks are not plain")
            a[0].parameter = True
            return a[0]
        if kind == "dtype" and n == 3 and isinstance(a[0], str):
            if a[0] not in NP_DTYPES:
                raise self.fail(f"numpy dtype {short(a[0])} is not a plain number type")
            return DType(a[0])
        if kind == "np_reconstruct" and n == 3 and isinstance(a[0], Global) and a[1] == (0,):
            if a[0].kind == "ndarray":
                return NumpyArray()
        elif kind == "np_frombuffer" and n == 4 and isinstance(a[1], DType) and a[3] in ("C", "F"):
            return NumpyArray(self.array(a[0], a[1], a[2], a[3] == "F"))
        raise self.fail(f"REDUCE of {func.name} with arguments {tuple(map(short, a))}")

    def persistent(self, meta: dict[Any, Any]) -> PersistentObject:
        src, cls, state = meta.get("module_src"), meta.get("class_name"), meta.get("state")
        if meta.get("type") != "class" or meta.get("version") != 6:
            raise self.fail("persistent object meta is not type 'class', version 6")
        if not isinstance(src, str) or not isinstance(cls, str) or not isinstance(state, dict):
            raise self.fail("persistent object meta lacks module_src, class_name or state")
        digest = hashlib.sha256(src.encode("utf-8", "surrogatepass")).hexdigest()
        return PersistentObject(cls, state, digest)

    def tensor(self, a: tuple[Any, ...]) -> TensorRef:
        storage, offset, size, stride, requires_grad, hooks, *metadata = a
        if not (nat(offset) and ints(size) and ints(stride)) or len(size) != len(stride):
            raise self.fail("_rebuild_tensor_v2: offset, size or stride are not integers")
        if not dims(size):
            raise self.fail(f"_rebuild_tensor_v2: shape {short(size)} is out of bounds")
        if not isinstance(requires_grad, bool) or not isinstance(hooks, dict) or hooks:
            raise self.fail("_rebuild_tensor_v2: requires_grad or hooks are not plain")
        if metadata not in ([], [None], [{}]):
            raise self.fail("_rebuild_tensor_v2: tensor metadata (conj/neg bits) is not supported")
        return TensorRef(storage, offset, size, stride)

    def storage(self, blob: FileBytes) -> Storage:
        """``_load_from_bytes(blob)``: read the blob's header, never its payload."""
        if self.blob or not isinstance(self.src, FileSource):
            raise self.fail("_load_from_bytes inside a storage blob")
        self._take(blob, "storage blob")
        want = 512
        while True:
            head = blob.data if blob.data is not None else blob.head
            if blob.data is None and len(head) < min(want, blob.length):
                head = blob.head = self.src.fetch(blob.offset, min(want, blob.length))
            try:
                return _parse_blob(MemSource(head, blob.offset, blob.length, self.where))
            except NeedMore:
                if len(head) >= BLOB_HEADER_MAX:
                    raise self.fail(
                        f"storage blob header is over {BLOB_HEADER_MAX} bytes"
                    ) from None
                want = min(4 * max(want, len(head)), BLOB_HEADER_MAX)

    def _take(self, raw: FileBytes, what: str) -> None:
        """Each bytes value makes one storage or array: a reuse would re-read it at will."""
        if raw.used:
            raise self.fail(f"one bytes value used twice (as a {what}): not written by torch")
        raw.used = True

    def array(self, raw: object, dt: DType, shape: object, fortran: bool) -> np.ndarray[Any, Any]:
        if not isinstance(raw, FileBytes) or raw.length > MAX_TEXT:
            raise self.fail(f"numpy array data is not a bytes value of at most {MAX_TEXT} bytes")
        if not ints(shape):
            raise self.fail("numpy array shape is not a tuple of integers")
        if not dims(shape):
            raise self.fail(f"numpy array shape {short(shape)} is out of bounds")
        dtype = np.dtype(dt.byteorder + dt.spec)
        if math.prod(shape) * dtype.itemsize != raw.length:
            raise self.fail(f"numpy array of shape {shape} does not match its {raw.length} bytes")
        self._take(raw, "numpy array")
        data = raw.data
        if data is None:
            if not isinstance(self.src, FileSource):
                raise self.fail("numpy array inside a storage blob")
            data = self.src.fetch(raw.offset, raw.length)
        flat = np.frombuffer(data, dtype)
        if fortran:
            return flat.reshape(shape[::-1]).T.copy(order="F")
        return flat.reshape(shape).copy()

    def build(self, obj: object, state: object) -> None:
        if isinstance(obj, ModuleObject) and obj.state is None and isinstance(state, dict):
            obj.state = state
        elif isinstance(obj, DType) and isinstance(state, tuple) and len(state) == 8:
            if state[1] not in ("<", ">", "|", "="):
                raise self.fail("numpy dtype byte order is not one of < > | =")
            obj.byteorder = state[1]
        elif isinstance(obj, NumpyArray) and obj.array is None and isinstance(state, tuple):
            if len(state) != 5 or state[0] != 1 or not isinstance(state[2], DType):
                raise self.fail("numpy array state is not (1, shape, dtype, fortran, data)")
            if not isinstance(state[3], bool):
                raise self.fail("numpy array state is not (1, shape, dtype, fortran, data)")
            obj.array = self.array(state[4], state[2], state[1], state[3])
        else:
            raise self.fail(f"BUILD of {short(obj)} with {short(state)}")

    def newobj(self, cls: object, args: object) -> object:
        if isinstance(cls, Global) and args == ():
            if cls.kind == "easydict":
                return EasyDict()
            if cls.kind == "moduledict":
                return ModuleObject(cls.name)
        raise self.fail(f"NEWOBJ of {short(cls)}")

    def persid(self, pid: object) -> StorageRef:
        if isinstance(pid, tuple) and len(pid) == 6:
            tag, typ, key, location, numel, view = pid
            if (
                tag == "storage"
                and isinstance(typ, Global)
                and isinstance(key, str)
                and isinstance(location, str)
                and nat(numel)
                and view is None
            ):
                return StorageRef(typ.dtype, typ.itemsize, key, numel)
        raise self.fail("persistent id is not ('storage', type, key, location, numel, None)")


def nat(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def ints(v: object) -> TypeGuard[tuple[int, ...]]:
    return isinstance(v, tuple) and len(v) <= 64 and all(nat(x) for x in v)


def dims(shape: tuple[int, ...]) -> bool:
    """A shape torch and numpy can hold: at most 32 dimensions, each (and the product of the
    nonzero ones, which sets the strides) under 2**62; a zero dimension hides no overflow."""
    if len(shape) > MAX_NDIM or any(n >= MAX_DIM for n in shape):
        return False
    return math.prod(max(n, 1) for n in shape) < MAX_DIM


def _parse_blob(mem: MemSource) -> Storage:
    """The five pickles of a legacy ``torch.save`` storage blob, then its numel."""
    values = [SnapshotVM(mem, mem.where, blob=True).run() for _ in range(5)]
    magic, proto, info, ref, keys = values
    where = f"{mem.where}: storage blob at byte {mem.base}"
    if type(magic) is not int or magic != STORAGE_MAGIC or proto != LEGACY_PROTOCOL:
        raise PickleError(f"{where}: not a legacy torch storage (magic or protocol differ)")
    if not isinstance(info, dict) or info.get("little_endian") is not True:
        raise PickleError(f"{where}: sys_info is not a little-endian dict")
    if not isinstance(ref, StorageRef) or keys != [ref.key]:
        raise PickleError(f"{where}: not one storage with its key list")
    at = mem.pos
    numel = int.from_bytes(mem.read(8), "little", signed=True)
    left = mem.size - mem.pos
    if numel != ref.numel or left != numel * ref.itemsize:
        raise PickleError(
            f"{where}: byte {at}: numel {numel} (persistent id: {ref.numel}) of "
            f"{ref.dtype} does not fill the {left} bytes left in the blob"
        )
    return Storage(ref.dtype, ref.itemsize, numel, mem.pos)
