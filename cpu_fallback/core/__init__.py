"""The engine core every index shares: contract, constants, checks, top-k, blocked logic.

Pure numpy, no backend specifics: ``cpu_fallback.index`` and ``gpu.index`` both build on
it, and so can an index that holds no blocks itself (a sharded one merges its shards'
answers with ``merge_search_results`` and ``merge_range_results``).
"""

from cpu_fallback.core.blocked import BlockedIndex
from cpu_fallback.core.contract import (
    BACKEND_NAMES,
    BLOCK_BYTES,
    CPU_SCRATCH_BYTES,
    DTYPES,
    ENGINE_OPTIONS,
    GATHER_FRACTION,
    GPU_SCRATCH_BYTES,
    METRICS,
    STORAGE_NUMPY,
    BackendName,
    FloatArray,
    IdArray,
    IndexUnavailable,
    Metric,
    StorageDtype,
    VectorIndex,
)
from cpu_fallback.core.rows import BlockRun, RowMap, blocks_in_use, plan_runs, split_by_block
from cpu_fallback.core.scoring import (
    Scoring,
    merge_range_results,
    merge_search_results,
    query_sq_norms,
)
from cpu_fallback.core.topk import merge_top_k, pack_by_row, sort_rows, top_k_exact
from cpu_fallback.core.validation import (
    as_ids,
    as_matrix,
    as_stored,
    check_config,
    check_k,
    check_size,
    check_threshold,
    last_occurrences,
    normalise_rows,
    prepare_batch,
    prepare_queries,
)

__all__ = [
    "BACKEND_NAMES",
    "BLOCK_BYTES",
    "CPU_SCRATCH_BYTES",
    "DTYPES",
    "ENGINE_OPTIONS",
    "GATHER_FRACTION",
    "GPU_SCRATCH_BYTES",
    "METRICS",
    "STORAGE_NUMPY",
    "BackendName",
    "BlockRun",
    "BlockedIndex",
    "FloatArray",
    "IdArray",
    "IndexUnavailable",
    "Metric",
    "RowMap",
    "Scoring",
    "StorageDtype",
    "VectorIndex",
    "as_ids",
    "as_matrix",
    "as_stored",
    "blocks_in_use",
    "check_config",
    "check_k",
    "check_size",
    "check_threshold",
    "last_occurrences",
    "merge_range_results",
    "merge_search_results",
    "merge_top_k",
    "normalise_rows",
    "pack_by_row",
    "plan_runs",
    "prepare_batch",
    "prepare_queries",
    "query_sq_norms",
    "sort_rows",
    "split_by_block",
    "top_k_exact",
]
