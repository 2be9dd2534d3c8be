"""Official-structure EDM2 snapshot pickles, written by tests (spec section 3).

Fake ``dnnlib.util`` / ``torch_utils.persistence`` modules exist only while a fixture is pickled;
every persistent object pickles as ``_reconstruct_persistent_obj(meta)`` with a dummy module
source of our own, and ``_init_kwargs`` is recorded as the official persistence does (the
constructor's keyword arguments). Shared by the pickle reader's, the converter's and the EDM2 client's tests.
"""

from __future__ import annotations

import collections
import contextlib
import pickle
import sys
import types
from collections.abc import Iterator
from typing import Any

from torch import nn

SRC = "# a dummy module source standing in for networks_edm2.py\nclass Precond: pass\n"

#: digits8 as the official training script would record its constructor arguments (lists).
DIGITS8_KWARGS: dict[str, Any] = {
    "img_resolution": 8,
    "img_channels": 1,
    "label_dim": 10,
    "model_channels": 32,
    "channel_mult": [1, 2],
    "num_blocks": 1,
    "attn_resolutions": [4],
    "dropout": 0.0,
    "use_fp16": False,
}


class EasyDict(dict):  # type: ignore[type-arg]
    pass


def _never_called(meta: Any) -> None:
    raise AssertionError("_reconstruct_persistent_obj must never be called")


EasyDict.__module__ = "dnnlib.util"
_never_called.__module__ = "torch_utils.persistence"
_never_called.__name__ = _never_called.__qualname__ = "_reconstruct_persistent_obj"


@contextlib.contextmanager
def official_modules(reconstruct: Any = _never_called) -> Iterator[None]:
    """``dnnlib.util`` and ``torch_utils.persistence`` in sys.modules while pickling.

    ``reconstruct`` stands for ``_reconstruct_persistent_obj`` (tests of what the official
    loader would run pass one that runs it).
    """
    dnnlib, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")
    tu, persistence = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    util.EasyDict, dnnlib.util = EasyDict, util  # type: ignore[attr-defined]
    persistence._reconstruct_persistent_obj = reconstruct  # type: ignore[attr-defined]
    tu.persistence = persistence  # type: ignore[attr-defined]
    mods = {"dnnlib": dnnlib, "dnnlib.util": util, "torch_utils": tu}
    mods["torch_utils.persistence"] = persistence
    saved = {k: sys.modules.get(k) for k in mods}
    sys.modules.update(mods)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v


class Persistent:
    """Pickles as the official persistent classes do: ``_reconstruct_persistent_obj(meta)``."""

    def __init__(self, class_name: str, state: dict[str, Any], src: str = SRC) -> None:
        self.meta = {"type": "class", "version": 6, "module_src": src}
        self.meta.update(class_name=class_name, state=state)

    def __reduce__(self) -> tuple[Any, ...]:
        return (sys.modules["torch_utils.persistence"]._reconstruct_persistent_obj, (self.meta,))


def persist(module: nn.Module, src: str = SRC, **extra: Any) -> Any:
    """A module tree as the official code pickles it (ModuleDict stays a torch ModuleDict)."""
    state = dict(module.__dict__, **extra)
    state["_modules"] = collections.OrderedDict(
        (k, None if m is None else persist(m, src)) for k, m in module._modules.items()
    )
    if type(module) is nn.ModuleDict:
        out = nn.ModuleDict.__new__(nn.ModuleDict)
        out.__dict__.update(state)
        return out
    return Persistent(type(module).__name__, state, src)


def official_snapshot(
    net: nn.Module,
    init_kwargs: dict[str, Any],
    *,
    encoder: str | None = "StandardRGBEncoder",
    protocol: int = 4,
) -> bytes:
    """The bytes of an official-structure snapshot of ``net`` built with ``init_kwargs``.

    ``encoder``: the encoder's class name (``None``: no encoder entry, as in old files).
    """
    loss = Persistent("EDM2Loss", {"P_mean": -0.4, "P_std": 1.0, "sigma_data": 0.5})
    dataset = EasyDict(class_name="training.dataset.ImageFolderDataset", path="x.zip")
    with official_modules():
        ema = persist(net, _init_args=(), _init_kwargs=dict(init_kwargs))
        data = EasyDict()
        if encoder is not None:
            data["encoder"] = Persistent(encoder, {})
        data.update(dataset_kwargs=dataset, loss_fn=loss, ema=ema)
        return pickle.dumps(data, protocol=protocol)
