"""The pickle virtual machine: opcodes, frames, limits, stack and memo (see phema.pickles).

It follows the opcode definitions of protocols 2-5 (``pickletools`` documents them) for
the opcodes EDM2 snapshot pickles use, and refuses every other one. It builds containers,
numbers, strings and :class:`~phema._pickle_io.FileBytes` only; what a global and REDUCE,
NEWOBJ, BUILD or BINPERSID on it mean is left to the hooks of :class:`VM`, which refuse
everything here (:class:`phema._pickle_calls.SnapshotVM` allows the snapshot's few).
Nothing named by the file is imported or called, and the only Python work done per opcode
is list, dict and number handling.
"""

from __future__ import annotations

import pickletools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from phema._pickle_io import FileBytes, FileSource, MemSource
from phema.errors import PickleError

MAX_OPS = 2_000_000  # opcodes in one pickle (an XXL snapshot needs about 100k)
MAX_STACK = 1_000_000  # items on the stack
MAX_MARKS = 1_000  # nested MARKs
MAX_TEXT = 16 << 20  # one str, or one bytes value held in memory
MAX_LONG = 256  # bytes of a LONG4 integer
MAX_KEY = 64  # scalars in one dict key or set item (tuples of scalars only)
INLINE = 4096  # bytes values up to this size are read; larger ones stay in the file
HEAD = 512  # bytes read at the start of a large value (a storage blob's header)

_NAMES = {ord(op.code): op.name for op in pickletools.opcodes}


def _name(code: int) -> str:
    name = _NAMES.get(code)
    return f"opcode {name} (0x{code:02x})" if name else f"unknown opcode 0x{code:02x}"


def short(text: object, limit: int = 80) -> str:
    s = text if isinstance(text, str) else type(text).__name__
    return s if len(s) <= limit and s.isprintable() else repr(s[:limit]) + "..."


def check_key(key: object) -> bool:
    """A dict key or set item must be a scalar or a small tuple of them (hashing stays flat)."""
    todo, seen = [key], 0
    while todo:
        k = todo.pop()
        seen += 1
        if seen > MAX_KEY:
            return False
        if isinstance(k, tuple):
            todo.extend(k)
        elif not isinstance(k, (str, int, float, bytes, type(None))):
            return False
    return True


