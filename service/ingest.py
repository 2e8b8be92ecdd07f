"""The image ingest use case: decode, featurize, thumbnail and upsert into a collection."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from service.catalog_values import ID_MAX, CollectionInfo
from service.errors import DotsearchError, InvalidInput, NotFound
from service.images import decode_image, thumbnail_jpeg

if TYPE_CHECKING:
    from service.catalog import Catalog

# Columns of a collection that an image ingest creates when it does not exist yet.
IMAGE_COLUMNS = {"label": "VARCHAR", "filename": "VARCHAR"}
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"})


class Limits(Protocol):
    """The settings an ingest reads (``service.settings.Settings`` has them)."""

    max_image_bytes: int
    max_image_pixels: int


class Featurizes(Protocol):
    """What an ingest needs of the featurizer."""

    dim: int

    def featurize(self, images: Sequence[Image.Image]) -> npt.NDArray[np.float32]: ...


def decode_images(blobs: Sequence[tuple[str, bytes]], limits: Limits) -> list[Image.Image]:
    """(name, bytes) pairs -> RGB images; the first bad one raises (413 or 415)."""
    return [decode_image(data, max_bytes=limits.max_image_bytes,
                         max_pixels=limits.max_image_pixels, name=name)
            for name, data in blobs]


def image_collection(catalog: Catalog, name: str, dim: int) -> CollectionInfo:
    """The target collection, created (cosine, ``dim``, label/filename, thumbnails) if new."""
    try:
        info: CollectionInfo = catalog.get_collection(name)
    except NotFound:
        try:
            info = catalog.create_collection(name, dim, "cosine", "float32",
                                             dict(IMAGE_COLUMNS), thumbnails=True)
        except Exception:
            info = catalog.get_collection(name)  # created meanwhile
    if info.dim != dim:
        raise InvalidInput(f"collection {name!r} holds {info.dim}-d vectors; image features "
                           f"are {dim}-d")
    return info


def store_images(catalog: Catalog, name: str, vectors: npt.NDArray[np.float32],
                 images: Sequence[Image.Image], *, dim: int,
                 filenames: Sequence[str | None] | None = None,
                 labels: Sequence[str] | None = None, ids: npt.NDArray[np.int64] | None = None,
                 thumbnail_size: int = 128) -> npt.NDArray[np.int64]:
    """Upsert featurized images as one batch (one commit); returns their ids.

    The collection is created when missing; ``labels`` need a ``label`` column, filenames
    are kept where the collection has a ``filename`` column; ids are assigned when absent.
    """
    info = image_collection(catalog, name, dim)
    if labels and "label" not in info.columns:
        raise InvalidInput(f"collection {name!r} has no 'label' column")
    metadata: list[dict[str, Any]] = [{} for _ in images]
    for i in range(len(images)):
        if labels:
            metadata[i]["label"] = labels[i]
        if filenames is not None and "filename" in info.columns and filenames[i]:
            metadata[i]["filename"] = filenames[i]
    thumbs = ([thumbnail_jpeg(img, thumbnail_size) for img in images]
              if info.thumbnails else None)
    if ids is None:
        try:
            ids = catalog.next_ids(name, len(images))
        except OverflowError as exc:
            raise InvalidInput(f"no {len(images)} fresh ids left in 0..{ID_MAX} (2^63-1); "
                               "give the ids explicitly") from exc
    assert ids is not None
    catalog.upsert(name, ids, vectors, metadata, thumbs)
    return ids


def ingest_images(catalog: Catalog, featurizer: Featurizes, name: str,
                  images: Sequence[Image.Image], **options: Any) -> npt.NDArray[np.int64]:
    """Featurize decoded images and store them (``store_images``'s options)."""
    vectors = featurizer.featurize(list(images))
    return store_images(catalog, name, vectors, images, dim=featurizer.dim, **options)


# -- a folder of image files, resumable: the CLI's ingest, locally or over HTTP ------------

@dataclass
class FileItem:
    """One decodable image file of a folder: its relative name, bytes, image and label."""

    name: str
    data: bytes
    image: Image.Image
    label: str | None


@dataclass
class FolderReport:
    """What a folder ingest did; ``bad`` holds (path, reason) of each file skipped."""

    found: int = 0
    skipped_existing: int = 0
    added: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)


# Stores one batch; returns the (name, reason) of each item it refused.
Sink = Callable[[list[FileItem]], list[tuple[str, str]]]


def image_files(folder: Path) -> list[Path]:
    """Image files (by suffix) under ``folder``, sorted."""
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def ingest_folder(folder: Path, sink: Sink, *, done: set[str], limits: Limits,
                  batch_size: int = 32, label_from_dir: bool = False,
                  on_start: Callable[[int], None] | None = None,
                  on_advance: Callable[[int], None] | None = None) -> FolderReport:
    """Decode every image under ``folder`` whose relative path is not in ``done`` and hand
    them to ``sink`` in batches; files that do not decode are reported and skipped."""
    files = image_files(folder)
    todo = [p for p in files if str(p.relative_to(folder)) not in done]
    report = FolderReport(found=len(files), skipped_existing=len(files) - len(todo))
    if on_start:
        on_start(len(todo))
    for chunk in _chunks(todo, batch_size):
        items: list[FileItem] = []
        for path in chunk:
            try:
                data = path.read_bytes()
                image = decode_images([(path.name, data)], limits)[0]
            except (DotsearchError, OSError) as exc:
                report.bad.append((str(path), str(exc)))
                continue
            items.append(FileItem(str(path.relative_to(folder)), data, image,
                                  path.parent.name if label_from_dir else None))
        if items:
            refused = sink(items)
            report.bad.extend((str(folder / n), why) for n, why in refused)
            report.added += len(items) - len(refused)
        if on_advance:
            on_advance(len(chunk))
    return report


def local_sink(catalog: Catalog, featurizer: Featurizes, collection: str,
               thumbnail_size: int = 128) -> Sink:
    """A sink that featurizes and upserts into an open catalog (one commit per batch)."""

    def store(items: list[FileItem]) -> list[tuple[str, str]]:
        labels = [i.label for i in items if i.label is not None]
        ingest_images(catalog, featurizer, collection, [i.image for i in items],
                      filenames=[i.name for i in items],
                      labels=labels if len(labels) == len(items) else None,
                      thumbnail_size=thumbnail_size)
        return []

    return store


def stored_filenames(catalog: Catalog, collection: str) -> set[str]:
    """Filenames already in the collection (what makes an ingest resumable); none if new."""
    try:
        info = catalog.get_collection(collection)
    except NotFound:
        return set()
    if "filename" not in info.columns:
        raise InvalidInput(f"collection {collection!r} has no 'filename' column")
    result = catalog.query(f'SELECT filename FROM "{collection}" WHERE filename IS NOT NULL')
    return {str(row[0]) for row in result.rows}
