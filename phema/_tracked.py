r"""What ``PowerFunctionEMA`` holds of each tensor it tracks, and whether it is still the module's.

Every tracked tensor of global shape :math:`(n_0, n_1, \dots)` is held here as a
block of whole rows :math:`[r_0, r_1)` of dim 0, i.e. the flat element range

.. math::

    [\,r_0\, m,\; r_1\, m\,), \qquad m = n_1 n_2 \cdots,

of the tensor in C order. Three cases, all with the same arithmetic on the local
rows (so each profile is bitwise the one an unsharded EMA computes):

* **full**: a plain tensor tracked whole (:math:`r_0 = 0, r_1 = n_0`);
* **dtensor**: a ``DTensor`` parameter (FSDP2's ``fully_shard``); the local rows are
  its shard, read from the shard itself with no collective;
* **partitioned**: a plain (replicated) tensor of which this rank tracks the rows
  ``torch.chunk`` would give it, the layout ``Shard(0)`` describes (DDP with
  ``partition=True``).

``writes`` says whether this process writes its rows into snapshots: a piece held by
several ranks (a replicated tensor, or a replica of a shard under HSDP) is written
by the first of them only, so the pieces written by all ranks tile each tensor once.

Staleness: each tracked tensor is reached from the root module through a chain of
``_modules`` / ``_parameters`` / ``_buffers`` entries. :func:`find_stale` checks that
every entry of every chain still holds the very object it held when the EMA was
made: a replaced submodule, ``load_state_dict(assign=True)`` or ``fully_shard``
after the EMA all break a chain, and the EMA refuses to go on instead of averaging
tensors the module no longer uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from phema._dist import world
from phema.errors import TrackingError

__all__ = ["Link", "Piece", "find_stale", "make_links", "make_piece"]

Kind = Literal["full", "dtensor", "partitioned"]


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


DTENSOR = _dtensor_type()


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    return DTENSOR is not None and isinstance(t, DTENSOR)


def chunk_rows(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[r0, r1)`` of ``n`` that ``torch.chunk(.., size)[rank]`` gives (possibly empty)."""
    step = -(-n // size) if n else 0
    r0 = min(n, rank * step)
    return r0, min(n, r0 + step)


@dataclass
class Piece:
    """The rows ``[r0, r1)`` of tracked tensor ``name`` that this process holds."""

    name: str
    obj: Tensor  # the module's tensor (a Parameter, a DTensor Parameter or a buffer)
    shape: tuple[int, ...]  # global shape
    r0: int
    r1: int
    kind: Kind
    writes: bool
    mesh: Any = None  # DeviceMesh of a DTensor / partitioned piece
    placements: tuple[Any, ...] = ()
    _rows: tuple[int, Tensor] | None = None  # (storage pointer, view) of a partitioned piece

    @property
    def row(self) -> int:
        """Elements per row (1 for a 0-d or 1-d tensor)."""
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def begin(self) -> int:
        """First element held, in the flattened global tensor."""
        return 0 if not self.shape else self.r0 * self.row

    @property
    def end(self) -> int:
        """One past the last element held, in the flattened global tensor."""
        return 1 if not self.shape else self.r1 * self.row

    @property
    def local_shape(self) -> tuple[int, ...]:
        """Shape of the rows held."""
        return self.shape if not self.shape else (self.r1 - self.r0, *self.shape[1:])

    def local(self) -> Tensor:
        """The held rows of the module's tensor, a view (no copy, no collective)."""
        if self.kind == "dtensor":
            local = getattr(self.obj, "_local_tensor", None)
            return local if isinstance(local, Tensor) else self.obj.to_local()  # type: ignore[attr-defined]
        if self.kind == "full":
            return self.obj.detach()
        ptr = self.obj.data_ptr()  # the view is made again only when the storage moved
        if self._rows is None or self._rows[0] != ptr:
            self._rows = (ptr, self.obj.detach()[self.r0 : self.r1])
        return self._rows[1]


def make_piece(name: str, obj: Tensor, partition_mesh: Any = None) -> Piece:
    """Where tensor ``obj`` lives and which of its rows this process tracks.

    With ``partition_mesh`` (a 1-D mesh over every rank) a plain tensor with rows is
    partitioned as ``Shard(0)`` over it; a 0-d tensor is tracked whole everywhere.
    """
    from torch.distributed.tensor import Shard

    rank, size = world()
    shape = tuple(obj.shape)
    if is_dtensor(obj):
        return _dtensor_piece(name, obj, shape)
    if partition_mesh is not None and shape:
        r0, r1 = chunk_rows(shape[0], rank, size)
        return Piece(name, obj, shape, r0, r1, "partitioned", True, partition_mesh, (Shard(0),))
    return Piece(name, obj, shape, 0, shape[0] if shape else 1, "full", rank == 0)


def _dtensor_piece(name: str, obj: Any, shape: tuple[int, ...]) -> Piece:
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = obj.device_mesh, tuple(obj.placements)
    for p in placements:
        if not isinstance(p, Replicate | Shard) or (isinstance(p, Shard) and p.dim != 0):
            raise TrackingError(
                f"parameter {name!r} is a DTensor with placements {placements}; phema tracks "
                "DTensors sharded on dim 0 (FSDP2's Shard(0)) or replicated"
            )
    r0, rows = 0, shape[0] if shape else 1
    coordinate = mesh.get_coordinate()
    if coordinate is None:  # this rank is not in the mesh: holds nothing
        return Piece(name, obj, shape, 0, 0, "dtensor", False, mesh, placements)
    writes = True
    for mesh_dim, p in enumerate(placements):
        if isinstance(p, Shard):  # nested chunking, as DTensor does it
            a, b = chunk_rows(rows, coordinate[mesh_dim], mesh.size(mesh_dim))
            r0, rows = r0 + a, b - a
        elif coordinate[mesh_dim] != 0:
            writes = False  # a replica: the one at coordinate 0 writes
    local = obj._local_tensor if hasattr(obj, "_local_tensor") else obj.to_local()
    if shape and tuple(local.shape) != (rows, *shape[1:]):
        raise TrackingError(
            f"parameter {name!r}: local shard has shape {tuple(local.shape)}, expected "
            f"{(rows, *shape[1:])} for {placements}; phema supports torch.chunk-style shards"
        )
    if not local.is_contiguous():
        raise TrackingError(f"parameter {name!r}: its local shard is not contiguous")
    return Piece(name, obj, shape, r0, r0 + rows, "dtensor", writes, mesh, placements)


@dataclass(frozen=True)
class Link:
    """``holder[key] is expected``: one step of the path from the root to a tracked tensor.

    ``path`` is the dotted name that step reaches (``"fc"`` for a submodule,
    ``"fc.weight"`` for the tensor itself); ``name`` is a tracked tensor under it.
    """

    holder: dict[str, Any]
    key: str
    expected: object
    path: str
    name: str


def make_links(root: nn.Module, names: Sequence[str], buffers: set[str]) -> list[Link]:
    """The distinct links from ``root`` to every tensor in ``names``.

    Names in ``buffers`` are looked up among buffers, the others among parameters.
    """
    links: dict[tuple[int, str], Link] = {}
    for name in names:
        *path, leaf = name.split(".")
        module = root
        for depth, part in enumerate(path):
            child = module._modules[part]
            assert child is not None
            key = (id(module._modules), part)
            links.setdefault(
                key, Link(module._modules, part, child, ".".join(path[: depth + 1]), name)
            )
            module = child
        holder = module._buffers if name in buffers else module._parameters
        links.setdefault((id(holder), leaf), Link(holder, leaf, holder[leaf], name, name))
    return list(links.values())


def find_stale(links: Sequence[Link]) -> Link | None:
    """The first link whose holder no longer holds the object it held, else None."""
    for link in links:
        if link.holder.get(link.key) is not link.expected:
            return link
    return None


def shard_placements(piece: Piece, dim: int) -> tuple[Any, ...]:
    """The piece's placements with ``Shard(0)`` moved to ``Shard(dim)`` (for stacked shadows)."""
    from torch.distributed.tensor import Shard

    return tuple(Shard(dim) if isinstance(p, Shard) else p for p in piece.placements)


def as_dtensor(piece: Piece, local: Tensor, lead: tuple[int, ...] = ()) -> Tensor:
    """``local`` (the piece's rows, after ``lead`` extra leading dims) as a DTensor."""
    from torch.distributed.tensor import DTensor

    shape = (*lead, *piece.shape)
    stride = torch.empty(0).new_empty(shape, device="meta").stride()
    local = local.to(piece.obj.device)  # host shadows (offload) meet the mesh's device
    return DTensor.from_local(
        local,
        piece.mesh,
        shard_placements(piece, len(lead)),
        run_check=False,
        shape=torch.Size(shape),
        stride=stride,
    )


def full_value(piece: Piece, local: Tensor) -> Tensor:
    """The whole tensor whose rows ``local`` holds: a collective unless the piece is full."""
    if piece.kind == "full":
        return local
    return as_dtensor(piece, local).full_tensor()  # type: ignore[attr-defined,no-any-return]


def world_mesh(device: torch.device) -> Any:
    """A 1-D DeviceMesh over every rank of the default group (for partitioned pieces)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world()[1],))


def reshard(module: nn.Module) -> bool:
    """Reshard every FSDP2 module under ``module``; whether there was any.

    After a forward outside backward (evaluation), FSDP2 leaves the root's parameters
    unsharded and registered in place of the sharded ones; resharding registers the
    sharded parameters again (values unchanged) and drops the gathered copies.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    found = False
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
            found = True
    return found
