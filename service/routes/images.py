"""Image routes: upload to a collection, search by image, classify by neighbours, thumbnails."""

from __future__ import annotations

import time
from collections import Counter
from typing import Annotated

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, File, Form, Response, UploadFile
from PIL import Image
from pydantic import Field, WithJsonSchema

from service.errors import InvalidInput, NotFound, PayloadTooLarge
from service.featurizer import Label
from service.ingest import decode_images, store_images
from service.routes.deps import READ, WRITE, SafeJSONResponse, Services, ServicesDep, in_thread
from service.routes.search import hits_json
from service.routes.vectors import ids_from_text
from service.schemas import (
    DECIMAL,
    ERROR_RESPONSES,
    ID_MAX,
    IDS_TEXT_PATTERN,
    MAX_K,
    PLAIN_NAME_PATTERN,
    SQL_MAX_CHARS,
    ClassifyOut,
    Hit,
    IdPath,
    ImageNamePath,
    ImagesOut,
    SearchOut,
)

router = APIRouter(prefix="/v1/collections/{name}", tags=["images"], responses=ERROR_RESPONSES)

# Form fields as the OpenAPI schema states them. An optional form field is absent or a
# string, never JSON null, so its schema is the plain type (not anyOf [type, null]).
IMAGE_SCHEMA = {"type": "string", "format": "binary", "contentMediaType": "image/*", "minLength": 1,
                "description": "a JPEG, PNG, WebP, GIF or BMP image"}
ImageFile = Annotated[UploadFile, File(), WithJsonSchema(IMAGE_SCHEMA)]
Files = Annotated[list[UploadFile], File(min_length=1), WithJsonSchema(
    {"type": "array", "minItems": 1, "items": IMAGE_SCHEMA})]
IdsField = Annotated[list[Annotated[str, Field(pattern=IDS_TEXT_PATTERN)]] | None, Form(
    description=f"one id per file, repeated or comma-separated; each in 0..{ID_MAX}"),
    WithJsonSchema({"type": "array", "items": {"type": "string", "pattern": IDS_TEXT_PATTERN}})]
LabelsField = Annotated[list[str] | None, Form(), WithJsonSchema(
    {"type": "array", "items": {"type": "string"}})]
FilterField = Annotated[str | None, Form(max_length=SQL_MAX_CHARS), WithJsonSchema(
    {"type": "string", "maxLength": SQL_MAX_CHARS})]
ThresholdField = Annotated[float | None, Form(allow_inf_nan=False),
                           WithJsonSchema({"type": "number"})]
# An empty form value counts as absent (FastAPI), so "" means the default column.
LABEL_COLUMN_PATTERN = "^(?:" + PLAIN_NAME_PATTERN.strip("^$") + ")?$"
LabelColumnField = Annotated[str, Form(pattern=LABEL_COLUMN_PATTERN,
                                       description="a metadata column; empty: label")]


def split_values(values: list[str] | None, count: int) -> list[str]:
    """One value per file: repeated form fields as given (a value may hold a comma), or
    one comma-separated value for several files."""
    values = [v for v in values or [] if v.strip() != ""]
    if len(values) == 1 and count > 1:
        values = [p.strip() for p in values[0].split(",") if p.strip() != ""]
    return [v.strip() for v in values]


async def read_upload(upload: UploadFile, limit: int) -> bytes:
    name = upload.filename or "image"
    if upload.size is not None and upload.size > limit:
        raise PayloadTooLarge(f"{name}: {upload.size} bytes, the limit is {limit}")
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise PayloadTooLarge(f"{name}: over the limit of {limit} bytes")
    return data


async def featurize_uploads(services: Services, uploads: list[UploadFile], *,
                            with_labels: bool = False
                            ) -> tuple[npt.NDArray[np.float32], list[list[Label]],
                                       list[Image.Image]]:
    """Decode (limits first) and featurize uploaded files, off the event loop."""
    featurizer = services.need_featurizer()
    settings = services.settings
    blobs = [await read_upload(u, settings.max_image_bytes) for u in uploads]

    def work() -> tuple[npt.NDArray[np.float32], list[list[Label]], list[Image.Image]]:
        images = decode_images([(u.filename or f"image {i}", b) for i, (b, u)
                                in enumerate(zip(blobs, uploads, strict=True))], settings)
        if with_labels:
            vectors, labels = featurizer.featurize_with_labels(images)
        else:
            vectors, labels = featurizer.featurize(images), [[] for _ in images]
        return vectors, labels, images

    result: tuple[npt.NDArray[np.float32], list[list[Label]], list[Image.Image]]
    result = await in_thread(work)
    services.metrics.images.inc(len(uploads))
    return result


