"""The CUDA operations GpuIndex needs: cuBLAS GEMM with float32 output, top-k, counts."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def gpu_available() -> tuple[bool, str]:
    """(True, device name) when CuPy imports and sees a CUDA device, else (False, why)."""
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
    name = props["name"]
    return True, name.decode() if isinstance(name, bytes) else str(name)


class CudaOps:
    """Device work for one CUDA device: CuPy arrays, cuBLAS gemmEx, torch.topk via DLPack."""

    def __init__(self) -> None:
        ok, why = gpu_available()
        if not ok:
            raise RuntimeError(f"GPU backend unavailable: {why}")
        import cupy
        import torch
        from cupy_backends.cuda.libs import cublas

        self.xp: Any = cupy
        self.name = why
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

        float16 operands run on tensor cores with float32 accumulation and output
        (cupy.matmul on float16 would round the output to float16). Writing into a slice
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
        """Largest k per row of keys (q, n), sorted descending: (values, column indices)."""
        tensor = self._torch.from_dlpack(keys)
        values, indices = self._torch.topk(tensor, k, dim=1, largest=True, sorted=True)
        return self.xp.from_dlpack(values), self.xp.from_dlpack(indices)

    def count_at_least(self, keys: Any, kth: Any) -> Any:
        """Per row, how many keys are >= that row's kth value (one fused pass)."""
        return (keys >= kth[:, None]).sum(axis=1)

    def to_host(self, array: Any) -> np.ndarray:
        return self.xp.asnumpy(array)

    def to_device(self, array: np.ndarray) -> Any:
        return self.xp.asarray(array)

    def memory(self) -> dict[str, int]:
        free, total = self.xp.cuda.runtime.memGetInfo()
        pool = self.xp.get_default_memory_pool()
        return {"device_free_bytes": int(free), "device_total_bytes": int(total),
                "pool_used_bytes": int(pool.used_bytes())}
