"""Property-based fuzzing of the HTTP API from its own OpenAPI schema, with schemathesis."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from PIL import Image

from service.app import create_app
from service.schemas import ID_MAX, NAME_PATTERN
from service.settings import Settings

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.core.parameters import ParameterLocation  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

# Requests go to these collections: `t`, `u` and `v` exist (4-d, cosine, column `label`,
# ids 1..3), `pics` holds three uploaded images (2048-d, ids 1..3, with thumbnails),
# `nope` does not exist (a 404 is then the right answer). Deletes go to `u` and `v`, so
# that the other operations still find `t` with its data; image routes go to `pics`.
# Models `t` and `u` are trained on `t`'s labels; model deletes go to `u`.
SEEDED = ("t", "u", "v")
DIM_OF_SEEDED = 4
NAMES = ("t", "t", "nope")
IMAGES = ("pics", "pics", "nope")
NAMES_FOR = {"DELETE /v1/collections/{name}": ("u", "nope"),
             "DELETE /v1/collections/{name}/vectors": ("v", "v", "nope"),
             "POST /v1/collections/{name}/images": IMAGES,
             "POST /v1/collections/{name}/search/image": IMAGES,
             "POST /v1/collections/{name}/classify": IMAGES,
             "GET /v1/collections/{name}/vectors/{id}/thumbnail": IMAGES,
             "DELETE /v1/models/{name}": ("u", "nope")}
IDS = (1, 2, 3, 0, 7)

# Refusals of schema-valid requests that a JSON schema cannot state, per operation, as
# (status, error name, message pattern, body media types or None for any). Anything else
# a schema-valid request gets must be a 2xx, or a 404 (no such collection, id or
# thumbnail) or 409 (exists): those depend on the state, not on the request.
BINARY = ("application/octet-stream", "application/x-npy", "multipart/form-data")
# A vector's length must be the collection's dim, which the schema does not know.
DIM = (422, "invalid_input", r"vectors must have shape|all vectors must have the same length"
                             r"|expected an array of shape|-d vectors; image features", None)
# A filter or a statement is SQL text, and SQL grammar, names and types are not a schema.
SQL = (400, "query", r".", None)
# Bytes are not an image: whether they decode is not a schema either.
NOT_AN_IMAGE = (415, "unsupported_media_type", r"empty file|not an image|format \w+ is not "
                                               r"supported|truncated or corrupt", None)
EXPECTED_REFUSALS: dict[str, list[tuple[int, str, str, tuple[str, ...] | None]]] = {
    # Column names must differ in more than case: JSON Schema cannot compare two keys.
    "POST /v1/collections": [(422, "invalid_input", r"given twice", None)],
    "POST /v1/collections/{name}/vectors": [
        DIM,
        # One id and one metadata object per vector (lengths cannot be compared); metadata
        # keys and value types come from the collection's columns; a cosine collection
        # cannot hold a zero vector (a norm is not a schema).
        (422, "invalid_input", r"\d+ ids for \d+ vectors|\d+ metadata objects for"
                               r"|unknown metadata columns|metadata '\w+' \(\w+\): unacceptable"
                               r"|zero vector", ("application/json",)),
        # A binary body is packed float32 or .npy bytes whose size and header decide; its
        # ids are a text, .npy or packed part; ids and id_start exclude each other and
        # id_start + n - 1 must stay within 2^63-1 (parameters cannot depend on each other
        # or on the body in OpenAPI).
        (422, "invalid_input", r"packed float32 body|readable \.npy|expected a float array"
                               r"|ids part|ids must|vectors for \d+ ids|id_start \d+ with"
                               r"|multipart upsert needs|metadata part|metadata must"
                               r"|unknown metadata|each metadata|zero vector", BINARY),
        (400, "bad_request", r"give ids or id_start, not both", BINARY),
    ],
    # A cosine collection cannot rank by a zero query vector.
    "POST /v1/collections/{name}/search": [DIM, SQL, (422, "invalid_input", r"zero vector", None)],
    # One id and one label per file (counts cannot be compared); an id's text pattern
    # states its digits, not the value 2^63-1.
    "POST /v1/collections/{name}/images": [
        NOT_AN_IMAGE, DIM, (422, "invalid_input", r"\d+ (ids|labels) for \d+ files"
                                                  r"|ids must be in 0\.\.", None)],
    "POST /v1/collections/{name}/search/image": [NOT_AN_IMAGE, DIM, SQL],
    "POST /v1/collections/{name}/classify": [
        NOT_AN_IMAGE, DIM, SQL, (422, "invalid_input", r"has no column", None)],
    "POST /v1/featurize": [NOT_AN_IMAGE],
    "POST /v1/query": [SQL],
    "GET /v1/query": [SQL],
    # The training rows decide: the label column must exist in the collection, not be
    # its vector column, and hold two classes or more; the filter is SQL.
    "POST /v1/models": [SQL, (422, "invalid_input", r"has no column|vector column"
                                                    r"|at least two classes", None)],
    # A model takes vectors of its own length; an image must decode.
    "POST /v1/models/{name}/predict": [
        NOT_AN_IMAGE, (422, "invalid_input", r"takes \d+-d vectors|multipart predict needs",
                       None)],
}


class RandomFeaturizer:
    """A seeded stand-in for Inception-v3: the image routes' contract without the model
    (the real one, even with random weights, takes about 25 s to build on two cores)."""

    dim = 2048
    pretrained = False
    weights_name = "random"

    def featurize(self, images: list[Any]) -> np.ndarray:
        rng = np.random.default_rng(len(images))
        return rng.standard_normal((len(images), self.dim)).astype(np.float32)

    def featurize_with_labels(self, images: list[Any]) -> tuple[np.ndarray, list[list[Any]]]:
        return self.featurize(images), [[] for _ in images]

    def info(self) -> dict[str, Any]:
        return {"weights": self.weights_name, "pretrained": False, "dim": self.dim}


def _openapi() -> dict[str, Any]:
    """The app's OpenAPI document (building an app reads no files; its lifespan would)."""
    unused = Settings(data_dir=Path("unused"), load_featurizer=False,
                      _env_file=None)  # type: ignore[call-arg]
    return create_app(unused).openapi()


