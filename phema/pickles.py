"""Read official EDM2 snapshot pickles without executing them.

The format
----------
An official EDM2 snapshot (``network-snapshot-<kimg>-<std>.pkl``, and the official
reconstruction tool's ``phema-<kimg>-<std>.pkl``, which has the same layout) is one plain
pickle, protocol 4 (5 from Python 3.14 writers), of a dict subclass (``dnnlib.util.EasyDict``)
with the keys ``encoder``, ``dataset_kwargs``, ``loss_fn`` and ``ema``. The network and the
encoder are "persistent" objects: each pickles as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` carries the
class name, the object's ``__dict__`` (for a torch module: ``_parameters``, ``_buffers``,
``_modules``, hook dicts, plain attributes, ``_init_kwargs``) and the *whole Python source*
of the module that defined the class. ``pickle.load`` runs that source; this reader does not.

Each tensor pickles as ``_rebuild_tensor_v2(storage, offset, shape, stride, ...)``
(``_rebuild_parameter`` around it for a parameter), and each storage as
``torch.storage._load_from_bytes(blob)``: the blob is a small legacy ``torch.save`` file of
its own, five protocol-2 pickles (a magic number, the legacy protocol 1001, a sys-info dict,
the persistent id ``('storage', torch.HalfStorage, key, 'cpu', numel, None)`` and the list
of keys), then the element count as int64 and the raw little-endian elements. The raw data of
every tensor therefore lies contiguously in the file, and :func:`index_snapshot` returns its
byte range without reading it: the outer pickle is read in small sequential windows, each
large blob only for its header, and payloads are skipped by their lengths.

Security model
--------------
* Nothing the file names is imported, called or executed: no ``pickle.load``, no
  ``torch.load``, no ``exec``. A small opcode interpreter (``phema._pickle_vm``) builds plain
  data only: containers, numbers, strings and the records of this module.
* Globals come from a fixed allowlist (the globals an official snapshot uses), each mapped to a
  data-only stand-in: ``dnnlib.util.EasyDict``, ``torch_utils.persistence.
  _reconstruct_persistent_obj`` (recorded as a :class:`PersistentObject` with the SHA-256 of
  the module source, never run), ``torch.nn.modules.container.ModuleDict``,
  ``collections.OrderedDict``, ``torch._utils._rebuild_parameter[_with_state]``,
  ``torch._utils._rebuild_tensor_v2``, ``torch.storage._load_from_bytes``, numpy 1.x and 2.x
  ``_reconstruct``/``_frombuffer``/``ndarray``/``dtype`` (plain number types only), and inside a
  storage blob the ``torch.{Half,BFloat16,Float,Double}Storage`` classes. Any other global, and
  any opcode outside the protocol 2-5 subset such files use (no ``INST``, ``OBJ``, ``EXT*``,
  out-of-band buffers, ``PERSID``, text opcodes), is refused.
* Limits: every length is checked against the bytes left in the file; strings and held bytes
  at most 16 MiB; at most 2M opcodes, 1M stack items and 1,000 nested marks per pickle; memo
  references must exist; frames must not be crossed; dict keys are scalars or small tuples of
  them (hashing stays flat); the module tree is walked without recursion, at most 256 levels,
  each module and tensor record once (a shared or cyclic one is refused), at most 1M tensors;
  ``_init_kwargs`` converts each container once (at most 100,000 values, 32 levels, no cycles);
  shapes have at most 32 dimensions, each and their nonzero product under 2**62.
  Every problem is a :class:`~phema.errors.PickleError` naming the file, the byte and the fault.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from phema._pickle_calls import SnapshotVM
from phema._pickle_io import FileBytes, FileSource
from phema._pickle_records import (
    EasyDict,
    ModuleObject,
    NumpyArray,
    PersistentObject,
    TensorRef,
)
from phema._pickle_vm import short
from phema.errors import PickleError

__all__ = [
    "EasyDict",
    "ModuleObject",
    "NumpyArray",
    "PersistentObject",
    "PickleError",
    "PickleIndex",
    "TensorRange",
    "index_snapshot",
    "index_snapshot_file",
    "read_tensor",
]

_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}
_MAX_DEPTH = 256  # module nesting, and nesting of init kwargs (32)
_MAX_MODULES = 100_000  # distinct modules (an XXL net has a few hundred)
_MAX_TENSORS = 1_000_000  # tensors in the module tree (an XXL net has about a thousand)
_MAX_PLAIN = 100_000  # values in _init_kwargs / _init_args (official ones: a few dozen)


@dataclass(frozen=True)
class TensorRange:
    """Where one tensor's raw (little-endian, C-contiguous) data lies in the file.

    Attributes:
        dtype: The element type.
        shape: The tensor's shape.
        begin: Absolute offset of the first byte.
        end: Absolute offset one past the last byte (``end - begin`` = numel x item size).
    """

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the data in bytes."""
        return self.end - self.begin


