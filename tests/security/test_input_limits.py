"""Input limits of the HTTP API (issue 15): ids, id_start, k, offset, dim, names, SQL size."""

from __future__ import annotations

import io
import re
import string
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service.app import create_app
from service.catalog_values import as_id_array
from service.duck_values import NAME_RE
from service.errors import InvalidInput
from service.schemas import (
    COLUMN_NAME_PATTERN,
    ID_MAX,
    MAX_DIM,
    MAX_K,
    MAX_OFFSET,
    NAME_PATTERN,
    SQL_MAX_CHARS,
)
from service.settings import Settings

ABOVE = ID_MAX + 1  # 2^63, the first id that does not fit a signed 64-bit integer
LIMIT = re.compile(f"{ID_MAX}|{ABOVE}")  # a refusal names 2^63-1 or (less than) 2^63


def seeded_client(data_dir):
    """Collection `t` (4-d dot, column label) holding ids 0, 1, 2."""
    s = Settings(data_dir=data_dir, load_featurizer=False, _env_file=None)  # type: ignore[call-arg]
    # A stand-in featurizer: the image routes check ids and names before they featurize.
    with TestClient(create_app(s, featurizer=SimpleNamespace(dim=2048))) as c:
        r = c.post("/v1/collections", json={"name": "t", "dim": 4, "metric": "dot",
                                            "columns": {"label": "VARCHAR"}})
        assert r.status_code == 201, r.text
        r = c.post("/v1/collections/t/vectors", json={
            "ids": [0, 1, 2], "vectors": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]})
        assert r.status_code == 200, r.text
        yield c


@pytest.fixture
def client(tmp_path):
    """A fresh seeded app, for the tests that change it."""
    yield from seeded_client(tmp_path / "data")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One seeded app for the tests that only send requests it must refuse."""
    yield from seeded_client(tmp_path_factory.mktemp("shared") / "data")


def refused(response, *, status: int = 422, names: str | re.Pattern[str] | None = None) -> str:
    """The error message of a refusal, checked for status, error name and the limit."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == ("invalid_input" if status == 422 else body["error"])
    message = body["message"] + " " + str(body.get("detail", ""))
    if isinstance(names, str):
        assert names in message, message
    elif names is not None:
        assert names.search(message), message
    return message


def count(client) -> int:
    return int(client.get("/v1/collections/t").json()["count"])


def packed(n: int) -> bytes:
    return np.ones((n, 4), dtype="<f4").tobytes()


# -- booleans are never ids ------------------------------------------------------------


@pytest.mark.parametrize("ids", [[False], [True], [True, 2], [0, False]])
def test_json_delete_refuses_boolean_ids(shared, ids):
    refused(shared.request("DELETE", "/v1/collections/t/vectors", json={"ids": ids}))
    assert count(shared) == 3
    assert shared.get("/v1/collections/t/vectors/0").status_code == 200


@pytest.mark.parametrize("ids", [[False], [True], ["1"]])
def test_json_upsert_refuses_boolean_and_string_ids(shared, ids):
    refused(shared.post("/v1/collections/t/vectors",
                        json={"ids": ids, "vectors": [[0, 0, 0, 1]]}))
    assert count(shared) == 3


@pytest.mark.parametrize("ids", [True, False, [True, 5], np.array([True, False]),
                                 [np.bool_(False)], (1, True)])
def test_as_id_array_refuses_booleans(ids):
    with pytest.raises(InvalidInput, match="boolean"):
        as_id_array(ids)


def test_as_id_array_range():
    assert as_id_array([0, ID_MAX]).tolist() == [0, ID_MAX]
    assert as_id_array(np.array([7], dtype=np.uint64)).tolist() == [7]
    assert as_id_array([3.0]).tolist() == [3]
    for ids in ([ABOVE], [2**70], np.array([ABOVE], dtype=np.uint64), [9.3e18], [-1],
                [-(2**63)], [-(2**64)]):
        with pytest.raises(InvalidInput, match=str(ID_MAX)):
            as_id_array(ids)
    for ids in ([1.5], [None], ["a"], [float("nan")]):
        with pytest.raises(InvalidInput):
            as_id_array(ids)


def test_json_flags_and_dims_are_not_booleans(shared):
    r = shared.post("/v1/collections", json={"name": "b", "dim": True})
    refused(r)
    r = shared.post("/v1/collections", json={"name": "b", "dim": 4, "thumbnails": 1})
    refused(r)
    r = shared.post("/v1/collections/t/search", json={"vector": [1, 0, 0, 0], "k": True})
    refused(r)
    r = shared.post("/v1/collections/t/search", json={"vector": [True, 0, 0, 0]})
    refused(r)


