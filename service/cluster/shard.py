"""ShardActor: one shard of a ShardedIndex, a CpuIndex or GpuIndex inside a Ray actor.

A plain class: the head wraps it with ``ray.remote`` where it creates actors, so it can
be imported and tested without Ray. Every data call names the epoch the head believes
the shard serves; a shard that is fresh (Ray restarted it, or it was never configured),
still loading, or configured for another epoch refuses with ``ShardNotReady`` rather
than answer from a partial partition.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import numpy as np
import numpy.typing as npt

from cpu_fallback import CpuIndex
from cpu_fallback.core import FloatArray, IdArray, VectorIndex
from gpu import GpuIndex, gpu_available


class ShardNotReady(RuntimeError):
    """The shard does not serve the epoch asked for: fresh, restarted, loading, or reset."""


def _assigned_gpus() -> list[Any]:
    """The GPUs Ray gave this actor (none outside Ray)."""
    try:
        import ray
    except ImportError:
        return []
    return list(ray.get_gpu_ids()) if ray.is_initialized() else []


def _node() -> str:
    """This process's Ray node id (and IP), or the hostname outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            node_id = ray.get_runtime_context().get_node_id()
            return f"{node_id[:12]}@{ray.util.get_node_ip_address()}"
    except ImportError:
        pass
    return socket.gethostname()


class ShardActor:
    """Holds one partition of a sharded index; states: unconfigured, loading, ready."""

    def __init__(self) -> None:
        self.incarnation = uuid.uuid4().hex  # new on every (re)start: how restarts are seen
        self.epoch = 0
        self.ready = False
        self.loading = False
        self._index: VectorIndex | None = None
        self._on_gpu = bool(_assigned_gpus()) and gpu_available()[0]

    # ------------------------------------------------------------------ lifecycle
    def configure(self, dim: int, metric: str, dtype: str, epoch: int,
                  engine_options: dict[str, int | None]) -> dict[str, Any]:
        """A fresh empty index for ``epoch``, loading (not ready); returns ``status()``."""
        self._index = None  # let the old partition go before the new one grows
        index_class = GpuIndex if self._on_gpu else CpuIndex
        self._index = index_class(dim, metric, dtype, **engine_options)
        self.epoch, self.ready, self.loading = epoch, False, True
        return self.status()

    def load(self, epoch: int, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> int:
        """Add prepared rows while loading; returns the rows held."""
        index = self._serving(epoch, loading=True)
        index.add(ids, vectors, prepared=True)
        return len(index)

    def finish(self, epoch: int) -> int:
        """Loading is over: the shard answers from now on; returns the rows held."""
        index = self._serving(epoch, loading=True)
        self.ready, self.loading = True, False
        return len(index)

    def status(self) -> dict[str, Any]:
        """Who and where this shard is, what it serves, and what it holds."""
        memory = self._index.memory_info() if self._index is not None else {}
        return {
            "incarnation": self.incarnation,
            "epoch": self.epoch,
            "ready": self.ready,
            "loading": self.loading,
            "rows": int(memory.get("vectors", 0)),
            "bytes": int(memory.get("allocated_bytes", 0)),
            "node": _node(),
            "device": memory.get("device", "host") if self._on_gpu else socket.gethostname(),
            "pid": os.getpid(),
            "memory": memory,
        }

    # ------------------------------------------------------------------ data
    def add(self, epoch: int, ids: npt.ArrayLike, vectors: npt.ArrayLike) -> int:
        """Upsert rows the head prepared (``prepare_batch``); returns the rows held."""
        index = self._serving(epoch)
        index.add(ids, vectors, prepared=True)
        return len(index)

    def remove(self, epoch: int, ids: npt.ArrayLike) -> tuple[int, int]:
        """(how many of ids were present, the rows held after)."""
        index = self._serving(epoch)
        removed = index.remove(ids)
        return removed, len(index)

    def search(self, epoch: int, queries: npt.ArrayLike, k: int, threshold: float | None,
               allow: npt.ArrayLike | None) -> tuple[FloatArray, IdArray]:
        return self._serving(epoch).search(queries, k, threshold, allow)

    def range_search(self, epoch: int, queries: npt.ArrayLike, threshold: float,
                     allow: npt.ArrayLike | None, max_results: int | None
                     ) -> tuple[IdArray, FloatArray, IdArray, IdArray]:
        return self._serving(epoch).range_search(queries, threshold, allow, max_results)

    def get(self, epoch: int, ids: npt.ArrayLike) -> FloatArray:
        return self._serving(epoch).get(ids)

    def contains(self, epoch: int, ids: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Which of ids this shard holds."""
        index = self._serving(epoch)
        return np.array([int(i) in index for i in np.asarray(ids).reshape(-1)], bool)

    def _serving(self, epoch: int, *, loading: bool = False) -> VectorIndex:
        """The index when it serves ``epoch`` (ready, or loading for load/finish)."""
        state_ok = self.loading if loading else self.ready
        if self._index is None or epoch != self.epoch or not state_ok:
            want = "loading" if loading else "ready"
            have = ("loading" if self.loading else "ready" if self.ready else "unconfigured")
            raise ShardNotReady(f"shard {self.incarnation[:8]} is {have} at epoch "
                                f"{self.epoch}, asked to be {want} at epoch {epoch}")
        return self._index
