"""GET /health (open: backend, device, featurizer, collections) and GET /metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from cpu_fallback.half_scoring import kernel_choices
from service.routes.deps import ServicesDep, in_thread

router = APIRouter(tags=["operations"])


def gpu_memory() -> dict[str, Any] | None:
    """GPU memory from service.backend when it can say, else None."""
    try:
        from service.backend import gpu_memory_info
    except ImportError:
        return None
    info = gpu_memory_info()
    return dict(info) if info else None


@router.get("/health")
async def health(services: ServicesDep) -> dict[str, Any]:
    """Liveness and what this server runs on; never needs an API key."""
    collections: list[dict[str, Any]] = []
    status = "ok"
    if services.catalog is None:
        status = "starting"
    else:
        infos = await in_thread(services.catalog.list_collections)
        shards: dict[str, list[dict[str, Any]]] = {}
        for name, state in await in_thread(services.catalog.shard_states):
            shards.setdefault(name, []).append(state)
        collections = [{"name": c.name, "count": c.count, "dim": c.dim} for c in infos]
        for entry in collections:
            if entry["name"] in shards:  # the ray backend: where each shard lives, its state
                entry["shards"] = shards[entry["name"]]
    featurizer: dict[str, Any] = {"state": services.featurizer_state}
    if services.featurizer is not None:
        featurizer.update(services.featurizer.info())
    elif services.featurizer_error:
        featurizer["error"] = services.featurizer_error
    return {"status": status, **services.backend, "gpu_memory": gpu_memory(),
            "half_precision_kernels": kernel_choices(),
            "featurizer": featurizer, "collections": collections}


@router.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus text format."""
    body = await in_thread(services.metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
