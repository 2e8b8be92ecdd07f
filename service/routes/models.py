"""Trained models: train (in the background), list, describe, drop or cancel, predict."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Request

from service.errors import InvalidInput, UnsupportedMediaType
from service.models import ModelInfo
from service.models.usecase import train_collection
from service.routes.deps import READ, WRITE, ServicesDep, in_thread, json_body
from service.routes.images import IMAGE_SCHEMA, featurize_uploads
from service.schemas import (
    ERROR_RESPONSES,
    ModelCreate,
    ModelList,
    ModelNamePath,
    ModelOut,
    PredictBody,
    PredictManyOut,
    PredictOut,
    Probability,
)

router = APIRouter(prefix="/v1/models", tags=["models"], responses=ERROR_RESPONSES)
TOP_PROBABILITIES = 5


def model_out(info: ModelInfo) -> ModelOut:
    return ModelOut.model_validate(info.as_dict())


@router.post("", status_code=202, dependencies=WRITE)
async def train(body: ModelCreate, services: ServicesDep) -> ModelOut:
    """Train a classifier on a collection's vectors and a label column. The training rows
    are read and checked now; training runs in the background (202, state `training`):
    `GET /v1/models/{name}` shows its progress and, once ready, its holdout metrics."""
    info = await in_thread(train_collection, services.need_catalog(), body.name,
                           body.collection, body.label_column, body.kind, filter=body.filter,
                           holdout=body.holdout, epochs=body.epochs, seed=body.seed,
                           hidden=body.hidden)
    return model_out(info)


@router.get("", dependencies=READ)
async def list_models(services: ServicesDep) -> ModelList:
    infos = await in_thread(services.need_catalog().models.list)
    return ModelList(models=[model_out(i) for i in infos])


@router.get("/{name}", dependencies=READ)
async def get_model(name: ModelNamePath, services: ServicesDep) -> ModelOut:
    return model_out(await in_thread(services.need_catalog().models.get, name))


@router.delete("/{name}", dependencies=WRITE)
async def drop_model(name: ModelNamePath, services: ServicesDep) -> dict[str, str]:
    """Drop a model; a model still training is cancelled (its state becomes `cancelled`,
    nothing is stored; a second DELETE forgets it)."""
    models = services.need_catalog().models
    found = models.resolve(name) or name
    await in_thread(models.drop, found)
    return {"dropped": found}


def _predictions(labels: list[str], probs: npt.NDArray[np.float32], classes: list[str]
                 ) -> list[PredictOut]:
    top = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_PROBABILITIES]
    return [PredictOut(label=label, probabilities=[
        Probability(label=classes[j], probability=float(row[j])) for j in order])
        for label, row, order in zip(labels, probs, top, strict=True)]


@router.post("/{name}/predict", dependencies=READ, openapi_extra={
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": PredictBody.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": IMAGE_SCHEMA}}}}}})
async def predict(name: ModelNamePath, request: Request, services: ServicesDep
                  ) -> PredictOut | PredictManyOut:
    """The label and the top-5 class probabilities for `{"vector": [...]}`, for each of
    `{"vectors": [[...], ...]}` (as `results`), or for an uploaded image (multipart field
    `file`, featurized first)."""
    models = services.need_catalog().models
    await in_thread(models.ready, name)  # 404 or 409 before reading a body
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip()
    many = False
    vectors: Any
    if ctype == "multipart/form-data":
        form = await request.form(max_part_size=services.settings.max_image_bytes + 1)
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidInput("multipart predict needs an image file part named 'file'")
        vectors, _, _ = await featurize_uploads(services, [upload])  # type: ignore[list-item]
    elif ctype in ("application/json", ""):
        body = await json_body(request, services.settings.max_body_bytes, PredictBody,
                               "predict")
        many = body.vectors is not None
        vectors = body.vectors if many else [body.vector]
    else:
        raise UnsupportedMediaType(f"cannot predict from {ctype}; send application/json "
                                   "or multipart/form-data with an image in 'file'")
    labels, probs, classes = await in_thread(models.predict, name, vectors)
    results = _predictions(labels, probs, classes)
    return PredictManyOut(results=results) if many else results[0]
