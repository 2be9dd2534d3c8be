"""phema.load: a reconstruction or snapshot back into a model, by URL."""

import uuid

import pytest
import torch
from torch import nn

import phema
from phema.errors import FormatError, StorageError


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


@pytest.fixture
def run():
    """A memory:// store with snapshots of a short run, and its reconstruction at std 0.08."""
    net = _net()
    root = f"memory://load-{uuid.uuid4().hex}"
    ema = phema.PowerFunctionEMA(net, stds=(0.05, 0.10))
    with phema.SnapshotWriter(f"{root}/snaps", dtype=torch.float16) as writer:
        for step in range(1, 41):
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(0.01 * step)
            net(torch.randn(5, 4))  # moves the BatchNorm statistics (copied buffers)
            ema.update(step)
            if step % 10 == 0:
                writer.save(ema, step=step)
    phema.reconstruct(f"{root}/snaps", [0.08], f"{root}/ema")
    (out,) = phema.SnapshotStore(f"{root}/ema").reconstructions()
    return net, root, out


def test_load_into_a_model_equals_the_stored_tensors(run):
    net, _root, out = run
    fresh = _net()
    with torch.no_grad():
        for p in fresh.parameters():
            p.fill_(7.0)  # so that a load that did nothing shows
    tensors = phema.load(out.url, fresh)
    stored = phema.SnapshotStore(out.url.rsplit("/", 1)[0]).load(out)
    assert set(tensors) == set(net.state_dict())  # strict: every key, no extra
    for name, value in fresh.state_dict().items():
        assert torch.equal(tensors[name], stored[name])
        # cast to the model's dtype (float16 outputs into float32 parameters)
        assert torch.equal(value, stored[name].to(value.dtype))


def test_load_a_snapshot_file_and_info(run):
    _, root, _ = run
    store = phema.SnapshotStore(f"{root}/snaps")
    first = store.list()[0]
    info = store.info(first.path.rsplit("/", 1)[1])
    assert info == first
    tensors = phema.load(first.url)
    assert all(torch.equal(tensors[k], v) for k, v in store.load(first).items())


def test_load_names_what_does_not_fit(run):
    _, _, out = run
    other = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8))  # no last layer
    with pytest.raises(FormatError) as err:
        phema.load(out.url, other)
    msg = str(err.value)
    assert out.url in msg
    assert "2 unexpected keys, e.g. ['2.bias', '2.weight']" in msg
    assert "strict=False" in msg
    phema.load(out.url, other, strict=False)  # the matching tensors load
    assert torch.equal(other[0].weight, phema.load(out.url)["0.weight"].float())


def test_load_names_a_shape_mismatch(run):
    _, _, out = run
    wider = nn.Sequential(nn.Linear(4, 9), nn.BatchNorm1d(9), nn.Linear(9, 2))
    with pytest.raises(FormatError) as err:
        phema.load(out.url, wider)
    msg = str(err.value)
    assert "of other shapes, e.g. size mismatch for 0.weight" in msg
    assert "strict=False" not in msg  # it would not help: shapes differ


def test_load_missing_and_foreign_files(run, tmp_path):
    _, root, _ = run
    with pytest.raises(StorageError, match=r"memory://.*/ema/nothing\.safetensors does not exist"):
        phema.load(f"{root}/ema/nothing.safetensors")
    bad = tmp_path / "plain.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}   ")
    with pytest.raises(FormatError, match=r"plain\.safetensors"):
        phema.load(str(bad))
