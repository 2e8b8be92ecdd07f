"""Image routes: upload to a collection, search by image, classify by neighbours, thumbnails."""

from __future__ import annotations

import time
from collections import Counter
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, File, Form, Response, UploadFile
from PIL import Image

from service.errors import InvalidInput, NotFound, PayloadTooLarge
from service.featurizer import Label
from service.images import decode_image, thumbnail_jpeg
from service.routes.deps import READ, WRITE, SafeJSONResponse, Services, ServicesDep, in_thread
from service.routes.search import hits_json
from service.schemas import ERROR_RESPONSES, ClassifyOut, Hit, ImagesOut, SearchOut

router = APIRouter(prefix="/v1/collections/{name}", tags=["images"], responses=ERROR_RESPONSES)

# Columns of a collection that the images route creates when it does not exist yet.
IMAGE_COLUMNS = {"label": "VARCHAR", "filename": "VARCHAR"}


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
        images = [decode_image(b, max_bytes=settings.max_image_bytes,
                               max_pixels=settings.max_image_pixels,
                               name=u.filename or f"image {i}")
                  for i, (b, u) in enumerate(zip(blobs, uploads, strict=True))]
        if with_labels:
            vectors, labels = featurizer.featurize_with_labels(images)
        else:
            vectors, labels = featurizer.featurize(images), [[] for _ in images]
        return vectors, labels, images

    result: tuple[npt.NDArray[np.float32], list[list[Label]], list[Image.Image]]
    result = await in_thread(work)
    services.metrics.images.inc(len(uploads))
    return result


async def _image_collection(services: Services, name: str) -> Any:
    """The target collection, created (cosine, 2048-d, label/filename, thumbnails) if new."""
    catalog = services.need_catalog()
    try:
        info = await in_thread(catalog.get_collection, name)
    except NotFound:
        try:
            info = await in_thread(catalog.create_collection, name, 2048, "cosine",
                                   "float32", dict(IMAGE_COLUMNS), thumbnails=True)
        except Exception:
            info = await in_thread(catalog.get_collection, name)  # created meanwhile
    if info.dim != services.need_featurizer().dim:
        raise InvalidInput(f"collection {name!r} holds {info.dim}-d vectors; image features "
                           f"are {services.need_featurizer().dim}-d")
    return info


@router.post("/images", dependencies=WRITE)
async def upload_images(name: str, services: ServicesDep,
                        files: Annotated[list[UploadFile], File()],
                        ids: Annotated[list[str] | None, Form()] = None,
                        labels: Annotated[list[str] | None, Form()] = None) -> ImagesOut:
    """Upload images (field `files`, repeated); optional `ids` and `labels`.

    A collection that does not exist is created: cosine, 2048-d, columns `label` and
    `filename` (VARCHAR), with a JPEG thumbnail per image.
    """
    start = time.perf_counter()
    catalog = services.need_catalog()
    services.need_featurizer()
    id_list = split_values(ids, len(files))
    label_list = split_values(labels, len(files))
    if id_list and len(id_list) != len(files):
        raise InvalidInput(f"{len(id_list)} ids for {len(files)} files")
    if label_list and len(label_list) != len(files):
        raise InvalidInput(f"{len(label_list)} labels for {len(files)} files")
    try:
        id_arr = np.array([int(i) for i in id_list], dtype=np.int64) if id_list else None
    except ValueError as exc:
        raise InvalidInput(f"ids must be integers: {exc}") from exc
    # Everything is checked and featurized before the collection may be created, so a
    # refused upload leaves nothing behind.
    vectors, _, images = await featurize_uploads(services, files)
    info = await _image_collection(services, name)
    if label_list and "label" not in info.columns:
        raise InvalidInput(f"collection {name!r} has no 'label' column")
    metadata: list[dict[str, Any]] = [{} for _ in files]
    for i, upload in enumerate(files):
        if label_list:
            metadata[i]["label"] = label_list[i]
        if "filename" in info.columns and upload.filename:
            metadata[i]["filename"] = upload.filename
    thumbs = None
    if info.thumbnails:
        size = services.settings.thumbnail_size
        thumbs = await in_thread(lambda: [thumbnail_jpeg(img, size) for img in images])
    if id_arr is None:
        id_arr = await in_thread(catalog.next_ids, name, len(files))
    await in_thread(catalog.upsert, name, id_arr, vectors, metadata, thumbs)
    return ImagesOut(collection=name, ids=[int(i) for i in id_arr], count=len(files),
                     took_ms=round((time.perf_counter() - start) * 1000, 3))


@router.post("/search/image", dependencies=READ, response_model=SearchOut,
             response_class=SafeJSONResponse)
async def search_image(name: str, services: ServicesDep,
                       file: Annotated[UploadFile, File()],
                       k: Annotated[int, Form(ge=1, le=100_000)] = 10,
                       filter: Annotated[str | None, Form()] = None,
                       threshold: Annotated[float | None, Form(allow_inf_nan=False)] = None
                       ) -> SafeJSONResponse:
    """Nearest neighbours of an uploaded image (field `file`)."""
    start = time.perf_counter()
    vectors, _, _ = await featurize_uploads(services, [file])
    rows = await services.need_batcher().search(name, vectors, k, threshold=threshold,
                                                filter=filter or None)
    return SafeJSONResponse({"results": hits_json(rows[0]),
                             "took_ms": round((time.perf_counter() - start) * 1000, 3)})


@router.post("/classify", dependencies=READ)
async def classify(name: str, services: ServicesDep, file: Annotated[UploadFile, File()],
                   k: Annotated[int, Form(ge=1, le=1000)] = 5,
                   filter: Annotated[str | None, Form()] = None,
                   label_column: Annotated[str, Form(pattern=r"^[A-Za-z_]\w*$")] = "label"
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
async def thumbnail(name: str, id: int, services: ServicesDep) -> Response:
    """The JPEG thumbnail stored with an uploaded image."""
    data = await in_thread(services.need_catalog().get_thumbnail, name, id)
    if data is None:
        raise NotFound(f"no thumbnail for id {id} in collection {name!r}")
    return Response(data, media_type="image/jpeg",
                    headers={"Cache-Control": "public, max-age=3600"})
