"""Pydantic request and response bodies of the HTTP API, with every input limit it enforces."""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)

from service.batches import MAX_DIM, MAX_SHARDS  # the bounds the catalog checks
from service.catalog_values import ID_MAX
from service.duck_values import NAME_RE, TYPE_ALIASES
from service.index_protocol import Metric, StorageDtype
from service.settings import Settings

# -- limits (each one is stated in the OpenAPI schema and named in the 4xx that enforces it) --
# FastAPI's OpenAPI model writes the bounds of a component schema as floats, and
# float(2^63-1) is 2^63 (written 9.223372036854776e18, which generators read as ...6000):
# a body with an id bound is published inline (openapi_extra), where the bound stays exact.
MAX_K = 100_000
MAX_OFFSET = 1_000_000_000
FLOAT32_MAX = 3.4028234663852886e38  # larger finite JSON numbers overflow a float32 vector
SQL_MAX_CHARS: int = Settings.model_fields["sql_max_chars"].default
NAME_MAX = 63
RESERVED_COLLECTION_PREFIXES = ("_dotsearch", "duckdb")  # refused by the catalog, any case
RESERVED_COLUMN_NAMES = ("id", "rowid", "feature", "_thumbnail")  # any case

_LETTERS = frozenset(string.ascii_letters)
_WORD = _LETTERS | frozenset(string.digits + "_")


