"""``python -m edm2_reference.evaluate``: held-out real images, ``--json`` rows with intervals,
and ``--plot`` (the EMA sweep figure and the best/worst sample grid) drawing exactly those rows."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

import edm2_reference.plot as plot_mod
from edm2_reference import evaluate as evaluate_mod
from edm2_reference.data import holdout_split, load_dataset
from edm2_reference.metrics import train_classifier
from edm2_reference.plot import PlotError, grid_path, plot_sweep
from edm2_reference.presets import build_precond

N = 40  # samples per network: a 4 x 8 grid per side, and seconds of CPU for three networks


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """Three random digits8 networks (different seeds, gains 0.5) as safetensors files."""
    folder = tmp_path_factory.mktemp("nets")
    paths = []
    for seed in range(3):
        torch.manual_seed(seed)
        net = build_precond("digits8", label_dim=10, img_resolution=8, img_channels=1)
        with torch.no_grad():  # the gains start at 0 (every fresh network the identity)
            for name, p in net.named_parameters():
                if name.endswith("gain"):
                    p.fill_(0.5)
        path = folder / f"net{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
        paths.append(str(path))
    return paths


@pytest.fixture
def patched(monkeypatch, nets):
    """Two "reconstructions" (stds 0.05, 0.10) and a quick classifier; records what they see."""
    seen = {}
    monkeypatch.setattr(
        evaluate_mod, "find_reconstructions", lambda url: [(0.05, nets[0]), (0.10, nets[1])]
    )

    def quick_classifier(data, path, **kwargs):
        seen["classifier_data"] = data
        return train_classifier(data.subset(range(200)), seed=0, epochs=1)

    monkeypatch.setattr(evaluate_mod, "cached_classifier", quick_classifier)
    real_sweep = evaluate_mod.evaluate_sweep

    def recording_sweep(net, generated, real, **kwargs):
        seen["real"] = real
        return real_sweep(net, generated, real, **kwargs)

    monkeypatch.setattr(evaluate_mod, "evaluate_sweep", recording_sweep)
    real_plot = plot_mod.plot_sweep

    def recording_plot(rows, path, **kwargs):
        seen["drawn"] = real_plot(rows, path, **kwargs)
        return seen["drawn"]

    monkeypatch.setattr(plot_mod, "plot_sweep", recording_plot)
    return seen


def _args(tmp_path, nets, *extra):
    return [
        "ema",
        "--net",
        f"raw weights={nets[2]}",
        "--n",
        str(N),
        "--steps",
        "2",
        "--resamples",
        "50",
        "--classifier",
        str(tmp_path / "classifier.safetensors"),
        *extra,
    ]


def test_json_rows_and_plot_agree(tmp_path, nets, patched, capsys):
    png = tmp_path / "sweep.png"
    evaluate_mod.main(_args(tmp_path, nets, "--json", "--plot", str(png)))
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]

    # Held out: the classifier learns the training part, samples meet the held-out part.
    train, held = holdout_split(load_dataset("digits"))
    assert torch.equal(patched["classifier_data"].pixels, train.pixels)
    assert torch.equal(patched["real"].pixels, held.pixels)

    assert [r["label"] for r in rows] == ["ema std 0.050", "ema std 0.100", "raw weights"]
    assert [r["std"] for r in rows] == [0.05, 0.10, None]
    for r in rows:
        assert r["n"] == N
        assert r["resamples"] == 50
        assert r["fd_lo"] <= r["fd"] <= r["fd_hi"]
        assert r["kid_lo"] <= r["kid"] <= r["kid_hi"]
        assert r["fd_baseline_lo"] <= r["fd_baseline"] <= r["fd_baseline_hi"]
        assert r["fd_tied"] == (r["fd_vs_best_lo"] <= 0 <= r["fd_vs_best_hi"])
    best = [r for r in rows if r["best_fd"]]
    assert len(best) == 1
    assert best[0]["fd"] == min(r["fd"] for r in rows)
    assert best[0]["fd_tied"]
    assert (best[0]["fd_vs_best_lo"], best[0]["fd_vs_best_hi"]) == (0.0, 0.0)

    # The figure holds exactly the JSON rows: curve and band over the EMA rows by std, a
    # line at the raw weights' FD and one at the real-vs-real FD.
    drawn = patched["drawn"]
    ema = sorted((r for r in rows if r["std"] is not None), key=lambda r: r["std"])
    np.testing.assert_array_equal(drawn.std, [r["std"] for r in ema])
    np.testing.assert_array_equal(drawn.fd, [r["fd"] for r in ema])
    np.testing.assert_array_equal(drawn.fd_lo, [r["fd_lo"] for r in ema])
    np.testing.assert_array_equal(drawn.fd_hi, [r["fd_hi"] for r in ema])
    best_fd = min(r["fd"] for r in rows)
    np.testing.assert_array_equal(drawn.diff, [r["fd"] - best_fd for r in ema])
    np.testing.assert_array_equal(drawn.diff_lo, [r["fd_vs_best_lo"] for r in ema])
    np.testing.assert_array_equal(drawn.diff_hi, [r["fd_vs_best_hi"] for r in ema])
    assert drawn.levels == {
        "raw weights": rows[2]["fd"],
        plot_mod.REAL_VS_REAL: rows[0]["fd_baseline"],
    }
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        assert im.size[0] > 300

    # The grid beside it: 8 rows of 4 best + spacer + 4 worst 8x8 digits at 8x, 1 px apart.
    grid = tmp_path / "sweep-grid.png"
    with Image.open(grid) as im:
        pixels = np.asarray(im)
    assert pixels.shape == (8 * 65 - 1, 9 * 65 - 1)
    spacer = pixels[:, 4 * 65 : 4 * 65 + 64].reshape(-1)  # the grey column (black padding rows)
    assert set(np.unique(spacer)) == {0, 128}
    assert np.all(pixels[:64, 4 * 65 : 4 * 65 + 64] == 128)
    left, right = pixels[:, : 4 * 65 - 1], pixels[:, 5 * 65 :]
    assert not np.array_equal(left, right)  # two different networks


def test_table_shows_intervals_marks_and_the_held_out_baseline(tmp_path, nets, patched, capsys):
    evaluate_mod.main(_args(tmp_path, nets))
    out = capsys.readouterr().out
    lines = out.splitlines()
    # One row per network (value, then its interval on the next line) and the baseline.
    for label in ("ema std 0.050", "ema std 0.100", "raw weights", "real-vs-real"):
        (k,) = [k for k, line in enumerate(lines) if f"│ {label} " in line]
        assert "[" in lines[k + 1]
    assert sum(line.count(" best ") for line in lines) == 2  # the least FD and the least KID
    assert max(len(line) for line in lines) <= 80  # fits a log's 80 columns
    text = " ".join(out.split())
    assert "bootstrap interval (50 resamples" in text
    assert "disjoint sets of n held-out real images" in text
    assert "drawn" not in patched  # no --plot, no figure


def test_bad_n_held_out_and_plot_are_refused_up_front(tmp_path, nets, patched, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluate_mod.main(["ema", "--n", "450", "--classifier", str(tmp_path / "c.safetensors")])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds out 899 of 1797" in err
    assert "--n 449" in err
    with pytest.raises(SystemExit):
        evaluate_mod.main(["--net", nets[0], "--held-out", "1.0"])
    assert "--held-out" in capsys.readouterr().err
    # --plot without EMA rows is refused before any sampling or training.
    with pytest.raises(SystemExit):
        evaluate_mod.main(["--net", nets[0], "--plot", str(tmp_path / "p.png")])
    assert "needs EMA rows with a std" in " ".join(capsys.readouterr().err.split())
    assert "classifier_data" not in patched


def test_plot_needs_ema_rows_and_numbers(tmp_path):
    row = {"label": "raw", "std": None, "fd": 1.0, "fd_baseline": 0.5, "n": 10}
    with pytest.raises(PlotError, match="no row has an EMA std"):
        plot_sweep([row], tmp_path / "x.png")
    bad = {**row, "std": 0.1, "fd_lo": None, "fd_hi": 2.0}
    with pytest.raises(PlotError, match="'fd_lo'"):
        plot_sweep([bad], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    assert grid_path("runs/sweep.png") == "runs/sweep-grid.png"
    assert grid_path("sweep") == "sweep-grid.png"
