"""Pydantic request and response bodies of the HTTP API (non-finite floats are rejected)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, model_validator

NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN, examples=["photos"])]
Vector = Annotated[list[FiniteFloat], Field(min_length=1, examples=[[0.1, 0.2, 0.3]])]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class CollectionCreate(_Strict):
    name: Name
    dim: int = Field(ge=1, le=65536, examples=[2048])
    metric: Literal["cosine", "dot", "l2"] = "cosine"
    dtype: Literal["float32", "float16"] = "float32"
    columns: dict[str, str] = Field(default_factory=dict,
                                    examples=[{"label": "VARCHAR", "year": "BIGINT"}])
    thumbnails: bool = False


class CollectionOut(BaseModel):
    name: str
    dim: int
    metric: str
    dtype: str
    columns: dict[str, str]
    count: int
    thumbnails: bool = False


class CollectionList(BaseModel):
    collections: list[CollectionOut]


class UpsertBody(_Strict):
    """Vectors with optional ids (assigned when absent) and one metadata object each."""

    ids: list[Annotated[int, Field(ge=0)]] | None = None
    vectors: list[Vector] = Field(min_length=1)
    metadata: list[dict[str, Any]] | None = None

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
    ids: list[int] = Field(min_length=1)


class DeleteOut(BaseModel):
    deleted: int


class VectorOut(BaseModel):
    id: int
    vector: list[float]
    metadata: dict[str, Any]


class SearchBody(_Strict):
    """Exactly one of ``vector`` (one query) or ``vectors`` (a batch)."""

    vector: Vector | None = None
    vectors: list[Vector] | None = Field(default=None, min_length=1)
    k: int = Field(default=10, ge=1, le=100_000)
    threshold: FiniteFloat | None = None
    filter: str | None = Field(default=None, examples=["label = 'cat' AND year > 2015"])
    offset: int = Field(default=0, ge=0)

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
    sql: str = Field(min_length=1, examples=["SELECT id, label FROM photos LIMIT 5"])
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
