"""Test support for the index suites: backends to run, a float64 reference, an emulated GPU,
and sharded indexes over a pool of Ray actors."""

from __future__ import annotations

import gc
import importlib.util
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from cpu_fallback import CpuIndex
from gpu import GpuIndex, gpu_available

GPU_OK, GPU_WHY = gpu_available()
RAY_OK = importlib.util.find_spec("ray") is not None


class EmulatedOutOfMemoryError(Exception):
    """The emulated device's out-of-memory error (what CuPy's OutOfMemoryError stands for)."""


class EmulatedCudaOps:
    """numpy stand-in for gpu.device.CudaOps, so GpuIndex's logic runs in CI without a GPU.

    It mirrors the device contract, including the parts that matter most for exactness:
    ``top_k`` picks arbitrarily among equal keys (here: in a random column order), as
    torch.topk may, and ranks NaN above every number, as torch.topk does. Device
    allocations (``to_device`` and ``xp.empty/full/zeros/concatenate``) are counted, and
    ``fail_allocation(n)`` makes the n-th one from then on raise the out-of-memory error.
    It checks the orchestration, not CUDA itself; the ``gpu``-marked tests run the real
    CudaOps on a device.
    """

    name = "emulated (numpy)"
    out_of_memory: tuple[type[BaseException], ...] = (EmulatedOutOfMemoryError,)

    def __init__(self, seed: int = 0) -> None:
        self._rng = np.random.default_rng(seed)
        self.xp = _CountingNumpy(self)
        self.allocations = 0  # device allocations so far
        self.host_bytes = 0  # bytes copied to the host so far
        self._fail_in: int | None = None

    def fail_allocation(self, nth: int | None) -> None:
        """Make the nth device allocation from now raise EmulatedOutOfMemoryError (once);
        None: none."""
        self._fail_in = nth

    def allocate(self) -> None:
        self.allocations += 1
        if self._fail_in is not None:
            self._fail_in -= 1
            if self._fail_in == 0:
                self._fail_in = None
                raise EmulatedOutOfMemoryError("injected: out of device memory")

    def scores(self, queries: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
        # Written in place, as gemmEx does (no score-sized temporary).
        np.matmul(_as_float32(queries), _as_float32(rows).T, out=out)

    def supports_bfloat16(self) -> bool:
        return True

    def top_k(self, keys: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        shuffle = self._rng.permutation(keys.shape[1])
        shuffled = keys[:, shuffle]
        # Descending, NaN first (torch.topk's order); stable, so ties keep the shuffle.
        order = np.lexsort((-shuffled, ~np.isnan(shuffled)), axis=1)[:, :k]
        cols = shuffle[order]
        return np.take_along_axis(keys, cols, axis=1), cols

    def count_at_least(self, keys: np.ndarray, kth: np.ndarray) -> np.ndarray:
        return (keys >= kth[:, None]).sum(axis=1)

    def to_host(self, array: Any) -> np.ndarray:
        out = np.array(array, copy=True)
        self.host_bytes += out.nbytes
        return out

    def to_device(self, array: Any) -> np.ndarray:
        self.allocate()
        return np.array(array, copy=True)

    def memory(self) -> dict[str, int]:
        return {}


def _as_float32(array: np.ndarray) -> np.ndarray:
    """Device operands as float32: uint16 holds bfloat16 bits, as on the real device."""
    if array.dtype == np.uint16:
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32, copy=False)


class _CountingNumpy:
    """numpy as the emulated device's array module: allocating calls go through
    EmulatedCudaOps.allocate (counted, and failing when a fault is armed)."""

    _ALLOCATING = frozenset({"empty", "full", "zeros", "concatenate"})

    def __init__(self, ops: EmulatedCudaOps) -> None:
        self._ops = ops

    def __getattr__(self, name: str) -> Any:
        attr = getattr(np, name)
        if name not in self._ALLOCATING:
            return attr

        def allocating(*args: Any, **kwargs: Any) -> Any:
            self._ops.allocate()
            return attr(*args, **kwargs)

        return allocating


IndexFactory = Callable[..., Any]


class EmulatedGpuIndex(GpuIndex):
    """GpuIndex over EmulatedCudaOps: the same constructor, no CUDA device needed."""

    def _device_ops(self) -> EmulatedCudaOps:
        return EmulatedCudaOps()


class PooledShardedIndex:
    """ShardedIndex(dim, metric, dtype, **engine options) over a pool of Ray actors.

    Starting actors takes about a second each, so the test session keeps groups of
    ``shards`` actors and lends each new index a group no live index holds (configure
    resets it); a group is free again once its index is garbage. Needs ``ray_cluster``.
    """

    backend = "ray"
    needs_ray = True

    def __init__(self, shards: int) -> None:
        self.shards = shards
        self._groups: list[list[Any]] = []
        self._holders: list[weakref.ref[Any] | None] = []

    def __call__(self, dim: int, metric: str = "cosine", dtype: str = "float32",
                 **options: Any) -> Any:
        from service.cluster import ShardedIndex

        slot = self._free_slot()
        index = ShardedIndex(dim, metric, dtype, actors=self._groups[slot], **options)
        self._holders[slot] = weakref.ref(index)
        return index

    def _free_slot(self) -> int:
        for attempt in range(2):
            for slot, holder in enumerate(self._holders):
                if holder is None or holder() is None:
                    return slot
            if attempt == 0:
                gc.collect()  # an index in a reference cycle still holds its group
        from service.cluster.actors import start_shard_actors

        self._groups.append(start_shard_actors(self.shards).handles)
        self._holders.append(None)
        return len(self._groups) - 1


RAY_POOL = PooledShardedIndex(shards=3)

BACKENDS = [
    pytest.param(CpuIndex, id="cpu"),
    pytest.param(EmulatedGpuIndex, id="gpu-emulated"),
    pytest.param(GpuIndex, id="gpu", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not GPU_OK, reason=f"no GPU: {GPU_WHY}")]),
    pytest.param(RAY_POOL, id="ray", marks=pytest.mark.skipif(
        not RAY_OK, reason="ray is not installed (the `cluster` extra)")),
]


