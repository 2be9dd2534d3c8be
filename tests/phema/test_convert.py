"""phema.convert and ``phema convert``: official EDM2 pickles and ema-pytorch checkpoints -> a store.

Official fixtures are written as ``test_pickles`` writes them (official structure, fake
``dnnlib``/``torch_utils`` modules, nothing executed on reading); ema-pytorch folders
are written by the real ``PostHocEMA`` (the ``bench`` extra).
"""

from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from test_pickles import Tiny, snapshot
from torch import nn

import phema
from phema.convert import convert, list_sources, official_nimg, update_every_error
from phema.errors import ExistsError, FormatError, OptionError, PickleError, ProfileError

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
from clirun import run_cli

STDS = ("0.050", "0.100")
KIMGS = (1024, 2048, 3072, 4096)


# -- official pickles ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kimg", "nimg"),
    [
        (0, 0),
        (1, 1024),
        (128, 128000),
        (8388, 8388608),
        (2147483, 2**31),
        (999, 999424),
        (84, 84992),
    ],
)
def test_kimg_rule(kimg, nimg):
    assert official_nimg(kimg) == nimg
    assert kimg * 1000 <= nimg <= kimg * 1000 + 999
    assert nimg % 1024 == 0


@pytest.mark.parametrize("kimg", [42, 127, 85])
def test_kimg_without_a_multiple_of_1024_is_refused(kimg):
    assert all(n % 1024 for n in range(kimg * 1000, kimg * 1000 + 1000))
    with pytest.raises(FormatError, match=f"kimg {kimg} names no multiple of 1024"):
        official_nimg(kimg)


def _official_folder(root, kimgs=KIMGS, stds=STDS):
    """Official-structure snapshots of ``Tiny`` (fp16), distinct tensors per file."""
    root.mkdir(exist_ok=True)
    nets = {}
    for i, kimg in enumerate(kimgs):
        for j, std in enumerate(stds):
            torch.manual_seed(10 * i + j)
            net = Tiny().half()
            path = root / f"network-snapshot-{kimg:07d}-{std}.pkl"
            path.write_bytes(snapshot(net))
            nets[path.name] = net.state_dict()
    (root / "log.txt").write_text("not a snapshot, left alone\n")
    (root / "training-state-0004096.pt").write_bytes(b"left alone too")
    return nets


@pytest.mark.filterwarnings("ignore::phema.errors.IllPosedWarning")  # few snapshots: poor fits
def test_official_snapshots_convert_bitwise(tmp_path):
    nets = _official_folder(tmp_path / "run")
    paths = convert(str(tmp_path / "run"), str(tmp_path / "out"))
    assert len(paths) == len(nets)
    store = phema.SnapshotStore(str(tmp_path / "out"))
    infos = store.list()
    assert len(infos) == len(nets)
    for info in infos:
        kimg, std = round(info.t) // 1024 * 1024 // 1000, info.std
        name = f"network-snapshot-{kimg:07d}-{std:.3f}.pkl"
        assert info.t == official_nimg(kimg)
        assert info.t_unit == "images"
        assert info.step is None
        assert info.gamma == float(phema.sigma_rel_to_gamma(std))
        got, want = store.load(info), nets[name]
        assert list(got) == list(want)
        for k, v in want.items():
            assert got[k].dtype == torch.float16
            assert torch.equal(got[k].view(torch.int16), v.view(torch.int16)), k
    # the store plans and reconstructs; a target that is an input comes back as that input
    p = phema.plan(store, [0.05, 0.07])
    assert p.t == official_nimg(4096)
    assert len(p.fits) == 2
    out = tmp_path / "rec"
    phema.reconstruct(store, [0.05, 0.07], str(out))
    rec = phema.SnapshotStore(str(out))
    (r05,) = [r for r in rec.reconstructions() if r.std == 0.05]
    last = nets["network-snapshot-0004096-0.050.pkl"]
    for k, v in rec.load(r05).items():
        torch.testing.assert_close(v.float(), last[k].float(), atol=1e-5, rtol=1e-5)


