r"""Shadow storage for K EMA profiles of a list of tensors, updated in one fused pass.

Each tracked tensor of ``n`` elements owns one flat shadow buffer of ``K * n``
elements laid out in blocks: ``[block 0: profile 0 (B), ..., profile K-1 (B)]``,
``[block 1: ...]``, ..., then a short tail block if ``B`` does not divide ``n``.
Viewed as ``(n_blocks, K, B)`` the update of every profile is one broadcasting

.. math::

    S_{b,k,:} \leftarrow S_{b,k,:} + w_k\,(x_{b,:} - S_{b,k,:}),
    \qquad w_k = 1 - \beta_k,

with the source viewed as ``(n_blocks, 1, B)``. The innermost loop runs over a
block of ``B`` elements and the next one over the profiles, so each block of the
source is read from memory once and then reused from cache by the other K-1
profiles: the update moves ``(2K + 1)`` element-widths per parameter instead of
``3K``. All tensors go through one ``torch._foreach_lerp_`` call per group, which
keeps the fixed cost per tensor at the level of a bare foreach op.

On accelerators the same buffer is used "profile-major" (one block per tensor,
``B = n``): profile ``k`` of every tensor is then contiguous, and the update is K
fast-path ``_foreach_lerp_`` calls with scalar weights (a few fused kernels),
where a broadcasting weight tensor would launch one kernel per tensor.

Sources whose dtype differs from the shadow dtype (bf16/fp16 parameters under
fp32 shadows) or that are not contiguous are first copied into a reused fp32
staging buffer in bounded groups (``lerp`` needs both operands in one dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from phema.errors import TrackingError

__all__ = ["FusedShadows", "Layout"]

#: Elements per block; 4 KiB of fp32, so source and K shadow blocks sit in L1.
BLOCK = 1024
#: Largest staging buffer for low-precision or strided sources, in elements.
STAGING_ELEMENTS = 1 << 22

#: ``"auto"`` picks ``"blocked"`` for CPU tensors and ``"profile_major"`` elsewhere.
Layout = Literal["auto", "blocked", "profile_major"]


def _segments(n: int, blocked: bool) -> list[tuple[int, int, int]]:
    """``(source offset, n_blocks, block size)`` pieces covering ``n`` elements."""
    if n == 0:
        return []
    b = n
    if blocked and n > BLOCK:
        b = next((c for c in range(BLOCK, BLOCK // 4 - 1, -1) if n % c == 0), BLOCK)
    nb, rest = divmod(n, b)
    return [(0, nb, b)] + ([(nb * b, 1, rest)] if rest else [])


@dataclass
class _Entry:
    """One tracked tensor: its shadow buffer and the blocked views into it."""

    shape: torch.Size
    numel: int
    storage: Tensor  # flat, K * numel elements
    segments: list[tuple[int, int, int]]
    direct: bool  # source can be viewed in place (same dtype, contiguous)
    blocked: bool

    def shadow_views(self, k_profiles: int) -> list[Tensor]:
        views, pos = [], 0
        for _, nb, b in self.segments:
            views.append(self.storage[pos : pos + nb * k_profiles * b].view(nb, k_profiles, b))
            pos += nb * k_profiles * b
        return views

    def source_views(self, flat: Tensor) -> list[Tensor]:
        return [flat[off : off + nb * b].view(nb, 1, b) for off, nb, b in self.segments]


@dataclass
class _Pass:
    """Views for one group of tensors sharing device, dtype and layout."""

    device: torch.device
    dtype: torch.dtype
    blocked: bool
    dst: list[Tensor] = field(default_factory=list)  # (nb, K, B) shadow views
    src: list[Tensor] = field(default_factory=list)  # (nb, 1, B) source views
    dst_by_profile: list[list[Tensor]] = field(default_factory=list)  # profile-major only
    src_flat: list[Tensor] = field(default_factory=list)  # profile-major only

    def add(self, dst: list[Tensor], src: list[Tensor]) -> None:
        self.dst.extend(dst)
        self.src.extend(src)

    def finish(self, k_profiles: int) -> _Pass:
        if not self.blocked:
            self.dst_by_profile = [[d[0, k] for d in self.dst] for k in range(k_profiles)]
            self.src_flat = [x[0, 0] for x in self.src]
        return self

    def run(self, weights: Sequence[float]) -> None:
        if not self.dst:
            return
        if self.blocked:
            w = torch.tensor(list(weights), dtype=self.dtype, device=self.device)
            w = w.view(1, len(weights), 1)
            torch._foreach_lerp_(self.dst, self.src, [w] * len(self.dst))
        else:
            for dst, wk in zip(self.dst_by_profile, weights, strict=True):
                torch._foreach_lerp_(dst, self.src_flat, wk)


@dataclass
class _Staged:
    """Sources copied into a staging buffer before their pass."""

    indices: list[int]
    shaped: list[Tensor]  # staging views shaped like the sources
    step: _Pass


class FusedShadows:
    """K fp32 (or wider) shadow copies of ``sources``, updated by :meth:`lerp`."""

    def __init__(
        self,
        sources: Sequence[Tensor],
        num_profiles: int,
        dtype: torch.dtype | None = None,
        layout: Layout = "auto",
        device: torch.device | None = None,
    ) -> None:
        self.k = num_profiles
        self.sources = list(sources)
        self.entries: list[_Entry] = []
        for src in self.sources:
            sdtype = dtype or torch.promote_types(src.dtype, torch.float32)
            where = src.device if device is None else device
            blocked = layout == "blocked" or (layout == "auto" and where.type == "cpu")
            n = src.numel()
            storage = torch.zeros(self.k * n, dtype=sdtype, device=where)
            direct = src.dtype == sdtype and src.is_contiguous() and src.device == where
            self.entries.append(
                _Entry(src.shape, n, storage, _segments(n, blocked), direct, blocked)
            )
        self._shadow_views = [e.shadow_views(self.k) for e in self.entries]
        self._ptrs: list[int] = []
        self._direct: list[_Pass] = []
        self._staged = self._plan_staging()

    def _plan_staging(self) -> list[_Staged]:
        """Group staged sources so that each group fits one staging buffer."""
        groups: list[_Staged] = []
        pending: dict[tuple[torch.device, torch.dtype, bool], list[int]] = {}
        for i, e in enumerate(self.entries):
            if not e.direct:
                key = (e.storage.device, e.storage.dtype, e.blocked)
                pending.setdefault(key, []).append(i)
        for (device, sdtype, blocked), idxs in pending.items():
            chunks: list[list[int]] = [[]]
            size = 0
            for i in idxs:
                if chunks[-1] and size + self.entries[i].numel > STAGING_ELEMENTS:
                    chunks.append([])
                    size = 0
                chunks[-1].append(i)
                size += self.entries[i].numel
            for chunk in chunks:
                buf = torch.empty(
                    sum(self.entries[j].numel for j in chunk), dtype=sdtype, device=device
                )
                step = _Pass(device, sdtype, blocked)
                shaped, off = [], 0
                for j in chunk:
                    e = self.entries[j]
                    flat = buf[off : off + e.numel]
                    shaped.append(flat.view(e.shape))
                    step.add(self._shadow_views[j], e.source_views(flat))
                    off += e.numel
                groups.append(_Staged(chunk, shaped, step.finish(self.k)))
        return groups

    def _refresh_direct(self) -> None:
        """Rebuild cached source views when any source's storage moved."""
        ptrs = [s.data_ptr() for s in self.sources]
        if ptrs == self._ptrs:
            return
        for src, e in zip(self.sources, self.entries, strict=True):
            if src.shape != e.shape or (e.direct and src.device != e.storage.device):
                raise TrackingError(
                    f"a tracked tensor changed from {tuple(e.shape)} on {e.storage.device} to "
                    f"{tuple(src.shape)} on {src.device}"
                )
            if e.direct and (src.dtype != e.storage.dtype or not src.is_contiguous()):
                raise TrackingError(
                    f"a tracked tensor changed dtype or layout (now {src.dtype}); "
                    "create the EMA after casting and moving the model"
                )
        passes: dict[tuple[torch.device, torch.dtype, bool], _Pass] = {}
        for src, e, sviews in zip(self.sources, self.entries, self._shadow_views, strict=True):
            if e.direct:
                key = (e.storage.device, e.storage.dtype, e.blocked)
                step = passes.setdefault(key, _Pass(*key))
                step.add(sviews, e.source_views(src.detach().view(-1)))
        self._direct = [p.finish(self.k) for p in passes.values()]
        self._ptrs = ptrs

    @torch.no_grad()
    def lerp(self, weights: Sequence[float], sources: Sequence[Tensor] | None = None) -> None:
        """``shadow[k] += weights[k] * (source - shadow[k])`` for every profile ``k``.

        ``sources`` replaces the tracked tensors by views of the same shapes (the
        current local shards of DTensors, whose wrappers may change between calls).
        """
        if sources is not None:
            self.sources = list(sources)
        self._refresh_direct()
        for step in self._direct:
            step.run(weights)
        for staged in self._staged:
            torch._foreach_copy_(staged.shaped, [self.sources[i] for i in staged.indices])
            staged.step.run(weights)

    @torch.no_grad()
    def copy_from_sources(self, sources: Sequence[Tensor] | None = None) -> None:
        """Set every profile to the current sources (the first update)."""
        if sources is not None:
            self.sources = list(sources)
        for src, e, sviews in zip(self.sources, self.entries, self._shadow_views, strict=True):
            flat = src.detach().reshape(-1)
            for view, sv in zip(sviews, e.source_views(flat), strict=True):
                view.copy_(sv.expand_as(view))

    def get(self, index: int, k: int, dtype: torch.dtype | None = None) -> Tensor:
        """A contiguous copy of profile ``k`` of tensor ``index`` (shadow dtype by default).

        One pass: each block of the profile is copied (and cast) straight into the result.
        """
        e = self.entries[index]
        out = e.storage.new_empty(e.numel, dtype=dtype or e.storage.dtype)
        pos = 0
        for v in self._shadow_views[index]:
            nb, _, b = v.shape
            out[pos : pos + nb * b].view(nb, b).copy_(v[:, k, :])
            pos += nb * b
        return out.view(e.shape)

    @torch.no_grad()
    def set(self, index: int, k: int, value: Tensor) -> None:
        """Overwrite profile ``k`` of tensor ``index`` with ``value`` (same shape)."""
        e = self.entries[index]
        flat = value.detach().reshape(-1).to(e.storage.dtype)
        for view, sv in zip(self._shadow_views[index], e.source_views(flat), strict=True):
            view[:, k, :].copy_(sv[:, 0, :])

    def dtype_of(self, index: int) -> torch.dtype:
        """The shadow dtype of tensor ``index``."""
        return self.entries[index].storage.dtype