@dataclass(frozen=True)
class PickleIndex:
    """What :func:`index_snapshot` found in a snapshot pickle.

    Attributes:
        tensors: State-dict name -> byte range, in ``nn.Module.state_dict()`` order.
        buffers: The names among ``tensors`` that are buffers, not parameters (an official
            EMA copies them from the training network instead of averaging them).
        class_name: Class name recorded for ``ema`` (``"Precond"`` for EDM2).
        init_kwargs: The constructor keyword arguments recorded for ``ema``, as plain
            Python values (dicts, lists, tuples, str, numbers, None).
        init_args: The positional constructor arguments, likewise.
        module_sha256: SHA-256 of the module source embedded for ``ema`` (never executed).
        extras: The other top-level entries as parsed data records (``encoder``,
            ``loss_fn``: :class:`PersistentObject`; ``dataset_kwargs``: :class:`EasyDict`).
        bytes_read: Bytes read to build this index.
        size: Size of the file in bytes.
    """

    tensors: dict[str, TensorRange]
    buffers: tuple[str, ...]
    class_name: str
    init_kwargs: dict[str, Any]
    init_args: tuple[Any, ...]
    module_sha256: str
    extras: dict[str, Any] = field(repr=False)
    bytes_read: int
    size: int


def index_snapshot(read_at: Callable[[int, int], bytes], size: int, where: str) -> PickleIndex:
    """Index an official EDM2 snapshot pickle without executing anything in it.

    Args:
        read_at: ``read_at(offset, n)`` returns the ``n`` bytes of the file at ``offset``.
        size: Size of the file in bytes.
        where: The file's name or URL, for error messages.

    Returns:
        The tensors' names, dtypes, shapes and byte ranges, and the recorded constructor
        arguments of the ``ema`` network.

    Raises:
        PickleError: The file is malformed, or names a global or opcode outside the allowlist.
    """
    if not isinstance(size, int) or size < 0:
        raise PickleError(f"{where}: invalid file size {size!r}")
    src = FileSource(read_at, size, where)
    vm = SnapshotVM(src, where)
    top = vm.run()
    if src.pos != size:
        raise PickleError(f"{where}: byte {src.pos}: {size - src.pos} bytes after STOP")
    if not isinstance(top, dict) or not isinstance(top.get("ema"), PersistentObject | ModuleObject):
        raise PickleError(f"{where}: the top level is not a dict with a persistent 'ema' module")
    ema = top["ema"]
    state = ema.state if ema.state is not None else {}
    kwargs = _plain(state.get("_init_kwargs", {}), where, "_init_kwargs")
    args = _plain(state.get("_init_args", ()), where, "_init_args")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise PickleError(f"{where}: ema's _init_kwargs is not a dict of names")
    if not isinstance(args, tuple | list):
        raise PickleError(f"{where}: ema's _init_args is not a tuple")
    tensors, buffers = _walk(ema, where)
    return PickleIndex(
        tensors=tensors,
        buffers=buffers,
        class_name=ema.class_name,
        init_kwargs=kwargs,
        init_args=tuple(args),
        module_sha256=ema.module_sha256 if isinstance(ema, PersistentObject) else "",
        extras={k: v for k, v in top.items() if k != "ema"},
        bytes_read=src.bytes_read,
        size=size,
    )


