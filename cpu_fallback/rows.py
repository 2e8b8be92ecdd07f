"""Host-side bookkeeping both backends share: batches, the id <-> row map, final results."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from cpu_fallback.topk import sort_rows
from cpu_fallback.validation import as_ids, as_matrix, normalise_rows

Ids = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float32]


def prepare_batch(
    ids: npt.ArrayLike, vectors: npt.ArrayLike, dim: int, metric: str, storage: np.dtype
) -> tuple[Ids, np.ndarray]:
    """Checked ids and vectors as stored (normalised under cosine, cast), last duplicate wins."""
    id_array = as_ids(ids)
    matrix = as_matrix(vectors, dim, "vectors")
    if len(id_array) != len(matrix):
        raise ValueError(f"got {len(id_array)} ids for {len(matrix)} vectors")
    if metric == "cosine":
        matrix = normalise_rows(matrix, "vectors")
    if storage != matrix.dtype:
        with np.errstate(over="ignore"):  # overflow is reported just below
            matrix = matrix.astype(storage)
        if not np.isfinite(matrix).all():
            raise ValueError(f"vectors overflow {storage.name} (largest magnitude 65504)")
    unique, last_reversed = np.unique(id_array[::-1], return_index=True)
    if len(unique) == len(id_array):  # no duplicates: no copy
        return id_array, matrix
    last = len(id_array) - 1 - last_reversed
    return id_array[last], matrix[last]


def prepare_queries(queries: npt.ArrayLike, dim: int, metric: str) -> Scores:
    matrix = as_matrix(queries, dim, "queries")
    return normalise_rows(matrix, "queries") if metric == "cosine" else matrix


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
    return -(-count // block_rows)


class Scoring:
    """Turns ranking keys (higher is closer) into the metric's scores and back."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.missing = np.float32(np.inf if metric == "l2" else -np.inf)

    def scores(self, keys: Scores, queries: Scores) -> Scores:
        """l2 keys are 2 q.x - |x|^2, so |q - x| = sqrt(|q|^2 - key); others are scores."""
        if self.metric != "l2":
            return keys
        q_sq = np.einsum("ij,ij->i", queries, queries)[:, None]
        return np.sqrt(np.maximum(q_sq - keys, 0)).astype(np.float32)

    def passes(self, scores: Scores, limit: float) -> npt.NDArray[np.bool_]:
        return scores <= limit if self.metric == "l2" else scores >= limit

    def closeness(self, scores: Scores) -> Scores:
        return -scores if self.metric == "l2" else scores

    def finish(
        self, keys: Scores, ids: Ids, queries: Scores, limit: float | None,
        out_scores: Scores, out_ids: Ids,
    ) -> None:
        """Write one chunk's exact top-k (unordered keys and ids) into padded outputs."""
        keys, ids = sort_rows(keys, ids)
        found = self.scores(keys, queries)
        valid = keys > -np.inf
        if limit is not None:
            valid &= self.passes(found, limit)
        width = keys.shape[1]
        out_scores[:, :width] = np.where(valid, found, self.missing)
        out_ids[:, :width] = np.where(valid, ids, -1)

    def ranges(
        self, query_of: Ids, scores: Scores, ids: Ids, nq: int, cap: int | None
    ) -> tuple[Ids, Scores, Ids, Ids]:
        """(lims, scores, ids, totals) from flat hits: per query best first, ties by id."""
        order = np.lexsort((ids, -self.closeness(scores), query_of))
        query_of, scores, ids = query_of[order], scores[order], ids[order]
        totals = np.bincount(query_of, minlength=nq).astype(np.int64)
        rank = np.arange(len(query_of)) - np.repeat(np.cumsum(totals) - totals, totals)
        kept = totals if cap is None else np.minimum(totals, cap)
        keep = rank < np.repeat(kept, totals)
        lims = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        return lims, scores[keep].astype(np.float32), ids[keep], totals
