"""bfloat16 storage through the service: SQL `VECTOR(d, BF16)`, REST `"dtype": "bfloat16"`,
casts, DESCRIBE, EXPLAIN's kernel line and /health's calibrated kernels."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.api_support import make_client


@pytest.fixture
def client(tmp_path: Path):
    with make_client(tmp_path) as c:
        yield c


def sql(client: TestClient, text: str, status: int = 200) -> dict:
    r = client.post("/v1/query", json={"sql": text})
    assert r.status_code == status, r.text
    return r.json()


def test_sql_bf16_table_ranks_the_stored_values_exactly(client):
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((300, 16)).astype(np.float32)
    sql(client, "CREATE TABLE p (id BIGINT PRIMARY KEY, v VECTOR(16, BF16), tag TEXT)")
    values = ", ".join(f"({i}, '{list(map(float, v))}', 't{i % 3}')"
                       for i, v in enumerate(vectors))
    assert sql(client, f"INSERT INTO p VALUES {values}")["rows"] == [[300]]
    query = rng.standard_normal(16).astype(np.float32)
    got = sql(client, f"SELECT id, DOT_PRODUCT(v, '{list(map(float, query))}') AS s FROM p "
                      "ORDER BY s DESC LIMIT 7")
    stored = vectors.astype(ml_dtypes.bfloat16).astype(np.float64)
    exact = stored @ query.astype(np.float64)
    assert [row[0] for row in got["rows"]] == np.argsort(-exact, kind="stable")[:7].tolist()
    np.testing.assert_allclose([row[1] for row in got["rows"]], np.sort(exact)[::-1][:7],
                               rtol=1e-5)
    desc = sql(client, "DESCRIBE p")["rows"]
    assert desc[1][:2] == ["v", "VECTOR(16, BF16)"]
    plan = sql(client, f"EXPLAIN SELECT id FROM p ORDER BY DOT_PRODUCT(v, "
                       f"'{list(map(float, query))}') DESC LIMIT 3")["explain"]
    assert "bfloat16, backend cpu" in plan and "kernel: " in plan
    kernels = client.get("/health").json()["half_precision_kernels"]
    assert kernels["bfloat16"]["single"] in ("fused", "widen-blas")


def test_bf16_casts_check_the_range(client):
    ok = sql(client, "SELECT '[1.5, -2]' :> VECTOR(2, BF16) AS v")
    assert ok["types"] == ["VECTOR(2, BF16)"] and ok["rows"] == [[[1.5, -2.0]]]
    err = sql(client, "SELECT '[3.3999e38, 0]' :> VECTOR(2, BF16)", status=400)
    assert "VECTOR(2, BF16) holds values within" in err["message"]


def test_rest_bfloat16_collection(client):
    r = client.post("/v1/collections", json={"name": "r", "dim": 3, "dtype": "bfloat16",
                                              "metric": "dot"})
    assert r.status_code == 201, r.text
    assert r.json()["vector_type"] == "VECTOR(3, BF16)"
    r = client.post("/v1/collections/r/vectors",
                    json={"ids": [1, 2], "vectors": [[1 + 2**-9, 0, 0], [0, 1, 0]]})
    assert r.status_code == 200, r.text
    r = client.post("/v1/collections/r/search", json={"vector": [1, 0, 0], "k": 1})
    assert r.json()["results"][0]["score"] == 1.0  # 1 + 2^-9 is stored as bfloat16 1.0
    r = client.post("/v1/collections", json={"name": "s", "dim": 3, "dtype": "bfloat8"})
    assert r.status_code == 422
