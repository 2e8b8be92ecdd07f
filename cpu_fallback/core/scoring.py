"""Ranking keys to scores, padded results, and the exact merge of per-shard results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_fallback.core.topk import sort_rows, top_k_exact
from cpu_fallback.core.validation import check_k

Ids = npt.NDArray[np.int64]
Scores = npt.NDArray[np.float32]
SearchResult = tuple[Scores, Ids]
RangeResult = tuple[Ids, Scores, Ids, Ids]


class Scoring:
    """Turns ranking keys (higher is closer) into the metric's scores and back.

    Every backend ranks by a key where higher is closer: the score for dot and cosine,
    ``2 q.x - |x|^2`` for l2 (it ranks like ``-|q - x|^2`` without the query's norm).
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.missing = np.float32(np.inf if metric == "l2" else -np.inf)

    def scores(self, keys: Scores, queries: Scores) -> Scores:
        """Scores of host keys (q, n) for host queries (q, dim)."""
        if self.metric != "l2":
            return keys
        return self.key_scores(keys, query_sq_norms(queries)).astype(np.float32)

    def key_scores(self, keys: Any, sq_norms: Any, xp: Any = np) -> Any:
        """Scores from keys (q, n) in any array module ``xp`` (numpy, or CuPy on the device).

        l2 needs the queries' squared norms (q, 1): the distance is sqrt(|q|^2 - key).
        """
        if self.metric != "l2":
            return keys
        return xp.sqrt(xp.maximum(sq_norms - keys, 0))

    def passes(self, scores: Any, limit: float) -> Any:
        """Where scores are at least as close as limit (distance <= limit for l2)."""
        return scores <= limit if self.metric == "l2" else scores >= limit

    def closeness(self, scores: Scores) -> Scores:
        """Higher-is-closer values of scores (distances negated for l2)."""
        return -scores if self.metric == "l2" else scores

    def finish(
        self, keys: Scores, ids: Ids, queries: Scores, limit: float | None,
        out_scores: Scores, out_ids: Ids,
    ) -> None:
        """Write one chunk's exact top-k (unordered keys and ids) into padded outputs."""
        keys, ids = sort_rows(keys, ids)
        found = self.scores(keys, queries)
        self.write_padded(keys, ids, found, limit, out_scores, out_ids)

    def write_padded(
        self, keys: Scores, ids: Ids, found: Scores, limit: float | None,
        out_scores: Scores, out_ids: Ids,
    ) -> None:
        """Sorted (keys, ids) and their scores into outputs: -inf keys and misses padded."""
        valid = keys > -np.inf
        if limit is not None:
            valid &= self.passes(found, limit)
        width = keys.shape[1]
        out_scores[:, :width] = np.where(valid, found, self.missing)
        out_ids[:, :width] = np.where(valid, ids, -1)

    def ranges(
        self, query_of: Ids, scores: Scores, ids: Ids, nq: int, cap: int | None
    ) -> RangeResult:
        """(lims, scores, ids, totals) from flat hits: per query best first, ties by id."""
        order = np.lexsort((ids, -self.closeness(scores), query_of))
        query_of, scores, ids = query_of[order], scores[order], ids[order]
        totals = np.bincount(query_of, minlength=nq).astype(np.int64)
        rank = np.arange(len(query_of)) - np.repeat(np.cumsum(totals) - totals, totals)
        kept = totals if cap is None else np.minimum(totals, cap)
        keep = rank < np.repeat(kept, totals)
        lims = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
        return lims, scores[keep].astype(np.float32), ids[keep], totals

    def ranges_from_hits(
        self, hits: Sequence[tuple[Ids, Scores, Ids]], nq: int, cap: int | None
    ) -> RangeResult:
        """``ranges`` over hit lists of (query row, score, id) arrays."""
        if not hits:
            return self.ranges(np.empty(0, np.int64), np.empty(0, np.float32),
                               np.empty(0, np.int64), nq, cap)
        query_of, scores, ids = (np.concatenate(column) for column in zip(*hits, strict=True))
        return self.ranges(query_of, scores, ids, nq, cap)


def query_sq_norms(queries: Scores) -> Scores:
    """Squared norms of queries (q, dim) as a (q, 1) float32 column."""
    return np.einsum("ij,ij->i", queries, queries)[:, None]


def merge_search_results(parts: Sequence[SearchResult], k: int, metric: str) -> SearchResult:
    """Exact top-k over several indexes' search results for the same queries (shards).

    Each part is ``(scores, ids)`` of shape (q, k_i) as ``VectorIndex.search`` returns
    it; the answer is (q, k), best first by score then id ascending, padded with id -1
    and score -inf (+inf for l2) -- the same answer one index over all rows would give.
    """
    k = check_k(k)
    if not parts:
        raise ValueError("merge_search_results needs at least one part")
    rows = {len(scores) for scores, _ in parts} | {len(ids) for _, ids in parts}
    if len(rows) != 1:
        raise ValueError(f"parts disagree on the number of queries: {sorted(rows)}")
    scoring = Scoring(metric)
    nq = rows.pop()
    scores = np.concatenate([np.asarray(s, np.float32) for s, _ in parts], axis=1)
    ids = np.concatenate([np.asarray(i, np.int64) for _, i in parts], axis=1)
    keys = np.where(ids >= 0, scoring.closeness(scores), np.float32(-np.inf))
    keys, ids = sort_rows(*top_k_exact(keys, ids, k))
    out_scores = np.full((nq, k), scoring.missing, np.float32)
    out_ids = np.full((nq, k), -1, np.int64)
    scoring.write_padded(keys, ids, scoring.closeness(keys), None, out_scores, out_ids)
    return out_scores, out_ids


def merge_range_results(
    parts: Sequence[RangeResult], metric: str, max_results: int | None = None
) -> RangeResult:
    """Exact range-search answer over several indexes' answers for the same queries.

    Each part is ``(lims, scores, ids, totals)`` as ``VectorIndex.range_search`` returns
    it (capped at the same ``max_results``); totals add up, hits are re-ranked by score
    then id and capped again.
    """
    if not parts:
        raise ValueError("merge_range_results needs at least one part")
    counts = {len(lims) - 1 for lims, *_ in parts}
    if len(counts) != 1:
        raise ValueError(f"parts disagree on the number of queries: {sorted(counts)}")
    nq = counts.pop()
    cap = None if max_results is None else check_k(max_results)
    hits = [(np.repeat(np.arange(nq), np.diff(lims)), np.asarray(scores, np.float32),
             np.asarray(ids, np.int64)) for lims, scores, ids, _ in parts]
    lims, scores, ids, _ = Scoring(metric).ranges_from_hits(hits, nq, cap)
    totals = np.sum([np.asarray(t, np.int64) for *_, t in parts], axis=0).astype(np.int64)
    return lims, scores, ids, totals
