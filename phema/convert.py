r"""Convert other post-hoc EMA snapshots into a phema store (``phema convert``).

Two sources, told apart by their file names (a local folder):

**Official EDM2 snapshots** ``network-snapshot-<kimg>-<std>.pkl``. Tensors are read
with :mod:`phema.pickles` (nothing in the pickle is executed) and keep their stored
dtype (fp16); buffers are marked copied, as the official EMA copies them. (A store
also reads such a folder in place, :mod:`phema._official`; converting makes a copy in
phema's format.) The time is in images, from the name's kimg by the official rule: the
one multiple of 1024 in ``[1000 kimg, 1000 kimg + 999]`` (:func:`official_nimg`); the
std is the name's. ``step`` is left unknown (the name does not give the batch size).

**ema-pytorch** ``PostHocEMA`` checkpoints ``<index>.<step>.pt`` (one per profile
``index`` every ``checkpoint_every_num_steps``), read with
``torch.load(weights_only=True)``; keys ``ema_model.<name>`` become ``<name>``, the
bookkeeping buffers ``initted`` and ``step`` are dropped. After its update number
:math:`n` (the counter ``step`` after it) ema-pytorch sets

.. math::

    \hat\theta \leftarrow \beta_n \hat\theta + (1 - \beta_n)\,\theta_n, \qquad
    \beta_n = \Big(1 - \frac{1}{n + 1}\Big)^{\gamma + 1}
            = \Big(\frac{n}{n + 1}\Big)^{\gamma + 1},

the first update copying :math:`\theta_1`. This is phema's power-function update
(:mod:`phema.tracking`, :math:`\beta = (t_\text{prev}/t)^{\gamma+1}`) at times
:math:`t_1 = 2, t_n = n + 1`: the checkpoint at step :math:`N` holds the
power-function profile at time :math:`t = N + 1` of the trajectory in which
:math:`\theta_n` holds over :math:`(n, n + 1]` (and :math:`\theta_1` also over
:math:`(0, 1]`); weights :math:`((n+1)^{\gamma+1} - n^{\gamma+1}) / (N+1)^{\gamma+1}`.
So ``t = step + 1`` with ``t_unit="steps"``. The files do not record the profiles'
stds (give them, in index order) nor ``update_every`` (ema-pytorch's default is 100).
With ``update_every = k > 1`` only the calls :math:`n \equiv 1 \pmod k` update, still
with :math:`\beta_n` above, and the profile is no power function: roughly
:math:`t^{(\gamma+1)/k - 1}` instead of :math:`t^\gamma`. :func:`update_every_error`
gives its exact relative L2 distance from the power function.
"""

from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from phema._official import OFFICIAL_NAME as OFFICIAL
from phema._official import official_nimg
from phema.errors import (
    ExistsError,
    FormatError,
    OptionError,
    PhemaError,
    ProfileError,
    StorageError,
)
from phema.format import file_view
from phema.profiles import gamma_to_sigma_rel, sigma_rel_to_gamma
from phema.store import SnapshotInfo, SnapshotStore, snapshot_metadata, snapshot_name

__all__ = [
    "Source",
    "convert",
    "list_sources",
    "official_nimg",
    "update_every_error",
]

Kind = Literal["official", "ema-pytorch"]
EMA_PYTORCH = re.compile(r"(\d+)\.(\d+)\.pt")
WRAPPER = "ema_model."
BOOKKEEPING = ("initted", "step")
MAX_UPDATES = 2**27  # update_every_error: beyond this the computation takes minutes
_CHUNK = 2**20


@dataclass(frozen=True)
class Source:
    """One input file and where it goes: time ``t`` (in ``t_unit``), ``std``, ``step``."""

    path: str
    kind: Kind
    t: float
    std: float
    step: int | None
    t_unit: str


def _kind(names: Sequence[str], folder: str) -> Kind:
    pkl = [n for n in names if n.endswith(".pkl")]
    pt = [n for n in names if EMA_PYTORCH.fullmatch(n)]
    if pkl and pt:
        raise FormatError(
            f"{folder} holds both .pkl files ({pkl[0]}) and ema-pytorch checkpoints ({pt[0]}); "
            "convert one run's folder at a time"
        )
    if pkl:
        return "official"
    if pt:
        return "ema-pytorch"
    raise FormatError(
        f"{folder} holds no network-snapshot-<kimg>-<std>.pkl (official EDM2) and no "
        "<index>.<step>.pt (ema-pytorch PostHocEMA) files"
    )


