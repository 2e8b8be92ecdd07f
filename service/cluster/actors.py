"""Starting shard actors: restarted by Ray, one GPU each where there are enough, else spread."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cpu_fallback.core import IndexUnavailable
from service.cluster.runtime import cluster_cpus, cluster_gpus, require_ray
from service.cluster.shard import ShardActor

# The BLAS thread pools an actor may start; each shard gets its share of the cluster's CPUs,
# so that shards on one node do not oversubscribe its cores.
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
# How long a fresh actor (a new worker process) or a GPU placement may take to come up.
START_TIMEOUT_S = 120.0


@dataclass
class ShardActors:
    """Actor handles, one per shard, and the placement group that holds their GPUs."""

    handles: list[Any]
    placement_group: Any | None = None

    def kill(self) -> None:
        """Kill the actors (no restart) and free the placement group."""
        ray = require_ray()
        if not ray.is_initialized():
            return  # Ray is gone, and its actors with it
        for handle in self.handles:
            ray.kill(handle, no_restart=True)
        if self.placement_group is not None:
            from ray.util import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None


def start_shard_actors(count: int, *, actor_class: type = ShardActor,
                       actor_options: dict[str, Any] | None = None) -> ShardActors:
    """``count`` actors of ``actor_class`` (not configured: none is ready yet).

    Each restarts forever (``max_restarts=-1``) and books no CPU (``num_cpus=0``, so many
    fit on a small machine); its BLAS threads are bounded to ``cpus // count``. When Ray
    sees at least ``count`` GPUs, each actor takes one, placed in a SPREAD placement group
    (one ``{"GPU": 1}`` bundle per shard); otherwise actors are spread over the nodes.
    ``actor_options`` are extra ``.options()`` (their ``runtime_env`` env_vars merge in).
    """
    ray = require_ray()
    extra = dict(actor_options or {})
    threads = str(max(1, cluster_cpus() // count))
    runtime_env = dict(extra.pop("runtime_env", None) or {})
    runtime_env["env_vars"] = {**dict.fromkeys(THREAD_VARS, threads),
                               **runtime_env.get("env_vars", {})}
    options: dict[str, Any] = {"max_restarts": -1, "num_cpus": 0, "runtime_env": runtime_env,
                               **extra}
    remote_class = ray.remote(actor_class)
    if cluster_gpus() < count:
        return ShardActors([remote_class.options(scheduling_strategy="SPREAD", **options)
                            .remote() for _ in range(count)])
    from ray.util import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = placement_group([{"GPU": 1}] * count, strategy="SPREAD")
    try:
        ray.get(group.ready(), timeout=START_TIMEOUT_S)
    except Exception as exc:
        remove_placement_group(group)
        raise IndexUnavailable(f"could not place {count} GPU shards: {exc}") from exc
    handles = [remote_class.options(
        num_gpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
            group, placement_group_bundle_index=i), **options).remote() for i in range(count)]
    return ShardActors(handles, group)
