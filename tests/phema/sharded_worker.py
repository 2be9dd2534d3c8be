"""Run under torchrun by test_sharded.py: sharded and partitioned EMAs against an unsharded one.

Each rank writes ``<out>/<mode>-rank<r>.json`` with what it found; the tests assert on
those files and on the stores written under ``<out>``. Modes:

* ``train``: the same trajectory through an FSDP2 model (EMA on its shards), a
  replicated model with ``partition=True``, and a plain model with an unsharded EMA;
  compares profiles, swaps, state dicts and snapshots; saves a DCP checkpoint.
* ``resume``: loads the DCP checkpoint of a ``train`` run (any world size) and
  compares the profiles with the ones that run saved whole.
* ``kill``: rank 1 dies while it writes its first shard.
* ``reconstruct``: ``reconstruct(parallel=True)`` of ``$PHEMA_SRC`` into
  ``<out>/parallel``, with the bytes each rank read.
* ``remote``: sharded snapshots to ``$PHEMA_REMOTE_URL`` (S3, the Hub), single-file
  ones of the same trajectory to ``<out>/plain``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.fsdp import fully_shard

from phema import PowerFunctionEMA, SnapshotWriter, TrackingError

STDS = (0.05, 0.1)
TIMES = (7.0, 19.0, 20.0, 41.5, 64.0, 65.0, 100.0)  # irregular, as images seen


def make() -> nn.Module:
    torch.manual_seed(0)
    # Odd row counts: uneven shards, and an empty one on some ranks of 4 (3 and 1 rows).
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Linear(7, 3), nn.Linear(3, 1))


def shard(model: nn.Module) -> nn.Module:
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    return model


def copy_trajectory(src: nn.Module, *dsts: nn.Module) -> None:
    """Give ``dsts`` the FSDP model's current (gathered) parameters and buffers."""
    with torch.no_grad():
        full = {n: p.full_tensor() for n, p in src.named_parameters()}
        bufs = dict(src.named_buffers())
        for dst in dsts:
            for n, p in dst.named_parameters():
                p.copy_(full[n])
            for n, b in dst.named_buffers():
                b.copy_(bufs[n])


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def train(out: str, rank: int, size: int) -> dict[str, object]:
    model = shard(make())
    plain, replicated = make(), make()
    ema = PowerFunctionEMA(model, STDS)
    part = PowerFunctionEMA(replicated, STDS, partition=True)
    ref = PowerFunctionEMA(plain, STDS)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    writers = {
        "fsdp": SnapshotWriter(f"{out}/fsdp", dtype=torch.float16, t_unit="images"),
        "partition": SnapshotWriter(f"{out}/partition", dtype=torch.float16, t_unit="images"),
        "plain": SnapshotWriter(f"{out}/plain", dtype=torch.float16, t_unit="images"),
    }
    for step, t in enumerate(TIMES, start=1):
        torch.manual_seed(100 + step)
        model(torch.randn(8, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        copy_trajectory(model, plain, replicated)
        for e in (ema, part, ref):
            e.update(t)
        if step % 2 == 1:
            writers["fsdp"].save(ema, step=step)
            writers["partition"].save(part, step=step)
            writers["plain"].save(ref, step=step)
    for w in writers.values():
        w.close()
    res: dict[str, object] = {}
    full = {s: ref.profile(s) for s in STDS}
    res["fsdp_profiles_bitwise"] = all(
        same({n: v.full_tensor() for n, v in ema.profile(s).items()}, full[s]) for s in STDS
    )
    res["fsdp_profile_is_dtensor"] = all(
        type(v).__name__ == "DTensor" for v in ema.profile(STDS[0]).values()
    )
    res["fsdp_full_state_bitwise"] = same(
        ema.profile_state_dict(0.1, full=True), ref.profile_state_dict(0.1)
    )
    res["partition_profiles_bitwise"] = all(same(part.profile(s), full[s]) for s in STDS)
    res["partition_copy_module_bitwise"] = same(
        dict(part.copy_module(0.05).state_dict()), dict(ref.copy_module(0.05).state_dict())
    )
    # Each element of each tensor is held by exactly the ranks the placement says:
    # shadow elements summed over ranks = K x params (no rank holds a full copy).
    held = torch.tensor(
        [sum(p.end - p.begin for p in part.pieces), sum(p.end - p.begin for p in ema.pieces)]
    )
    dist.all_reduce(held)
    total = sum(p.numel() for p in plain.parameters())
    res["elements_held_partition"], res["elements_held_fsdp"] = held.tolist()
    res["elements_total"] = total
    res["rank_shadow_elements"] = sum(p.end - p.begin for p in part.pieces)
    # swapped: the FSDP model computes with the profile, then gets its weights back.
    x = torch.randn(4, 5)
    before = {n: p.full_tensor() for n, p in model.named_parameters()}
    model.eval()
    plain.eval()
    with ema.swapped(0.1), ref.swapped(0.1):
        inside = {n: p.full_tensor() for n, p in model.named_parameters()}
        res["fsdp_swapped_forward_equal"] = bool(torch.equal(model(x), plain(x)))
    after = {n: p.full_tensor() for n, p in model.named_parameters()}
    res["fsdp_swapped_holds_profile"] = same(inside, {n: full[0.1][n] for n in inside})
    res["fsdp_swapped_restores"] = same(before, after)
    with part.swapped(0.05):
        res["partition_swapped_holds_profile"] = same(
            dict(replicated.named_parameters()), full[0.05]
        )
    # DCP: save both sharded states; reload into fresh EMAs on this world size.
    dcp.save({"fsdp": ema.state_dict(), "partition": part.state_dict()}, checkpoint_id=f"{out}/dcp")
    if rank == 0:
        torch.save({str(s): full[s] for s in STDS} | {"t": ref.t}, f"{out}/full_profiles.pt")
    fresh, fresh_part = (
        PowerFunctionEMA(model, STDS),
        PowerFunctionEMA(replicated, STDS, partition=True),
    )
    loaded = {"fsdp": fresh.state_dict(), "partition": fresh_part.state_dict()}
    dcp.load(loaded, checkpoint_id=f"{out}/dcp")
    fresh.load_state_dict(loaded["fsdp"])
    fresh_part.load_state_dict(loaded["partition"])
    # One more step on both: the resumed EMAs continue bitwise like the originals.
    torch.manual_seed(999)
    model(torch.randn(8, 5)).square().mean().backward()
    opt.step()
    copy_trajectory(model, plain, replicated)
    for e in (ema, part, ref, fresh, fresh_part):
        e.update(150.0)
    res["dcp_resume_same_size_bitwise"] = all(
        same(
            {n: v.to_local() for n, v in fresh.profile(s).items()},
            {n: v.to_local() for n, v in ema.profile(s).items()},
        )
        and same(fresh_part.profile(s), ref.profile(s))
        for s in STDS
    )
    res["unsharded_state_loads_into_partition"] = _unsharded_into_partition(ref, replicated)
    res["zero_d_dtensor_loads_unsharded_state"] = _zero_d_dtensor()
    res.update(_staleness())
    return res


def _unsharded_into_partition(ref: PowerFunctionEMA, replicated: nn.Module) -> bool:
    other = PowerFunctionEMA(replicated, STDS, partition=True)
    other.load_state_dict(ref.state_dict())
    return all(same(other.profile(s), ref.profile(s)) for s in STDS)


def _zero_d_dtensor() -> bool:
    """A replicated 0-d DTensor parameter takes its value from an unsharded state."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    gain, plain = nn.Module(), nn.Module()
    gain.g = nn.Parameter(distribute_tensor(torch.tensor(2.0), mesh, [Replicate()]))
    plain.g = nn.Parameter(torch.tensor(2.0))
    ema, ref = PowerFunctionEMA(gain, STDS), PowerFunctionEMA(plain, STDS)
    for t in (1.0, 2.0):
        ref.update(t)
    ema.load_state_dict(ref.state_dict())
    return all(torch.equal(ema.profile(s)["g"].full_tensor(), ref.profile(s)["g"]) for s in STDS)


def _staleness() -> dict[str, object]:
    out: dict[str, object] = {}
    model = make()
    ema = PowerFunctionEMA(model, STDS)
    shard(model)  # after the EMA: it holds the parameters fully_shard discarded
    try:
        ema.update(1.0)
        out["ema_before_fully_shard"] = "no error"
    except TrackingError as exc:
        out["ema_before_fully_shard"] = str(exc)
    return out


def resume(out: str, rank: int, size: int) -> dict[str, object]:
    model = shard(make())
    replicated = make()
    ema = PowerFunctionEMA(model, STDS)
    part = PowerFunctionEMA(replicated, STDS, partition=True)
    state = {"fsdp": ema.state_dict(), "partition": part.state_dict()}
    dcp.load(state, checkpoint_id=f"{out}/dcp")
    ema.load_state_dict(state["fsdp"])
    part.load_state_dict(state["partition"])
    saved = torch.load(f"{out}/full_profiles.pt", weights_only=True)
    return {
        "t": ema.t,
        "saved_t": float(saved["t"]),
        "fsdp_bitwise": all(
            same({n: v.full_tensor() for n, v in ema.profile(s).items()}, saved[str(s)])
            for s in STDS
        ),
        "partition_bitwise": all(same(part.profile(s), saved[str(s)]) for s in STDS),
    }


def kill(out: str, rank: int, size: int) -> dict[str, object]:
    model = shard(make())
    ema = PowerFunctionEMA(model, STDS)
    writer = SnapshotWriter(f"{out}/killed")
    real_write = writer.store.write

    def write(name: str, data: bytes, **kw: object) -> str:
        if rank == 1 and name.startswith("shards/"):
            # Dies mid-snapshot, before its shard is published, once rank 0's shard is.
            folder = os.path.join(out, "killed", os.path.dirname(name))
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not any(
                n.endswith("-00000.safetensors") for n in _listdir(folder)
            ):
                time.sleep(0.05)
            os._exit(17)
        return real_write(name, data, **kw)  # type: ignore[arg-type]

    writer.store.write = write  # type: ignore[method-assign]
    ema.update(1.0)
    writer.save(ema, step=1)
    writer.close()
    return {"closed": True}


def _listdir(folder: str) -> list[str]:
    return os.listdir(folder) if os.path.isdir(folder) else []


def remote(out: str, rank: int, size: int) -> dict[str, object]:
    """Sharded snapshots to the store at ``$PHEMA_REMOTE_URL``, single-file ones to ``out``."""
    model = shard(make())
    plain = make()
    ema, ref = PowerFunctionEMA(model, STDS), PowerFunctionEMA(plain, STDS)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sharded = SnapshotWriter(os.environ["PHEMA_REMOTE_URL"], t_unit="images")
    single = SnapshotWriter(f"{out}/plain", t_unit="images")
    for step, t in enumerate(TIMES[:3], start=1):
        torch.manual_seed(100 + step)
        model(torch.randn(8, 5)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        copy_trajectory(model, plain)
        ema.update(t)
        ref.update(t)
        sharded.save(ema, step=step)
        single.save(ref, step=step)
    sharded.close()
    single.close()
    return {"written": sharded.written}


def parallel_reconstruct(out: str, rank: int, size: int) -> dict[str, object]:
    """``reconstruct(parallel=True)`` of ``$PHEMA_SRC`` into ``$PHEMA_OUT`` (default
    ``<out>/parallel``); the bytes this rank read."""
    from phema.streaming import reconstruct

    got: list[int] = []
    src = os.environ.get(f"PHEMA_SRC_RANK{rank}", os.environ["PHEMA_SRC"])
    made = reconstruct(
        src,
        [0.07, 0.09],
        os.environ.get("PHEMA_OUT", f"{out}/parallel"),
        window_bytes=64,
        max_inflight=3,
        threads=1,
        progress=got.append,
        parallel=True,
        sharded=bool(os.environ.get("PHEMA_SHARDED_OUT")),
    )
    return {"bytes_read": sum(got), "reads": len(got), "urls": [m.url for m in made]}


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    modes = {
        "train": train,
        "resume": resume,
        "kill": kill,
        "remote": remote,
        "reconstruct": parallel_reconstruct,
    }
    res = modes[mode](out, rank, size)
    with open(f"{out}/{mode}-{size}-rank{rank}.json", "w") as f:
        json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