# A .npy upsert body goes out as the generated bytes, like application/octet-stream.
schemathesis.serializer.alias("application/x-npy", "application/octet-stream")

# The schema's examples, its boundary values (coverage phase) and a few positive and
# negative cases per operation (fuzzing phase), the same ones on every run.
SCHEMA = schemathesis.openapi.from_dict(_openapi(), config=schemathesis.Config.from_dict({
    "generation": {"mode": "all", "deterministic": True, "max-examples": 12},
    "phases": {"stateful": {"enabled": False}},
}))


@SCHEMA.hook
def map_path_parameters(context: Any, path_parameters: dict[str, Any] | None) -> Any:
    """A valid name becomes one from NAMES and a valid id one from IDS, so requests hit
    real data; invalid ones (negative cases) are kept, so their refusal is tested."""
    if not path_parameters:
        return path_parameters
    name = path_parameters.get("name")
    if isinstance(name, str) and re.fullmatch(NAME_PATTERN, name):
        names = NAMES_FOR.get(getattr(context.operation, "label", ""), NAMES)
        path_parameters["name"] = names[len(name) % len(names)]
    ident = path_parameters.get("id")
    if isinstance(ident, int) and not isinstance(ident, bool) and 0 <= ident <= ID_MAX:
        path_parameters["id"] = IDS[ident % len(IDS)]
    return path_parameters


def _png(seed: int) -> bytes:
    """A small seeded-random RGB image as PNG bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _fit(vectors: Any) -> Any:
    """Vectors cut or padded (with 0.5) to DIM_OF_SEEDED numbers; still schema-valid."""
    if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
        return vectors
    return [(v + [0.5] * DIM_OF_SEEDED)[:DIM_OF_SEEDED] for v in vectors]


@SCHEMA.hook
def map_case(context: Any, case: Any) -> Any:
    """A positive search or upsert on a seeded collection gets vectors of its length, so
    that it reaches the engine rather than stopping at the (expected) length check."""
    positive = case.meta is not None and case.meta.generation.mode.is_positive
    name = (case.path_parameters or {}).get("name")
    if positive and name in SEEDED and isinstance(case.body, dict):
        if "vector" in case.body:
            case.body["vector"] = _fit([case.body["vector"]])[0]
        if "vectors" in case.body:
            case.body["vectors"] = _fit(case.body["vectors"])
    return case


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The app under test, on a data directory seeded with SEEDED."""
    data_dir = tmp_path_factory.mktemp("fuzz") / "data"
    s = Settings(data_dir=data_dir, load_featurizer=False, model_max_training=64,  # type: ignore[call-arg]
                 _env_file=None)
    with TestClient(create_app(s, featurizer=RandomFeaturizer())) as seed:
        for name in SEEDED:
            assert seed.post("/v1/collections", json={
                "name": name, "dim": DIM_OF_SEEDED,
                "columns": {"label": "VARCHAR"}}).status_code == 201
            assert seed.post(f"/v1/collections/{name}/vectors", json={
                "ids": [1, 2, 3], "vectors": [[1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]],
                "metadata": [{"label": "cat"}, {"label": "dog"}, {}]}).status_code == 200
        files = [("files", (f"{i}.png", _png(i), "image/png")) for i in range(3)]
        r = seed.post("/v1/collections/pics/images", files=files,
                      data={"ids": "1,2,3", "labels": "cat,dog,cat"})
        assert r.status_code == 200, r.text
        for model in ("t", "u"):
            r = seed.post("/v1/models", json={"name": model, "collection": "t",
                                              "label_column": "label", "epochs": 1})
            assert r.status_code == 202, r.text
            while seed.get(f"/v1/models/{model}").json()["state"] == "training":
                time.sleep(0.02)
    application = create_app(s, featurizer=RandomFeaturizer())
    SCHEMA.app = application  # schemathesis then calls it in process (ASGI, lifespan too)
    yield application
    SCHEMA.app = None


