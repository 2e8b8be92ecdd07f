"""The `dotsearch` command line: serve, ingest, query, demo, bench."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from service.settings import Settings

app = typer.Typer(help="dotsearch: GPU-accelerated exact vector search for image features.",
                  no_args_is_help=True, add_completion=False)
console = Console()
err = Console(stderr=True)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
DataDir = Annotated[Path | None, typer.Option(help="Data directory [env DOTSEARCH_DATA_DIR]")]
Backend = Annotated[str | None, typer.Option(help="auto | gpu | cpu [env DOTSEARCH_BACKEND]")]
Weights = Annotated[str | None, typer.Option(
    help="auto | imagenet | random | PATH [env DOTSEARCH_WEIGHTS]")]


def _settings(**overrides: Any) -> Settings:
    """Environment / .env settings with the flags that were given on top."""
    base = Settings()
    given = {k: v for k, v in overrides.items() if v is not None}
    return base.model_copy(update=given) if given else base


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")


@app.command()
def serve(host: Annotated[str | None, typer.Option(help="[env DOTSEARCH_HOST]")] = None,
          port: Annotated[int | None, typer.Option(help="[env DOTSEARCH_PORT]")] = None,
          data_dir: DataDir = None, backend: Backend = None, weights: Weights = None) -> None:
    """Run the HTTP server (OpenAPI docs at /docs)."""
    import uvicorn

    from service.app import create_app
    from service.http_server import http_protocol

    settings = _settings(host=host, port=port, data_dir=data_dir, backend=backend,
                         weights=weights)
    _logging(settings.log_level)
    # http=: uvicorn's HTTP/1.1 protocol plus a request-head read timeout (slowloris)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=30,
                http=http_protocol(settings.header_timeout_s))


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _ingested_names(catalog: Any, collection: str) -> set[str]:
    """Filenames already stored in the collection (what makes ingest resumable)."""
    result = catalog.query(f'SELECT filename FROM "{collection}" WHERE filename IS NOT NULL')
    return {str(row[0]) for row in result.rows}


def ingest_folder(catalog: Any, featurizer: Any, folder: Path, collection: str, *,
                  batch_size: int = 32, label_from_dir: bool = False,
                  settings: Settings | None = None, show_progress: bool = True
                  ) -> dict[str, Any]:
    """Featurize every image under ``folder`` into ``collection``; skips files already there.

    Returns counts and the bad files with their reasons. Usable from Python as well.
    """
    from service.errors import DotsearchError, NotFound
    from service.images import decode_image, thumbnail_jpeg
    from service.routes.images import IMAGE_COLUMNS

    settings = settings or Settings()
    try:
        info = catalog.get_collection(collection)
    except NotFound:
        info = catalog.create_collection(collection, featurizer.dim, "cosine", "float32",
                                         dict(IMAGE_COLUMNS), thumbnails=True)
    if "filename" not in info.columns:
        raise typer.BadParameter(f"collection {collection!r} has no 'filename' column")
    files = _image_files(folder)
    done = _ingested_names(catalog, collection)
    todo = [p for p in files if str(p.relative_to(folder)) not in done]
    bad: list[tuple[str, str]] = []
    added = 0
    progress = Progress(TextColumn("[bold]ingest"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=err, disable=not show_progress)
    with progress:
        task = progress.add_task("ingest", total=len(todo))
        for chunk in _chunks(todo, batch_size):
            images, names, labels = [], [], []
            for path in chunk:
                try:
                    images.append(decode_image(path.read_bytes(),
                                               max_bytes=settings.max_image_bytes,
                                               max_pixels=settings.max_image_pixels,
                                               name=path.name))
                except (DotsearchError, OSError) as exc:
                    bad.append((str(path), str(exc)))
                    continue
                names.append(str(path.relative_to(folder)))
                labels.append(path.parent.name if label_from_dir else None)
            if images:
                vectors = featurizer.featurize(images)
                meta = [{"filename": n, **({"label": lab} if lab is not None else {})}
                        for n, lab in zip(names, labels, strict=True)]
                thumbs = ([thumbnail_jpeg(img, settings.thumbnail_size) for img in images]
                          if info.thumbnails else None)
                ids = catalog.next_ids(collection, len(images))
                catalog.upsert(collection, ids, vectors, meta, thumbs)  # one commit per batch
                added += len(images)
            progress.advance(task, len(chunk))
    return {"found": len(files), "skipped_existing": len(files) - len(todo), "added": added,
            "bad": bad}


@app.command()
def ingest(folder: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
           collection: Annotated[str, typer.Option("--collection", "-c")],
           data_dir: DataDir = None, backend: Backend = None, weights: Weights = None,
           batch_size: Annotated[int, typer.Option(min=1)] = 32,
           label_from_dir: Annotated[bool, typer.Option(
               help="Use each file's folder name as its label")] = False) -> None:
    """Featurize a folder of images into a collection (resumable; bad files are skipped).

    Works on the data directory directly: stop the server first (DuckDB has one writer).
    """
    from service.catalog import Catalog
    from service.featurizer import Featurizer

    settings = _settings(data_dir=data_dir, backend=backend, weights=weights)
    _logging("warning")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    featurizer = Featurizer(settings.weights, batch_size=batch_size)
    if featurizer.warning:
        err.print(f"[bold red]WARNING:[/] {featurizer.warning}")
    with Catalog(settings.data_dir, settings.backend,
                 duckdb_memory_limit=settings.duckdb_memory_limit) as catalog:
        start = time.perf_counter()
        report = ingest_folder(catalog, featurizer, folder, collection, batch_size=batch_size,
                               label_from_dir=label_from_dir, settings=settings)
        seconds = time.perf_counter() - start
    for path, reason in report["bad"]:
        err.print(f"[yellow]skipped[/] {path}: {reason}")
    console.print(f"{report['added']} added, {report['skipped_existing']} already there, "
                  f"{len(report['bad'])} bad, of {report['found']} files "
                  f"in {seconds:.1f} s -> collection [bold]{collection}[/]")


def print_result(result: Any, title: str | None = None) -> None:
    """A QueryResult as a rich table (vectors abbreviated)."""
    if title:
        console.print(f"[bold]{title}[/]")
    table = Table(show_lines=False)
    for name in result.columns:
        table.add_column(str(name))
    for row in result.rows:
        cells = []
        for value in row:
            if isinstance(value, list) and len(value) > 6:
                value = f"[{', '.join(f'{v:.3g}' for v in value[:4])}, ... ({len(value)})]"
            elif isinstance(value, float):
                value = f"{value:.6g}"
            cells.append(str(value))
        table.add_row(*cells)
    console.print(table)
    if getattr(result, "explain", None):
        console.print(result.explain)


@app.command()
def query(sql: Annotated[str, typer.Argument(help="SQL statement(s)")],
          data_dir: DataDir = None, backend: Backend = None) -> None:
    """Run SQL against the data directory and print a table (stop the server first)."""
    from service.catalog import Catalog
    from service.errors import DotsearchError

    settings = _settings(data_dir=data_dir, backend=backend)
    _logging("warning")
    try:
        with Catalog(settings.data_dir, settings.backend,
                     duckdb_memory_limit=settings.duckdb_memory_limit) as catalog:
            start = time.perf_counter()
            result = catalog.query(sql)
            took = (time.perf_counter() - start) * 1000
    except DotsearchError as exc:
        err.print(f"[bold red]{exc.error}[/]: {exc}")
        raise typer.Exit(1) from exc
    print_result(result)
    console.print(f"{len(result.rows)} rows in {took:.1f} ms")


DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page",
               "clock", "text", "immunohistochemistry", "hubble_deep_field")


@app.command()
def demo(data_dir: DataDir = None, weights: Weights = None,
         collection: Annotated[str, typer.Option()] = "demo_photos") -> None:
    """Ingest scikit-image's sample photographs, then run a similar-image and a SQL query."""
    import skimage.data
    from PIL import Image, ImageOps

    from service.catalog import Catalog
    from service.errors import NotFound
    from service.featurizer import Featurizer
    from service.images import thumbnail_jpeg

    settings = _settings(data_dir=data_dir, weights=weights)
    _logging("warning")
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    featurizer = Featurizer(settings.weights)
    if featurizer.warning:
        err.print(f"[bold red]WARNING:[/] {featurizer.warning}")
    images = {n: Image.fromarray(np.asarray(getattr(skimage.data, n)())).convert("RGB")
              for n in DEMO_PHOTOS}
    with Catalog(settings.data_dir, settings.backend,
                 duckdb_memory_limit=settings.duckdb_memory_limit) as catalog:
        with contextlib.suppress(NotFound):
            catalog.drop_collection(collection)
        catalog.create_collection(collection, featurizer.dim, "cosine", "float32",
                                  {"label": "VARCHAR", "filename": "VARCHAR"}, thumbnails=True)
        vectors = featurizer.featurize(list(images.values()))
        ids = np.arange(len(images), dtype=np.int64)
        catalog.upsert(collection, ids, vectors,
                       [{"label": n, "filename": f"skimage.data.{n}"} for n in images],
                       [thumbnail_jpeg(img) for img in images.values()])
        console.print(f"ingested {len(images)} photographs from scikit-image into "
                      f"[bold]{collection}[/] (weights: {featurizer.weights_name})")
        query_img = ImageOps.mirror(images["chelsea"])
        hits = catalog.search(collection, featurizer.featurize([query_img]), 3)[0]
        console.print("[bold]Similar to mirrored 'chelsea'[/] (search by image)")
        table = Table()
        for column in ("id", "score", "label"):
            table.add_column(column)
        for hit in hits:
            table.add_row(str(hit.id), f"{hit.score:.4f}", str(hit.metadata.get("label")))
        console.print(table)
        sql = (f"SELECT id, label, DOT_PRODUCT(feature, (SELECT feature FROM {collection} "
               f"WHERE label = 'coffee')) AS score FROM {collection} "
               f"ORDER BY score DESC LIMIT 3")
        console.print(f"[bold]SQL:[/] {sql}")
        print_result(catalog.query(sql), title="More like 'coffee', in SQL")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Run the benchmark harness (arguments go to `python -m bench`)."""
    try:
        from bench.__main__ import main as bench_main
    except ImportError as exc:
        err.print(f"the benchmark harness is not installed here: {exc}")
        raise typer.Exit(2) from exc
    raise typer.Exit(bench_main(list(ctx.args)) or 0)


if __name__ == "__main__":
    sys.exit(app())
