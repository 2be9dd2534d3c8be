"""phema.pickles: the safe reader of official EDM2 snapshot pickles.

Fixtures are written here with plain ``pickle.dumps`` in the official structure (spec
section 3): fake ``dnnlib.util`` / ``torch_utils.persistence`` modules exist only while a
fixture is pickled, and every network module pickles as a call of
``_reconstruct_persistent_obj(meta)`` carrying a dummy module source of our own.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import hashlib
import pickle
import pickletools
import random
import struct
import warnings

import numpy as np
import pytest
import torch
from official_pickles import SRC, EasyDict, Persistent, official_modules, persist
from torch import nn

from edm2_reference.presets import build_precond
from phema.errors import FormatError, PickleError
from phema.pickles import (
    PersistentObject,
    TensorRange,
    index_snapshot,
    index_snapshot_file,
    read_tensor,
)

KWARGS = {
    "img_resolution": 8,
    "img_channels": 1,
    "label_dim": 10,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "attn_resolutions": (4,),
    "dropout": 0.0,
    "use_fp16": False,
}


ENC_SCALE = np.array([0.5, 1.5, -2.0, 3.25], dtype=np.float32)
ENC_BIAS = np.asfortranarray(np.arange(6, dtype=">f8").reshape(2, 3))


def snapshot(net, protocol=4, numpy1=False, src=SRC, ema=None, **top):
    """The bytes of an official-structure snapshot of ``net`` (numpy 1.x globals if asked)."""
    encoder = Persistent("StabilityVAEEncoder", {"scale": ENC_SCALE, "bias": ENC_BIAS})
    loss = Persistent("EDM2Loss", {"P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5})
    dataset = EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip")
    with official_modules():
        if ema is None:
            ema = persist(net, src, _init_args=(), _init_kwargs=KWARGS)
        data = EasyDict(encoder=encoder, dataset_kwargs=dataset, loss_fn=loss, ema=ema)
        data.update(top)
        blob = pickle.dumps(data, protocol=protocol)
    if numpy1:  # numpy 1.x writers spell numpy._core as numpy.core; optimize() re-frames
        for name in (b"multiarray", b"numeric"):
            new, old = b"numpy.core." + name, b"numpy._core." + name
            blob = blob.replace(bytes([0x8C, len(old)]) + old, bytes([0x8C, len(new)]) + new)
        blob = pickletools.optimize(blob)
    names = {a for op, a, _ in pickletools.genops(blob) if op.name == "SHORT_BINUNICODE"}
    assert ("numpy.core.multiarray" in names or "numpy.core.numeric" in names) == numpy1
    return blob


def reader(blob):
    return lambda offset, n: blob[offset : offset + n]


def index(blob, where="snap.pkl"):
    return index_snapshot(reader(blob), len(blob), where)


def raw(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


class Leaf(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, 3))
        self.gain = nn.Parameter(torch.tensor(0.5))
        self.register_parameter("bias", None)
        self.register_buffer("freqs", torch.randn(n))
        self.register_buffer("scratch", torch.ones(2), persistent=False)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict({"a": Leaf(2)})
        self.out = Leaf(1)
        self.flavor = "enc"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Tiny().half()


@pytest.fixture(scope="module")
def tiny_blob(tiny):
    return snapshot(tiny)


@pytest.fixture(scope="module")
def precond():
    torch.manual_seed(0)
    return build_precond("digits8")


def unframe(blob):
    """The same pickle without FRAME opcodes (frames are optional), to truncate anywhere."""
    frames = [pos for op, _, pos in pickletools.genops(blob) if op.name == "FRAME"]
    out, last = bytearray(), 0
    for pos in frames:
        out += blob[last:pos]
        last = pos + 9
    return bytes(out + blob[last:])


def op(code, arg=b""):
    return bytes([code]) + arg


def u8(s):
    s = s.encode()
    return op(0x8C, bytes([len(s)]) + s)


P4, STOP = b"\x80\x04", b"."


# -- reading official-structure files --------------------------------------------------------
@pytest.mark.parametrize("protocol", [4, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("numpy1", [False, True], ids=["numpy2", "numpy1"])
def test_tensors_equal_the_originals_bitwise(precond, protocol, dtype, numpy1):
    net = copy.deepcopy(precond).to(dtype)
    blob = snapshot(net, protocol, numpy1)
    idx = index(blob)
    sd = net.state_dict()
    assert list(idx.tensors) == list(sd)
    for name, t in sd.items():
        r = idx.tensors[name]
        assert (r.dtype, r.shape, r.nbytes) == (
            t.dtype,
            tuple(t.shape),
            t.numel() * t.element_size(),
        )
        assert blob[r.begin : r.end] == raw(t), name
        assert torch.equal(read_tensor(reader(blob), r), t)
    assert idx.class_name == "Precond"
    assert idx.init_kwargs == KWARGS
    assert type(idx.init_kwargs["attn_resolutions"]) is tuple
    assert idx.init_args == ()
    assert idx.module_sha256 == hashlib.sha256(SRC.encode()).hexdigest()
    assert idx.size == len(blob)
    enc = idx.extras["encoder"]
    assert isinstance(enc, PersistentObject)
    assert enc.class_name == "StabilityVAEEncoder"
    for key, want in (("scale", ENC_SCALE), ("bias", ENC_BIAS)):
        got = enc.state[key].array
        assert got.dtype == want.dtype, key
        assert np.array_equal(got, want), key
    assert idx.extras["dataset_kwargs"]["path"] == "x.zip"
    assert idx.extras["loss_fn"].state["P_mean"] == -0.4


def test_torch_emits_what_the_reader_expects(tiny_blob):
    """torch 2.13 + plain pickle: the globals of spec section 3.3, and nested storage blobs."""
    args, names = [], set()
    for o, a, _ in pickletools.genops(tiny_blob):
        if o.name == "SHORT_BINUNICODE":
            args.append(a)
        elif o.name == "STACK_GLOBAL":
            names.add(".".join(args[-2:]))
        elif o.name in ("BINBYTES", "SHORT_BINBYTES") and len(a) > 100:
            assert a.startswith(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")  # storage magic
    assert {
        "dnnlib.util.EasyDict",
        "torch_utils.persistence._reconstruct_persistent_obj",
        "torch.nn.modules.container.ModuleDict",
        "collections.OrderedDict",
        "torch._utils._rebuild_parameter",
        "torch.storage._load_from_bytes",
    } <= names
    assert any(n.endswith("_rebuild_tensor_v2") for n in names)


def test_names_follow_state_dict(tiny, tiny_blob):
    idx = index(tiny_blob)
    # None parameters and non-persistent buffers are left out, as state_dict() does
    assert list(idx.tensors) == list(tiny.state_dict())
    assert "enc.a.bias" not in idx.tensors
    assert "enc.a.scratch" not in idx.tensors
    assert idx.tensors["out.gain"].shape == ()
    assert idx.class_name == "Tiny"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_other_storage_types(tiny, dtype):
    net = copy.deepcopy(tiny).to(dtype)
    blob = snapshot(net, 5)
    for name, t in net.state_dict().items():
        r = index(blob).tensors[name]
        assert r.dtype == dtype
        assert blob[r.begin : r.end] == raw(t)


def test_views_read_from_their_storage_offset(tiny):
    net = copy.deepcopy(tiny)
    base = torch.arange(10, dtype=torch.float16)
    net.out.register_buffer("view", base[3:7])
    blob = snapshot(net)
    r = index(blob).tensors["out.view"]
    assert blob[r.begin : r.end] == raw(base[3:7])


def test_reads_a_small_fraction_of_a_large_file():
    net = build_precond("digits8", model_channels=64).half()  # about 5.8 MB of tensors
    blob = snapshot(net)
    calls = []
    idx = index_snapshot(lambda o, n: calls.append(n) or blob[o : o + n], len(blob), "big.pkl")
    assert idx.bytes_read == sum(calls)
    assert idx.bytes_read < 0.05 * len(blob), (idx.bytes_read, len(blob))
    assert len(calls) < 3 * len(idx.tensors)


def test_index_snapshot_file(tmp_path, tiny, tiny_blob):
    path = tmp_path / "network-snapshot-0008388-0.100.pkl"
    path.write_bytes(tiny_blob)
    idx = index_snapshot_file(path)
    assert list(idx.tensors) == list(tiny.state_dict())
    path.write_bytes(tiny_blob[:-1])
    with pytest.raises(PickleError, match=r"network-snapshot-0008388-0\.100\.pkl: byte"):
        index_snapshot_file(path)


# -- nothing is ever executed ----------------------------------------------------------------
def _exec_module_src(meta):  # what the official loader does with module_src
    exec(meta["module_src"], {})


_exec_module_src.__module__ = "torch_utils.persistence"
_exec_module_src.__name__ = _exec_module_src.__qualname__ = "_reconstruct_persistent_obj"


def test_module_src_is_never_executed(tmp_path, tiny):
    target = tmp_path / "pwned"
    src = f"open({str(target)!r}, 'w').write('pwned')\nexec('import os')\n"
    blob = snapshot(tiny, src=src)
    idx = index(blob)
    assert not target.exists()
    assert idx.module_sha256 == hashlib.sha256(src.encode()).hexdigest()
    assert list(idx.tensors) == list(tiny.state_dict())
    # the payload is live: an official-style loader runs it
    with official_modules(_exec_module_src), contextlib.suppress(Exception):
        pickle.loads(blob)
    assert target.exists()


class Gadget:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


@pytest.mark.parametrize("func", ["exec", "eval"])
def test_reduce_gadgets_are_refused(tmp_path, tiny, func):
    target = tmp_path / "pwned"
    code = f"open({str(target)!r}, 'w').close()"
    gadget = Gadget(getattr(__import__("builtins"), func), code)
    blob = snapshot(tiny, dataset_kwargs=EasyDict(x=gadget))
    with pytest.raises(PickleError, match=rf"byte \d+: global builtins\.{func} is not allowed"):
        index(blob)
    assert not target.exists()
    with official_modules(lambda meta: None):
        pickle.loads(blob)  # the payload is live
    assert target.exists()


def test_os_system_via_reduce_is_refused(tmp_path):
    target = tmp_path / "pwned"
    call = u8(f"touch {target}") + op(0x85) + op(0x52) + STOP
    for blob in (
        P4 + u8("os") + u8("system") + op(0x93) + call,
        b"\x80\x02cos\nsystem\n" + call,
        pickle.dumps(Gadget(__import__("os").system, f"touch {target}"), protocol=4),
    ):
        with pytest.raises(PickleError, match=r"global (os|posix)\.system is not allowed"):
            index(blob)
    assert not target.exists()


@pytest.mark.parametrize(
    "name",
    [
        "subprocess.Popen",
        "builtins.getattr",
        "builtins.__import__",
        "torch.load",
        "numpy.load",
        "torch.HalfStorage",  # only inside a storage blob
        "torch._utils._rebuild_device_tensor_from_numpy",
        "dnnlib.util.call_func_by_name",
    ],
)
def test_globals_off_the_list_are_refused(name):
    module, attr = name.rsplit(".", 1)
    blob = P4 + u8(module) + u8(attr) + op(0x93) + op(0x29) + op(0x52) + STOP
    with pytest.raises(PickleError, match=rf"snap\.pkl: byte \d+: global {name} is not allowed"):
        index(blob)


@pytest.mark.parametrize(
    ("opname", "payload"),
    [
        ("INST", b"ios\nsystem\n"),
        ("OBJ", b""),
        ("EXT1", b"\x01"),
        ("EXT2", b"\x01\x00"),
        ("PERSID", b"x\n"),
        ("BINPERSID", b""),
        ("NEXT_BUFFER", b""),
        ("READONLY_BUFFER", b""),
        ("NEWOBJ_EX", b""),
        ("STRING", b"'a'\n"),
        ("INT", b"1\n"),
        ("GET", b"0\n"),
    ],
)
def test_unsupported_opcodes_are_refused(opname, payload):
    code = pickletools.code2op  # name -> byte
    byte = next(c for c, o in code.items() if o.name == opname).encode("latin-1")
    blob = P4 + op(0x4E) + op(0x30) + byte + payload + op(0x4E) + STOP
    with pytest.raises(PickleError, match=rf"byte 4: opcode {opname} \(0x.."):
        index(blob)


# -- malformed files -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "match"),
    [
        (op(0x58, b"\xff\xff\xff\xff"), r"length 4294967295 runs past the end"),  # BINUNICODE
        (op(0x42, b"\xff\xff\xff\x7f"), r"length 2147483647 runs past the end"),  # BINBYTES
        (op(0x8E, struct.pack("<Q", 1 << 63)), r"length 9223372036854775808 runs past"),
        (op(0x8D, b"\xff" * 8), r"length 18446744073709551615 runs past"),
        (op(0x96, b"\xff" * 8), r"length 18446744073709551615 runs past"),
        (op(0x8B, struct.pack("<i", -1)), r"LONG length -1 is negative"),
        (op(0x8B, struct.pack("<i", 1 << 30)), r"LONG length 1073741824 is negative or over"),
        (op(0x95, struct.pack("<Q", 1 << 40)), r"length 1099511627776 runs past the end"),
        (op(0x68, b"\x05"), r"memo index 5 was never stored"),
        (op(0x6A, b"\xff\xff\xff\xff"), r"memo index 4294967295 was never stored"),
        (op(0x30), r"stack underflow"),
        (op(0x31), r"no MARK to pop to"),
        (op(0x61), r"stack underflow"),
        (op(0x4E) + op(0x4E) + op(0x61), r"APPEND to NoneType"),
        (op(0x7D) + op(0x5D) + op(0x4E) + op(0x73), r"not a plain scalar"),
        (op(0x4A, b"\x00" * 4) + op(0x80, b"\x04"), r"PROTO 4 is not supported here"),
        (op(0x8C, b"\x02\xff\xfe"), r"string is not UTF-8"),
        (op(0x4E) + op(0x4E), r"STOP with 2 items"),
        (op(0x8C, b"\x05ab"), r"runs past the end"),
    ],
)
def test_malformed_opcodes_are_refused(body, match):
    with pytest.raises(PickleError, match=r"snap\.pkl: byte \d+: .*" + match):
        index(P4 + body + STOP)


def test_pickle_error_is_a_format_error():
    assert issubclass(PickleError, FormatError)
    assert issubclass(PickleError, ValueError)
    with pytest.raises(PickleError, match=r"protocol 2 or later starts with PROTO"):
        index(b"N.")
    with pytest.raises(PickleError, match=r"PROTO 6 is not supported"):
        index(b"\x80\x06N.")


def test_frame_lengths_that_lie_are_refused(tiny_blob):
    assert tiny_blob[2] == 0x95
    (length,) = struct.unpack("<Q", tiny_blob[3:11])
    for lie in (length - 1, length + 1, length - 100, 1 << 62):
        blob = tiny_blob[:3] + struct.pack("<Q", lie) + tiny_blob[11:]
        with pytest.raises(PickleError, match=r"frame|runs past the end"):
            index(blob)


def test_every_truncation_is_a_pickle_error(tiny_blob):
    torch.manual_seed(1)
    small = snapshot(Leaf(1).half())  # with the encoder's numpy arrays, loss_fn, dataset_kwargs
    for blob in (tiny_blob, unframe(small)):  # a framed file is already caught at its FRAME
        index(blob)
        for cut in range(len(blob)):
            with pytest.raises(PickleError):
                index(blob[:cut])


def test_trailing_bytes_and_short_reads_are_refused(tiny_blob):
    with pytest.raises(PickleError, match=r"1 bytes after STOP"):
        index(tiny_blob + b"\x00")
    with pytest.raises(PickleError, match=r"read \d+ of \d+ bytes"):
        index_snapshot(lambda o, n: tiny_blob[o : o + n][:-1], len(tiny_blob), "x")


def test_random_byte_flips_never_escape(tiny_blob):
    rng = random.Random(1234)
    blobs = [tiny_blob, unframe(tiny_blob)]
    outcomes = collections.Counter()
    for i in range(600):
        blob = bytearray(blobs[i % 2])
        for _ in range(1 + (i % 3)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        try:
            index(bytes(blob))
            outcomes["ok"] += 1
        except PickleError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 100, outcomes


def test_deep_nesting_is_bounded():
    n = 100_000
    lists = P4 + op(0x5D) * n + op(0x61) * (n - 1) + STOP
    with pytest.raises(PickleError, match=r"top level is not a dict"):
        index(lists)
    with pytest.raises(PickleError, match=r"over 1000 nested MARKs"):
        index(P4 + op(0x28) * n + STOP)
    # nesting needs no stack: ((((),),),) 100k deep, used as a dict key
    chain = P4 + op(0x29) + op(0x85) * n
    with pytest.raises(PickleError, match=r"not a plain scalar"):
        index(chain[:2] + op(0x7D) + chain[2:] + op(0x4E) + op(0x73) + STOP)


def test_deep_or_cyclic_structures_in_the_snapshot_are_refused(tiny):
    deep = []
    for _ in range(50):
        deep = [deep]
    state = {"_parameters": {}, "_buffers": {}, "_init_kwargs": {"deep": deep}}
    with pytest.raises(PickleError, match=r"_init_kwargs is nested deeper than 32"):
        index(snapshot(tiny, ema=Persistent("Precond", state)))
    loop = nn.ModuleDict.__new__(nn.ModuleDict)  # NEWOBJ + BUILD: pickle keeps the cycle
    loop.__dict__.update(_parameters={}, _buffers={}, _modules={"again": loop})
    state = {"_parameters": {}, "_buffers": {}, "_modules": {"body": loop}}
    with pytest.raises(
        PickleError, match=r"module body.again is module body again \(shared or cyclic\)"
    ):
        index(snapshot(tiny, ema=Persistent("Precond", state)))


class FakeTensor:
    """Pickles as ``_rebuild_tensor_v2`` with chosen arguments, over a real storage."""

    def __init__(self, *args, storage_numel=4):
        self.storage = torch.ones(storage_numel, dtype=torch.float16).untyped_storage()
        self.args = args

    def __reduce__(self):
        typed = torch.storage.TypedStorage(
            wrap_storage=self.storage, dtype=torch.float16, _internal=True
        )
        return (torch._utils._rebuild_tensor_v2, (typed, *self.args))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((2, (4,), (1,), False, collections.OrderedDict()), r"lie outside its storage of 4"),
        ((0, (2, 2), (1, 2), False, collections.OrderedDict()), r"strides \(1, 2\) .* contiguous"),
        ((0, (2,), (1,), 1, collections.OrderedDict()), r"requires_grad or hooks"),
        ((0, (2,), (1,), False, collections.OrderedDict(), {"neg": True}), r"metadata"),
        ((-1, (2,), (1,), False, collections.OrderedDict()), r"not integers"),
    ],
)
def test_bad_tensors_are_refused(tiny, args, match):
    state = {"_parameters": {"w": FakeTensor(*args)}, "_buffers": {}}
    with pytest.raises(PickleError, match=match):
        index(snapshot(tiny, ema=Persistent("Precond", state)))


def test_bad_storage_blobs_are_refused(tiny_blob):
    at = tiny_blob.index(b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19") + 2
    with pytest.raises(PickleError, match=r"storage blob at byte \d+: not a legacy torch storage"):
        index(tiny_blob[:at] + b"\x00" + tiny_blob[at + 1 :])
    for old, new in ((b"ctorch\nHalfStorage\n", b"cbuiltins\nexecXXXX\n"),
                     (b"\x03\x00\x00\x00cpuq\x03K\x06", b"\x03\x00\x00\x00cpuq\x03K\x07")):  # fmt: skip
        assert old in tiny_blob
        with pytest.raises(PickleError, match=r"is not allowed|does not fill"):
            index(tiny_blob.replace(old, new, 1))


def test_malformed_top_levels_are_refused(tiny):
    with pytest.raises(PickleError, match=r"top level is not a dict with a persistent 'ema'"):
        index(pickle.dumps({"ema": 1}, protocol=4))
    with pytest.raises(PickleError, match=r"top level"):
        index(pickle.dumps([1, 2], protocol=4))
    state = {"_parameters": {"w": 3}, "_buffers": {}}
    with pytest.raises(PickleError, match=r"w is a int, not a tensor"):
        index(snapshot(tiny, ema=Persistent("Precond", state)))


class _Reduce:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def test_one_bytes_value_cannot_make_two_storages():
    """A memoised blob reused would be parsed (and numpy data re-read) again and again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated; tensors still pickle it
        fn, (blob,) = torch.arange(8.0).storage().__reduce__()
    once = pickle.dumps([_Reduce(fn, blob)], protocol=4)
    twice = pickle.dumps([_Reduce(fn, blob), _Reduce(fn, blob)], protocol=4)
    assert twice.count(blob[:64]) == 1  # pickle memoised it: the second is a BINGET
    with pytest.raises(PickleError) as first:
        index(once)
    assert "used twice" not in str(first.value)  # refused later, as no snapshot
    with pytest.raises(PickleError, match="one bytes value used twice"):
        index(twice)