@dataclass
class VM:
    """Runs one pickle to STOP; a subclass gives globals, calls and persistent ids a meaning."""

    src: FileSource | MemSource
    where: str
    blob: bool = False  # a nested legacy storage blob: protocol 2, storage globals, BINPERSID
    stack: list[Any] = field(default_factory=list)
    marks: list[list[Any]] = field(default_factory=list)
    memo: dict[int, Any] = field(default_factory=dict)
    frame_end: int | None = None
    at: int = 0
    ops: int = 0
    framed: bool = False  # FRAME follows PROTO: then opcodes lie in frames (as pickle writes them)
    outside: bool = False  # the current opcode is outside a frame

    def fail(self, what: str) -> PickleError:
        return PickleError(f"{self.where}: byte {self.at}: {what}")

    # -- reading -----------------------------------------------------------------------
    def framing(self, n: int) -> None:
        """The next ``n`` bytes must not cross the current frame's end (reaching it ends it)."""
        end = self.frame_end
        if end is not None:
            if self.src.pos == end:
                self.frame_end = None
            elif self.src.pos + n > end:
                raise self.fail(f"{n} bytes at byte {self.src.pos} cross the frame end {end}")

    def take(self, n: int, ahead: bool = True) -> bytes:
        self.framing(n)
        return self.src.read(n, ahead)

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def length(self, n: int, cap: int, value: bool = True) -> int:
        size = self.uint(n)
        if value and self.outside and size < 1 << 16:
            raise self.fail(f"a value of {size} bytes outside a frame in a framed pickle")
        left = self.src.size - self.src.pos
        if size > left:
            raise self.fail(f"length {size} runs past the end of the file ({left} bytes left)")
        if size > cap:
            raise self.fail(f"length {size} is over the limit of {cap}")
        return size

    def text(self, n: int) -> str:
        data = self.take(self.length(n, MAX_TEXT))
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as e:
            raise self.fail(f"string is not UTF-8: {e.reason}") from None

    def bytes_value(self, n: int) -> FileBytes:
        size = self.length(n, self.src.size)
        offset = self.src.pos
        if size <= INLINE:
            return FileBytes(offset, size, self.take(size))
        self.framing(size)
        head = self.src.read(HEAD, ahead=False)  # a storage blob's header; the rest is skipped
        self.src.skip(size - HEAD)
        return FileBytes(offset, size, None, head)

    def line(self) -> str:
        out = bytearray()
        while (c := self.take(1)) != b"\n":
            out += c
            if len(out) > 256:
                raise self.fail("GLOBAL name longer than 256 bytes")
        try:
            return out.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("GLOBAL name is not UTF-8") from None

    # -- stack -------------------------------------------------------------------------
    def pop(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow")
        return self.stack.pop()

    def discard(self, _: object) -> None:
        pass

    def top(self) -> Any:
        if not self.stack:
            raise self.fail("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise self.fail("no MARK to pop to")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def key(self, k: object) -> object:
        if not check_key(k):
            raise self.fail(f"dict key or set item of type {short(k)} is not a plain scalar")
        return k

    def setitems(self, items: list[Any]) -> None:
        target = self.top()
        if not isinstance(target, dict) or len(items) % 2:
            raise self.fail(f"SETITEM(S) on {short(target)} with {len(items)} items")
        for i in range(0, len(items), 2):
            target[self.key(items[i])] = items[i + 1]

    def memo_get(self, i: int) -> Any:
        if i not in self.memo:
            raise self.fail(f"memo index {i} was never stored")
        return self.memo[i]

    def memo_put(self, i: int) -> None:
        self.memo[i] = self.top()

    # -- the loop ----------------------------------------------------------------------
    def run(self) -> Any:
        while True:
            self.at = self.src.pos
            code = self.take(1)[0]
            self.ops += 1
            if self.ops == 1 and code != 0x80:
                raise self.fail(f"{_name(code)}: a pickle of protocol 2 or later starts with PROTO")
            # pickle frames every opcode but FRAME and the header of a value >= 64 KiB
            self.outside = self.framed and self.frame_end is None
            if self.outside and code not in (0x95, 0x42, 0x8E, 0x96, 0x58, 0x8D):
                raise self.fail(f"{_name(code)} outside a frame in a framed pickle")
            if self.ops > MAX_OPS or len(self.stack) > MAX_STACK:
                raise self.fail(f"over {MAX_OPS} opcodes or {MAX_STACK} stack items")
            if code == 0x2E:  # STOP
                if self.marks or len(self.stack) != 1:
                    raise self.fail(
                        f"STOP with {len(self.stack)} items and {len(self.marks)} marks"
                    )
                if self.frame_end is not None and self.src.pos != self.frame_end:
                    raise self.fail(f"STOP before the frame end {self.frame_end}")
                return self.stack.pop()
            handler = _OPS.get(code)
            if handler is None or code == (0x95 if self.blob else 0x51):  # FRAME / BINPERSID
                raise self.fail(f"{_name(code)} is not supported")
            handler(self)

    # -- globals and calls: all refused here, SnapshotVM gives a few of them a meaning ---
    def global_(self, module: object, name: object) -> object:
        raise self.fail(f"global {short(module)}.{short(name)} is not allowed")

    def reduce(self, func: object, args: object) -> object:
        raise self.fail(f"REDUCE of {short(func)} with {short(args)}")

    def newobj(self, cls: object, args: object) -> object:
        raise self.fail(f"NEWOBJ of {short(cls)}")

    def build(self, obj: object, state: object) -> None:
        raise self.fail(f"BUILD of {short(obj)} with {short(state)}")

    def persid(self, pid: object) -> object:
        raise self.fail("persistent ids are not supported")


def _push(value: Callable[[VM], object]) -> Callable[[VM], None]:
    def op(vm: VM) -> None:
        item = value(vm)  # first: popping to a MARK replaces vm.stack
        vm.stack.append(item)

    return op


def _tuple(n: int) -> Callable[[VM], None]:
    def op(vm: VM) -> None:
        if len(vm.stack) < n:
            raise vm.fail("stack underflow")
        items = tuple(vm.stack[len(vm.stack) - n :])
        del vm.stack[len(vm.stack) - n :]
        vm.stack.append(items)

    return op


def _proto(vm: VM) -> None:
    proto = vm.uint(1)
    if vm.ops != 1 or not (proto == 2 if vm.blob else 2 <= proto <= 5):
        raise vm.fail(f"PROTO {proto} is not supported here (protocols 2-5, first opcode only)")


def _frame(vm: VM) -> None:
    if vm.frame_end is not None and vm.src.pos != vm.frame_end:
        raise vm.fail(f"FRAME before the end of the previous frame at byte {vm.frame_end}")
    size = vm.length(8, vm.src.size, value=False)
    vm.frame_end = vm.src.pos + size
    vm.framed |= vm.ops == 2


def _mark(vm: VM) -> None:
    if len(vm.marks) >= MAX_MARKS:
        raise vm.fail(f"over {MAX_MARKS} nested MARKs")
    vm.marks.append(vm.stack)
    vm.stack = []


def _append(vm: VM) -> None:
    value = vm.pop()
    target = vm.top()
    if not isinstance(target, list):
        raise vm.fail(f"APPEND to {short(target)}")
    target.append(value)


def _appends(vm: VM) -> None:
    items = vm.pop_mark()
    target = vm.top()
    if not isinstance(target, list):
        raise vm.fail(f"APPENDS to {short(target)}")
    target.extend(items)


def _dict(vm: VM) -> None:
    items = vm.pop_mark()
    vm.stack.append({})
    vm.setitems(items)


def _setitem(vm: VM) -> None:
    value = vm.pop()
    key = vm.pop()
    vm.setitems([key, value])


def _additems(vm: VM) -> None:
    items = vm.pop_mark()
    target = vm.top()
    if not isinstance(target, set):
        raise vm.fail(f"ADDITEMS to {short(target)}")
    target.update(vm.key(i) for i in items)


def _long(n: int) -> Callable[[VM], object]:
    def op(vm: VM) -> object:
        size = int.from_bytes(vm.take(n), "little", signed=n == 4)  # LONG1's is unsigned
        if size < 0 or size > MAX_LONG:
            raise vm.fail(f"LONG length {size} is negative or over {MAX_LONG}")
        return int.from_bytes(vm.take(size), "little", signed=True)

    return op


def _get(n: int) -> Callable[[VM], None]:
    return lambda vm: vm.stack.append(vm.memo_get(vm.uint(n)))


def _put(n: int) -> Callable[[VM], None]:
    return lambda vm: vm.memo_put(vm.uint(n))


def _stack_global(vm: VM) -> None:
    name = vm.pop()
    vm.stack.append(vm.global_(vm.pop(), name))


def _reduce(vm: VM) -> None:
    args = vm.pop()
    vm.stack.append(vm.reduce(vm.pop(), args))


def _newobj(vm: VM) -> None:
    args = vm.pop()
    vm.stack.append(vm.newobj(vm.pop(), args))


def _build(vm: VM) -> None:
    state = vm.pop()
    vm.build(vm.top(), state)


_OPS: dict[int, Callable[[VM], None]] = {
    0x80: _proto,
    0x95: _frame,
    0x28: _mark,
    0x30: lambda vm: vm.discard(vm.pop()),  # POP
    0x31: lambda vm: vm.discard(vm.pop_mark()),  # POP_MARK
    0x32: _push(lambda vm: vm.top()),
    0x4E: _push(lambda vm: None),
    0x88: _push(lambda vm: True),
    0x89: _push(lambda vm: False),
    0x4A: _push(lambda vm: int.from_bytes(vm.take(4), "little", signed=True)),
    0x4B: _push(lambda vm: vm.uint(1)),
    0x4D: _push(lambda vm: vm.uint(2)),
    0x8A: _push(_long(1)),
    0x8B: _push(_long(4)),
    0x47: _push(lambda vm: struct.unpack(">d", vm.take(8))[0]),
    0x8C: _push(lambda vm: vm.text(1)),
    0x58: _push(lambda vm: vm.text(4)),
    0x8D: _push(lambda vm: vm.text(8)),
    0x43: _push(lambda vm: vm.bytes_value(1)),
    0x42: _push(lambda vm: vm.bytes_value(4)),
    0x8E: _push(lambda vm: vm.bytes_value(8)),
    0x96: _push(lambda vm: vm.bytes_value(8)),
    0x29: _push(lambda vm: ()),
    0x74: _push(lambda vm: tuple(vm.pop_mark())),
    0x85: _tuple(1),
    0x86: _tuple(2),
    0x87: _tuple(3),
    0x5D: _push(lambda vm: []),
    0x61: _append,
    0x65: _appends,
    0x6C: _push(lambda vm: vm.pop_mark()),  # LIST
    0x7D: _push(lambda vm: {}),
    0x64: _dict,
    0x73: _setitem,
    0x75: lambda vm: vm.setitems(vm.pop_mark()),
    0x8F: _push(lambda vm: set()),
    0x90: _additems,
    0x91: _push(lambda vm: frozenset(vm.key(i) for i in vm.pop_mark())),
    0x94: lambda vm: vm.memo_put(len(vm.memo)),
    0x71: _put(1),
    0x72: _put(4),
    0x68: _get(1),
    0x6A: _get(4),
    0x63: lambda vm: vm.stack.append(vm.global_(vm.line(), vm.line())),
    0x93: _stack_global,
    0x52: _reduce,
    0x81: _newobj,
    0x62: _build,
    0x51: _push(lambda vm: vm.persid(vm.pop())),
}