def index_snapshot_file(path: str | os.PathLike[str]) -> PickleIndex:
    """:func:`index_snapshot` on a local file (positioned reads, nothing else)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return index_snapshot(
            lambda offset, n: os.pread(fd, n, offset), os.fstat(fd).st_size, str(Path(path))
        )
    finally:
        os.close(fd)


def read_tensor(read_at: Callable[[int, int], bytes], tensor: TensorRange) -> torch.Tensor:
    """Read one tensor of an index (a CPU tensor that owns its memory)."""
    data = read_at(tensor.begin, tensor.nbytes)
    if len(data) != tensor.nbytes:
        raise PickleError(f"byte {tensor.begin}: read {len(data)} of {tensor.nbytes} bytes")
    try:
        if not tensor.nbytes:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        return torch.frombuffer(bytearray(data), dtype=tensor.dtype).reshape(tensor.shape)
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:
        raise PickleError(
            f"byte {tensor.begin}: a tensor of shape {short(tensor.shape)} cannot be made: {e}"
        ) from None


def _state(module: object, where: str, name: str) -> dict[Any, Any]:
    state = module.state if isinstance(module, PersistentObject | ModuleObject) else None
    if not isinstance(state, dict):
        raise PickleError(f"{where}: module {short(name or 'ema', 200)} is not a module record")
    return state


def _walk(ema: object, where: str) -> tuple[dict[str, TensorRange], tuple[str, ...]]:
    """State-dict names and ranges in ``state_dict()`` order, and the buffers' names.

    The walk uses no recursion.
    The module records form a tree: one reached twice (shared or cyclic) is refused, and so is
    one tensor record under two names (torch writes neither), so the work is linear in the file.
    """
    out: dict[str, TensorRange] = {}
    buffers: list[str] = []
    todo: list[tuple[str, object, int]] = [("", ema, 0)]
    modules: dict[int, str] = {}
    tensors: dict[int, str] = {}
    while todo:
        prefix, module, depth = todo.pop()
        name = prefix[:-1] or "ema"
        if id(module) in modules:
            raise PickleError(
                f"{where}: module {short(name, 200)} is module "
                f"{short(modules[id(module)], 200)} again (shared or cyclic)"
            )
        modules[id(module)] = name
        if depth > _MAX_DEPTH or len(modules) > _MAX_MODULES:
            raise PickleError(
                f"{where}: the module tree is deeper than {_MAX_DEPTH} or has over "
                f"{_MAX_MODULES} modules"
            )
        state = _state(module, where, prefix[:-1])
        skip = state.get("_non_persistent_buffers_set", set())
        if not isinstance(skip, set | frozenset):
            raise PickleError(f"{where}: {prefix}_non_persistent_buffers_set is not a set")
        for kind in ("_parameters", "_buffers"):
            for key, tensor in _named(state, kind, where, prefix):
                if tensor is None or (kind == "_buffers" and key in skip):
                    continue
                if id(tensor) in tensors:
                    raise PickleError(
                        f"{where}: {short(prefix + key, 200)} is tensor "
                        f"{short(tensors[id(tensor)], 200)} again (shared tensors are not written)"
                    )
                tensors[id(tensor)] = prefix + key
                if len(tensors) > _MAX_TENSORS:
                    raise PickleError(f"{where}: the module tree has over {_MAX_TENSORS} tensors")
                out[prefix + key] = _range(tensor, where, prefix + key)
                if kind == "_buffers":
                    buffers.append(prefix + key)
        children = list(_named(state, "_modules", where, prefix))
        todo.extend((f"{prefix}{n}.", m, depth + 1) for n, m in reversed(children) if m is not None)
    return out, tuple(buffers)


def _named(state: dict[Any, Any], kind: str, where: str, prefix: str) -> list[tuple[str, Any]]:
    entries = state.get(kind, {})
    if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
        raise PickleError(f"{where}: {short(prefix + kind, 200)} is not a dict of names")
    return list(entries.items())


def _range(tensor: object, where: str, name: str) -> TensorRange:
    if not isinstance(tensor, TensorRef):
        raise PickleError(f"{where}: {short(name, 200)} is a {short(tensor)}, not a tensor")
    st, shape, stride = tensor.storage, tensor.shape, tensor.stride
    numel = 1
    for n in shape:
        numel *= n
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride), strict=True):
        if n != 1 and s != expected and numel:
            raise PickleError(
                f"{where}: {short(name, 200)}: strides {stride} of shape {shape} are not contiguous"
            )
        expected *= n
    if tensor.storage_offset + numel > st.numel:
        raise PickleError(
            f"{where}: {short(name, 200)}: elements {tensor.storage_offset}..+{numel} lie "
            f"outside its storage of {st.numel}"
        )
    begin = st.offset + tensor.storage_offset * st.itemsize
    return TensorRange(_DTYPES[st.dtype], shape, begin, begin + numel * st.itemsize)


def _plain(value: object, where: str, name: str) -> Any:
    """Parsed data -> plain Python (dicts, lists, tuples, sets, scalars); nesting at most 32.

    Each container is converted once (a shared one stays shared, so ``l = [l, l]`` nested
    costs one conversion per level), a cycle is refused, at most ``_MAX_PLAIN`` values are
    visited, and the nesting is checked through shared containers too (by their heights).
    """
    todo: list[tuple[object, Any, Any, int]] = [(value, root := [None], 0, 0)]
    done: dict[int, Any] = {}  # id of a parsed container -> its conversion
    height: dict[int, int] = {}  # id of a conversion -> levels below it (0: empty)
    open_: set[int] = set()  # containers whose items are still being converted (ancestors)
    visits = 0
    while todo:
        v, parent, slot, depth = todo.pop()
        if v is _CLOSE:  # all items of ``parent`` (parsed container ``slot``) are converted
            open_.discard(slot)
            items = parent.values() if isinstance(parent, dict) else parent
            height[id(parent)] = max((height.get(id(x), 0) + 1 for x in items), default=0)
            continue
        visits += 1
        if visits > _MAX_PLAIN:
            raise PickleError(f"{where}: {name} holds over {_MAX_PLAIN} values")
        if depth > 32:
            raise PickleError(f"{where}: {name} is nested deeper than 32 levels (or cyclic)")
        out: Any
        if v is None or isinstance(v, str | int | float | bytes | frozenset | set):
            out = v
        elif isinstance(v, FileBytes) and v.data is not None:
            out = v.data
        elif id(v) in open_:
            raise PickleError(f"{where}: {name} is cyclic (a container holds itself)")
        elif id(v) in done:
            out = done[id(v)]
            if depth + height[id(out)] > 32:
                raise PickleError(f"{where}: {name} is nested deeper than 32 levels")
        elif isinstance(v, dict | list | tuple):
            if isinstance(v, dict):
                out = {}
                children = [(x, out, k, depth + 1) for k, x in v.items()]
            else:  # a tuple is filled in place as a _TupleSlot, made a tuple after the walk
                out = (_TupleSlot if isinstance(v, tuple) else list)([None] * len(v))
                children = [(x, out, i, depth + 1) for i, x in enumerate(v)]
            done[id(v)] = out
            open_.add(id(v))
            todo.append((_CLOSE, out, id(v), depth))
            todo.extend(children)
        else:
            raise PickleError(f"{where}: {name} holds a {short(v)}, not plain data")
        parent[slot] = out
    return _untuple(root[0], {})


_CLOSE = object()  # marks, in _plain's work list, the end of a container's items


class _TupleSlot(list[Any]):
    """A tuple's items while :func:`_plain` fills them; :func:`_untuple` freezes it."""


def _untuple(value: Any, done: dict[int, Any]) -> Any:
    # Acyclic and at most 33 deep (checked by _plain), so recursion is bounded; ``done``
    # converts a shared container once, keeping it shared.
    if not isinstance(value, dict | list):
        return value
    if id(value) not in done:
        if isinstance(value, dict):
            done[id(value)] = {k: _untuple(v, done) for k, v in value.items()}
        else:
            items = [_untuple(v, done) for v in value]
            done[id(value)] = tuple(items) if isinstance(value, _TupleSlot) else items
    return done[id(value)]