def backend_factory(request: pytest.FixtureRequest) -> Any:
    """The ``make`` fixture's value: a backend's constructor (Ray started when it needs it)."""
    if getattr(request.param, "needs_ray", False):
        request.getfixturevalue("ray_cluster")
    return request.param


def default_scratch_bytes(index: Any) -> int:
    """The scratch budget an index gets when none is set (a sharded one: its shards')."""
    if index.backend == "ray":
        shard_backend = index.memory_info()["shard_backend"]
        return int((GpuIndex if shard_backend == "gpu" else CpuIndex).default_scratch_bytes)
    return int(type(index).default_scratch_bytes)


def stored_values(vectors: np.ndarray, metric: str, dtype: str) -> np.ndarray:
    """What an index holds for these vectors, as float64."""
    v = vectors.astype(np.float64)
    if metric == "cosine":
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
    # Through float32, as an index casts (float64 -> bfloat16 directly can round a tie
    # the other way).
    return v.astype(np.float32).astype(dtype).astype(np.float64)


def reference_scores(stored: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    q = queries.astype(np.float64)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    if metric == "l2":
        return np.sqrt(np.maximum(
            (q**2).sum(1)[:, None] + (stored**2).sum(1)[None, :] - 2 * q @ stored.T, 0))
    return q @ stored.T


def reference_search(
    stored: np.ndarray, ids: np.ndarray, queries: np.ndarray, metric: str, k: int,
    threshold: float | None = None, allow: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """float64 brute force with the index's conventions (ties by id, -1 padding)."""
    scores = reference_scores(stored, queries, metric)
    closeness = -scores if metric == "l2" else scores
    missing = np.inf if metric == "l2" else -np.inf
    out_s = np.full((len(queries), k), missing)
    out_i = np.full((len(queries), k), -1, np.int64)
    for r in range(len(queries)):
        ok = np.ones(len(ids), bool)
        if allow is not None:
            ok &= np.isin(ids, allow)
        if threshold is not None:
            ok &= closeness[r] >= (-threshold if metric == "l2" else threshold)
        cand = np.flatnonzero(ok)
        order = cand[np.lexsort((ids[cand], -closeness[r, cand]))][:k]
        out_s[r, : len(order)] = scores[r, order]
        out_i[r, : len(order)] = ids[order]
    return out_s, out_i