def test_official_names_are_checked_before_anything_is_written(tmp_path):
    _official_folder(tmp_path / "run", kimgs=(1024,))
    (tmp_path / "run" / "network-snapshot-0000042-0.050.pkl").write_bytes(b"")
    with pytest.raises(FormatError, match="kimg 42 names no multiple of 1024"):
        convert(str(tmp_path / "run"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    (tmp_path / "run" / "network-snapshot-0000042-0.050.pkl").unlink()
    (tmp_path / "run" / "phema-0001024-0.070.pkl").write_bytes(b"")
    with pytest.raises(FormatError, match="official reconstructions are no snapshots"):
        list_sources(str(tmp_path / "run"))


def test_a_file_that_is_no_snapshot_is_refused(tmp_path):
    _official_folder(tmp_path / "run", kimgs=(1024,))
    (tmp_path / "run" / "network-snapshot-0002048-0.050.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(PickleError, match=r"network-snapshot-0002048-0\.050\.pkl"):
        convert(str(tmp_path / "run"), str(tmp_path / "out"))


def test_existing_outputs_are_kept(tmp_path):
    _official_folder(tmp_path / "run", kimgs=(1024,))
    convert(str(tmp_path / "run"), str(tmp_path / "out"))
    with pytest.raises(ExistsError, match="exists; pass overwrite"):
        convert(str(tmp_path / "run"), str(tmp_path / "out"))
    assert len(convert(str(tmp_path / "run"), str(tmp_path / "out"), overwrite=True)) == 2


# -- ema-pytorch -----------------------------------------------------------------------------
SIGMAS = (0.05, 0.28)


def _train(folder, update_every, steps=12, every=3, dtype=torch.float32):
    """Train a tiny net with the real PostHocEMA; the parameters at each update (float64)."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    ema = ema_pytorch.PostHocEMA(
        net,
        sigma_rels=SIGMAS,
        checkpoint_every_num_steps=every,
        checkpoint_folder=str(folder),
        checkpoint_dtype=dtype,
        update_every=update_every,
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    trajectory = []
    for _ in range(steps):
        x = torch.randn(16, 3)
        loss = (net(x) - x[:, :2]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        trajectory.append({k: v.detach().double().clone() for k, v in net.state_dict().items()})
        ema.update()
    return trajectory


def _oracle(trajectory, n, std):
    """Float64 power-function EMA (phema.tracking's update) at t = n + 1.

    ``theta_1`` is sampled at t = 2 (the first update copies it), ``theta_m`` at m + 1.
    """
    gamma = float(phema.sigma_rel_to_gamma(std))
    avg, t_prev = None, 0.0
    for m, theta in enumerate(trajectory[:n], start=1):
        t = m + 1.0
        beta = (t_prev / t) ** (gamma + 1)
        avg = (
            theta if avg is None else {k: beta * avg[k] + (1 - beta) * v for k, v in theta.items()}
        )
        t_prev = t
    return avg


@pytest.mark.filterwarnings("ignore::phema.errors.IllPosedWarning")  # few snapshots: poor fits
def test_ema_pytorch_checkpoints_are_power_function_profiles(tmp_path):
    trajectory = _train(tmp_path / "ckpt", update_every=1)
    assert sorted(os.listdir(tmp_path / "ckpt"))[:2] == ["0.12.pt", "0.3.pt"]
    convert(str(tmp_path / "ckpt"), str(tmp_path / "out"), stds=SIGMAS, update_every=1)
    store = phema.SnapshotStore(str(tmp_path / "out"))
    infos = store.list()
    assert sorted((i.step, i.std) for i in infos) == [(n, s) for n in (3, 6, 9, 12) for s in SIGMAS]
    # fp32 lerp rounds each update by a few ulp of max|theta|; beta <= 1 contracts old
    # errors, so after n updates the error is at most ~3 n 2^-24 max|theta|.
    scale = max(v.abs().max().item() for th in trajectory for v in th.values())
    for info in infos:
        assert info.t == info.step + 1
        assert info.t_unit == "steps"
        got, want = store.load(info), _oracle(trajectory, info.step, info.std)
        assert list(got) == list(want)  # the model's own names, no "ema_model.", no bookkeeping
        atol = 4 * info.step * 2.0**-24 * scale
        for k, v in want.items():
            assert got[k].dtype == torch.float32
            torch.testing.assert_close(got[k].double(), v, atol=atol, rtol=0)
    # a wrong trajectory/time mapping would be far outside that tolerance
    off = _oracle(trajectory, 11, SIGMAS[0])
    last = next(i for i in infos if i.step == 12 and i.std == SIGMAS[0])
    assert max((store.load(last)[k].double() - v).abs().max() for k, v in off.items()) > 1e-4
    out = tmp_path / "rec"
    phema.reconstruct(store, [0.05, 0.15], str(out))
    (r05,) = [r for r in phema.SnapshotStore(str(out)).reconstructions() if r.std == 0.05]
    for k, v in phema.SnapshotStore(str(out)).load(r05).items():
        torch.testing.assert_close(v.double(), store.load(last)[k].double(), atol=1e-5, rtol=0)


def test_update_every_error_matches_the_real_package():
    """Their profile, measured by averaging one-hot trajectories with the real KarrasEMA."""
    ema_pytorch = pytest.importorskip("ema_pytorch")
    steps, gamma = 40, 3.0
    for k in (1, 2, 5):
        net = nn.Linear(steps, 1, bias=False).double()
        ema = ema_pytorch.KarrasEMA(net, gamma=gamma, update_every=k)
        for n in range(1, steps + 1):
            with torch.no_grad():
                net.weight.zero_()
                net.weight[0, n - 1] = 1.0
            ema.update()
        w = ema.ema_model.weight[0].detach().numpy()  # weight of theta_n, n = 1..steps
        assert math.isclose(w.sum(), 1.0, rel_tol=1e-12)
        ns = list(range(1, steps + 1, k))
        big_t = steps + 1.0
        num = den = 0.0
        for j, n in enumerate(ns):
            a = 0.0 if j == 0 else float(n)
            b = min(n + k, big_t)
            c = (b / big_t) ** (gamma + 1) - (a / big_t) ** (gamma + 1)
            num += (w[n - 1] - c) ** 2 / (b - a)
            den += c * c / (b - a)
        assert math.isclose(update_every_error(gamma, steps, k), math.sqrt(num / den), abs_tol=1e-9)
        assert (update_every_error(gamma, steps, k) < 1e-12) == (k == 1)


def test_update_every_above_one_is_refused_with_the_error_size(tmp_path):
    _train(tmp_path / "ckpt", update_every=2, dtype=torch.float16)
    worst = max(
        update_every_error(float(phema.sigma_rel_to_gamma(s)), n, 2)
        for s in SIGMAS
        for n in (3, 6, 9, 12)
    )
    with pytest.raises(ProfileError, match=f"relative L2 error up to {worst:.3g}"):
        convert(str(tmp_path / "ckpt"), str(tmp_path / "out"), stds=SIGMAS, update_every=2)
    assert not (tmp_path / "out").exists()
    with pytest.warns(UserWarning, match=f"relative L2 error up to {worst:.3g}"):
        convert(
            str(tmp_path / "ckpt"),
            str(tmp_path / "out"),
            stds=SIGMAS,
            update_every=2,
            allow_inexact=True,
        )
    infos = phema.SnapshotStore(str(tmp_path / "out")).list()
    assert len(infos) == 8
    assert all(
        v.dtype == torch.float16
        for v in phema.SnapshotStore(str(tmp_path / "out")).load(infos[0]).values()
    )


def test_ema_pytorch_needs_stds_and_update_every(tmp_path):
    _train(tmp_path / "ckpt", update_every=1, steps=3)
    with pytest.raises(OptionError, match="give the 2 sigma_rels"):
        convert(str(tmp_path / "ckpt"), str(tmp_path / "out"), update_every=1)
    with pytest.raises(OptionError, match="3 stds were given"):
        convert(
            str(tmp_path / "ckpt"), str(tmp_path / "out"), stds=(0.05, 0.1, 0.2), update_every=1
        )
    with pytest.raises(OptionError, match="update_every"):
        convert(str(tmp_path / "ckpt"), str(tmp_path / "out"), stds=SIGMAS)
    gammas = [float(phema.sigma_rel_to_gamma(s)) for s in SIGMAS]
    convert(str(tmp_path / "ckpt"), str(tmp_path / "out"), gammas=gammas, update_every=1)
    assert sorted(
        i.std for i in phema.SnapshotStore(str(tmp_path / "out")).list()
    ) == pytest.approx(SIGMAS)


# -- the command -----------------------------------------------------------------------------
def test_cli_converts_and_refuses(tmp_path, capsys):
    _official_folder(tmp_path / "run", kimgs=(1024, 2048))
    code, _, err = run_cli(capsys, "convert", tmp_path / "run", "--out", tmp_path / "out")
    assert code == 0
    assert err[-1].startswith("converted 4 snapshot(s)")
    assert "network-snapshot-0001024-0.050.pkl -> " in err[0]
    code, _, err = run_cli(capsys, "convert", tmp_path / "run", "--out", tmp_path / "out")
    assert code == 1
    assert len(err) == 1
    assert "exists; pass overwrite (--overwrite)" in err[0]
    code, _, err = run_cli(
        capsys, "convert", tmp_path / "run", "--out", tmp_path / "out", "--overwrite"
    )
    assert code == 0
    (tmp_path / "run" / "notes.pkl").write_bytes(b"")
    code, _, err = run_cli(capsys, "convert", tmp_path / "run", "--out", tmp_path / "o2")
    assert code == 1
    assert len(err) == 1
    assert err[0].startswith("error: ")
    assert "notes.pkl" in err[0]
    code, _, err = run_cli(capsys, "convert", tmp_path / "nothing", "--out", tmp_path / "o2")
    assert code == 1
    assert len(err) == 1
    assert "not a local folder" in err[0]


def test_cli_ema_pytorch(tmp_path, capsys):
    _train(tmp_path / "ckpt", update_every=2, steps=6)
    base = ["convert", tmp_path / "ckpt", "--out", tmp_path / "out"]
    code, _, err = run_cli(capsys, *base, "--update-every", "2")
    assert code == 2
    assert len(err) == 1
    assert "--stds" in err[0]
    code, _, err = run_cli(capsys, *base, "--stds", "0.05,0.28")
    assert code == 2
    assert len(err) == 1
    assert "--update-every" in err[0]
    assert "default is 100" in err[0]
    code, _, err = run_cli(capsys, *base, "--stds", "0.05,0.28", "--update-every", "0")
    assert code == 2
    code, _, err = run_cli(
        capsys, *base, "--stds", "0.05,0.28", "--gammas", "1,2", "--update-every", "1"
    )
    assert code == 2
    assert "not both" in err[0]
    code, _, err = run_cli(capsys, *base, "--stds", "0.05,0.28", "--update-every", "2")
    assert code == 1
    assert len(err) == 1
    assert "relative L2 error up to" in err[0]
    assert "--allow-inexact" in err[0]
    code, _, err = run_cli(
        capsys, *base, "--stds", "0.05,0.28", "--update-every", "2", "--allow-inexact"
    )
    assert code == 0
    assert err[0].startswith("warning: update_every=2")
    assert err[-1].startswith("converted 4")


# -- review fixes ----------------------------------------------------------------------------
def test_a_truncated_file_stops_the_run_before_anything_is_written(tmp_path):
    _official_folder(tmp_path / "run", kimgs=(1024,))
    good = (tmp_path / "run" / "network-snapshot-0001024-0.050.pkl").read_bytes()
    bad = tmp_path / "run" / "network-snapshot-0002048-0.050.pkl"
    bad.write_bytes(good[: len(good) * 3 // 4])
    with pytest.raises(PickleError, match=r"network-snapshot-0002048-0\.050\.pkl"):
        convert(str(tmp_path / "run"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
    bad.unlink()
    assert len(convert(str(tmp_path / "run"), str(tmp_path / "out"))) == 2  # no leftovers


def test_a_failed_write_removes_this_runs_outputs_only(tmp_path, monkeypatch):
    import phema.convert as pc

    _official_folder(tmp_path / "run", kimgs=(1024, 2048))
    convert(str(tmp_path / "run"), str(tmp_path / "out"))
    keep = sorted(os.listdir(tmp_path / "out"))
    real, calls = pc._read_official, []

    def flaky(src, *, check_only=False):
        if not check_only:
            calls.append(src.path)
            if len(calls) == 3:
                raise PickleError(f"{src.path}: unreadable now")
        return real(src, check_only=check_only)

    monkeypatch.setattr(pc, "_read_official", flaky)
    with pytest.raises(PickleError, match=r"2 existing output.* were already replaced"):
        convert(str(tmp_path / "run"), str(tmp_path / "out"), overwrite=True)
    assert sorted(os.listdir(tmp_path / "out")) == keep  # replaced, never removed
    calls.clear()
    with pytest.raises(PickleError, match="removed the 2 output"):
        convert(str(tmp_path / "run"), str(tmp_path / "new"))
    assert not os.listdir(tmp_path / "new")


def test_two_sources_with_one_output_name_are_refused(tmp_path):
    _official_folder(tmp_path / "run", kimgs=(128,), stds=("0.050", "0.05"))
    with pytest.raises(FormatError, match=r"-0\.05\.pkl and .*-0\.050\.pkl both convert to"):
        convert(str(tmp_path / "run"), str(tmp_path / "out"), overwrite=True)
    assert not (tmp_path / "out").exists()
    (tmp_path / "ckpt").mkdir()
    for n in ("0.3.pt", "1.3.pt"):
        (tmp_path / "ckpt" / n).write_bytes(b"")
    with pytest.raises(OptionError, match=r"0\.3\.pt and .*1\.3\.pt both convert to"):
        list_sources(str(tmp_path / "ckpt"), stds=(0.05, 0.05))


def test_cli_names_the_gammas_flag(tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    for n in ("0.3.pt", "1.3.pt"):
        (tmp_path / "ckpt" / n).write_bytes(b"")
    base = ["convert", tmp_path / "ckpt", "--out", tmp_path / "out", "--update-every", "1"]
    code, _, err = run_cli(capsys, *base, "--gammas", "5")
    assert code == 2
    assert "--gammas" in " ".join(err)
    assert "--stds" not in " ".join(err)


def test_update_every_error_bounds_its_work_and_is_exact_near_gamma_minus_one():
    assert update_every_error(7.0, 10**11, 1) == 0.0
    with pytest.raises(ProfileError, match="EMA updates"):
        update_every_error(7.0, 99999999999, 2)
    # reference in plain floats, with 0 ** (gamma + 1) = 0 exactly at the first interval
    gamma, step, k = -1 + 1e-3, 10, 2
    g1, big_t = gamma + 1, step + 1.0
    ns = list(range(1, step + 1, k))
    beta = [0.0] + [(n / (n + 1)) ** g1 for n in ns[1:]]
    w = [(1 - beta[j]) * math.prod(beta[j + 1 :]) for j in range(len(ns))]
    a = [0.0] + [float(n) for n in ns[1:]]
    b = [min(1.0 + k, big_t)] + [min(n + k, big_t) for n in ns[1:]]
    c = [(bj / big_t) ** g1 - (aj / big_t) ** g1 for aj, bj in zip(a, b, strict=True)]
    num = sum((wj - cj) ** 2 / (bj - aj) for wj, cj, aj, bj in zip(w, c, a, b, strict=True))
    den = sum(cj * cj / (bj - aj) for cj, aj, bj in zip(c, a, b, strict=True))
    assert update_every_error(gamma, step, k) == pytest.approx(math.sqrt(num / den), rel=1e-9)
    # chunked sums agree with one pass
    assert update_every_error(3.0, 5 * 2**20, 2) == pytest.approx(
        update_every_error(3.0, 5 * 2**20 - 1, 2), rel=1e-3
    )
