"""FSDP2 for the training loop (``--fsdp``): sharding the network, and what the loop adds.

:func:`shard_network` ``fully_shard``-s every :class:`~edm2_reference.network.Block` and then
the root. ``fully_shard`` cannot shard 0-d parameters (the gains): they stay replicated, and
the loop averages their gradients itself (:func:`average_grads`), as DDP would. Forced weight
normalisation moves out of the forward, which sees gathered copies of the weights, to
:func:`before_sharded_forward`, which rewrites the shards before each forward, as DDP's
forward applies it to the whole weights. :func:`local_part` gives this rank's part of a
(possibly sharded) gradient.
"""

from __future__ import annotations

import warnings
from typing import cast

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor

from edm2_reference.distributed import World
from edm2_reference.mp import MPConv, normalize_weights_
from edm2_reference.network import Block, Precond

__all__ = ["average_grads", "before_sharded_forward", "local_part", "shard_network"]


def shard_network(net: Precond, world: World) -> list[nn.Parameter]:
    """FSDP2: shard every :class:`Block`, then the rest at the root; the params left replicated.

    ``fully_shard`` cannot shard 0-d parameters (the gains): they stay plain tensors on every
    rank, and the loop averages their gradients itself (:func:`average_grads`). Forced
    weight normalisation moves out of the forward, which sees gathered copies of the
    weights, to :func:`before_sharded_forward`, which rewrites the shards.
    """
    replicated = [p for p in net.parameters() if p.ndim == 0]
    # The root returns the log-variance as a view; edm2_loss never changes it in place.
    warnings.filterwarnings(
        "ignore", message=r"FSDP2-wrapped module \(FSDPPrecond\) returned a view tensor"
    )
    for m in net.modules():
        if isinstance(m, MPConv):
            m.normalize_in_forward = False
    mesh = init_device_mesh(world.device.type, (world.size,))
    ignored = set(replicated)
    for block in [m for m in net.modules() if isinstance(m, Block)]:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    fully_shard(net, mesh=mesh, ignored_params=ignored)
    return replicated


def before_sharded_forward(net: Precond, *, sync: bool) -> None:
    """FSDP2, before each forward: gradient sync on or off, forced weight normalisation."""
    for m in net.modules():
        if isinstance(m, FSDPModule):
            m.reshard()  # so that the shards, not gathered copies, are registered (a no-op)
    cast(FSDPModule, net).set_requires_gradient_sync(sync)
    normalize_weights_(net)


def average_grads(params: list[nn.Parameter], world: World) -> None:
    """Average the gradients of replicated parameters over ranks, as DDP does (divide, sum)."""
    flat = torch.stack([p.grad if p.grad is not None else torch.zeros_like(p) for p in params])
    flat.div_(world.size)
    dist.all_reduce(flat)
    for p, value in zip(params, flat.unbind(), strict=True):
        p.grad = value.clone()


def local_part(t: Tensor) -> Tensor:
    """This rank's part of ``t`` (a view of a DTensor's shard), or ``t``."""
    return t.to_local() if isinstance(t, DTensor) else t
