"""The ray backend: a sharded index on Ray actors that is one more VectorIndex.

Ray is an optional extra (``pip install 'dotsearch[cluster]'``): importing this package
never imports it; the functions that need it do, and say what to install when it is missing.
"""

from service.cluster.calls import SHARD_STATES
from service.cluster.routing import shard_of_ids
from service.cluster.runtime import cluster_gpus, default_shards, ensure_ray, shutdown_ray
from service.cluster.shard import ShardActor, ShardNotReady
from service.cluster.sharded import ShardedIndex

__all__ = [
    "SHARD_STATES",
    "ShardActor",
    "ShardNotReady",
    "ShardedIndex",
    "cluster_gpus",
    "default_shards",
    "ensure_ray",
    "shard_of_ids",
    "shutdown_ray",
]
