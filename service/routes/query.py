"""POST /v1/query {sql, params} and GET /v1/query?q=...: the SQL face."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from sqlglot.dialects import Dialect
from sqlglot.errors import SqlglotError
from sqlglot.tokens import TokenType

from service.auth import check_access
from service.routes.deps import ApiKey, SafeJSONResponse, ServicesDep, in_thread
from service.schemas import ERROR_RESPONSES, QueryBody, QueryOut

router = APIRouter(prefix="/v1", tags=["sql"], responses=ERROR_RESPONSES)

READ_STATEMENTS = {TokenType.SELECT, TokenType.WITH, TokenType.SHOW, TokenType.DESCRIBE,
                   TokenType.DESC, TokenType.L_PAREN, TokenType.VALUES}


def is_read_only(sql: str) -> bool:
    """True when every statement of the script starts as a read (SELECT, SHOW, EXPLAIN...)."""
    try:
        tokens = Dialect.get_or_raise("singlestore").tokenize(sql)
    except SqlglotError:
        return False
    first = True
    for token in tokens:
        if token.token_type == TokenType.SEMICOLON:
            first = True
            continue
        if first:
            explain = token.token_type == TokenType.VAR and token.text.upper() == "EXPLAIN"
            if token.token_type not in READ_STATEMENTS and not explain:
                return False
            first = False
    return True


def _authorize(services: ServicesDep, sql: str, key: str | None) -> None:
    s = services.settings
    check_access(key, "read" if is_read_only(sql) else "write", api_key=s.api_key,
                 read_only_api_key=s.read_only_api_key)


async def _run(services: ServicesDep, sql: str, params: Any) -> SafeJSONResponse:
    start = time.perf_counter()
    result = await in_thread(services.need_catalog().query, sql, params)
    body = result.to_dict()
    body.setdefault("types", [])
    body["took_ms"] = round((time.perf_counter() - start) * 1000, 3)
    return SafeJSONResponse(body)


def _key(x_api_key: ApiKey = None) -> str | None:
    return x_api_key


@router.post("/query", response_model=QueryOut, response_class=SafeJSONResponse)
async def query(body: QueryBody, services: ServicesDep,
                key: Annotated[str | None, Depends(_key)]) -> SafeJSONResponse:
    """Run SQL (statements separated by ';'); the last statement's columns and rows.

    A read-only API key may run only SELECT, SHOW, DESCRIBE and EXPLAIN statements.
    """
    _authorize(services, body.sql, key)
    return await _run(services, body.sql, body.params)


@router.get("/query", response_model=QueryOut, response_class=SafeJSONResponse)
async def query_get(services: ServicesDep, key: Annotated[str | None, Depends(_key)],
                    q: Annotated[str, Query(min_length=1, description="SQL")]
                    ) -> SafeJSONResponse:
    """The same as POST, for a browser or curl: `GET /v1/query?q=SHOW%20TABLES`."""
    _authorize(services, q, key)
    return await _run(services, q, None)