def list_sources(
    folder: str,
    *,
    stds: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
) -> list[Source]:
    """The snapshots in a local ``folder``, sorted by ``(t, std)``; names checked, nothing read.

    Every ``.pkl`` of an official folder must be named ``network-snapshot-<kimg>-<std>.pkl``
    (other files, e.g. ``log.txt`` or ``training-state-*.pt``, are left alone). ema-pytorch
    folders need the profiles' ``stds`` (or ``gammas``), in index order.

    Raises:
        FormatError: An unparseable or unusable name, no snapshot at all, a mixed folder,
            two files that convert to one output name (``...-0.050.pkl``, ``...-0.05.pkl``).
        OptionError: ``stds``/``gammas`` missing, not one per index, or giving two files
            one output name (ema-pytorch).
    """
    if not os.path.isdir(folder):
        raise FormatError(f"{folder} is not a local folder of snapshots")
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    kind = _kind(names, folder)
    out: list[Source] = []
    if kind == "official":
        for n in (n for n in names if n.endswith(".pkl")):
            m = OFFICIAL.fullmatch(n)
            if m is None:
                why = (
                    " (official reconstructions are no snapshots)" if n.startswith("phema-") else ""
                )
                raise FormatError(
                    f"{os.path.join(folder, n)}: not named network-snapshot-<kimg>-<std>.pkl"
                    f"{why}; move it out of {folder}"
                )
            nimg, std = official_nimg(int(m[1]), n), float(m[2])
            out.append(Source(os.path.join(folder, n), kind, float(nimg), std, None, "images"))
    else:
        found = [(int(m[1]), int(m[2]), n) for n in names if (m := EMA_PYTORCH.fullmatch(n))]
        count = max(i for i, _, _ in found) + 1
        given = _profile_stds(stds, gammas, count)
        for i, step, n in found:
            out.append(Source(os.path.join(folder, n), kind, step + 1.0, given[i], step, "steps"))
    out.sort(key=lambda s: (s.t, s.std))
    seen: dict[str, Source] = {}
    for s in out:
        name = snapshot_name(s.t, s.std)
        if (other := seen.setdefault(name, s)) is not s:
            why = (
                "give distinct stds (or gammas)"
                if kind == "ema-pytorch"
                else f"move one out of {folder}"
            )
            error = OptionError if kind == "ema-pytorch" else FormatError
            raise error(
                f"{other.path} and {s.path} both convert to {name} (time {s.t:g}, std "
                f"{s.std:g}); {why}"
            )
    return out


def _profile_stds(
    stds: Sequence[float] | None, gammas: Sequence[float] | None, count: int
) -> list[float]:
    if (stds is None) == (gammas is None):
        raise OptionError(
            f"ema-pytorch checkpoints do not record their profiles: give the {count} sigma_rels "
            "(or gammas) of PostHocEMA, in its order"
        )
    values = list(stds if stds is not None else gammas or ())
    if len(values) != count:
        raise OptionError(
            f"the checkpoints hold {count} profiles (indices 0..{count - 1}), "
            f"but {len(values)} {'stds' if stds is not None else 'gammas'} were given"
        )
    if stds is None:
        return [float(gamma_to_sigma_rel(g)) for g in values]
    return [float(s) for s in values]


