"""The CUDA operations GpuIndex needs: cuBLAS GEMM with float32 output, top-k, counts."""

from __future__ import annotations

import functools
import importlib
import logging
import threading
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

# Host -> device uploads larger than this go through two pinned staging buffers of this
# size, in turn: filling one overlaps the other's copy, and pinned host memory stays
# bounded (CuPy's own asarray pins a buffer as large as the whole array, and its pool
# keeps it).
STAGING_BYTES = 8 << 20


@functools.cache
def gpu_available() -> tuple[bool, str]:
    """(True, device name) when the whole GPU path works here, else (False, why).

    Counting devices is not enough: cuBLAS may be missing (CuPy loads it lazily), torch
    may be a CPU build or see no device, or a kernel may not run on this architecture,
    and backend "auto" would then pick the GPU and fail at the first search. So this
    imports cuBLAS, asks torch, and runs a one-element float16 and float32 GEMM and a
    top-k through DLPack. Cached: the answer does not change within a process.
    """
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install
        return False, f"CuPy is not importable ({exc.__class__.__name__}: {exc}); "\
            "install the 'gpu' extra (cupy-cuda13x)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDARuntimeError: no driver, driver too old, ...
        return False, f"CuPy sees no CUDA device ({exc})"
    if count == 0:
        return False, "CuPy sees no CUDA device (device count 0)"
    props = cupy.cuda.runtime.getDeviceProperties(0)
    raw_name = props["name"]
    name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
    try:
        importlib.import_module("cupy_backends.cuda.libs.cublas")
    except Exception as exc:  # ImportError: libcublas.so not found
        return False, f"cuBLAS is not loadable on {name} ({exc.__class__.__name__}: {exc}); "\
            "install the CUDA libraries (cupy-cuda13x[ctk])"
    try:
        import torch
    except Exception as exc:
        return False, f"torch is not importable ({exc.__class__.__name__}: {exc})"
    if not torch.cuda.is_available():
        return False, f"torch sees no CUDA device (torch {torch.__version__}, "\
            f"CUDA build {torch.version.cuda})"
    try:
        _probe(name)
    except Exception as exc:
        return False, f"the GPU probe (one-element GEMM and top-k) failed on {name} "\
            f"({exc.__class__.__name__}: {exc})"
    return True, name


def _probe(name: str) -> None:
    """One-element float16 and float32 gemmEx, and torch.topk through DLPack, checked."""
    ops = CudaOps.unchecked(name)
    xp = ops.xp
    for dtype in (np.float16, np.float32):
        out = xp.zeros((1, 1), dtype=np.float32)
        ops.scores(xp.full((1, 1), 2, dtype=dtype), xp.full((1, 1), 3, dtype=dtype), out)
        got = float(ops.to_host(out)[0, 0])
        if got != 6.0:
            raise RuntimeError(f"{np.dtype(dtype).name} GEMM gave {got}, not 6")
    values, cols = ops.top_k(ops.to_device(np.array([[1.0, 5.0]], np.float32)), 1)
    got_top = (float(ops.to_host(values)[0, 0]), int(ops.to_host(cols)[0, 0]))
    if got_top != (5.0, 1):
        raise RuntimeError(f"top-k gave {got_top}, not (5.0, 1)")


