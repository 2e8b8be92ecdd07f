"""Backend selection (auto | gpu | cpu | ray) and the index factory the service uses."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from cpu_fallback import CpuIndex
from cpu_fallback.core import ENGINE_OPTIONS, BackendName
from gpu import GpuIndex, gpu_available
from service.index_protocol import VectorIndex

log = logging.getLogger(__name__)

BACKENDS = ("auto", "gpu", "cpu", "ray")

__all__ = ["BACKENDS", "ENGINE_OPTIONS", "BackendChoice", "ClusterOptions", "gpu_memory_info",
           "index_class", "make_index", "resolve_backend", "select_backend"]


@dataclass(frozen=True)
class BackendChoice:
    """The backend in use ("gpu", "cpu" or "ray"), the device it runs on, and why it was
    chosen."""

    name: BackendName | Literal["ray"]
    device: str
    reason: str


@dataclass(frozen=True)
class ClusterOptions:
    """The ray backend's settings: where Ray runs (None: a local Ray this process starts),
    the default shard count (None: the GPUs Ray sees, or 2), how long a shard may take to
    answer, and how often shards are checked for restarts."""

    address: str | None = None
    shards: int | None = None
    timeout_s: float = 10.0
    check_s: float = 1.0


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
    if requested == "ray":
        log.info("backend: ray (requested): shards on a Ray cluster")
        return BackendChoice("ray", "ray cluster", "requested")
    ok, detail = gpu_available()
    if ok:
        log.info("backend: gpu on %s (%s)", detail, requested)
        return BackendChoice("gpu", detail, requested)
    if requested == "gpu":
        raise RuntimeError(f"backend 'gpu' requested but no GPU is usable: {detail}")
    log.warning("backend: cpu (no usable GPU: %s)", detail)
    return BackendChoice("cpu", "host", f"no usable GPU: {detail}")


def resolve_backend(setting: str = "auto") -> str:
    """The backend a setting (auto | gpu | cpu | ray) runs on: "gpu", "cpu" or "ray",
    decided and logged once per setting; "gpu" without a usable device raises
    RuntimeError."""
    return select_backend(setting).name


def index_class(backend: str = "auto") -> type[CpuIndex] | type[GpuIndex]:
    """The single-process index class for a backend setting (auto | gpu | cpu)."""
    return GpuIndex if resolve_backend(backend) == "gpu" else CpuIndex


def make_index(dim: int, metric: str = "cosine", dtype: str = "float32",
               backend: str = "auto", *, shards: int | None = None, name: str = "",
               cluster: ClusterOptions | None = None, **options: Any) -> VectorIndex:
    """A GpuIndex or CpuIndex per ``resolve_backend(backend)``, or for "ray" a ShardedIndex
    of ``shards`` actors (default ``cluster.shards``) named ``name`` in its messages.

    ``options`` go to the constructor (``ENGINE_OPTIONS``): ``block_bytes`` (256 MiB),
    ``block_rows`` (from block_bytes), ``scratch_bytes`` (16 MiB on the CPU, 1 GiB on the
    GPU); None means the default, so unset settings can be passed as they are.
    """
    if resolve_backend(backend) == "ray":
        from service.cluster.sharded import ShardedIndex

        cluster = cluster or ClusterOptions()
        return ShardedIndex(dim, metric, dtype, shards=shards or cluster.shards,
                            timeout_s=cluster.timeout_s, name=name, **options)
    return index_class(backend)(dim, metric, dtype, **options)


def gpu_memory_info() -> dict[str, int] | None:
    """Free and total device memory when the GPU backend is usable, else None."""
    ok, _ = gpu_available()
    if not ok:
        return None
    import cupy

    free, total = cupy.cuda.runtime.memGetInfo()
    return {"free_bytes": int(free), "total_bytes": int(total)}