def update_every_error(gamma: float, step: int, update_every: int) -> float:
    r"""Relative L2 distance of ema-pytorch's profile at ``step`` from the power function.

    With ``update_every = k`` the updates are the calls :math:`n_j = 1 + jk \le N`
    (:math:`N` = ``step``), the first a copy, each with
    :math:`\beta_{n_j} = (n_j / (n_j + 1))^{\gamma+1}`; update :math:`j` gets weight
    :math:`w_j = (1 - \beta_{n_j}) \prod_{i > j} \beta_{n_i}`, and
    :math:`\theta_{n_j}` holds over :math:`(n_j, n_j + k]` (the first also over
    :math:`(0, 1]`, the last up to :math:`T = N + 1`). The power-function profile of
    the same samples (what phema's own EMA holds, see :mod:`phema.tracking`) gives that
    interval :math:`c_j = (b_j^{\gamma+1} - a_j^{\gamma+1}) / T^{\gamma+1}`. As densities,
    constant on each interval, the relative L2 distance is

    .. math::

        \sqrt{\sum_j (w_j - c_j)^2 / (b_j - a_j) \Big/ \sum_j c_j^2 / (b_j - a_j)},

    0 for ``k = 1``; for large ``t`` the profile is close to :math:`t^{(\gamma+1)/k - 1}`.

    Example:
        >>> update_every_error(7.0, 1000, 1) < 1e-12, round(update_every_error(7.0, 1000, 2), 2)
        (True, 0.41)
    """
    if step < 1 or update_every < 1:
        raise ProfileError(f"need step >= 1 and update_every >= 1, got {step}, {update_every}")
    if update_every == 1:
        return 0.0  # the power function exactly
    count = (step - 1) // update_every + 1  # updates n_j = 1 + j k <= N
    if count > MAX_UPDATES:
        raise ProfileError(
            f"step {step} with update_every={update_every} makes {count} EMA updates; the "
            f"error is computed for at most {MAX_UPDATES} (is the step in the file name right?)"
        )
    g1, big_t = gamma + 1.0, float(step + 1)
    num = den = 0.0
    carry = 0.0  # sum of log beta over the later chunks
    for stop in range(count, 0, -_CHUNK):  # chunks from the end: memory O(_CHUNK), not O(step)
        j = np.arange(max(stop - _CHUNK, 0), stop, dtype=np.float64)
        n = 1.0 + j * update_every
        log_beta = g1 * np.log(n / (n + 1.0))
        if j[0] == 0:
            log_beta[0] = -np.inf  # the first update copies
        suffix = np.cumsum(log_beta[::-1])[::-1]
        after = np.append(suffix[1:], 0.0) + carry  # sum over i > j
        carry += float(suffix[0])
        w = -np.expm1(log_beta) * np.exp(after)
        a = n.copy()
        b = np.minimum(n + update_every, big_t)
        if j[0] == 0:
            a[0] = 0.0
            b[0] = min(1.0 + update_every, big_t)
        # an exact 0 at a = 0 (no clamp: gamma near -1 makes tiny**(gamma+1) far from 0)
        lower = np.where(a > 0.0, np.exp(g1 * np.log(np.where(a > 0.0, a, 1.0) / big_t)), 0.0)
        c = np.exp(g1 * np.log(b / big_t)) - lower
        num += float(np.sum((w - c) ** 2 / (b - a)))
        den += float(np.sum(c * c / (b - a)))
    return math.sqrt(num / den)


Read = tuple[dict[str, torch.Tensor], tuple[str, ...]]  # tensors, and the copied ones' names


def _read_official(src: Source, *, check_only: bool = False) -> Read:
    """The tensors of an official snapshot and its buffers' names; ``check_only``: index only.

    The file is read as a store reads it in place (:mod:`phema._official`: indexed, each
    tensor's range checked against the file, then each tensor's bytes read once). Buffers
    are copied by the official EMA, not averaged.
    """
    folder, name = os.path.split(src.path)
    store = SnapshotStore(folder or ".")
    info = store.info(name)
    assert isinstance(info, SnapshotInfo)  # an official pickle reads as a snapshot
    return ({} if check_only else store.load(info)), info.copied


