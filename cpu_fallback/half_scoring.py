"""How CpuIndex scores half-precision rows, and the choice of kernels for this machine.

Two ways, both exact:
- ``exact``: every score in float32 from the stored values -- the fused numba kernel
  (``half.dots``, each row read once) or rows widened to float32 in cache-sized panels and
  multiplied by BLAS.
- ``candidates`` (a top-k over many queries): a bfloat16 GEMM (torch/oneDNN: AMX or
  AVX512-BF16 where the CPU has them) gives approximate scores; every row whose
  approximation is within the proven error band of the k-th best is then scored exactly,
  and only those go on to the top-k. The answer is the exact top-k of the float32 scores.

The error bound, per query q and row x: the GEMM takes q and x rounded to bfloat16 (q' =
q - dq, x' = x - dx; dx = 0 for bfloat16 storage), sums in float32 and rounds the sum t to
bfloat16 a. So |a - q.x| <= u' |a| + |dq| |x| + |q| |dx| + |dq| |dx| + 2 gamma_d (|q| +
|dq|) (|x| + |dx|), with u' = 2^-8 / (1 - 2^-8), by Cauchy-Schwarz for the roundings and
gamma_d = d 2^-24 / (1 - d 2^-24) for each float32 sum (the GEMM's and the exact
rescoring's). |dq| is computed per query and |dx| per row (while rounding the row), so
the bound is tight. With each key within [lo, up]: k rows have exact keys >= the k-th
best lo, so the exact k-th best key is too, and a row whose up is below it cannot be in
the top k. Tests check the top-k against the exact path on adversarial near-ties.

Which kernels run is measured, not guessed (``kernel_choice``): once per process and
storage dtype, on synthetic rows; the choice is logged and shown in /health and EXPLAIN.
On a CPU without BF16 instructions the GEMM is emulated and loses to widened BLAS.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from cpu_fallback import half

log = logging.getLogger("dotsearch.kernels")

# Up to this many queries, the fused kernel (each row read once, every query scored from
# the cache) is memory-bound; past it, a GEMM's blocking wins.
FUSED_MAX_QUERIES = 8
# Widened rows (float32) per BLAS panel: 4 MiB stays in the cache.
WIDEN_BYTES = 4 << 20
# Room for each query's candidates per panel: at least this many, or 4 k; a panel where
# some query has more is run again with room for them, unless that is more than this
# fraction of its rows (heavy ties), which are then all scored exactly.
MIN_CANDIDATES = 256
MAX_CANDIDATE_FRACTION = 0.25
_NO_MASK = np.empty(0, np.bool_)
BF16_UNIT = 2.0 ** -8
# The GEMM rounds its float32 sum t to bfloat16 a: |a - t| <= u |t| <= u / (1 - u) |a|
# (plus a hair for float32's own rounding of the bounds).
OUTPUT_ROUNDING = BF16_UNIT / (1 - BF16_UNIT) + 2.0 ** -20


class QueryOperand(NamedTuple):
    """A chunk of queries as ``candidates`` takes it: rounded to bfloat16 for the GEMM,
    and per query the weights of |x| and |x - bf16(x)| in the error bound."""

    rounded: torch.Tensor
    error: npt.NDArray[np.float32]
    weight: npt.NDArray[np.float32]

FUSED, WIDEN_BLAS, BF16_GEMM = "fused", "widen-blas", "bf16-gemm"
KERNEL_NOTES = {
    FUSED: "numba, rows widened in registers, float32 sums",
    WIDEN_BLAS: "rows widened to float32 panels, BLAS",
    BF16_GEMM: "bfloat16 GEMM proposes candidates, float32 rescoring decides",
}


@dataclass(frozen=True)
class KernelChoice:
    """The kernels a storage dtype uses here: ``single`` for up to FUSED_MAX_QUERIES
    queries, ``batch`` for a top-k over more; ``seconds`` as measured for each option."""

    single: str
    batch: str
    seconds: dict[str, float] = field(default_factory=dict)

    def describe(self, nq: int, ranging: bool) -> str:
        """The kernel a search of nq queries runs (a range search is always exact)."""
        if nq <= FUSED_MAX_QUERIES:
            return self.single
        return WIDEN_BLAS if ranging or self.batch != BF16_GEMM else self.batch


class HalfScorer:
    """Scores rows of one half-precision storage dtype and dim.

    It holds no buffers: each search brings its own ``Scratch``, so that searches of one
    index may run at the same time.
    """

    def __init__(self, storage: np.dtype[Any], dim: int,
                 choice: KernelChoice | None = None) -> None:
        self.storage = storage
        self.dim = dim
        self.choice = choice if choice is not None else kernel_choice(storage)
        # float32 sums of d terms are off by at most gamma_d of sum |terms|
        self._gamma = dim * 2.0 ** -24 / (1 - dim * 2.0 ** -24)

    def scratch(self) -> Scratch:
        """Buffers for one search (reused across its panels)."""
        return Scratch(self.dim)

    def proposes(self, nq: int) -> bool:
        """Whether a top-k over nq queries goes through ``candidates``."""
        return nq > FUSED_MAX_QUERIES and self.choice.batch == BF16_GEMM

    # ------------------------------------------------------------------ exact
    def exact(self, rows: np.ndarray, queries: npt.NDArray[np.float32],
              out: npt.NDArray[np.float32], scratch: Scratch) -> None:
        """out (n, q) = rows (n, d) @ queries (q, d).T in float32."""
        fused = self.choice.single if len(queries) <= FUSED_MAX_QUERIES else WIDEN_BLAS
        if fused == FUSED:
            if len(queries) == 1:
                half.gemv(half.bits(rows), queries[0], out[:, 0])
            else:
                half.dots(half.bits(rows), queries, out)
            return
        widened = scratch.widened()
        step = len(widened)
        for r0 in range(0, len(rows), step):
            panel = widened[: min(step, len(rows) - r0)]
            half.widen(half.bits(rows[r0:r0 + len(panel)]), panel)
            np.matmul(panel, queries.T, out=out[r0:r0 + len(panel)])

    # ------------------------------------------------------------------ candidates
    def query_operand(self, queries: npt.NDArray[np.float32]) -> QueryOperand:
        """What ``candidates`` takes for a chunk of queries (computed once per chunk)."""
        rounded = torch.from_numpy(queries).to(torch.bfloat16)
        norms = np.linalg.norm(queries.astype(np.float64), axis=1)
        errors = np.linalg.norm(queries - rounded.float().numpy().astype(np.float64), axis=1)
        # Cauchy-Schwarz: |dq . x| <= |dq| |x|, and the float32 sums (the GEMM's and the
        # rescoring's) are off by at most gamma_d of sum |q_i x_i| each.
        slack = 1 + 2.0 ** -10
        summing = 2 * self._gamma * (norms + errors)
        return QueryOperand(rounded, ((errors + summing) * slack).astype(np.float32),
                            ((norms + errors + summing) * slack).astype(np.float32))

    def candidates(
        self, rows: np.ndarray, queries: npt.NDArray[np.float32], operand: QueryOperand,
        k: int, ids: npt.NDArray[np.int64], sq_norms: npt.NDArray[np.float32],
        l2: bool, keep: npt.NDArray[np.bool_] | None, scratch: Scratch,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """(keys, ids) holding every row that can be in each query's exact top k.

        keys are exact ranking keys (higher is closer: the score, or 2 q.x - |x|^2 under
        l2), -inf where masked or padding; ids is (q, w) for a packed candidate set, or
        (n,) when the panel was scored whole. ``sq_norms`` are the rows' squared norms.
        """
        n, nq = len(rows), len(queries)
        bf16_rows, row_errors = self._bf16_rows(rows, scratch)
        approx = torch.mm(operand.rounded, bf16_rows.T).view(torch.int16).numpy()
        row_norms = np.sqrt(sq_norms) * np.float32(1 + self._gamma)
        width = min(n, max(MIN_CANDIDATES, 4 * k))
        while True:
            keys = np.empty((nq, width), np.float32)
            local = np.empty((nq, width), np.int64)
            counts = np.empty(nq, np.int64)
            half.rescore_candidates(
                approx, half.bits(rows), queries, k, operand.error, operand.weight,
                OUTPUT_ROUNDING, row_norms, row_errors, sq_norms, l2,
                _NO_MASK if keep is None else keep, keys, local, counts)
            if counts.max() <= width:
                break
            if counts.max() > MAX_CANDIDATE_FRACTION * n:  # heavy ties: score it whole
                return self._whole_panel(rows, queries, ids, sq_norms, l2, keep, scratch)
            width = int(counts.max())
        used = int(counts.max())
        filled = np.arange(used) < counts[:, None]
        rows_of = np.where(filled, local[:, :used], 0)  # unfilled slots hold garbage
        return (np.where(filled, keys[:, :used], -np.inf).astype(np.float32),
                np.where(filled, ids[rows_of], -1))

    def _whole_panel(
        self, rows: np.ndarray, queries: npt.NDArray[np.float32], ids: npt.NDArray[np.int64],
        sq_norms: npt.NDArray[np.float32], l2: bool, keep: npt.NDArray[np.bool_] | None,
        scratch: Scratch,
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        exact = np.empty((len(rows), len(queries)), np.float32)
        self.exact(rows, queries, exact, scratch)
        keys = exact.T
        if l2:
            keys = 2 * keys - sq_norms
        if keep is not None:
            keys[:, ~keep] = -np.inf
        return keys, ids

    def _bf16_rows(self, rows: np.ndarray, scratch: Scratch
                   ) -> tuple[torch.Tensor, npt.NDArray[np.float32]]:
        """rows as a bfloat16 tensor, and each row's rounding error |x - bf16(x)|:
        bfloat16 storage as it is (no error), float16 rounded here."""
        if rows.dtype != np.float16:
            return (torch.from_numpy(half.bits(rows)).view(torch.bfloat16),
                    np.zeros(len(rows), np.float32))
        out = scratch.bf16(len(rows))
        errors = np.empty(len(rows), np.float32)
        half.to_bfloat16(half.bits(rows), out, errors)
        return torch.from_numpy(out).view(torch.bfloat16), errors * np.float32(1 + self._gamma)


class Scratch:
    """The buffers one search reuses across its panels, allocated when first needed."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._widened: npt.NDArray[np.float32] | None = None
        self._bf16: npt.NDArray[np.int16] = np.empty((0, dim), np.int16)

    def widened(self) -> npt.NDArray[np.float32]:
        """A float32 panel of about WIDEN_BYTES."""
        if self._widened is None:
            self._widened = np.empty((max(16, WIDEN_BYTES // (4 * self.dim)), self.dim),
                                     np.float32)
        return self._widened

    def bf16(self, rows: int) -> npt.NDArray[np.int16]:
        """Room for ``rows`` bfloat16 rows (as int16 bits)."""
        if len(self._bf16) < rows:
            self._bf16 = np.empty((rows, self.dim), np.int16)
        return self._bf16[:rows]


# ---------------------------------------------------------------------- calibration
_CALIBRATION_ROWS, _CALIBRATION_DIM, _CALIBRATION_QUERIES = 4096, 512, 64
_choices: dict[str, KernelChoice] = {}
_lock = threading.Lock()


def kernel_choice(storage: np.dtype[Any]) -> KernelChoice:
    """This machine's kernels for a half-precision storage dtype, measured on first use."""
    name = np.dtype(storage).name
    with _lock:
        if name not in _choices:
            _choices[name] = _calibrate(np.dtype(storage))
            chosen = _choices[name]
            log.info("%s kernels: %s for up to %d queries, %s for more (measured: %s)",
                     name, chosen.single, FUSED_MAX_QUERIES, chosen.batch,
                     ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in chosen.seconds.items()))
        return _choices[name]


def kernel_choices() -> dict[str, dict[str, Any]]:
    """The choices made so far, by storage dtype (for /health)."""
    with _lock:
        return {name: {"single": c.single, "batch": c.batch,
                       "measured_ms": {k: round(v * 1e3, 3) for k, v in c.seconds.items()}}
                for name, c in _choices.items()}


def _calibrate(storage: np.dtype[Any]) -> KernelChoice:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((_CALIBRATION_ROWS, _CALIBRATION_DIM), np.float32)
    rows = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(storage)
    queries = rng.standard_normal((_CALIBRATION_QUERIES, _CALIBRATION_DIM), np.float32)
    ids = np.arange(len(rows), dtype=np.int64)
    sq = np.ones(len(rows), np.float32)
    seconds: dict[str, float] = {}

    def scorer(single: str, batch: str) -> HalfScorer:
        return HalfScorer(storage, _CALIBRATION_DIM, KernelChoice(single, batch))

    scratch = Scratch(_CALIBRATION_DIM)
    for option in (FUSED, WIDEN_BLAS):
        one = scorer(option, WIDEN_BLAS)
        out = np.empty((len(rows), 1), np.float32)
        seconds[f"single/{option}"] = _best_time(
            partial(one.exact, rows, queries[:1], out, scratch))
    gemm = scorer(FUSED, BF16_GEMM)
    operand = gemm.query_operand(queries)
    seconds[f"batch/{BF16_GEMM}"] = _best_time(
        lambda: gemm.candidates(rows, queries, operand, 10, ids, sq, False, None, scratch))
    out = np.empty((len(rows), len(queries)), np.float32)
    seconds[f"batch/{WIDEN_BLAS}"] = _best_time(lambda: gemm.exact(rows, queries, out, scratch))
    single = min((FUSED, WIDEN_BLAS), key=lambda o: seconds[f"single/{o}"])
    batch = min((BF16_GEMM, WIDEN_BLAS), key=lambda o: seconds[f"batch/{o}"])
    return KernelChoice(single, batch, seconds)


def _best_time(run: Callable[[], object], repeats: int = 5) -> float:
    # Other thread pools' workers (OpenBLAS spins about 0.1 s after a call) go idle first.
    time.sleep(0.15)
    run()  # compiles (numba caches the machine code on disk) and warms the caches
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return float(best)