def test_long1_length_is_unsigned():
    big = 1 << 1100  # 138 bytes: LONG1's length byte is over 127
    blob = pickle.dumps({"x": big}, protocol=2)
    with pytest.raises(PickleError) as err:
        index(blob)
    assert "LONG length" not in str(err.value)  # parsed; refused as no snapshot


def _kwargs_snapshot(tiny, kwargs):
    state = {"_parameters": {}, "_buffers": {}, "_init_kwargs": kwargs}
    return snapshot(tiny, ema=Persistent("Precond", state))


def test_shared_init_kwargs_are_converted_once(tiny, monkeypatch):
    shared = []
    for _ in range(12):  # l = [l, l]: memo BINGETs; expanded, 8k lists (2**32 at depth 32)
        shared = [shared, shared]
    kwargs = index(_kwargs_snapshot(tiny, {"x": shared, "t": ((1,), (1,))})).init_kwargs
    x = kwargs["x"]
    for _ in range(11):
        assert x[0] is x[1]
        x = x[0]
    assert x == [[], []]
    loop = [1]
    loop.append(loop)
    with pytest.raises(PickleError, match=r"snap.pkl: _init_kwargs is cyclic"):
        index(_kwargs_snapshot(tiny, {"loop": loop}))
    deep = []
    for _ in range(20):
        deep = [deep]
    # the shared list sits at depth 21 under "b", so reusing it 15 levels down nests 36 deep
    low = deep
    for _ in range(15):
        low = [low]
    with pytest.raises(PickleError, match=r"_init_kwargs is nested deeper than 32"):
        index(_kwargs_snapshot(tiny, {"a": low, "b": deep}))
    monkeypatch.setattr("phema.pickles._MAX_PLAIN", 50)
    with pytest.raises(PickleError, match=r"snap.pkl: _init_kwargs holds over 50 values"):
        index(_kwargs_snapshot(tiny, {"many": list(range(60))}))


