"""The streaming pass itself (phema._stream) against a float64 brute-force sum.

Layouts are drawn at random: any order of dtypes (so tensors may sit off their
alignment, which phema's own writer never does), copied tensors, empty tensors,
any window size, any number of inputs, outputs and reads in flight.
"""

import io
import itertools
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from phema._stream import plan_windows, stream
from phema.format import encode_header

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8]
#: Unit roundoff of the accumulation dtype.
EPS = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


@st.composite
def cases(draw):
    n_tensors = draw(st.integers(1, 6))
    specs = []
    for i in range(n_tensors):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 9), min_size=1, max_size=2)))
        specs.append((f"t{i}", dtype, shape))
    copied = {n for n, d, _ in specs if d.is_floating_point and draw(st.booleans())}
    return {
        "specs": specs,
        "copied": copied,
        "inputs": draw(st.integers(1, 7)),
        "outputs": draw(st.integers(1, 4)),
        "window": draw(st.integers(1, 120)),
        "inflight": draw(st.integers(1, 5)),
        "out_dtype": draw(st.sampled_from([torch.float32, torch.float16, torch.float64])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _data(specs, n_inputs, gen):
    """Each input's data section: random tensors laid out in the given order."""
    _, header = encode_header(specs, {}, keep_order=True)
    datas, tensors = [], []
    for _ in range(n_inputs):
        parts, values = [], {}
        for ti in header.tensors:
            if ti.dtype.is_floating_point:
                v = torch.randn(ti.shape, generator=gen, dtype=torch.float64).to(ti.dtype)
            else:
                v = torch.randint(-100, 100, ti.shape, generator=gen).to(ti.dtype)
            values[ti.name] = v
            parts.append(v.reshape(-1).view(torch.uint8).numpy().tobytes())
        datas.append(b"".join(parts))
        tensors.append(values)
    return header.tensors, datas, tensors


@settings(max_examples=150, deadline=None)
@given(cases())
def test_stream_equals_float64_sum_and_reads_every_byte_once(case):
    gen = torch.Generator().manual_seed(case["seed"])
    layout, datas, tensors = _data(case["specs"], case["inputs"], gen)
    n_in, k = case["inputs"], case["outputs"]
    weights = (torch.rand(n_in, k, generator=gen, dtype=torch.float64) * 2 - 0.5).tolist()
    latest = int(torch.randint(0, n_in, (1,), generator=gen))
    averaged = {ti.name for ti in layout if ti.dtype.is_floating_point} - case["copied"]
    out_dtype = {ti.name: case["out_dtype"] if ti.name in averaged else ti.dtype for ti in layout}
    windows = plan_windows(layout, averaged, out_dtype, case["window"])

    reads, lock = [], threading.Lock()

    def read(r, offset, out):
        with lock:
            reads.append((r, offset, len(out)))
        out[:] = datas[r][offset : offset + len(out)]

    files = [io.BytesIO() for _ in range(k)]
    stream(read, windows, weights, latest, files, max_inflight=case["inflight"])

    # Every byte of every input read exactly once, in ranges of at most one window
    # (or one element, when an element is wider than the window).
    widest = max(ti.dtype.itemsize for ti in layout)
    for r in range(n_in):
        spans = sorted((o, o + n) for q, o, n in reads if q == r)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert sum(b - a for a, b in spans) == len(datas[r])
        assert all(b - a <= max(case["window"], widest) for a, b in spans)

    wide = any(ti.dtype == torch.float64 and ti.numel for ti in layout if ti.name in averaged)
    acc_dtype = torch.float64 if wide else torch.float32
    out_u = {torch.float16: 2.0**-11, torch.float32: 2.0**-24, torch.float64: 2.0**-53}
    for j, f in enumerate(files):
        buf = bytearray(f.getvalue())
        pos = 0
        for ti in layout:
            size = ti.numel * out_dtype[ti.name].itemsize
            got = torch.tensor(list(buf[pos : pos + size]), dtype=torch.uint8)
            got = got.view(out_dtype[ti.name])
            pos += size
            if ti.name not in averaged:
                assert torch.equal(got, tensors[latest][ti.name].reshape(-1))
                continue
            xs = np.stack([tensors[r][ti.name].double().reshape(-1).numpy() for r in range(n_in)])
            c = np.array([weights[r][j] for r in range(n_in)])
            exact = c @ xs
            # fp32/fp64 accumulation of n_in products: |error| <= (n_in + 1) u sum|c x|
            # (the coefficients themselves are rounded to the accumulation dtype), then
            # one rounding to the output dtype.
            bound = (n_in + 1) * EPS[acc_dtype] * (np.abs(c) @ np.abs(xs))
            bound = bound + out_u[out_dtype[ti.name]] * np.abs(exact) + 1e-300
            if out_dtype[ti.name] == torch.float16:
                bound = bound + 2.0**-25  # fp16 subnormal spacing
            err = np.abs(got.double().numpy() - exact)
            assert np.all(err <= bound * 1.01), (ti, err.max(), bound.min())
        assert pos == len(buf)


def test_fp64_inputs_accumulate_in_fp64():
    """A float64 model's reconstruction keeps float64 precision (no fp32 detour)."""
    gen = torch.Generator().manual_seed(0)
    layout, datas, tensors = _data([("w", torch.float64, (1000,))], 5, gen)
    weights = [[0.1 + 1e-9 * r] for r in range(5)]
    windows = plan_windows(layout, {"w"}, {"w": torch.float64}, 800)
    out = io.BytesIO()

    def read(r, offset, buf):
        buf[:] = datas[r][offset : offset + len(buf)]

    stream(read, windows, weights, 0, [out], max_inflight=2)
    got = torch.frombuffer(bytearray(out.getvalue()), dtype=torch.float64)
    exact = sum(weights[r][0] * tensors[r]["w"] for r in range(5))
    # fp64 summation of 5 terms: a few ulps; fp32 accumulation would be off by ~1e-8.
    assert torch.allclose(got, exact, rtol=0, atol=1e-14)


def test_read_error_propagates_and_no_later_window_is_written():
    gen = torch.Generator().manual_seed(0)
    layout, datas, _ = _data([("w", torch.float32, (100,))], 3, gen)
    windows = plan_windows(layout, {"w"}, {"w": torch.float32}, 40)
    calls = []

    def read(r, offset, buf):
        calls.append(offset)
        if offset >= 200:
            raise OSError("connection reset")
        buf[:] = datas[r][offset : offset + len(buf)]

    out = io.BytesIO()
    with pytest.raises(OSError, match="connection reset"):
        stream(read, windows, [[1.0], [0.0], [0.0]], 0, [out], max_inflight=2)
    assert len(out.getvalue()) == 200  # the 5 windows before the failed read, nothing after
