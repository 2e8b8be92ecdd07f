"""The exact answers every benchmarked system is checked against, and the check itself."""

from __future__ import annotations

import numpy as np

MIN_RECALL = {"float32": 0.99, "float16": 0.9}
SCORE_TOLERANCE = {"float32": 2e-3, "float16": 2e-2}


def exact_reference(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int,
                    metric: str) -> tuple[np.ndarray, np.ndarray]:
    """The float64 exact top-k (best first, ties by id), computed in row chunks."""
    q64 = queries.astype(np.float64)
    if metric == "cosine":
        q64 /= np.linalg.norm(q64, axis=1, keepdims=True)
    k = min(k, len(ids))
    best_scores = np.empty((len(q64), 0))
    best_ids = np.empty((len(q64), 0), dtype=np.int64)
    step = max(1, (1 << 24) // vectors.shape[1])
    for lo in range(0, len(ids), step):
        block = vectors[lo : lo + step].astype(np.float64)
        if metric == "cosine":
            block /= np.linalg.norm(block, axis=1, keepdims=True)
        scores = q64 @ block.T
        if metric == "l2":
            sq = (block * block).sum(1)[None, :] - 2 * scores + (q64 * q64).sum(1)[:, None]
            scores = -np.sqrt(np.maximum(sq, 0))
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, np.broadcast_to(ids[lo : lo + step], scores.shape)], 1)
        order = np.lexsort((all_ids, -all_scores), axis=1)[:, :k]
        best_scores = np.take_along_axis(all_scores, order, 1)
        best_ids = np.take_along_axis(all_ids, order, 1)
    if metric == "l2":
        best_scores = -best_scores
    return best_scores, best_ids


def check_answers(scores: np.ndarray, found: np.ndarray, ref_scores: np.ndarray,
                  ref_ids: np.ndarray, dtype: str) -> tuple[float, str | None]:
    """Recall@k against the exact answer, and why the answers are refused (None when fine).

    Refused: wrong shape, recall under MIN_RECALL[dtype], or a score at some rank further
    from the exact score at that rank than SCORE_TOLERANCE[dtype].
    """
    scores, found = np.asarray(scores), np.asarray(found)
    if found.shape != ref_ids.shape or scores.shape != ref_ids.shape:
        return 0.0, f"shape {found.shape} instead of {ref_ids.shape}"
    k = ref_ids.shape[1]
    if k == 0:
        return 1.0, None
    hits = [len(set(row.tolist()) & set(ref.tolist())) for row, ref in zip(found, ref_ids,
                                                                           strict=True)]
    recall = float(np.mean(hits) / k)
    if recall < MIN_RECALL[dtype]:
        return recall, f"recall {recall:.3f} < {MIN_RECALL[dtype]}"
    error = np.abs(scores.astype(np.float64) - ref_scores)
    worst = float(np.nanmax(np.where(np.isfinite(error), error, np.inf)))
    if worst > SCORE_TOLERANCE[dtype]:
        return recall, f"scores off by {worst:.3g} > {SCORE_TOLERANCE[dtype]}"
    return recall, None