def _read_ema_pytorch(src: Source, *, check_only: bool = False) -> Read:
    """The tensors of a checkpoint; ``check_only`` maps it (no copy) where it can."""
    try:
        try:
            state = torch.load(src.path, map_location="cpu", weights_only=True, mmap=check_only)
        except RuntimeError:  # mmap needs the zip format; an old-format file reads whole
            if not check_only:
                raise
            state = torch.load(src.path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors of every kind: the file is not a checkpoint
        raise FormatError(
            f"{src.path}: not a torch.save checkpoint ({exc})".split("\n")[0]
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"{src.path}: not an ema-pytorch checkpoint (a dict of tensors)")
    if "initted" in state and not bool(state["initted"]):
        raise FormatError(f"{src.path}: written before the first EMA update (initted is False)")
    counter = state.get("step")
    if counter is not None and float(counter) != float(torch.tensor(src.step).to(counter.dtype)):
        raise FormatError(
            f"{src.path}: its step counter is {float(counter):g}, not the name's {src.step}"
        )
    out = {}
    for key, value in state.items():
        if key in BOOKKEEPING:
            continue
        if not key.startswith(WRAPPER):
            raise FormatError(f"{src.path}: key {key!r} is not under {WRAPPER!r} (not a KarrasEMA)")
        if not check_only:
            out[key[len(WRAPPER) :]] = value.contiguous()
    return out, ()  # ema-pytorch averages floating buffers too


def convert(
    src: str,
    out: SnapshotStore | str,
    *,
    stds: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    update_every: int | None = None,
    allow_inexact: bool = False,
    overwrite: bool = False,
    progress: Callable[[Source, str], None] | None = None,
) -> list[str]:
    """Write every snapshot of the local folder ``src`` into the store ``out``; their paths.

    Names and outputs are all checked before anything is written: no output may exist
    unless ``overwrite``. ema-pytorch sources need ``stds`` (or ``gammas``) and
    ``update_every``; ``update_every > 1`` raises unless ``allow_inexact`` (then warns),
    naming the worst :func:`update_every_error` over the files.

    Raises:
        FormatError, OptionError: See :func:`list_sources`; a file that does not read.
        ProfileError: ``update_every > 1`` without ``allow_inexact``.
        ExistsError: An output exists (without ``overwrite``).
    """
    sources = list_sources(src, stds=stds, gammas=gammas)
    if sources[0].kind == "ema-pytorch":
        if update_every is None or update_every < 1:
            raise OptionError(
                "ema-pytorch checkpoints do not record update_every (its default is 100): give it"
            )
        if update_every > 1:
            worst = max(sources, key=lambda s: _inexact(s, update_every))
            err = _inexact(worst, update_every)
            message = (
                f"update_every={update_every}: these checkpoints are not power-function profiles; "
                f"relative L2 error up to {err:.3g} ({os.path.basename(worst.path)}, std "
                f"{worst.std:g}: close to a power function of exponent "
                f"{(float(sigma_rel_to_gamma(worst.std)) + 1) / update_every - 1:.3g} instead of "
                f"{float(sigma_rel_to_gamma(worst.std)):.3g})"
            )
            if not allow_inexact:
                raise ProfileError(
                    f"{message}; pass allow_inexact (--allow-inexact) to convert anyway"
                )
            warnings.warn(message, stacklevel=2)
    store = out if isinstance(out, SnapshotStore) else SnapshotStore(out)
    if not overwrite:
        for s in sources:
            if store.exists(snapshot_name(s.t, s.std)):
                raise ExistsError(
                    f"{store.url.rstrip('/')}/{snapshot_name(s.t, s.std)} exists; pass "
                    "overwrite (--overwrite) to replace it"
                )
    read = _read_official if sources[0].kind == "official" else _read_ema_pytorch
    for s in sources:  # every file indexed (and checked) before anything is written
        read(s, check_only=True)
    written: list[str] = []
    new: list[str] = []  # outputs this run created (absent before): removed on failure
    replaced: list[str] = []  # outputs that existed and were overwritten: cannot come back
    try:
        for s in sources:
            tensors, copied = read(s)
            gamma = float(sigma_rel_to_gamma(s.std))
            meta = snapshot_metadata(
                tensors, t=s.t, std=s.std, gamma=gamma, t_unit=s.t_unit, step=s.step, copied=copied
            )
            name = snapshot_name(s.t, s.std)
            existed = overwrite and store.exists(name)
            written.append(
                store.write(name, file_view(tensors, meta, consume=True), overwrite=overwrite)
            )
            (replaced if existed else new).append(name)
            if progress is not None:
                progress(s, name)
        store.flush()
    except PhemaError as exc:
        note = _undo(store, new, replaced)
        raise type(exc)(f"{exc}; {note}") from exc
    except BaseException:
        _undo(store, new, replaced)
        raise
    return written


def _undo(store: SnapshotStore, new: list[str], replaced: list[str]) -> str:
    """Remove (best effort) the outputs in ``new``; what was done, for the error message."""
    kept = []
    for name in new:
        try:
            if store.hub is not None:  # a pending Hub file cannot be withdrawn here
                raise StorageError(name)
            store.fs.rm(store.path_of(name))
        except Exception:  # best effort: say which are left
            kept.append(name)
    base = store.url.rstrip("/")
    parts = [f"removed the {len(new) - len(kept)} output(s) this run had written"]
    if kept:
        parts.append(f"could not remove {', '.join(f'{base}/{n}' for n in kept)}")
    if replaced:
        parts.append(
            f"{len(replaced)} existing output(s) were already replaced (--overwrite) and "
            f"hold the new snapshot: {', '.join(f'{base}/{n}' for n in replaced)}"
        )
    return "; ".join(parts)


def _inexact(s: Source, update_every: int) -> float:
    assert s.step is not None
    return update_every_error(float(sigma_rel_to_gamma(s.std)), s.step, update_every)
