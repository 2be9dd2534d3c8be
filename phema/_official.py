"""Official EDM2 snapshot pickles as entries of a store, read in place.

A folder (local, ``s3://``, ``hf://``, ``https://``) of official
``network-snapshot-<kimg>-<std>.pkl`` files is a store like any other: each pickle is
indexed by :mod:`phema.pickles` (its structure only, nothing in it executed, tensor
payloads skipped by their lengths) and listed as a snapshot whose *logical* data are
its state dict's tensors back to back, in ``state_dict()`` order. The pickle itself is
the one shard of that snapshot, and one :class:`~phema.shards.Segment` per tensor says
where the tensor's bytes lie in it, so the streaming engine reads each tensor's bytes
once, by exact ranged reads, and never the pickle structure again.

* Time, in images, from the name's kimg by the official rule (:func:`official_nimg`);
  the std is the name's. ``step`` is unknown (the name does not give the batch size).
* Buffers (EDM2's Fourier ``freqs``/``phases``) are *copied*, as the official EMA copies
  them from the training network: a reconstruction takes them from its latest input.
* The outputs carry the official ``state_dict`` names, so they load ``strict=True`` into
  the official network and into ``edm2_reference``'s ``Precond``.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Callable

from phema._listing import SnapshotInfo
from phema._meta import snapshot_fields
from phema.errors import ChangedError, FormatError, PickleError, ProfileError
from phema.format import Header, TensorInfo
from phema.pickles import PickleIndex, index_snapshot
from phema.profiles import sigma_rel_to_gamma
from phema.shards import Segment, Shard

__all__ = ["OFFICIAL_NAME", "PICKLE_NAME", "official_info", "official_nimg"]

#: An official training snapshot (the only pickles a listing takes as snapshots).
OFFICIAL_NAME = re.compile(r"network-snapshot-(\d+)-(\d+\.\d+)\.pkl")
#: Any pickle named the official way, e.g. the official tool's ``phema-<kimg>-<std>.pkl``
#: outputs: readable one at a time (:meth:`~phema.store.SnapshotStore.info`), never listed.
PICKLE_NAME = re.compile(r"(.+)-(\d+)-(\d+\.\d+)\.pkl")

#: Bytes ``[offset, offset + n)`` of a file.
ReadAt = Callable[[int, int], bytes]


def official_nimg(kimg: int, name: str = "") -> int:
    """Images of an official snapshot named with ``kimg``: ``(1000 kimg + 999) // 1024 * 1024``.

    That is the multiple of 1024 in ``[1000 kimg, 1000 kimg + 999]``; the training loop
    only writes such times. A kimg without one (``42``: 41984 < 42000, 43008 > 42999) is refused.

    Example:
        >>> official_nimg(8388), official_nimg(2147483) == 2**31, official_nimg(128)
        (8388608, True, 128000)
    """
    nimg = (kimg * 1000 + 999) // 1024 * 1024
    if nimg < kimg * 1000:
        raise FormatError(
            f"{name or kimg}: kimg {kimg} names no multiple of 1024 images (the official "
            f"training loop writes only those; [{kimg * 1000}, {kimg * 1000 + 999}] holds none)"
        )
    return nimg


def official_info(
    path: str,
    source: str,
    shard_name: str,
    version: tuple[int, str],
    read_at: ReadAt,
    current: Callable[[], str],
) -> SnapshotInfo:
    """The listing entry of the official pickle at ``path`` (``source``: its URL).

    Args:
        path: The file's path for the store's filesystem.
        source: Its URL, for messages.
        shard_name: Its name relative to the store's root (``store.path_of`` of it is
            ``path``).
        version: ``(size, identity)`` of the version to index.
        read_at: Reads bytes of the file (no version check per read).
        current: The identity of the file's version now, checked after indexing.

    Raises:
        FormatError: A name that is not ``<prefix>-<kimg>-<std>.pkl``, a kimg with no
            multiple of 1024, a std out of range, a malformed or hostile pickle
            (:class:`~phema.errors.PickleError`).
        ChangedError: The file changed while it was indexed.
    """
    m = PICKLE_NAME.fullmatch(os.path.basename(path))
    if m is None:
        raise FormatError(
            f"{source}: not named <prefix>-<kimg>-<std>.pkl as official EDM2 snapshots are"
        )
    nimg, std = official_nimg(int(m[2]), source), float(m[3])
    try:
        gamma = float(sigma_rel_to_gamma(std))
    except ProfileError as exc:
        raise FormatError(f"{source}: the std {m[3]} in its name is not usable: {exc}") from exc
    size, identity = version
    index = index_snapshot(read_at, size, source)
    if current() != identity:
        raise ChangedError(
            f"{source} changed while it was indexed (replaced by another writer); run the "
            "command again"
        )
    return _info(path, source, shard_name, index, identity, float(nimg), std, gamma)


def _info(
    path: str,
    source: str,
    shard_name: str,
    index: PickleIndex,
    identity: str,
    t: float,
    std: float,
    gamma: float,
) -> SnapshotInfo:
    from phema.store import snapshot_metadata  # phema.store imports this module

    if not index.tensors:
        raise PickleError(f"{source}: the network holds no tensors")
    layout, segments, begin = [], [], 0
    for name, r in index.tensors.items():
        if not 0 <= r.begin <= r.end <= index.size:
            raise PickleError(
                f"{source}: tensor {name} lies at bytes [{r.begin}, {r.end}), past the file's "
                f"{index.size} bytes (a truncated file?)"
            )
        layout.append(TensorInfo(name, r.dtype, r.shape, begin, begin + r.nbytes))
        if r.nbytes:
            segments.append(Segment(begin, begin + r.nbytes, 0, r.begin))
        begin += r.nbytes
    _check_disjoint(index, source)
    specs = [(ti.name, ti.dtype, ti.shape) for ti in layout]
    meta = snapshot_metadata(
        specs, t=t, std=std, gamma=gamma, t_unit="images", step=None, copied=index.buffers
    )
    header = Header(tuple(layout), meta, 0)
    # identity set: nothing to verify; path: read the version listed (pinned on the Hub)
    shard = Shard(shard_name, index.size, 0, (), identity, path)
    return SnapshotInfo(
        path=path,
        url=source,
        **snapshot_fields(meta, source, index.tensors.keys()),
        size=index.size,
        header=header,
        identity=identity,
        shards=(shard,),
        segments=tuple(segments),
        index_bytes=index.bytes_read,
    )


def _check_disjoint(index: PickleIndex, source: str) -> None:
    """Refuse tensors whose bytes overlap: torch writes each storage's bytes once, and a
    file whose tensors reuse bytes would claim far more data than it holds."""
    ranges = sorted((r.begin, r.end, name) for name, r in index.tensors.items() if r.nbytes)
    for (_, end, first), (begin, _, second) in itertools.pairwise(ranges):
        if begin < end:
            raise PickleError(
                f"{source}: tensors {first} and {second} share bytes (from byte {begin}); "
                "official snapshots never do"
            )
