"""Backend selection (auto | gpu | cpu) and the index factory the service uses."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from typing import Any

from cpu_fallback import CpuIndex
from cpu_fallback.core import ENGINE_OPTIONS, BackendName
from gpu import GpuIndex, gpu_available
from service.index_protocol import VectorIndex

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gpu", "cpu")

__all__ = ["BACKENDS", "ENGINE_OPTIONS", "BackendChoice", "gpu_memory_info", "index_class",
           "make_index", "resolve_backend", "select_backend"]


@dataclass(frozen=True)
class BackendChoice:
    """The backend in use ("gpu" or "cpu"), the device it runs on, and why it was chosen."""

    name: BackendName
    device: str
    reason: str


@cache
def select_backend(requested: str = "auto") -> BackendChoice:
    """auto: the GPU when CuPy imports and sees a device, else the CPU (logged once).

    gpu: a device is required; without one this fails fast with the reason.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {requested!r}")
    if requested == "cpu":
        log.info("backend: cpu (requested)")
        return BackendChoice("cpu", "host", "requested")
    ok, detail = gpu_available()
    if ok:
        log.info("backend: gpu on %s (%s)", detail, requested)
        return BackendChoice("gpu", detail, requested)
    if requested == "gpu":
        raise RuntimeError(f"backend 'gpu' requested but no GPU is usable: {detail}")
    log.warning("backend: cpu (no usable GPU: %s)", detail)
    return BackendChoice("cpu", "host", f"no usable GPU: {detail}")


def resolve_backend(setting: str = "auto") -> BackendName:
    """The backend a setting (auto | gpu | cpu) runs on: "gpu" or "cpu", decided and logged
    once per setting; "gpu" without a usable device raises RuntimeError."""
    return select_backend(setting).name


def index_class(backend: str = "auto") -> type[CpuIndex] | type[GpuIndex]:
    """The index class for a backend setting (auto | gpu | cpu)."""
    return GpuIndex if resolve_backend(backend) == "gpu" else CpuIndex


def make_index(dim: int, metric: str = "cosine", dtype: str = "float32",
               backend: str = "auto", **options: Any) -> VectorIndex:
    """A GpuIndex or CpuIndex per ``resolve_backend(backend)``.

    ``options`` go to the constructor (``ENGINE_OPTIONS``): ``block_bytes`` (256 MiB),
    ``block_rows`` (from block_bytes), ``scratch_bytes`` (16 MiB on the CPU, 1 GiB on the
    GPU); None means the default, so unset settings can be passed as they are.
    """
    return index_class(backend)(dim, metric, dtype, **options)


def gpu_memory_info() -> dict[str, int] | None:
    """Free and total device memory when the GPU backend is usable, else None."""
    ok, _ = gpu_available()
    if not ok:
        return None
    import cupy

    free, total = cupy.cuda.runtime.memGetInfo()
    return {"free_bytes": int(free), "total_bytes": int(total)}

