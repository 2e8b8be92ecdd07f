"""Exact top-k on the host under the total order (key descending, id ascending)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Keys = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]


# Rows are cut into groups of this many columns for the group-maximum pre-selection.
GROUP = 32


def top_k_exact(keys: Keys, ids: Ids, k: int) -> tuple[Keys, Ids]:
    """The k best columns of each row of ``keys`` (r, c), as (keys, ids) of shape (r, k').

    ``keys`` may be C-ordered or the transpose of a C-ordered (c, r) array (the layout a
    GEMM of rows by queries writes). ``ids`` is (c,) shared by every row or (r, c).
    k' = min(k, c). The set is exact under (key desc, id asc) -- ties at the boundary go
    to the smaller id -- but unordered.
    Columns holding -inf are padding and may appear when a row has fewer than k others.
    """
    rows, cols = keys.shape
    if k >= cols:
        return keys.copy(), np.broadcast_to(ids, keys.shape).copy()
    if k == 0:
        return np.empty((rows, 0), keys.dtype), np.empty((rows, 0), np.int64)
    if cols >= 4 * k * GROUP:
        narrowed = _narrow_by_group_max(keys, ids, k)
        if narrowed is not None:
            return _top_k_partition(*narrowed, k)
    return _top_k_partition(keys, ids, k)


def _narrow_by_group_max(keys: Keys, ids: Ids, k: int) -> tuple[Keys, Ids] | None:
    """Candidates that can be in the top k, packed (r, width) with -inf padding.

    The k-th largest of a row's group maxima is a lower bound on its k-th largest key
    (k groups each hold a key at least that large), and only groups whose maximum
    reaches it can hold candidates: one max pass over the keys, then work on a handful
    of groups instead of a selection over every column.
    Returns None when too many survive (heavy ties) to be worth it.
    """
    rows, cols = keys.shape
    usable = cols // GROUP * GROUP
    if keys.T.flags.c_contiguous and not keys.flags.c_contiguous:
        # keys is the transpose of a (cols, rows) array: reduce along that array's rows.
        group_max = keys.T[:usable].reshape(-1, GROUP, rows).max(axis=1).T
    else:
        group_max = keys[:, :usable].reshape(rows, -1, GROUP).max(axis=2)
    n_groups = group_max.shape[1]
    bound = np.partition(group_max, n_groups - k, axis=1)[:, n_groups - k]
    group_rows, groups = np.nonzero(group_max >= bound[:, None])
    if len(group_rows) > rows * n_groups // 4:
        return None
    # Every column of the chosen groups, plus the ragged tail past the last whole group.
    cand_rows = np.concatenate([np.repeat(group_rows, GROUP),
                                np.repeat(np.arange(rows), cols - usable)])
    cand_cols = np.concatenate([(groups[:, None] * GROUP + np.arange(GROUP)).ravel(),
                                np.tile(np.arange(usable, cols), rows)])
    cand_keys = keys[cand_rows, cand_cols]
    hit = cand_keys >= bound[cand_rows]
    order = np.flatnonzero(hit)[np.argsort(cand_rows[hit], kind="stable")]
    hit_rows, hit_cols = cand_rows[order], cand_cols[order]
    hit_ids = ids[hit_cols] if ids.ndim == 1 else ids[hit_rows, hit_cols]
    return pack_by_row(hit_rows, cand_keys[order], hit_ids, rows)


def pack_by_row(row_of: Ids, keys: Keys, ids: Ids, rows: int) -> tuple[Keys, Ids]:
    """(row, key, id) triples sorted by row, packed into (rows, width) arrays: each row's
    keys and ids side by side, padded with -inf and id -1."""
    counts = np.bincount(row_of, minlength=rows)
    width = int(counts.max()) if len(row_of) else 0
    slots = np.arange(len(row_of)) - np.repeat(np.cumsum(counts) - counts, counts)
    packed_keys = np.full((rows, width), -np.inf, keys.dtype)
    packed_ids = np.full((rows, width), -1, np.int64)
    packed_keys[row_of, slots] = keys
    packed_ids[row_of, slots] = ids
    return packed_keys, packed_ids


def _top_k_partition(keys: Keys, ids: Ids, k: int) -> tuple[Keys, Ids]:
    """top_k_exact by argpartition over every column, then ties settled by id."""
    cols = keys.shape[1]
    ids_2d = np.broadcast_to(ids, keys.shape)
    if k >= cols:
        return keys.copy(), ids_2d.copy()
    part = np.argpartition(keys, cols - k, axis=1)[:, cols - k:]
    top_keys = np.take_along_axis(keys, part, axis=1)
    top_ids = ids[part] if ids.ndim == 1 else np.take_along_axis(ids, part, axis=1)
    kth = top_keys.min(axis=1)
    # argpartition picks arbitrarily among keys equal to the k-th: find the rows where
    # such a tie straddles the boundary and settle them by id (rare on real data).
    at_least_kth = np.count_nonzero(keys >= kth[:, None], axis=1)
    for row in np.flatnonzero((at_least_kth > k) & (kth > -np.inf)):
        tied = np.flatnonzero(keys[row] >= kth[row])
        order = np.lexsort((ids_2d[row, tied], -keys[row, tied]))[:k]
        top_keys[row] = keys[row, tied[order]]
        top_ids[row] = ids_2d[row, tied[order]]
    return top_keys, top_ids


def merge_top_k(
    best: tuple[Keys, Ids], candidates: tuple[Keys, Ids], k: int
) -> tuple[Keys, Ids]:
    """Running merge of two candidate sets of the same rows, keeping the exact top k."""
    keys = np.concatenate([best[0], candidates[0]], axis=1)
    ids = np.concatenate([best[1], candidates[1]], axis=1)
    return top_k_exact(keys, ids, k)


def sort_rows(keys: Keys, ids: Ids) -> tuple[Keys, Ids]:
    """Order every row best first: key descending, then id ascending."""
    order = np.lexsort((ids, -keys), axis=-1)
    return np.take_along_axis(keys, order, axis=1), np.take_along_axis(ids, order, axis=1)
