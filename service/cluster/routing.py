"""Which shard holds an id: a stable hash, and a batch split by owner."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from cpu_fallback.core import IdArray

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def shard_of_ids(ids: npt.ArrayLike, shards: int) -> IdArray:
    """The shard of each int64 id: splitmix64 of the id, mod ``shards``.

    The same in every process and after every restart (Python's ``hash`` is neither), and
    well mixed, so that ids in sequence spread evenly.
    """
    z = np.asarray(ids, np.int64).reshape(-1).view(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z ^= z >> np.uint64(31)
    return (z % np.uint64(shards)).astype(np.int64)


def split_by_owner(owners: IdArray) -> dict[int, npt.NDArray[np.intp]]:
    """Positions of each owner's items, in input order, for every owner present."""
    order = np.argsort(owners, kind="stable")
    bounds = np.flatnonzero(np.diff(owners[order])) + 1
    return {int(owners[group[0]]): group for group in np.split(order, bounds) if len(group)}