@router.post("/images", dependencies=WRITE)
async def upload_images(name: ImageNamePath, services: ServicesDep, files: Files,
                        ids: IdsField = None, labels: LabelsField = None) -> ImagesOut:
    """Upload images (field `files`, repeated); optional `ids` and `labels`.

    A collection that does not exist is created: cosine, 2048-d, columns `label` and
    `filename` (VARCHAR), with a JPEG thumbnail per image.
    """
    start = time.perf_counter()
    catalog = services.need_catalog()
    services.need_featurizer()
    id_list = split_values(ids, len(files))
    label_list = split_values(labels, len(files))
    id_arr = ids_from_text(",".join(id_list)) if id_list else None
    if id_arr is not None and len(id_arr) != len(files):
        raise InvalidInput(f"{len(id_arr)} ids for {len(files)} files")
    if label_list and len(label_list) != len(files):
        raise InvalidInput(f"{len(label_list)} labels for {len(files)} files")
    # Everything is checked and featurized before the collection may be created, so a
    # refused upload leaves nothing behind.
    vectors, _, images = await featurize_uploads(services, files)
    id_arr = await in_thread(
        store_images, catalog, name, vectors, images, dim=services.need_featurizer().dim,
        filenames=[u.filename for u in files], labels=label_list or None, ids=id_arr,
        thumbnail_size=services.settings.thumbnail_size)
    return ImagesOut(collection=name, ids=[int(i) for i in id_arr], count=len(files),
                     took_ms=round((time.perf_counter() - start) * 1000, 3))


@router.post("/search/image", dependencies=READ, response_model=SearchOut,
             response_class=SafeJSONResponse)
async def search_image(name: ImageNamePath, services: ServicesDep,
                       file: ImageFile,
                       k: Annotated[int, Form(ge=1, le=MAX_K), DECIMAL] = 10,
                       filter: FilterField = None, threshold: ThresholdField = None
                       ) -> SafeJSONResponse:
    """Nearest neighbours of an uploaded image (field `file`)."""
    start = time.perf_counter()
    vectors, _, _ = await featurize_uploads(services, [file])
    rows = await services.need_batcher().search(name, vectors, k, threshold=threshold,
                                                filter=filter or None)
    return SafeJSONResponse({"results": hits_json(rows[0]),
                             "took_ms": round((time.perf_counter() - start) * 1000, 3)})


@router.post("/classify", dependencies=READ)
async def classify(name: ImageNamePath, services: ServicesDep, file: ImageFile,
                   k: Annotated[int, Form(ge=1, le=1000), DECIMAL] = 5, filter: FilterField = None,
                   label_column: LabelColumnField = "label"
                   ) -> ClassifyOut:
    """The label most common among the k nearest labelled neighbours (ties: closer)."""
    start = time.perf_counter()
    info = await in_thread(services.need_catalog().get_collection, name)
    if label_column not in info.columns:
        raise InvalidInput(f"collection {name!r} has no column {label_column!r}")
    labelled = f"{label_column} IS NOT NULL"
    where = f"({filter}) AND {labelled}" if filter else labelled
    vectors, _, _ = await featurize_uploads(services, [file])
    rows = await services.need_batcher().search(name, vectors, k, filter=where)
    hits = hits_json(rows[0])
    votes = Counter(str(h["metadata"].get(label_column)) for h in hits)
    score_sum: Counter[str] = Counter()
    for h in hits:
        sign = -1.0 if info.metric == "l2" else 1.0  # l2 scores are distances
        score_sum[str(h["metadata"].get(label_column))] += sign * h["score"]
    best = max(votes, key=lambda lab: (votes[lab], score_sum[lab]), default=None)
    return ClassifyOut(label=best, votes=dict(votes.most_common()),
                       neighbors=[Hit.model_validate(h) for h in hits],
                       took_ms=round((time.perf_counter() - start) * 1000, 3))


@router.get("/vectors/{id}/thumbnail", dependencies=READ, response_class=Response,
            responses={200: {"content": {"image/jpeg": {}}}})
async def thumbnail(name: ImageNamePath, id: IdPath, services: ServicesDep) -> Response:
    """The JPEG thumbnail stored with an uploaded image."""
    data = await in_thread(services.need_catalog().get_thumbnail, name, id)
    if data is None:
        raise NotFound(f"no thumbnail for id {id} in collection {name!r}")
    return Response(data, media_type="image/jpeg",
                    headers={"Cache-Control": "public, max-age=3600"})