class _PinnedStaging:
    """Two pinned host buffers shared by every upload in the process (a lock serialises
    them); created on first use. If pinning fails, uploads fall back to CuPy's own."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buffers: list[Any] | None = None
        self._ready: list[Any] = [None, None]  # per buffer: event of its last copy
        self.disabled = False

    def upload(self, xp: Any, host: np.ndarray) -> Any:
        """host (C-contiguous) copied into a new device array, in staged chunks."""
        with self._lock:
            if self._buffers is None and not self.disabled:
                try:
                    self._buffers = [xp.cuda.alloc_pinned_memory(STAGING_BYTES)
                                     for _ in range(2)]
                except Exception as exc:  # CUDARuntimeError: host memory cannot be pinned
                    self.disabled = True
                    log.warning("pinned staging unavailable (%s): uploads go unstaged", exc)
            if self._buffers is None:
                return xp.asarray(host)
            out = xp.empty(host.shape, host.dtype)
            source = host.reshape(-1).view(np.uint8)
            stream = xp.cuda.get_current_stream()
            for i, start in enumerate(range(0, source.nbytes, STAGING_BYTES)):
                n = min(STAGING_BYTES, source.nbytes - start)
                slot = i % 2
                if self._ready[slot] is not None:  # its previous copy must be done
                    self._ready[slot].synchronize()
                buffer = self._buffers[slot]
                np.frombuffer(buffer, np.uint8, n)[:] = source[start:start + n]
                (out.data + start).copy_from_host_async(buffer.ptr, n, stream)
                self._ready[slot] = stream.record()
            return out


_STAGING = _PinnedStaging()


class CudaOps:
    """Device work for one CUDA device: CuPy arrays, cuBLAS gemmEx, torch.topk via DLPack."""

    def __init__(self) -> None:
        ok, why = gpu_available()
        if not ok:
            raise RuntimeError(f"GPU backend unavailable: {why}")
        self._open(why)

    @classmethod
    def unchecked(cls, name: str) -> CudaOps:
        """CudaOps without asking gpu_available first (its probe uses this)."""
        ops = cls.__new__(cls)
        ops._open(name)
        return ops

    def _open(self, name: str) -> None:
        import cupy
        import torch
        from cupy_backends.cuda.libs import cublas

        self.xp: Any = cupy
        self.name = name
        self._cublas = cublas
        self._torch = torch
        self._one = np.array(1.0, np.float32)
        self._zero = np.array(0.0, np.float32)
        self.out_of_memory: tuple[type[BaseException], ...] = (
            cupy.cuda.memory.OutOfMemoryError,
            torch.cuda.OutOfMemoryError,
        )

    def scores(self, queries: Any, rows: Any, out: Any) -> None:
        """out[:] = queries (q, d) @ rows (n, d).T in float32; out may be a column slice.

        float16 and bfloat16 operands (bfloat16 as its uint16 bits: CuPy has no such
        dtype) run on tensor cores with float32 accumulation and output (cupy.matmul on
        float16 would round the output to float16). Writing into a slice
        of a wider buffer lets one top-k cover many blocks.
        """
        cupy, cublas = self.xp, self._cublas
        q, d = queries.shape
        n = rows.shape[0]
        if q == 0 or n == 0:
            return
        if not (queries.flags.c_contiguous and rows.flags.c_contiguous):
            raise ValueError("scores needs C-contiguous queries and rows")
        if out.dtype != np.float32 or out.strides[1] != 4 or out.shape != (q, n):
            raise ValueError("scores writes float32 (q, n) rows with unit column stride")
        kind = {np.dtype(np.float16): cupy.cuda.runtime.CUDA_R_16F,
                np.dtype(np.uint16): cupy.cuda.runtime.CUDA_R_16BF,
                np.dtype(np.float32): cupy.cuda.runtime.CUDA_R_32F}[rows.dtype]
        handle = cupy.cuda.device.get_cublas_handle()
        # Row-major out (q, n) with row stride ldc is column-major out^T (n, q): that is
        # rows (column-major d x n)^T times queries (column-major d x q).
        ldc = out.strides[0] // 4
        cublas.setPointerMode(handle, cublas.CUBLAS_POINTER_MODE_HOST)
        cublas.gemmEx(
            handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n, q, d,
            self._one.ctypes.data, rows.data.ptr, kind, d,
            queries.data.ptr, kind, d,
            self._zero.ctypes.data, out.data.ptr, cupy.cuda.runtime.CUDA_R_32F, ldc,
            cublas.CUBLAS_COMPUTE_32F, cublas.CUBLAS_GEMM_DEFAULT,
        )

    def top_k(self, keys: Any, k: int) -> tuple[Any, Any]:
        """Largest k per row of keys (q, n), sorted descending: (values, column indices).

        torch.topk ranks NaN above every number; GpuIndex never lets a NaN key through.
        """
        tensor = self._torch.from_dlpack(keys)
        values, indices = self._torch.topk(tensor, k, dim=1, largest=True, sorted=True)
        return self.xp.from_dlpack(values), self.xp.from_dlpack(indices)

    def count_at_least(self, keys: Any, kth: Any) -> Any:
        """Per row, how many keys are >= that row's kth value (one fused pass)."""
        return (keys >= kth[:, None]).sum(axis=1)

    def supports_bfloat16(self) -> bool:
        """bfloat16 GEMMs need compute capability 8.0 (Ampere) or newer."""
        return int(self.xp.cuda.Device().compute_capability) >= 80

    def to_host(self, array: Any) -> np.ndarray:
        return self.xp.asnumpy(array)

    def to_device(self, array: np.ndarray) -> Any:
        host = np.ascontiguousarray(array)
        if host.nbytes <= STAGING_BYTES:
            return self.xp.asarray(host)
        return _STAGING.upload(self.xp, host)

    def memory(self) -> dict[str, int]:
        free, total = self.xp.cuda.runtime.memGetInfo()
        pool = self.xp.get_default_memory_pool()
        return {"device_free_bytes": int(free), "device_total_bytes": int(total),
                "pool_used_bytes": int(pool.used_bytes())}