def _char_class(chars: Iterable[str]) -> str:
    """A regex character class for a set of ASCII letters, digits and underscores."""
    ordered = sorted(set(chars), key=ord)
    parts: list[str] = []
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ord(ordered[j + 1]) == ord(ordered[j]) + 1:
            j += 1
        parts.append(ordered[i] if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return "[" + "".join(parts) + "]"


def name_pattern(banned: Iterable[str] = (), *, prefixes: bool = False) -> str:
    """The regex of service.duck_values.NAME_RE (a letter, then up to 62 letters, digits or
    underscores) that also refuses the ``banned`` words, case-insensitively: as whole names,
    or with ``prefixes`` as name prefixes. Built without look-ahead, so pydantic-core, every
    JSON Schema validator and every generated client read it the same way."""
    words = {w.lower() for w in banned}

    def rest(done: str) -> str:
        depth = len(done)
        alphabet = _LETTERS if depth == 0 else _WORD
        nexts = {w[depth] for w in words if w.startswith(done) and len(w) > depth}
        free = alphabet - {c for n in nexts for c in (n.lower(), n.upper())}
        alternatives = []
        if free:
            alternatives.append(_char_class(free) + f"[A-Za-z0-9_]{{0,{NAME_MAX - depth - 1}}}")
        for n in sorted(nexts):
            cased = {n.lower(), n.upper()} & alphabet
            if not cased or (prefixes and done + n in words):
                continue
            alternatives.append(_char_class(cased) + rest(done + n))
        may_end = depth > 0 and done not in words
        group = "(?:" + "|".join(alternatives) + ")"
        return group + "?" if may_end else group

    return "^" + rest("") + "$"


PLAIN_NAME_PATTERN = NAME_RE.pattern
NAME_PATTERN = name_pattern(RESERVED_COLLECTION_PREFIXES, prefixes=True)
COLUMN_NAME_PATTERN = name_pattern(RESERVED_COLUMN_NAMES)
COLUMN_TYPE_PATTERN = "^ *(?:" + "|".join(
    "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in alias)
    for alias in sorted(TYPE_ALIASES, key=lambda a: (-len(a), a))) + ") *$"
IDS_TEXT_PATTERN = r"^ *[0-9]{1,19}(?: *, *[0-9]{1,19})* *$"

NAME_RULE = ("a letter, then up to 62 letters, digits or underscores; not starting with "
             "'duckdb' or '_dotsearch' (any case)")
COLUMN_RULE = ("a letter, then up to 62 letters, digits or underscores; not 'id', 'rowid' "
               "or 'feature' (any case)")


def _json_integer(value: Any) -> Any:
    """A JSON integer only: true, false and "12" are not integers here (1.0 is one)."""
    if isinstance(value, bool | str):
        raise ValueError("must be a JSON integer, not a boolean or a string")
    return value


def _decimal_text(value: Any) -> Any:
    """A path, query or form integer written in decimal digits: "+1", "1.0" are not."""
    if isinstance(value, str) and not re.fullmatch(r"-?[0-9]+", value):
        raise ValueError("must be an integer in decimal digits")
    return value


_JSON_INT = BeforeValidator(_json_integer)
DECIMAL = BeforeValidator(_decimal_text)
Id = Annotated[int, Field(strict=False, ge=0, le=ID_MAX,
                          description=f"0..{ID_MAX} (2^63-1)"), _JSON_INT]
Name = Annotated[str, Field(pattern=NAME_PATTERN, description=NAME_RULE, examples=["docs"])]
ColumnName = Annotated[str, Field(pattern=COLUMN_NAME_PATTERN, description=COLUMN_RULE)]
ColumnType = Annotated[str, Field(pattern=COLUMN_TYPE_PATTERN,
                                  description="BIGINT, DOUBLE, VARCHAR, BOOLEAN, TIMESTAMP, "
                                              "JSON or an alias (INT, TEXT, ...), any case")]
# pydantic states a dict's key pattern as patternProperties, which lets other keys through;
# propertyNames says that every key must match.
Columns = Annotated[dict[ColumnName, ColumnType], WithJsonSchema({
    "type": "object", "propertyNames": {"pattern": COLUMN_NAME_PATTERN},
    "additionalProperties": {"type": "string", "pattern": COLUMN_TYPE_PATTERN}})]
MetadataRow = Annotated[dict[ColumnName, Any], WithJsonSchema({
    "type": "object", "propertyNames": {"pattern": COLUMN_NAME_PATTERN}})]
Number = Annotated[float, Field(ge=-FLOAT32_MAX, le=FLOAT32_MAX, allow_inf_nan=False)]
Vector = Annotated[list[Number], Field(min_length=1, examples=[[0.1, 0.2, 0.3]])]
SqlText = Annotated[str, Field(min_length=1, max_length=SQL_MAX_CHARS)]
Filter = Annotated[str, Field(max_length=SQL_MAX_CHARS,
                              examples=["label = 'cat' AND year > 2015"])]

# Path parameters of every route under /v1/collections/{name}. The examples tell one story:
# `docs` is made 3-d (CollectionCreate), then given and searched with 3-d vectors; `photos`
# is made by uploading images (2048-d), then searched and classified by image.
NamePath = Annotated[str, Path(pattern=NAME_PATTERN, description=NAME_RULE,
                               examples=["docs"])]
ImageNamePath = Annotated[str, Path(pattern=NAME_PATTERN, description=NAME_RULE,
                                    examples=["photos"])]
IdPath = Annotated[int, Path(ge=0, le=ID_MAX, description=f"an id in 0..{ID_MAX} (2^63-1)"),
                   DECIMAL]


def inline_json_body(model: type[BaseModel]) -> dict[str, Any]:
    """openapi_extra for a route that reads ``model`` from a JSON body itself."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": model.model_json_schema()}}}}


class _Strict(BaseModel):
    """JSON types as the schema states them: no booleans for numbers, no "1" for 1."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


class CollectionCreate(_Strict):
    name: Name
    dim: Annotated[int, Field(strict=False, ge=1, le=MAX_DIM, examples=[3],
                              description="vector length (2048 for image features)"),
                   _JSON_INT]
    metric: Metric = "cosine"
    dtype: StorageDtype = "float32"
    columns: Columns = Field(
        default_factory=dict, examples=[{"label": "VARCHAR", "year": "BIGINT"}],
        description="metadata columns; names must differ from each other in more than case")
    thumbnails: bool = False
    shards: Annotated[int, Field(strict=False, ge=1, le=MAX_SHARDS, examples=[4],
                                 description="ray backend: shards for this collection "
                                 "(default: the server's DOTSEARCH_SHARDS)"),
                      _JSON_INT] | None = None


class CollectionOut(BaseModel):
    name: str
    dim: int
    metric: str
    dtype: str
    columns: dict[str, str] = Field(description="metadata columns, in declared order")
    count: int
    thumbnails: bool = False
    column_order: list[str] = Field(
        default_factory=list, description="every column in declared order: id, the vector "
        "column, the metadata columns")
    vector_type: str = Field(default="VECTOR", description="the vector column's declared type")
    auto_increment: bool = Field(default=False,
                                 description="the id column was declared AUTO_INCREMENT")
    shards: int | None = Field(default=None, description="the shard count this collection "
                               "asked for (ray backend); null: the server's")


class CollectionList(BaseModel):
    collections: list[CollectionOut]


class UpsertBody(_Strict):
    """Vectors with optional ids (assigned when absent) and one metadata object each."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "ids": [1], "vectors": [[0.1, 0.2, 0.3]],
        "metadata": [{"label": "cat", "year": 2020}]}]})

    ids: list[Id] | None = Field(default=None, description="as many as vectors")
    vectors: list[Vector] = Field(min_length=1, description="all of the collection's dim")
    metadata: list[MetadataRow] | None = Field(
        default=None, description="one object per vector, keys among the collection's columns")

    @model_validator(mode="after")
    def _lengths(self) -> UpsertBody:
        n = len(self.vectors)
        if self.ids is not None and len(self.ids) != n:
            raise ValueError(f"{len(self.ids)} ids for {n} vectors")
        if self.metadata is not None and len(self.metadata) != n:
            raise ValueError(f"{len(self.metadata)} metadata objects for {n} vectors")
        if len({len(v) for v in self.vectors}) > 1:
            raise ValueError("all vectors must have the same length")
        return self


class UpsertOut(BaseModel):
    upserted: int
    ids: list[int]


class DeleteBody(_Strict):
    ids: list[Id] = Field(min_length=1)


class DeleteOut(BaseModel):
    deleted: int


class VectorOut(BaseModel):
    id: int
    vector: list[float]
    metadata: dict[str, Any]


# Exactly one of `vector` and `vectors` is given (not null): JSON Schema says it with oneOf.
_ONE_QUERY_FORM: dict[str, Any] = {"oneOf": [
    {"required": ["vector"], "properties": {"vector": {"type": "array"}}},
    {"required": ["vectors"], "properties": {"vectors": {"type": "array"}}}],
    "examples": [{"vector": [0.1, 0.2, 0.3], "k": 10, "filter": "label = 'cat'"}]}


class SearchBody(_Strict):
    """Exactly one of ``vector`` (one query) or ``vectors`` (a batch)."""

    model_config = ConfigDict(json_schema_extra=_ONE_QUERY_FORM)

    vector: Vector | None = None
    vectors: list[Vector] | None = Field(default=None, min_length=1)
    k: Annotated[int, Field(strict=False, ge=1, le=MAX_K), _JSON_INT] = 10
    threshold: Annotated[float, Field(allow_inf_nan=False)] | None = None
    filter: Filter | None = None
    offset: Annotated[int, Field(strict=False, ge=0, le=MAX_OFFSET), _JSON_INT] = 0

    @model_validator(mode="after")
    def _one_query_form(self) -> SearchBody:
        if (self.vector is None) == (self.vectors is None):
            raise ValueError("give exactly one of 'vector' or 'vectors'")
        if self.vectors is not None and len({len(v) for v in self.vectors}) > 1:
            raise ValueError("all vectors must have the same length")
        return self


class Hit(BaseModel):
    id: int
    score: float
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchOut(BaseModel):
    results: list[Hit] | list[list[Hit]]
    took_ms: float


class Label(BaseModel):
    label: str
    index: int
    probability: float


class FeaturizeOut(BaseModel):
    vector: list[float]
    dim: int
    weights: str
    labels: list[Label] | None = None
    took_ms: float


class ImagesOut(BaseModel):
    collection: str
    ids: list[int]
    count: int
    took_ms: float


class ClassifyOut(BaseModel):
    label: str | None
    votes: dict[str, int]
    neighbors: list[Hit]
    took_ms: float


class QueryBody(_Strict):
    sql: SqlText = Field(examples=["SELECT id, label FROM docs LIMIT 5"])
    params: dict[str, Any] | list[Any] | None = None


class QueryOut(BaseModel):
    columns: list[str]
    types: list[str] = Field(default_factory=list)
    rows: list[Any]
    took_ms: float


class ErrorOut(BaseModel):
    error: str
    message: str
    detail: Any = None


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut} for code in (400, 401, 403, 404, 409, 413, 415, 422, 503)
}


# -- trained models --------------------------------------------------------------------

MODEL_MAX_EPOCHS: int = Settings.model_fields["model_max_epochs"].default
SEED_MAX = 2**32 - 1  # a training seed (exact in a JSON Schema bound, unlike 2^63-1)
# A model is named as a collection is (the same rule, in its own namespace).
ModelName = Annotated[str, Field(pattern=NAME_PATTERN, examples=["kind_of_photo"],
                                 description=NAME_RULE)]
ModelNamePath = Annotated[str, Path(pattern=NAME_PATTERN, description=NAME_RULE,
                                    examples=["kind_of_photo"])]


class ModelCreate(_Strict):
    """Train a classifier on a collection: its vectors, the labels in ``label_column``
    (rows whose label is NULL are skipped), the rows a ``filter`` admits."""

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "name": "kind_of_photo", "collection": "photos", "label_column": "label",
        "kind": "logistic", "holdout": 0.2, "epochs": 30, "seed": 1}]})

    name: ModelName
    collection: Annotated[str, Field(pattern=NAME_PATTERN, examples=["photos"])]
    label_column: Annotated[str, Field(pattern=PLAIN_NAME_PATTERN, examples=["label"])]
    kind: Literal["logistic", "mlp"] = "logistic"
    filter: Filter | None = None
    holdout: Annotated[float, Field(ge=0, le=0.9,
                                    description="share of each class held out for metrics")
                       ] = 0.2
    epochs: Annotated[int, Field(strict=False, ge=1, le=MODEL_MAX_EPOCHS), _JSON_INT] | None = None
    seed: Annotated[int, Field(strict=False, ge=0, le=SEED_MAX), _JSON_INT] | None = None
    hidden: Annotated[int, Field(strict=False, ge=1, le=8192, description="mlp: hidden units"),
                      _JSON_INT] | None = None


class ModelOut(BaseModel):
    name: str
    collection: str | None = None
    label_column: str | None = None
    kind: str
    state: Literal["training", "ready", "failed", "cancelled"]
    dim: int
    classes: list[str]
    created_at: str
    source: str = Field(description="the training query, or the REST request that trained it")
    options: dict[str, Any] = Field(default_factory=dict)
    progress: dict[str, Any] = Field(default_factory=dict,
                                     description="epoch, epochs and the last epoch's mean loss")
    metrics: dict[str, Any] | None = Field(
        default=None, description="holdout accuracy, macro_f1, per_class precision/recall/"
        "support, confusion (rows: true, columns: predicted) and counts; null until ready")
    error: str | None = None


class ModelList(BaseModel):
    models: list[ModelOut]


class PredictBody(_Strict):
    """Exactly one of ``vector`` (one prediction) or ``vectors`` (a batch)."""

    model_config = ConfigDict(json_schema_extra={
        "oneOf": _ONE_QUERY_FORM["oneOf"], "examples": [{"vector": [0.1, 0.2, 0.3]}]})

    vector: Vector | None = None
    vectors: list[Vector] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> PredictBody:
        if (self.vector is None) == (self.vectors is None):
            raise ValueError("give exactly one of 'vector' or 'vectors'")
        if self.vectors is not None and len({len(v) for v in self.vectors}) > 1:
            raise ValueError("all vectors must have the same length")
        return self


class Probability(BaseModel):
    label: str
    probability: float


class PredictOut(BaseModel):
    label: str
    probabilities: list[Probability] = Field(description="the top 5, best first")


class PredictManyOut(BaseModel):
    results: list[PredictOut]
