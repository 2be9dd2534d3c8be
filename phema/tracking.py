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
from typing import Any, Literal

import torch
from torch import Tensor, nn

from phema._shadow import FusedShadows
from phema.errors import StateError, TrackingError
from phema.memory import Snapshot
from phema.profiles import power_weight, sigma_rel_to_gamma

__all__ = ["BufferPolicy", "PowerFunctionEMA", "unwrap_module"]

#: ``"copy"``: buffers are not averaged; a profile's state uses the live module's
#: buffers (the reference behaviour, right for BatchNorm statistics of the current
#: weights). ``"average"``: floating-point buffers are averaged like parameters and
#: integer buffers are copied.
BufferPolicy = Literal["copy", "average"]

_STATE_FORMAT = "phema.PowerFunctionEMA"
_STATE_VERSION = 1
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


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
            EMA after the model is on its device and in its dtype; parameters are
            held by reference, as an optimizer holds them.
        stds: Relative stds of the profiles to track, each in ``(0, 0.2887]``.
        buffers: Buffer policy, see :data:`BufferPolicy`.
        dtype: Shadow dtype; default float32, or float64 for float64 parameters.

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
        self.buffer_policy: BufferPolicy = buffers
        named: list[tuple[str, Tensor]] = list(self.module.named_parameters())
        if buffers == "average":
            named += [(n, b) for n, b in self.module.named_buffers() if b.is_floating_point()]
        for name, tensor in named:
            if not tensor.is_floating_point():
                raise TrackingError(f"parameter {name!r} has dtype {tensor.dtype}; only floats")
        self._names = tuple(n for n, _ in named)
        self._tensors = [t for _, t in named]
        self._index_of = {id(t): i for i, t in enumerate(self._tensors)}
        self._shadows = FusedShadows(self._tensors, len(std_list), dtype)
        self._t = 0.0
        self._num_updates = 0

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

    @torch.no_grad()
    def update(self, t: float) -> None:
        """Fold the module's current weights into every profile at training time ``t``.

        Args:
            t: Training time after the step just taken; must exceed the previous one.

        Raises:
            TrackingError: If ``t`` is not finite or not larger than the last time.
        """
        t = float(t)
        if not (math.isfinite(t) and t > self._t):
            raise TrackingError(
                f"update time must be finite and increase: got t={t} after t={self._t}; "
                "pass the training time after each step (e.g. images seen)"
            )
        if self._t == 0.0:
            self._shadows.copy_from_sources()
        else:
            self._shadows.lerp([power_weight(g, self._t, t) for g in self._gammas])
        self._t = t
        self._num_updates += 1

    def index(self, std: float) -> int:
        """Position of the profile with relative std ``std`` (matched to 1e-9)."""
        for k, s in enumerate(self._stds):
            if math.isclose(s, std, rel_tol=1e-9, abs_tol=0.0):
                return k
        raise TrackingError(f"no tracked profile with std {std}; tracked stds are {self._stds}")

    def profile(self, std: float) -> dict[str, Tensor]:
        """Averaged tensors of one profile, ``{name: tensor}`` in the shadow dtype (copies)."""
        k = self.index(std)
        return {n: self._shadows.get(i, k) for i, n in enumerate(self._names)}

    def profile_state_dict(self, std: float) -> dict[str, Tensor]:
        """A full ``module.state_dict()`` with one profile's weights, ready to load.

        Averaged entries come from the profile (shadow dtype), all other entries
        (buffers under the ``"copy"`` policy, integer buffers) are copies of the live
        module's.
        """
        k = self.index(std)
        self._require_updated()
        out: dict[str, Tensor] = {}
        for key, value in self.module.state_dict(keep_vars=True).items():
            i = self._index_of.get(id(value))
            out[key] = self._shadows.get(i, k) if i is not None else value.detach().clone()
        return out

    def snapshot(self, dtype: torch.dtype | None = None) -> list[Snapshot]:
        """Copies of every profile at the current time, one :class:`Snapshot` each.

        Args:
            dtype: Storage dtype of the copies (e.g. ``torch.float16``); default the
                shadow dtype.
        """
        self._require_updated()
        return [
            Snapshot(
                self._t,
                std,
                {
                    n: self._shadows.get(i, k).to(dtype or self._shadows.dtype_of(i))
                    for i, n in enumerate(self._names)
                },
            )
            for k, std in enumerate(self._stds)
        ]

    @contextmanager
    def swapped(self, std: float) -> Iterator[nn.Module]:
        """Context manager: the module holds profile ``std``'s weights inside the block.

        The training weights are kept in one temporary copy of the tracked tensors and
        restored on exit, also when the block raises.
        """
        k = self.index(std)
        self._require_updated()
        with torch.no_grad():
            saved = [t.detach().clone() for t in self._tensors]
            for i, t in enumerate(self._tensors):
                t.copy_(self._shadows.get(i, k))
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for t, s in zip(self._tensors, saved, strict=True):
                    t.copy_(s)

    def copy_module(self, std: float) -> nn.Module:
        """A deep copy of the module holding profile ``std``, in eval mode, frozen."""
        state = self.profile_state_dict(std)
        clone = copy.deepcopy(self.module)
        clone.load_state_dict(state)
        clone.requires_grad_(False)
        return clone.eval()

    def _require_updated(self) -> None:
        if self._num_updates == 0:
            raise TrackingError("the EMA has no profile yet: call update(t) after a step first")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bitwise: times, stds and every shadow.

        Shadows are stored per name as one tensor of shape ``[num_profiles, *shape]``.
        The result holds only tensors and plain Python values, so it round-trips
        through ``torch.save`` / ``torch.load(weights_only=True)``.
        """
        shadows = {
            n: torch.stack([self._shadows.get(i, k) for k in range(len(self._stds))])
            for i, n in enumerate(self._names)
        }
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "stds": list(self._stds),
            "buffers": self.buffer_policy,
            "t": self._t,
            "num_updates": self._num_updates,
            "shadows": shadows,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises :class:`StateError` on any mismatch."""
        if state.get("format") != _STATE_FORMAT or state.get("version") != _STATE_VERSION:
            raise StateError(
                f"not a PowerFunctionEMA state (format={state.get('format')!r}, "
                f"version={state.get('version')!r}); expected {_STATE_FORMAT!r} v{_STATE_VERSION}"
            )
        stds = tuple(float(s) for s in state["stds"])
        if stds != self._stds:
            raise StateError(
                f"saved stds {stds} differ from this EMA's {self._stds}; "
                "construct PowerFunctionEMA with the saved stds"
            )
        if state["buffers"] != self.buffer_policy:
            raise StateError(
                f"saved buffer policy {state['buffers']!r} differs from {self.buffer_policy!r}"
            )
        shadows: Mapping[str, Tensor] = state["shadows"]
        _check_names(set(shadows), set(self._names))
        for i, name in enumerate(self._names):
            value = shadows[name]
            want = (len(self._stds), *self._tensors[i].shape)
            if tuple(value.shape) != want or value.dtype != self._shadows.dtype_of(i):
                raise StateError(
                    f"saved shadow {name!r} is {value.dtype} {tuple(value.shape)}, expected "
                    f"{self._shadows.dtype_of(i)} {want}"
                )
        for i, name in enumerate(self._names):
            for k in range(len(self._stds)):
                self._shadows.set(i, k, shadows[name][k])
        self._t = float(state["t"])
        self._num_updates = int(state["num_updates"])

    def __repr__(self) -> str:
        return (
            f"PowerFunctionEMA(stds={self._stds}, tensors={len(self._names)}, "
            f"t={self._t:g}, updates={self._num_updates}, buffers={self.buffer_policy!r})"
        )


def _check_names(saved: set[str], expected: set[str]) -> None:
    if saved == expected:
        return
    missing = sorted(expected - saved)
    unexpected = sorted(saved - expected)
    hint = ""
    stripped = {n.split(".", 1)[1] if n.startswith(_WRAPPER_PREFIXES) else n for n in saved}
    if stripped == expected:
        hint = "; the saved names carry a DDP/compile prefix: save from an unwrapped module"
    raise StateError(
        f"saved EMA state does not match the module: missing {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
        f"{' ...' if len(unexpected) > 5 else ''}{hint}"
    )
