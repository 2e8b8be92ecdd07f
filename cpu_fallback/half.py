"""Half-precision rows on the host: numba kernels that score float16 and bfloat16 rows
against float32 queries with float32 accumulation, reading each stored byte once.

numpy's float16 cast runs at under 2 GB/s and torch's half GEMV at 8-11 GB/s here, far
below memory bandwidth (bench/results has the figures): a kernel that widens each
element in registers (F16C's vcvtph2ps for float16, a shift for bfloat16) and multiplies
it at once is what makes half the bytes mean twice the rows per second.

Rows reach the kernels as their bits: float16 as uint16 and bfloat16 as int16 (``bits``),
so that one kernel source compiles to the right conversion for each format.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numba
import numpy as np
import numpy.typing as npt
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

# Parallel kernels may be entered from several threads at once (concurrent searches):
# only OpenMP and TBB allow that (numba's own workqueue aborts the process).
numba.config.THREADING_LAYER = "threadsafe"  # type: ignore[attr-defined]

# Sums may be reordered so that they vectorise; no other liberty (NaN and inf stay exact).
_FAST = {"reassoc", "contract"}
_BIT_VIEWS = {np.dtype(np.float16): np.uint16, np.dtype(ml_dtypes.bfloat16): np.int16}

HalfBits = npt.NDArray[np.integer[Any]]


def bits(rows: np.ndarray) -> HalfBits:
    """The kernels' view of half-precision rows (no copy)."""
    return rows.view(_BIT_VIEWS[rows.dtype])


def is_half(dtype: np.dtype[Any]) -> bool:
    return dtype in _BIT_VIEWS


def _widen_typing(typingctx: Any, value: Any) -> Any:
    """float32 of one half-precision value given as its bits (uint16: float16, exact with
    subnormals; int16: bfloat16, the upper half of a float32)."""
    if value == types.uint16:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    elif value == types.int16:
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
            wide = builder.zext(builder.bitcast(args[0], ir.IntType(16)), ir.IntType(32))
            upper = builder.shl(wide, ir.Constant(ir.IntType(32), 16))
            return builder.bitcast(upper, ir.FloatType())
    else:
        return None
    return types.float32(value), codegen


def _float_bits_typing(typingctx: Any, value: Any) -> Any:
    """The bits of a float32 as uint32."""
    if value != types.float32:
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(value), codegen


_widen: Any = intrinsic(_widen_typing)
_float_bits: Any = intrinsic(_float_bits_typing)


@njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def dots(rows: Any, queries: Any, out: Any) -> None:  # pragma: no cover - compiled
    """out[i, j] = rows[i] . queries[j] (float32 accumulation); each row is read once."""
    for i in prange(rows.shape[0]):
        for j in range(queries.shape[0]):
            acc = np.float32(0.0)
            for t in range(rows.shape[1]):
                acc += _widen(rows[i, t]) * queries[j, t]
            out[i, j] = acc


@njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def gemv(rows: Any, query: Any, out: Any) -> None:  # pragma: no cover - compiled
    """out[i] = rows[i] . query: ``dots`` for one query, four rows at a time (each query
    element loaded once for four rows: 10% faster here, 1.8x float32's rows per second)."""
    n = rows.shape[0]
    for quad in prange((n + 3) // 4):
        i = 4 * quad
        if i + 4 <= n:
            a0 = np.float32(0.0)
            a1 = np.float32(0.0)
            a2 = np.float32(0.0)
            a3 = np.float32(0.0)
            for t in range(rows.shape[1]):
                q = query[t]
                a0 += _widen(rows[i, t]) * q
                a1 += _widen(rows[i + 1, t]) * q
                a2 += _widen(rows[i + 2, t]) * q
                a3 += _widen(rows[i + 3, t]) * q
            out[i], out[i + 1], out[i + 2], out[i + 3] = a0, a1, a2, a3
        else:
            for r in range(i, n):
                acc = np.float32(0.0)
                for t in range(rows.shape[1]):
                    acc += _widen(rows[r, t]) * query[t]
                out[r] = acc


@njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def pair_dots(rows: Any, row_of: Any, queries: Any, query_of: Any,
              out: Any) -> None:  # pragma: no cover - compiled
    """out[p] = rows[row_of[p]] . queries[query_of[p]] (float32 accumulation)."""
    for p in prange(row_of.shape[0]):
        r, j = row_of[p], query_of[p]
        acc = np.float32(0.0)
        for t in range(rows.shape[1]):
            acc += _widen(rows[r, t]) * queries[j, t]
        out[p] = acc


@njit(parallel=True, cache=True, nogil=True)
def widen(rows: Any, out: Any) -> None:  # pragma: no cover - compiled
    """out (n, d) float32 = rows, exactly."""
    for i in prange(rows.shape[0]):
        for t in range(rows.shape[1]):
            out[i, t] = _widen(rows[i, t])


@njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def to_bfloat16(rows: Any, out: Any, error_norms: Any) -> None:  # pragma: no cover - compiled
    """out (n, d) bfloat16 bits (int16) = rows rounded to nearest even (finite rows), and
    error_norms[i] = |rows[i] - out[i]| (in float32, its own rounding left to the caller)."""
    for i in prange(rows.shape[0]):
        err = np.float32(0.0)
        for t in range(rows.shape[1]):
            value = _widen(rows[i, t])
            b = _float_bits(value)
            rounded = np.int16(np.uint16((b + np.uint32(0x7FFF) + ((b >> 16) & 1)) >> 16))
            out[i, t] = rounded
            gap = value - _widen(rounded)
            err += gap * gap
        error_norms[i] = np.sqrt(err)


@njit(parallel=True, fastmath=_FAST, cache=True, nogil=True)
def rescore_candidates(approx: Any, rows: Any, queries: Any, k: int, query_error: Any,
                       query_weight: Any, relative: float, row_norms: Any, row_errors: Any,
                       sq_norms: Any, l2: bool, keep: Any, out_keys: Any, out_rows: Any,
                       counts: Any) -> None:  # pragma: no cover - compiled
    """Per query j: the exact keys of every row that can be among its k best.

    approx (q, n) holds bfloat16 approximate scores a (bits). Each exact score lies within
    e = relative |a| + query_error[j] row_norms[i] + query_weight[j] row_errors[i] of a
    (HalfScorer.candidates derives the terms), so the key (the score, or 2 score -
    sq_norms[i] under l2) lies in [lo, up]. The k-th best lo is a floor under the exact
    k-th best key, and only rows whose up reaches it are scored exactly here.
    Rows where keep (when not empty) is False are left out.
    out_keys[j, :counts[j]] and out_rows[j, :counts[j]] receive the exact keys and the
    rows; counts[j] may exceed the outputs' width, and then only the count is right.
    """
    nq, n = approx.shape
    width = out_keys.shape[1]
    for j in prange(nq):
        low = np.empty(n, np.float32)
        high = np.empty(n, np.float32)
        for i in range(n):
            a = _widen(approx[j, i])
            e = relative * abs(a) + query_error[j] * row_norms[i] + query_weight[j] * row_errors[i]
            if l2:  # float32's own rounding of 2 a - |x|^2 widens the bounds a little
                e2 = 2 * e + np.float32(2.0 ** -21) * sq_norms[i]
                low[i] = 2 * a - e2 - sq_norms[i]
                high[i] = 2 * a + e2 - sq_norms[i]
            else:
                low[i] = a - e
                high[i] = a + e
        if len(keep):
            for i in range(n):
                if not keep[i]:
                    low[i] = -np.inf
                    high[i] = -np.inf
        best = np.full(min(k, n), -np.inf, np.float32)  # a min-heap of the k best lows
        for i in range(n):
            key = low[i]
            if key > best[0]:  # replace the heap's least and sift it down
                pos = 0
                while True:
                    child = 2 * pos + 1
                    if child >= len(best):
                        break
                    if child + 1 < len(best) and best[child + 1] < best[child]:
                        child += 1
                    if best[child] >= key:
                        break
                    best[pos] = best[child]
                    pos = child
                best[pos] = key
        floor = best[0]
        found = 0
        for i in range(n):
            if high[i] < floor or high[i] == -np.inf:
                continue
            if found < width:
                acc = np.float32(0.0)
                for t in range(rows.shape[1]):
                    acc += _widen(rows[i, t]) * queries[j, t]
                out_keys[j, found] = 2 * acc - sq_norms[i] if l2 else acc
                out_rows[j, found] = i
            found += 1
        counts[j] = found
