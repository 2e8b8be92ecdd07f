"""The vector index contract as the service imports it (defined in ``cpu_fallback.core``)."""

from __future__ import annotations

from cpu_fallback.core import (
    DTYPES,
    METRICS,
    FloatArray,
    IdArray,
    Metric,
    StorageDtype,
    VectorIndex,
)

__all__ = ["DTYPES", "METRICS", "FloatArray", "IdArray", "Metric", "StorageDtype", "VectorIndex"]