# -- ids and id_start fit a signed 64-bit integer ---------------------------------------


def test_id_start_overflow_is_422_naming_the_limit(client):
    headers = {"content-type": "application/octet-stream"}
    r = client.post(f"/v1/collections/t/vectors?id_start={ID_MAX}", content=packed(2),
                    headers=headers)
    refused(r, names=LIMIT)
    r = client.post(f"/v1/collections/t/vectors?id_start={ID_MAX - 1}", content=packed(3),
                    headers=headers)
    refused(r, names=LIMIT)
    r = client.post(f"/v1/collections/t/vectors?id_start={ABOVE}", content=packed(1),
                    headers=headers)
    refused(r, names=LIMIT)
    assert count(client) == 3
    r = client.post(f"/v1/collections/t/vectors?id_start={ID_MAX - 1}", content=packed(2),
                    headers=headers)
    assert r.status_code == 200 and r.json()["ids"] == [ID_MAX - 1, ID_MAX], r.text


def test_ids_above_int64_are_refused_everywhere(shared):
    r = shared.post("/v1/collections/t/vectors", json={"ids": [ABOVE], "vectors": [[1, 1, 1, 1]]})
    refused(r, names=LIMIT)
    r = shared.request("DELETE", "/v1/collections/t/vectors", json={"ids": [ABOVE]})
    refused(r, names=LIMIT)
    refused(shared.get(f"/v1/collections/t/vectors/{ABOVE}"), names=LIMIT)
    refused(shared.get(f"/v1/collections/t/vectors/{ABOVE}/thumbnail"), names=LIMIT)
    r = shared.post(f"/v1/collections/t/vectors?ids={ABOVE}", content=packed(1),
                    headers={"content-type": "application/octet-stream"})
    refused(r, names=LIMIT)
    buf = io.BytesIO()
    np.save(buf, np.array([ABOVE], dtype=np.uint64))
    r = shared.post("/v1/collections/t/vectors", files={
        "vectors": ("v.bin", packed(1), "application/octet-stream"),
        "ids": ("ids.npy", buf.getvalue(), "application/octet-stream")})
    refused(r, names=LIMIT)
    for ids in ({"data": {"ids": str(ABOVE)}},
                {"files": {"ids": ("ids.txt", str(ABOVE).encode(), "text/plain")}}):
        r = shared.post("/v1/collections/t/vectors", data=ids.get("data"), files={
            "vectors": ("v.bin", packed(1), "application/octet-stream"), **ids.get("files", {})})
        refused(r, names=LIMIT)
    r = shared.post("/v1/collections/t/images", data={"ids": str(ABOVE)},
                    files={"files": ("a.jpg", b"not decoded", "image/jpeg")})
    refused(r, names=LIMIT)
    assert count(shared) == 3


@pytest.mark.parametrize("text", ["+1", "1.0", "1e3", "0x1", " 1"])
def test_path_and_query_ids_are_decimal_integers(shared, text):
    refused(shared.get(f"/v1/collections/t/vectors/{text}"), names="decimal")
    r = shared.post("/v1/collections/t/vectors", params={"id_start": text}, content=packed(1),
                    headers={"content-type": "application/octet-stream"})
    refused(r, names="decimal")


def test_negative_ids_are_refused_everywhere(shared):
    r = shared.post("/v1/collections/t/vectors", json={"ids": [-1], "vectors": [[1, 1, 1, 1]]})
    refused(r)
    refused(shared.request("DELETE", "/v1/collections/t/vectors", json={"ids": [-1]}))
    refused(shared.get("/v1/collections/t/vectors/-1"))
    r = shared.post("/v1/collections/t/vectors?ids=-1", content=packed(1),
                    headers={"content-type": "application/octet-stream"})
    refused(r)
    r = shared.post("/v1/collections/t/vectors", files={
        "vectors": ("v.bin", packed(1), "application/octet-stream"),
        "ids": ("ids.bin", np.array([-5], dtype="<i8").tobytes(), "application/octet-stream")})
    refused(r, names=LIMIT)
    assert count(shared) == 3


