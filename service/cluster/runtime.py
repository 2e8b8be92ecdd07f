"""Ray for the sharded index: imported only when needed, connected once per process."""

from __future__ import annotations

import signal
import threading
from types import ModuleType
from typing import Any

MISSING_RAY = "the ray backend needs the `cluster` extra: pip install 'dotsearch[cluster]'"

_connect_lock = threading.Lock()


def require_ray() -> ModuleType:
    """The ray module; RuntimeError saying which extra to install when it is missing.

    Ray is optional (one machine never needs it), so nothing imports it at module level:
    ``import service.cluster`` works without it.
    """
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError(MISSING_RAY) from exc
    return ray


def ensure_ray(address: str | None = None, *, num_cpus: int | None = None) -> None:
    """Connect this process to Ray once; later calls do nothing.

    ``address`` None starts a local Ray (no dashboard, worker logs kept out of ours);
    ``"auto"`` joins the cluster this node belongs to; ``"ray://host:10001"`` goes through
    Ray Client. Workers elsewhere must have dotsearch installed to import the shards.
    """
    ray = require_ray()
    with _connect_lock:
        if ray.is_initialized():
            return
        options: dict[str, Any] = {"log_to_driver": False, "ignore_reinit_error": True}
        if address is None:
            options.update(num_cpus=num_cpus, include_dashboard=False)
        else:
            options["address"] = address
        kept = _signal_handlers()
        try:
            ray.init(**options)
        finally:
            _restore(kept)


def _signal_handlers() -> dict[int, Any]:
    """SIGTERM's and SIGINT's handlers, when this is the main thread (else none)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}


def _restore(handlers: dict[int, Any]) -> None:
    """``ray.init`` installs its own SIGTERM handler (exit at once); the server's own (finish
    the requests in flight, then close storage) must stay."""
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def cluster_gpus() -> int:
    """How many GPUs the connected Ray cluster has (0 without any)."""
    ray = require_ray()
    return int(ray.cluster_resources().get("GPU", 0))


def cluster_cpus() -> int:
    """How many CPUs the connected Ray cluster has (at least 1)."""
    ray = require_ray()
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def default_shards() -> int:
    """One shard per GPU Ray sees, or 2 when it sees none."""
    return cluster_gpus() or 2


def shutdown_ray() -> None:
    """Disconnect (and stop the local Ray this process started, with its actors)."""
    ray = require_ray()
    if ray.is_initialized():
        ray.shutdown()
