r"""``PowerFunctionEMA``: several power-function EMA profiles of a module, tracked at once.

After each optimizer step, ``ema.update(t)`` with the training time ``t`` after
that step (images seen, steps, any unit that only grows) applies, to every
profile :math:`k` with exponent :math:`\gamma_k`,

.. math::

    \hat\theta_k \leftarrow \beta_k \hat\theta_k + (1 - \beta_k)\,\theta,
    \qquad \beta_k = \left(\frac{t_\text{prev}}{t}\right)^{\gamma_k + 1},

where :math:`t_\text{prev}` is the time of the previous update (0 before the
first, so the first update copies the weights). Because :math:`\beta` comes from
the real time elapsed, updating every step, every k steps or at irregular times
all give exactly the power-function profile of the trajectory as sampled:
interval :math:`(t_{i-1}, t_i]` gets weight
:math:`(t_i^{\gamma+1} - t_{i-1}^{\gamma+1}) / t^{\gamma+1}`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from phema._dist import world
from phema._ema_state import STATE_FORMAT, STATE_VERSION, check_header, check_names, local_rows
from phema._offload import OffloadedShadows
from phema._shadow import FusedShadows
from phema._tracked import (
    Piece,
    as_dtensor,
    find_stale,
    full_value,
    is_dtensor,
    make_links,
    make_piece,
    reshard,
    world_mesh,
)
from phema.errors import TrackingError
from phema.memory import Snapshot
from phema.profiles import power_weight, sigma_rel_to_gamma

__all__ = ["BufferPolicy", "PowerFunctionEMA", "ShardState", "unwrap_module"]

#: ``"copy"``: buffers are not averaged; a profile's state uses the live module's
#: buffers (the reference behaviour, right for BatchNorm statistics of the current
#: weights). ``"average"``: floating-point buffers are averaged like parameters and
#: integer buffers are copied.
BufferPolicy = Literal["copy", "average"]


@dataclass(frozen=True)
class ShardState:
    """One rank's part of a profile (:meth:`PowerFunctionEMA.shard_state`).

    ``specs`` are ``(name, dtype, global shape)`` of every state entry, in the module's
    order; ``pieces`` ``(name, begin, end, values)`` hold flat elements ``[begin,
    end)``; ``copied`` names the entries taken from the live module.
    """

    specs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    pieces: list[tuple[str, int, int, Tensor]]
    copied: tuple[str, ...]


def unwrap_module(module: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / ``torch.compile`` wrappers, so names match."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel | nn.DataParallel):
            inner = getattr(module, "module", None)
        elif type(module).__name__ == "OptimizedModule":  # torch.compile's wrapper
            inner = getattr(module, "_orig_mod", None)
        else:
            return module
        if not isinstance(inner, nn.Module):
            return module
        module = inner


class PowerFunctionEMA:
    """Track power-function EMA profiles of ``module`` with one fused update per step.

    Args:
        module: The model being trained (DDP and ``torch.compile`` wrappers are
            unwrapped, so names never carry ``module.`` / ``_orig_mod.``). Create the
            EMA after the model is on its device, in its dtype and sharded (FSDP2's
            ``fully_shard``); parameters are held by reference, as an optimizer
            holds them, and one replaced afterwards raises :class:`TrackingError`.
        stds: Relative stds of the profiles to track, each in ``(0, 0.2887]``.
        buffers: Buffer policy, see :data:`BufferPolicy`.
        dtype: Shadow dtype; default float32, or float64 for float64 parameters.
        partition: Under ``torch.distributed`` with replicated parameters (DDP):
            each rank tracks only its ``torch.chunk`` of every tensor's rows, so EMA
            memory and update work per rank fall by the world size. Every rank must
            then create the EMA and call :meth:`update`; reading a whole profile
            (:meth:`profile`, :meth:`swapped`, :meth:`profile_state_dict`,
            :meth:`copy_module`, :meth:`snapshot`) is a collective that every rank
            must call. Off by default: an EMA made on one rank only would silently
            track a fraction of the model.
        device: Where the shadows live; default: each parameter's device. ``"cpu"``
            with the model on an accelerator keeps them in host memory and updates them
            off the training thread (:mod:`phema._offload`): the parameters are copied
            to pinned buffers on a side stream and a background thread applies the
            lerp; the next update and every read wait for it.

    Sharded parameters (DTensors, as FSDP2 makes them) are tracked shard by shard on
    each rank with no collective in :meth:`update`; profiles and states come back as
    DTensors with the parameters' placements (``profile_state_dict(std, full=True)``
    gathers plain tensors).

    Example:
        >>> net = nn.Linear(4, 2)
        >>> ema = PowerFunctionEMA(net, stds=(0.05, 0.10))
        >>> for step in range(1, 11):
        ...     _ = net.weight.data.add_(0.1)  # stands for an optimizer step
        ...     ema.update(step)
        >>> with ema.swapped(0.10):
        ...     pass  # evaluate net with the 0.10 profile's weights
    """

    def __init__(
        self,
        module: nn.Module,
        stds: Sequence[float] = (0.05, 0.10),
        *,
        buffers: BufferPolicy = "copy",
        dtype: torch.dtype | None = None,
        partition: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        std_list = [float(s) for s in stds]
        if not std_list:
            raise TrackingError("stds is empty: pass at least one profile, e.g. (0.05, 0.10)")
        if len(set(std_list)) != len(std_list):
            raise TrackingError(f"stds must be distinct, got {std_list}")
        if buffers not in ("copy", "average"):
            raise TrackingError(f"buffers must be 'copy' or 'average', got {buffers!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TrackingError(f"dtype must be a floating-point dtype, got {dtype}")
        self._gammas = tuple(float(g) for g in sigma_rel_to_gamma(std_list))
        self._stds = tuple(std_list)
        self.module = unwrap_module(module)
        reshard(self.module)  # FSDP2: the sharded parameters, not gathered ones, are tracked
        self.buffer_policy: BufferPolicy = buffers
        named: list[tuple[str, Tensor]] = list(self.module.named_parameters())
        averaged_buffers = set()
        if buffers == "average":
            extra = [(n, b) for n, b in self.module.named_buffers() if b.is_floating_point()]
            named += extra
            averaged_buffers = {n for n, _ in extra}
        for name, tensor in named:
            if not tensor.is_floating_point():
                raise TrackingError(f"parameter {name!r} has dtype {tensor.dtype}; only floats")
        mesh = None
        if partition and world()[1] > 1:
            mesh = world_mesh(named[0][1].device if named else torch.device("cpu"))
        self._names = tuple(n for n, _ in named)
        self._pieces = [make_piece(n, t, mesh) for n, t in named]
        self._links = make_links(self.module, self._names, averaged_buffers)
        self._full = all(p.kind == "full" for p in self._pieces)
        self._has_dtensors = any(p.kind == "dtensor" for p in self._pieces)
        self._index_of = {id(t): i for i, (_, t) in enumerate(named)}
        where = torch.device(device) if device is not None else None
        sources = self._sources()
        self._shadows: FusedShadows | OffloadedShadows
        if where is not None and _elsewhere(sources, where):
            self._shadows = OffloadedShadows(sources, len(std_list), dtype, where)
        else:
            self._shadows = FusedShadows(sources, len(std_list), dtype, device=where)
        self._offloaded = isinstance(self._shadows, OffloadedShadows)
        self._t = 0.0
        self._num_updates = 0
        self._swap: tuple[int, list[Tensor], list[Tensor]] | None = None

    @property
    def stds(self) -> tuple[float, ...]:
        """Relative stds of the tracked profiles, in order."""
        return self._stds

    @property
    def gammas(self) -> tuple[float, ...]:
        """Exponents of the tracked profiles, in order."""
        return self._gammas

    @property
    def t(self) -> float:
        """Training time of the last update (0.0 before the first)."""
        return self._t

    @property
    def num_updates(self) -> int:
        """How many times :meth:`update` has run."""
        return self._num_updates

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the averaged tensors (parameters, then averaged buffers)."""
        return self._names

    @property
    def sharded(self) -> bool:
        """Whether this process holds only part of some tensors (FSDP2 or ``partition``)."""
        return not self._full

    @property
    def pieces(self) -> tuple[Piece, ...]:
        """What this process tracks of each averaged tensor (rows, placement, writer)."""
        return tuple(self._pieces)

    def _sources(self) -> list[Tensor]:
        if self._full:
            return [p.obj for p in self._pieces]
        return [p.obj if p.kind == "full" else p.local() for p in self._pieces]

    def check_tracking(self) -> None:
        """Raise :class:`TrackingError` if a tracked tensor is no longer the module's.

        Runs at every :meth:`update` and before every read of a profile.
        """
        stale = find_stale(self._links)
        if stale is None:
            return
        if self._has_dtensors and reshard(self.module):  # unsharded by an eval forward
            stale = find_stale(self._links)
            if stale is None:
                return
        where = (
            f"parameter {stale.name!r} is no longer the one this EMA tracks: it was replaced"
            if stale.path == stale.name
            else f"submodule {stale.path!r} was replaced, so the tracked parameter "
            f"{stale.name!r} (and any other under it) is no longer the module's"
        )
        raise TrackingError(
            f"{where} after the EMA was made (a new submodule, load_state_dict(assign=True), "
            "or fully_shard). Create the EMA after such changes; to keep its history, make a "
            "new PowerFunctionEMA and load_state_dict(old.state_dict()) into it"
        )

    @torch.no_grad()
    def update(self, t: float) -> None:
        """Fold the module's current weights into every profile at training time ``t``.

        Args:
            t: Training time after the step just taken; must exceed the previous one.

        Raises:
            TrackingError: If ``t`` is not finite or not larger than the last time, or
                a tracked parameter was replaced.
        """
        t = float(t)
        if self._swap is not None:
            raise TrackingError(
                f"update() while profile {self._stds[self._swap[0]]} is swapped in would "
                "average the profile into itself; call swap_out() (or leave the swapped() "
                "block) before training on"
            )
        if not (math.isfinite(t) and t > self._t):
            raise TrackingError(
                f"update time must be finite and increase: got t={t} after t={self._t}; "
                "pass the training time after each step (e.g. images seen)"
            )
        self.check_tracking()
        sources = None if self._full and not self._offloaded else self._sources()
        if self._t == 0.0:
            self._shadows.copy_from_sources(sources)
        else:
            self._shadows.lerp([power_weight(g, self._t, t) for g in self._gammas], sources)
        self._t = t
        self._num_updates += 1

    def index(self, std: float) -> int:
        """Position of the profile with relative std ``std`` (matched to 1e-9)."""
        for k, s in enumerate(self._stds):
            if math.isclose(s, std, rel_tol=1e-9, abs_tol=0.0):
                return k
        raise TrackingError(f"no tracked profile with std {std}; tracked stds are {self._stds}")

    def _value(self, i: int, k: int, full: bool, dtype: torch.dtype | None = None) -> Tensor:
        """Profile ``k`` of tensor ``i``: local rows as a DTensor, or gathered when ``full``."""
        piece, local = self._pieces[i], self._shadows.get(i, k, dtype)
        if piece.kind == "full":
            return local
        if piece.kind == "dtensor" and not full:
            return as_dtensor(piece, local)
        return full_value(piece, local)

    def profile(self, std: float, *, full: bool = False) -> dict[str, Tensor]:
        """Averaged tensors of one profile, ``{name: tensor}`` in the shadow dtype (copies).

        DTensor parameters give DTensors (no collective) unless ``full``; partitioned
        tensors are gathered (a collective: every rank must call).
        """
        k = self.index(std)
        self.check_tracking()
        return {n: self._value(i, k, full) for i, n in enumerate(self._names)}

    def profile_state_dict(
        self, std: float, *, full: bool = False, dtype: torch.dtype | None = None
    ) -> dict[str, Tensor]:
        """A full ``module.state_dict()`` with one profile's weights, ready to load.

        Averaged entries come from the profile (shadow dtype, or ``dtype``: cast as they
        are copied), as in :meth:`profile`;
        other entries (buffers under the ``"copy"`` policy, integer buffers) are copies
        of the live module's. A parameter the EMA does not track raises
        :class:`TrackingError` rather than being filled from the live module.
        """
        k = self.index(std)
        self._require_updated()
        self.check_tracking()
        out: dict[str, Tensor] = {}
        for key, value in self.module.state_dict(keep_vars=True).items():
            i = self._index_of.get(id(value))
            if i is not None:
                out[key] = self._value(i, k, full, dtype)
            else:
                self._refuse_untracked(key, value)
                live: Any = value.detach().clone()
                out[key] = live.full_tensor() if full and is_dtensor(live) else live
        return out

    def shard_state(self, std: float, dtype: torch.dtype | None = None) -> ShardState:
        """This process's part of profile ``std``, for a snapshot written without a gather.

        Every element of the module's state is in exactly one rank's part: the rows a
        rank holds and writes of each tracked tensor (see :class:`Piece`), and, on rank
        0, the whole of every untracked entry (buffers under the ``"copy"`` policy).
        Values are 1-D copies, floating-point ones in ``dtype`` if given (each cast as it
        is copied: no full-precision copy is made). Every rank must call it (DTensor
        buffers are gathered).
        """
        k = self.index(std)
        self._require_updated()
        self.check_tracking()
        rank = world()[0]
        specs, pieces, copied = [], [], []
        for key, value in self.module.state_dict(keep_vars=True).items():
            i = self._index_of.get(id(value))
            if i is None:
                self._refuse_untracked(key, value)
                live: Any = value.detach()
                live = live.full_tensor() if is_dtensor(live) else live
                cast = dtype if dtype is not None and live.is_floating_point() else live.dtype
                specs.append((key, cast, tuple(live.shape)))
                copied.append(key)
                if rank == 0:
                    pieces.append((key, 0, live.numel(), live.reshape(-1).to(cast, copy=True)))
                continue
            piece = self._pieces[i]
            cast = dtype or self._shadows.dtype_of(i)
            specs.append((key, cast, piece.shape))
            if piece.writes and piece.end > piece.begin:
                values = self._shadows.get(i, k, cast).reshape(-1)
                pieces.append((key, piece.begin, piece.end, values))
        return ShardState(specs, pieces, tuple(copied))

    def copied_keys(self) -> tuple[str, ...]:
        """State-dict keys a profile takes from the live module (not averaged).

        Decided by identity, so a tied parameter's second name is averaged too.
        """
        live = self.module.state_dict(keep_vars=True)
        return tuple(k for k, v in live.items() if id(v) not in self._index_of)

    def _refuse_untracked(self, key: str, value: Tensor) -> None:
        if isinstance(value, nn.Parameter) or (
            self.buffer_policy == "average" and value.is_floating_point()
        ):
            raise TrackingError(
                f"{key!r} is in the module's state but not tracked by this EMA (added "
                "after the EMA was made); create the EMA after building the model"
            )

    def snapshot(self, dtype: torch.dtype | None = None) -> list[Snapshot]:
        """Copies of every profile at the current time, one :class:`Snapshot` each.

        Tensors are whole (gathered under sharding: a collective every rank must call).

        Args:
            dtype: Storage dtype of the copies (e.g. ``torch.float16``); default the
                shadow dtype.
        """
        self._require_updated()
        self.check_tracking()
        return [
            Snapshot(
                self._t,
                std,
                {
                    n: self._value(i, k, True).to(dtype or self._shadows.dtype_of(i))
                    for i, n in enumerate(self._names)
                },
            )
            for k, std in enumerate(self._stds)
        ]

    @property
    def swapped_std(self) -> float | None:
        """The std whose weights the module holds after :meth:`swap_in`, else ``None``."""
        return None if self._swap is None else self._stds[self._swap[0]]

    def swap_in(self, std: float) -> None:
        """Put profile ``std``'s weights into the module until :meth:`swap_out`.

        The training weights are kept in one temporary copy of the tracked tensors.
        For code whose evaluation spans two callbacks (e.g. Lightning's validation
        epoch start and end); elsewhere prefer :meth:`swapped`. While swapped in,
        :meth:`update` raises (it would fold the profile into itself). Sharded
        parameters get their shards (no collective); partitioned ones are gathered (a
        collective).
        """
        k = self.index(std)
        if self._swap is not None:
            raise TrackingError(
                f"profile {self._stds[self._swap[0]]} is already swapped in; call "
                "swap_out() before swapping in another"
            )
        self._require_updated()
        self.check_tracking()
        with torch.no_grad():
            targets = [p.local() if p.kind == "dtensor" else p.obj.detach() for p in self._pieces]
            values = [
                self._shadows.get(i, k) if p.kind != "partitioned" else self._value(i, k, True)
                for i, p in enumerate(self._pieces)
            ]
            saved = [t.clone() for t in targets]
            for t, v in zip(targets, values, strict=True):
                t.copy_(v)
        self._swap = (k, targets, saved)

    def swap_out(self) -> None:
        """Give the module its training weights back after :meth:`swap_in`."""
        if self._swap is None:
            raise TrackingError("no profile is swapped in: call swap_in(std) first")
        _, targets, saved = self._swap
        self._swap = None
        if self._has_dtensors:  # drop weights gathered from the profile
            reshard(self.module)
        with torch.no_grad():
            for t, s in zip(targets, saved, strict=True):
                t.copy_(s)

    @contextmanager
    def swapped(self, std: float) -> Iterator[nn.Module]:
        """Context manager: the module holds profile ``std``'s weights inside the block.

        The training weights are kept in one temporary copy of the tracked tensors and
        restored on exit, also when the block raises. Sharded parameters get their
        shards (no collective); partitioned ones are gathered (a collective).
        """
        self.swap_in(std)
        try:
            yield self.module
        finally:
            self.swap_out()

    def copy_module(self, std: float) -> nn.Module:
        """A deep copy of the module holding profile ``std``, in eval mode, frozen.

        Partitioned tensors are gathered (a collective). A module sharded with FSDP2
        cannot be deep-copied: load ``profile_state_dict(std, full=True)`` into an
        unsharded model instead.
        """
        if self._has_dtensors:
            raise TrackingError(
                "copy_module cannot copy a module sharded with fully_shard; load "
                "ema.profile_state_dict(std, full=True) (every rank calls it) into an "
                "unsharded copy of the model instead"
            )
        state = self.profile_state_dict(std, full=True)
        clone = copy.deepcopy(self.module)
        clone.load_state_dict(state)
        clone.requires_grad_(False)
        return clone.eval()

    def _require_updated(self) -> None:
        if self._num_updates == 0:
            raise TrackingError("the EMA has no profile yet: call update(t) after a step first")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bitwise: times, stds and every shadow.

        Shadows are stored per name as one tensor of shape ``[num_profiles, *shape]``:
        plain tensors for an unsharded EMA (round-trip through ``torch.save`` /
        ``torch.load(weights_only=True)``), DTensors sharded on dim 1 for a sharded or
        partitioned one, so that ``torch.distributed.checkpoint`` saves each rank's
        rows and loads them back on any number of ranks.
        """
        shadows = {}
        for i, n in enumerate(self._names):
            stacked = torch.stack([self._shadows.get(i, k) for k in range(len(self._stds))])
            piece = self._pieces[i]
            shadows[n] = (
                stacked if piece.kind == "full" else as_dtensor(piece, stacked, (len(self._stds),))
            )
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "stds": list(self._stds),
            "buffers": self.buffer_policy,
            "t": self._t,
            "num_updates": self._num_updates,
            "shadows": shadows,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises :class:`StateError` on any mismatch.

        A state saved unsharded loads into a sharded or partitioned EMA (each rank
        takes its rows); a sharded one needs the same placements (load it with
        ``torch.distributed.checkpoint`` into this EMA's :meth:`state_dict` first).
        """
        check_header(state, self._stds, self.buffer_policy)
        shadows: Mapping[str, Tensor] = state["shadows"]
        check_names(set(shadows), set(self._names))
        rows = [
            local_rows(
                name, shadows[name], self._pieces[i], len(self._stds), self._shadows.dtype_of(i)
            )
            for i, name in enumerate(self._names)
        ]
        for i, value in enumerate(rows):
            for k in range(len(self._stds)):
                self._shadows.set(i, k, value[k])
        self._t = float(state["t"])
        self._num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        return (
            f"PowerFunctionEMA(stds={self._stds}, tensors={len(self._names)}, "
            f"t={self._t:g}, updates={self._num_updates}, buffers={self.buffer_policy!r})"
        )


def _elsewhere(sources: Sequence[Tensor], device: torch.device) -> bool:
    """Whether some tracked tensor lives on another device than the shadows (offload)."""
    return any(s.device.type != device.type for s in sources)