def test_npy_bodies_must_be_one_honest_array(shared):
    """No .npz archive (np.load opens one: a 500 before) and no header that declares more
    data than the body holds (numpy allocates the declared size first: a MemoryError)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (2**40, 4)})
    archive = io.BytesIO()
    np.savez(archive, vectors=np.ones((1, 4), dtype=np.float32))
    for body in (header.getvalue(), archive.getvalue()):
        r = shared.post("/v1/collections/t/vectors", content=body,
                        headers={"content-type": "application/x-npy"})
        refused(r, names=".npy")
        r = shared.post("/v1/collections/t/vectors", files={
            "vectors": ("v.bin", packed(1), "application/octet-stream"),
            "ids": ("ids.npy", body, "application/octet-stream")})
        assert r.status_code == 422, r.text
    assert count(shared) == 3


def test_image_ids_count_matches_files(shared):
    r = shared.post("/v1/collections/t/images", data={"ids": "5,6"},
                    files={"files": ("a.jpg", b"not decoded", "image/jpeg")})
    refused(r, names="2 ids for 1 files")


def test_assigned_ids_never_overflow(client):
    r = client.post("/v1/collections/t/vectors", json={"ids": [ID_MAX],
                                                       "vectors": [[1, 1, 1, 1]]})
    assert r.status_code == 200, r.text
    r = client.post("/v1/collections/t/vectors", json={"vectors": [[1, 2, 3, 4]]})
    refused(r, names=LIMIT)
    assert count(client) == 4


# -- k, offset, dim ---------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "limit"), [
    ("k", 0, "1"), ("k", MAX_K + 1, str(MAX_K)), ("k", -3, "1"),
    ("offset", -1, "0"), ("offset", MAX_OFFSET + 1, str(MAX_OFFSET)),
])
def test_search_k_and_offset_limits(shared, field, value, limit):
    r = shared.post("/v1/collections/t/search", json={"vector": [1, 0, 0, 0], field: value})
    refused(r, names=limit)


def test_search_limits_at_the_edge_are_accepted(shared):
    r = shared.post("/v1/collections/t/search", json={"vector": [1, 0, 0, 0], "k": 1,
                                                      "offset": 0})
    assert r.status_code == 200 and [h["id"] for h in r.json()["results"]] == [0], r.text


def test_dim_limit_is_the_catalogs():
    from service.batches import MAX_DIM as CATALOG_MAX_DIM

    assert MAX_DIM == CATALOG_MAX_DIM


@pytest.mark.parametrize(("dim", "limit"), [(0, "1"), (MAX_DIM + 1, str(MAX_DIM)), (-1, "1")])
def test_dim_limits(shared, dim, limit):
    refused(shared.post("/v1/collections", json={"name": "d", "dim": dim}), names=limit)


def test_image_search_k_limit(shared):
    r = shared.post("/v1/collections/t/search/image", data={"k": str(MAX_K + 1)},
                    files={"file": ("a.jpg", b"x", "image/jpeg")})
    refused(r, names=str(MAX_K))


# -- names ------------------------------------------------------------------------------

BAD_NAMES = ["_t", "1abc", "a-b", "x" * 64, "t\n", "é"]
RESERVED_NAMES = ["duckdb_tables", "DuckDB", "duckdbx", "_dotsearch_meta"]


@pytest.mark.parametrize("name", BAD_NAMES + RESERVED_NAMES)
def test_bad_collection_names_in_body(shared, name):
    refused(shared.post("/v1/collections", json={"name": name, "dim": 4}))


@pytest.mark.parametrize("name", BAD_NAMES[:4] + RESERVED_NAMES)
@pytest.mark.parametrize(("method", "path", "kwargs"), [
    ("GET", "", {}), ("DELETE", "", {}),
    ("POST", "/search", {"json": {"vector": [1, 0, 0, 0]}}),
    ("DELETE", "/vectors", {"json": {"ids": [1]}}),
    ("GET", "/vectors/1", {}),
    ("POST", "/images", {"files": {"files": ("a.jpg", b"x", "image/jpeg")}}),
])
def test_bad_collection_names_in_path(shared, name, method, path, kwargs):
    r = shared.request(method, f"/v1/collections/{name}{path}", **kwargs)
    refused(r, names="name")
    assert shared.get("/v1/collections").json()["collections"][0]["name"] == "t"


@pytest.mark.parametrize("column", ["id", "ROWID", "Feature", "_thumbnail", "_x", "1a", "a b"])
def test_bad_column_names(shared, column):
    refused(shared.post("/v1/collections", json={"name": "c", "dim": 4,
                                                 "columns": {column: "VARCHAR"}}))


def test_column_types_as_the_schema_says(client):
    r = client.post("/v1/collections", json={"name": "c", "dim": 4, "columns": {
        "a": "int", "b": " Text ", "c": "DOUBLE", "d": "json"}})
    assert r.status_code == 201, r.text
    refused(client.post("/v1/collections", json={"name": "e", "dim": 4,
                                                 "columns": {"a": "BLOB"}}))


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(string.ascii_letters + string.digits + "_-", max_size=70),
    st.builds(lambda p, s: p + s,
              st.sampled_from(["duckdb", "DUCKDB", "dUcKd", "duck", "d", "id", "ROWID",
                               "feature", "Featur", "_dotsearch", "rowi"]),
              st.text(string.ascii_letters + string.digits + "_", max_size=5)),
))
def test_schema_name_patterns_match_the_server_rules(name):
    plain = NAME_RE.fullmatch(name) is not None
    reserved = name.lower().startswith(("duckdb", "_dotsearch"))
    assert (re.fullmatch(NAME_PATTERN, name) is not None) == (plain and not reserved)
    column_reserved = name.lower() in ("id", "rowid", "feature", "_thumbnail")
    assert (re.fullmatch(COLUMN_NAME_PATTERN, name) is not None) == (
        plain and not column_reserved)


# -- SQL size ---------------------------------------------------------------------------


def test_sql_text_over_the_limit_is_refused_unrun(shared):
    sql = "SELECT 1 --" + "x" * (SQL_MAX_CHARS - 10)
    assert len(sql) == SQL_MAX_CHARS + 1
    refused(shared.post("/v1/query", json={"sql": sql}), names=str(SQL_MAX_CHARS))


# -- the OpenAPI schema states every limit ----------------------------------------------


def exact(bound: object) -> object:
    """An id bound as published: an int (a float cannot say 2^63-1; it would say 2^63)."""
    assert isinstance(bound, int), f"{bound!r} is not exact"
    return bound


def test_openapi_states_the_limits(shared):
    spec = shared.get("/openapi.json").json()
    name_routes = 0
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            params = {p["name"]: p for p in op.get("parameters", []) if p["in"] == "path"}
            if "{name}" in path:
                name_routes += 1
                assert params["name"]["schema"]["pattern"] == NAME_PATTERN, (method, path)
            if "{id}" in path:
                bounds = params["id"]["schema"]
                assert bounds["minimum"] == 0 and exact(bounds["maximum"]) == ID_MAX, path
    assert name_routes >= 10
    schemas = spec["components"]["schemas"]
    create = schemas["CollectionCreate"]["properties"]
    assert create["name"]["pattern"] == NAME_PATTERN
    assert create["columns"]["propertyNames"]["pattern"] == COLUMN_NAME_PATTERN
    assert (create["dim"]["minimum"], create["dim"]["maximum"]) == (1, MAX_DIM)
    assert schemas["QueryBody"]["properties"]["sql"]["maxLength"] == SQL_MAX_CHARS
    delete = spec["paths"]["/v1/collections/{name}/vectors"]["delete"]
    delete_ids = delete["requestBody"]["content"]["application/json"]["schema"]
    assert exact(delete_ids["properties"]["ids"]["items"]["maximum"]) == ID_MAX
    upsert = spec["paths"]["/v1/collections/{name}/vectors"]["post"]
    query = {p["name"]: p["schema"] for p in upsert["parameters"] if p["in"] == "query"}
    assert exact(query["id_start"]["maximum"]) == ID_MAX
    body = upsert["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert exact(body["ids"]["anyOf"][0]["items"]["maximum"]) == ID_MAX
    search = spec["paths"]["/v1/collections/{name}/search"]["post"]
    props = search["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert (props["k"]["minimum"], props["k"]["maximum"]) == (1, MAX_K)
    assert (props["offset"]["minimum"], props["offset"]["maximum"]) == (0, MAX_OFFSET)


def test_the_schema_states_the_configured_sql_bound(tmp_path):
    """DOTSEARCH_SQL_MAX_CHARS is what /openapi.json says, and what the server enforces."""
    s = Settings(data_dir=tmp_path / "data", load_featurizer=False, sql_max_chars=5000,  # type: ignore[call-arg]
                 _env_file=None)
    with TestClient(create_app(s)) as client:
        schema = client.get("/openapi.json").json()
        assert schema["components"]["schemas"]["QueryBody"]["properties"]["sql"][
            "maxLength"] == 5000
        q = next(p for p in schema["paths"]["/v1/query"]["get"]["parameters"]
                 if p["name"] == "q")
        assert q["schema"]["maxLength"] == 5000
        fits = "SELECT 1" + " " * (5000 - len("SELECT 1"))
        assert client.post("/v1/query", json={"sql": fits}).status_code == 200
        over = client.post("/v1/query", json={"sql": fits + " "})
        assert over.status_code == 400 and over.json()["error"] == "query_too_large"
    with pytest.raises(ValueError, match="less than or equal"):
        Settings(sql_max_chars=2_000_000, _env_file=None)  # type: ignore[call-arg]
