"""POST /v1/collections/{name}/search: JSON vector search through the batcher."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter

from service.routes.deps import READ, SafeJSONResponse, ServicesDep
from service.schemas import ERROR_RESPONSES, SearchBody, SearchOut

router = APIRouter(prefix="/v1/collections/{name}", tags=["search"], responses=ERROR_RESPONSES)


def hits_json(hits: list[Any]) -> list[dict[str, Any]]:
    return [{"id": int(h.id), "score": float(h.score), "metadata": h.metadata} for h in hits]


@router.post("/search", dependencies=READ, response_model=SearchOut,
             response_class=SafeJSONResponse)
async def search(name: str, body: SearchBody, services: ServicesDep) -> SafeJSONResponse:
    """`vector` answers `{"results": [hit, ...]}`; `vectors` answers `{"results": [[hit]]}`."""
    start = time.perf_counter()
    single = body.vector is not None
    queries = np.asarray([body.vector] if single else body.vectors, dtype=np.float32)
    rows = await services.need_batcher().search(name, queries, body.k,
                                                threshold=body.threshold,
                                                filter=body.filter, offset=body.offset)
    results: Any = hits_json(rows[0]) if single else [hits_json(r) for r in rows]
    took_ms = (time.perf_counter() - start) * 1000
    return SafeJSONResponse({"results": results, "took_ms": round(took_ms, 3)})