def expected_refusal(case: Any, response: Any) -> bool:
    """True for a refusal that the schema cannot state (see EXPECTED_REFUSALS)."""
    try:
        body = response.json()
    except ValueError:
        return False
    if not isinstance(body, dict):
        return False
    label = f"{case.method.upper()} {case.operation.path}"
    for status, error, message, media in EXPECTED_REFUSALS.get(label, []):
        if (response.status_code == status and str(body.get("error", "")).startswith(error)
                and re.search(message, str(body.get("message", "")))
                and (media is None or case.media_type in media)):
            return True
    return False


def accepts_schema_valid(ctx: Any, response: Any, case: Any) -> bool | None:
    """Like schemathesis' positive_data_acceptance, with EXPECTED_REFUSALS allowed."""
    meta = case.meta
    if meta is None or not meta.generation.mode.is_positive:
        return None
    if response.status_code < 300 or response.status_code in (404, 409):
        return None
    if expected_refusal(case, response):
        return None
    raise AssertionError(f"schema-valid request refused: {response.status_code} "
                         f"{response.text[:300]}")


def rejects_schema_invalid(ctx: Any, response: Any, case: Any) -> bool | None:
    """schemathesis' negative_data_rejection, except for a multipart form whose body alone
    breaks the schema: every form field is text on the wire, so a number, null or object
    sent for a text field arrives as text, and an empty value as an absent field (FastAPI),
    which the server may rightly accept."""
    meta = case.meta
    if (case.media_type == "multipart/form-data" and meta is not None
            and meta.is_negative_at(ParameterLocation.BODY)
            and not any(meta.is_negative_at(where) for where in ParameterLocation
                        if where is not ParameterLocation.BODY)):
        return None
    return negative_data_rejection(ctx, response, case)


@SCHEMA.parametrize()
@settings(deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_follows_its_schema(case, app):
    """No 5xx, every response as documented, no schema-valid request refused, and no
    request that the schema forbids accepted."""
    case.call_and_validate(
        checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                response_schema_conformance, rejects_schema_invalid, accepts_schema_valid],
        app=app,
    )


def test_the_fuzzed_names_are_valid():
    names = [*NAMES, *(n for group in NAMES_FOR.values() for n in group)]
    assert all(re.fullmatch(NAME_PATTERN, n) for n in names)


def test_an_unexpected_refusal_is_reported():
    """The acceptance check can fail: a refusal outside EXPECTED_REFUSALS is one."""

    class Case:
        method, media_type = "post", "application/json"
        meta = type("Meta", (), {"generation": type("G", (), {"mode": type(
            "M", (), {"is_positive": True})()})()})()
        operation = type("Op", (), {"path": "/v1/collections/{name}/vectors"})()

    class Response:
        status_code = 422
        text = '{"error": "invalid_input", "message": "ids.0: less than or equal"}'

        def json(self) -> dict[str, str]:
            return {"error": "invalid_input", "message": "ids.0: less than or equal"}

    with pytest.raises(AssertionError, match="schema-valid request refused"):
        accepts_schema_valid(None, Response(), Case())
    Response.json = lambda self: {"error": "invalid_input",  # type: ignore[method-assign]
                                  "message": "2 ids for 3 vectors"}
    assert accepts_schema_valid(None, Response(), Case()) is None
