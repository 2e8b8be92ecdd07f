"""The exact answers every benchmarked system is checked against, and the check itself."""

from __future__ import annotations

import numpy as np

# The reference is the float64 answer on the float32 rows, but a half-precision system
# scores the rows it stores, rounded to 2^-11 relative (float16) or 2^-8 (bfloat16: 8
# significant bits); a GPU GEMM rounds the query too. A score at a rank is off by at most
# the largest per-row error (order statistics move no further than their inputs), which on
# unit vectors is at most sum_i |q_i v_i| * 2^-8 <= 2^-8 = 3.9e-3 for bfloat16 rows and a
# float32 query, 7.8e-3 with the query rounded as well, 9.8e-3 with a bfloat16 GEMM output
# (torch). Measured on bench.harness.random_vectors (64 queries, dotsearch-cpu and faiss
# IndexScalarQuantizer QT_bf16): bfloat16's worst score error 2e-4 at d=2048 (N=2e4 and
# 1e5, median 2e-5), 1.7e-3 at d=16, 2.8e-3 at d=16 with the query rounded too, 3.9e-3
# with torch's bfloat16 output; recall@10 0.99-1.0 at every size tried (lowest 0.992, l2
# at N=2e4 d=2048). So bfloat16 keeps float16's recall floor (a wrong system lands far
# below it) and gets a score tolerance of 1e-2: above even the worst-case bound, while a
# system scoring some other quantity (unnormalised rows, another metric) is off by more.
MIN_RECALL = {"float32": 0.99, "float16": 0.9, "bfloat16": 0.9}
SCORE_TOLERANCE = {"float32": 2e-3, "float16": 2e-2, "bfloat16": 1e-2}


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
