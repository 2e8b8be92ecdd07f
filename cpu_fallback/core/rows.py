"""Row bookkeeping every blocked index shares: the id <-> row map, blocks, allow-list runs."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpu_fallback.core.contract import GATHER_FRACTION
from cpu_fallback.core.validation import as_ids

Ids = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Removal:
    """Rows to drop; survivors past the new end (movers) fill the holes below it."""

    gone: Ids
    holes: Ids
    movers: Ids
    new_count: int


class RowMap:
    """Dense row positions 0..count-1, the id held in each, and the reverse map."""

    def __init__(self) -> None:
        self._position: dict[int, int] = {}
        self._ids = np.empty(0, np.int64)
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __contains__(self, id_: object) -> bool:
        return isinstance(id_, int | np.integer) and int(id_) in self._position

    def positions(self, ids: Ids) -> Ids:
        """Row of each id, -1 where unknown."""
        return np.array([self._position.get(i, -1) for i in ids.tolist()], np.int64)

    def lookup(self, ids: npt.ArrayLike) -> Ids:
        """Rows of known ids; KeyError names the first unknown one."""
        positions = self.positions(as_ids(ids, allow_empty=True))
        if (positions < 0).any():
            raise KeyError(f"unknown id {int(np.asarray(ids).reshape(-1)[positions < 0][0])}")
        return positions

    def ids_at(self, positions: Ids | slice) -> Ids:
        return self._ids[positions]

    def plan_upsert(self, ids: Ids) -> tuple[Ids, int]:
        """Rows for a batch: existing rows for known ids, fresh rows at the end for the rest."""
        positions = self.positions(ids)
        fresh = positions < 0
        n_new = int(fresh.sum())
        positions[fresh] = np.arange(self.count, self.count + n_new)
        return positions, self.count + n_new

    def commit_upsert(self, ids: Ids, positions: Ids, new_count: int) -> None:
        if len(self._ids) < new_count:
            grown = np.full(max(new_count, 2 * len(self._ids)), -1, np.int64)
            grown[: self.count] = self._ids[: self.count]
            self._ids = grown
        self._ids[positions] = ids
        self._position.update(zip(ids.tolist(), positions.tolist(), strict=True))
        self.count = new_count

    def plan_remove(self, ids: npt.ArrayLike) -> Removal:
        positions = self.positions(np.unique(as_ids(ids, allow_empty=True)))
        gone = np.sort(positions[positions >= 0])
        new_count = self.count - len(gone)
        movers = np.setdiff1d(np.arange(new_count, self.count), gone, assume_unique=True)
        return Removal(gone, gone[gone < new_count], movers, new_count)

    def commit_remove(self, removal: Removal) -> None:
        for gone_id in self._ids[removal.gone].tolist():
            del self._position[gone_id]
        mover_ids = self._ids[removal.movers]
        self._ids[removal.holes] = mover_ids
        self._position.update(zip(mover_ids.tolist(), removal.holes.tolist(), strict=True))
        self.count = removal.new_count

    def allowed_positions(self, allow: npt.ArrayLike | None) -> Ids | None:
        """Sorted rows of the allowed ids that are present (unknown ids are ignored)."""
        if allow is None:
            return None
        # Sorted first: ids in order visit the dict's table (hash(i) == i) in order.
        positions = self.positions(np.unique(as_ids(allow, allow_empty=True)))
        return np.sort(positions[positions >= 0])


RowIndex = Ids | slice


def split_by_block(positions: Ids, block_rows: int) -> Iterator[tuple[int, RowIndex, RowIndex]]:
    """(block, row offsets within it, indices into ``positions``) per touched block.

    Contiguous runs (an append) come as slices, so that copies are plain memcpy rather
    than fancy-index gathers and scatters.
    """
    blocks = positions // block_rows
    for b in np.unique(blocks).tolist():
        where = np.flatnonzero(blocks == b)
        offsets = positions[where] - b * block_rows
        n = len(where)
        if where[-1] - where[0] == n - 1 and offsets[-1] - offsets[0] == n - 1 and (
            n == 1 or bool((np.diff(offsets) == 1).all())
        ):
            yield b, slice(int(offsets[0]), int(offsets[0]) + n), slice(int(where[0]),
                                                                        int(where[0]) + n)
        else:
            yield b, offsets, where


def blocks_in_use(count: int, block_rows: int) -> int:
    """How many blocks of block_rows rows hold count rows."""
    return -(-count // block_rows)


@dataclass(frozen=True)
class BlockRun:
    """The rows of one block a search may return.

    ``local`` is None when every row may be returned; otherwise it holds the sorted
    offsets (within the block) of the allowed rows, and ``gather`` says whether to score
    only those rows (a sparse allow-list) or the whole block with the rest masked.
    """

    block: int
    start: int  # row position of the block's first row
    rows: int  # rows in use in the block
    local: Ids | None = None
    gather: bool = False


def plan_runs(allowed: Ids | None, count: int, block_rows: int) -> Iterator[BlockRun]:
    """BlockRuns over count rows for sorted allowed positions (None: every row).

    Blocks without an allowed row are skipped.
    """
    for b in range(blocks_in_use(count, block_rows)):
        start = b * block_rows
        n = min(block_rows, count - start)
        if allowed is None:
            yield BlockRun(b, start, n)
            continue
        lo, hi = np.searchsorted(allowed, (start, start + n))
        if hi == lo:
            continue
        local = allowed[lo:hi] - start
        yield BlockRun(b, start, n, local, bool(len(local) < GATHER_FRACTION * n))
