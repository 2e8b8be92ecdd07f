"""POST /v1/collections/{name}/search: JSON vector search through the batcher."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.routes.deps import READ, SafeJSONResponse, ServicesDep, read_body
from service.schemas import ERROR_RESPONSES, NamePath, SearchBody, SearchOut, inline_json_body

router = APIRouter(prefix="/v1/collections/{name}", tags=["search"], responses=ERROR_RESPONSES)


def hits_json(hits: list[Any]) -> list[dict[str, Any]]:
    return [{"id": int(h.id), "score": float(h.score), "metadata": h.metadata} for h in hits]


@router.post("/search", dependencies=READ, response_model=SearchOut,
             response_class=SafeJSONResponse, openapi_extra=inline_json_body(SearchBody))
async def search(name: NamePath, request: Request, services: ServicesDep) -> SafeJSONResponse:
    """`vector` answers `{"results": [hit, ...]}`; `vectors` answers `{"results": [[hit]]}`.

    The body is parsed by pydantic-core straight from bytes (the hot path: about 0.1 ms for
    a 2048-d vector, against about 1 ms through json.loads and model validation).
    """
    start = time.perf_counter()
    raw = await read_body(request, services.settings.max_body_bytes)
    try:
        body = SearchBody.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc
    single = body.vector is not None
    queries = np.asarray([body.vector] if single else body.vectors, dtype=np.float32)
    rows = await services.need_batcher().search(name, queries, body.k,
                                                threshold=body.threshold,
                                                filter=body.filter, offset=body.offset)
    results: Any = hits_json(rows[0]) if single else [hits_json(r) for r in rows]
    took_ms = (time.perf_counter() - start) * 1000
    return SafeJSONResponse({"results": results, "took_ms": round(took_ms, 3)})
