"""Fixtures shared by the edm2_reference tests."""

import pytest

from edm2_reference.train import TrainSettings, train
from phema.streaming import reconstruct


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny finished digits8 run (256 images), with reconstructions at stds 0.07 and 0.09.

    Its folder holds ``snapshots/``, ``ema/`` and ``training-state-000000000256.pt``; each
    test module that asks for it trains its own.
    """
    out = tmp_path_factory.mktemp("run")
    settings = TrainSettings(
        preset="digits8",
        data="digits",
        outdir=str(out),
        batch=32,
        duration=256,
        rampup=128,
        snapshot=64,
        checkpoint=256,
        status=128,
    )
    train(settings)
    reconstruct(str(out / "snapshots"), [0.07, 0.09], str(out / "ema"))
    return out
