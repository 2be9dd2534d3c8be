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

Sources whose dtype differs from the shadow dtype (bf16/fp16 parameters under
fp32 shadows) or that are not contiguous are first copied into a reused fp32
staging buffer in bounded groups (``lerp`` needs both operands in one dtype).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from phema.errors import TrackingError

__all__ = ["FusedShadows"]

#: Elements per block; 4 KiB of fp32, so source and K shadow blocks sit in L1.
BLOCK = 1024
#: Largest staging buffer for low-precision or strided sources, in elements.
STAGING_ELEMENTS = 1 << 22


def _block_size(n: int) -> int:
    if n <= BLOCK:
        return n
    for b in range(BLOCK, BLOCK // 4 - 1, -1):
        if n % b == 0:
            return b
    return BLOCK


@dataclass
class _Entry:
    """One tracked tensor: its shadow buffer and the blocked views into it."""

    shape: torch.Size
    numel: int
    storage: Tensor  # flat, K * numel elements
    segments: list[tuple[int, int, int]]  # (source offset, n_blocks, block size)
    direct: bool  # source can be viewed in place (same dtype, contiguous)

    def shadow_views(self, k_profiles: int) -> list[Tensor]:
        views, pos = [], 0
        for _, nb, b in self.segments:
            views.append(self.storage[pos : pos + nb * k_profiles * b].view(nb, k_profiles, b))
            pos += nb * k_profiles * b
        return views

    def source_views(self, flat: Tensor) -> list[Tensor]:
        return [flat[off : off + nb * b].view(nb, 1, b) for off, nb, b in self.segments]


class FusedShadows:
    """K fp32 (or wider) shadow copies of ``sources``, updated by :meth:`lerp`."""

    def __init__(
        self, sources: Sequence[Tensor], num_profiles: int, dtype: torch.dtype | None = None
    ) -> None:
        self.k = num_profiles
        self.sources = list(sources)
        self.entries: list[_Entry] = []
        for src in self.sources:
            sdtype = dtype or torch.promote_types(src.dtype, torch.float32)
            n = src.numel()
            b = _block_size(n)
            nb, rest = divmod(n, b)
            segments = [(0, nb, b)] + ([(nb * b, 1, rest)] if rest else [])
            storage = torch.zeros(self.k * n, dtype=sdtype, device=src.device)
            direct = src.dtype == sdtype and src.is_contiguous()
            self.entries.append(_Entry(src.shape, n, storage, segments, direct))
        self._shadow_views = [e.shadow_views(self.k) for e in self.entries]
        self._ptrs: list[int] = []
        self._direct_src: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]]
        self._direct_src = {}
        self._staged = self._plan_staging()

    def _plan_staging(self) -> list[tuple[list[int], Tensor, list[Tensor], list[Tensor]]]:
        """Group staged sources so that each group fits one staging buffer."""
        groups: list[tuple[list[int], Tensor, list[Tensor], list[Tensor]]] = []
        pending: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for i, e in enumerate(self.entries):
            if not e.direct:
                pending.setdefault((e.storage.device, e.storage.dtype), []).append(i)
        for (device, sdtype), idxs in pending.items():
            chunk: list[int] = []
            size = 0
            for i in [*idxs, -1]:
                n = self.entries[i].numel if i >= 0 else 0
                if chunk and (i < 0 or size + n > STAGING_ELEMENTS):
                    buf = torch.empty(size, dtype=sdtype, device=device)
                    shaped, blocked, off = [], [], 0
                    for j in chunk:
                        e = self.entries[j]
                        flat = buf[off : off + e.numel]
                        shaped.append(flat.view(e.shape))
                        blocked.extend(e.source_views(flat))
                        off += e.numel
                    groups.append((chunk, buf, shaped, blocked))
                    chunk, size = [], 0
                if i >= 0:
                    chunk.append(i)
                    size += n
        return groups

    def _refresh_direct(self) -> None:
        """Rebuild cached source views when any source's storage moved."""
        ptrs = [s.data_ptr() for s in self.sources]
        if ptrs == self._ptrs:
            return
        for src, e in zip(self.sources, self.entries, strict=True):
            if src.shape != e.shape or src.device != e.storage.device:
                raise TrackingError(
                    f"a tracked tensor changed from {tuple(e.shape)} on {e.storage.device} to "
                    f"{tuple(src.shape)} on {src.device}"
                )
            if e.direct and (src.dtype != e.storage.dtype or not src.is_contiguous()):
                raise TrackingError(
                    f"a tracked tensor changed dtype or layout (now {src.dtype}); "
                    "create the EMA after casting and moving the model"
                )
        groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        for src, e, sviews in zip(self.sources, self.entries, self._shadow_views, strict=True):
            if e.direct:
                dst, srcs = groups.setdefault((e.storage.device, e.storage.dtype), ([], []))
                dst.extend(sviews)
                srcs.extend(e.source_views(src.detach().view(-1)))
        self._direct_src = groups
        self._ptrs = ptrs

    def lerp(self, weights: Sequence[float]) -> None:
        """``shadow[k] += weights[k] * (source - shadow[k])`` for every profile ``k``."""
        self._refresh_direct()
        wcache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

        def weight(device: torch.device, dtype: torch.dtype) -> Tensor:
            w = wcache.get((device, dtype))
            if w is None:
                w = torch.tensor(list(weights), dtype=dtype, device=device).view(1, self.k, 1)
                wcache[(device, dtype)] = w
            return w

        for (device, dtype), (dst, srcs) in self._direct_src.items():
            torch._foreach_lerp_(dst, srcs, [weight(device, dtype)] * len(dst))
        for idxs, buf, shaped, blocked in self._staged:
            torch._foreach_copy_(shaped, [self.sources[i] for i in idxs])
            dst = [v for i in idxs for v in self._shadow_views[i]]
            torch._foreach_lerp_(dst, blocked, [weight(buf.device, buf.dtype)] * len(dst))

    def copy_from_sources(self) -> None:
        """Set every profile to the current sources (the first update)."""
        for src, e, sviews in zip(self.sources, self.entries, self._shadow_views, strict=True):
            flat = src.detach().reshape(-1)
            for view, sv in zip(sviews, e.source_views(flat), strict=True):
                view.copy_(sv.expand_as(view))

    def get(self, index: int, k: int) -> Tensor:
        """A contiguous copy of profile ``k`` of tensor ``index``, in the shadow dtype."""
        e = self.entries[index]
        parts = [v[:, k, :].reshape(-1) for v in self._shadow_views[index]]
        return torch.cat(parts).view(e.shape)

    def set(self, index: int, k: int, value: Tensor) -> None:
        """Overwrite profile ``k`` of tensor ``index`` with ``value`` (same shape)."""
        e = self.entries[index]
        flat = value.detach().reshape(-1).to(e.storage.dtype)
        for view, sv in zip(self._shadow_views[index], e.source_views(flat), strict=True):
            view[:, k, :].copy_(sv[:, 0, :])

    def dtype_of(self, index: int) -> torch.dtype:
        """The shadow dtype of tensor ``index``."""
        return self.entries[index].storage.dtype