def test_shared_modules_and_tensors_are_refused(tiny, monkeypatch):
    half = torch.ones(2, dtype=torch.float16)
    leaf = Persistent("Leaf", {"_parameters": {"w": half}, "_buffers": {}})
    state = {"_parameters": {}, "_buffers": {}, "_modules": {"a": leaf, "b": leaf}}
    with pytest.raises(PickleError, match=r"snap.pkl: module b is module a again"):
        index(snapshot(tiny, ema=Persistent("Precond", state)))
    state = {"_parameters": {"u": half}, "_buffers": {"v": half}}
    with pytest.raises(PickleError, match=r"snap.pkl: v is tensor u again"):
        index(snapshot(tiny, ema=Persistent("Precond", state)))
    monkeypatch.setattr("phema.pickles._MAX_TENSORS", 2)
    with pytest.raises(PickleError, match=r"over 2 tensors"):
        index(snapshot(tiny))


def test_huge_shapes_are_refused():
    arr = np.empty((1, 0), dtype=np.float32)
    fn, args, state = arr.__reduce__()
    assert state[1] == (1, 0)
    assert state[4] == b""
    for shape in ((2**70, 0), (0,) * 33, (0, 2**61, 2**61)):
        bad = _Reduce3(fn, args, (state[0], shape, *state[2:]))
        with pytest.raises(PickleError, match=r"numpy array shape .* out of bounds"):
            index(pickle.dumps({"a": bad}, protocol=4))
    for shape in ((0, 2**70), (0, 2**61, 2**61)):
        bad = FakeTensor(0, shape, (1,) * len(shape), False, collections.OrderedDict())
        with pytest.raises(PickleError, match=r"_rebuild_tensor_v2: shape .* out of bounds"):
            index(pickle.dumps({"a": bad}, protocol=4))
    with pytest.raises(PickleError, match=r"cannot be made"):
        read_tensor(reader(b""), TensorRange(torch.float16, (0, 2**70), 0, 0))


class _Reduce3:
    def __init__(self, fn, args, state):
        self.reduced = fn, args, state

    def __reduce__(self):
        return self.reduced
