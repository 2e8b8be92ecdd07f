"""POST /v1/query {sql, params} and GET /v1/query?q=...: the SQL face."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Query

from service.auth import Access
from service.routes.deps import GrantedDep, SafeJSONResponse, ServicesDep, in_thread
from service.schemas import ERROR_RESPONSES, QueryBody, QueryOut
from service.settings import MAX_SQL_CHARS

router = APIRouter(prefix="/v1", tags=["sql"], responses=ERROR_RESPONSES)


async def _run(services: ServicesDep, sql: str, params: Any, access: Access
               ) -> SafeJSONResponse:
    start = time.perf_counter()
    result = await in_thread(services.need_catalog().query, sql, params, access=access)
    body = result.to_dict()
    body.setdefault("types", [])
    body["took_ms"] = round((time.perf_counter() - start) * 1000, 3)
    return SafeJSONResponse(body)


@router.post("/query", response_model=QueryOut, response_class=SafeJSONResponse)
async def query(body: QueryBody, services: ServicesDep, granted: GrantedDep
                ) -> SafeJSONResponse:
    """Run SQL (statements separated by ';'); the last statement's columns and rows.

    A read-only API key may run only reads: SELECT (no INSERT, UPDATE or DELETE anywhere in
    it, CTEs included), SHOW, DESCRIBE and EXPLAIN of a read. The parsed statements are
    checked, all of them before any runs.
    """
    return await _run(services, body.sql, body.params, granted)


@router.get("/query", response_model=QueryOut, response_class=SafeJSONResponse)
async def query_get(services: ServicesDep, granted: GrantedDep,
                    q: Annotated[str, Query(min_length=1, max_length=MAX_SQL_CHARS,
                                            description="SQL")]
                    ) -> SafeJSONResponse:
    """The same as POST, for a browser or curl: `GET /v1/query?q=SHOW%20TABLES`."""
    return await _run(services, q, None, granted)
