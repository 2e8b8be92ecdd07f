"""The `dotsearch` command line: serve; ingest, query, train and demo, over HTTP or on the
files."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import numpy as np
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from service.settings import Settings

if TYPE_CHECKING:
    from PIL import Image

    from service.catalog import Catalog
    from service.client import Client
    from service.ingest import FolderReport, Sink

app = typer.Typer(help="dotsearch: GPU-accelerated exact vector search for image features.",
                  no_args_is_help=True, add_completion=False)
console = Console()
err = Console(stderr=True)

DataDir = Annotated[Path | None, typer.Option(help="Data directory [env DOTSEARCH_DATA_DIR]")]
Backend = Annotated[str | None, typer.Option(
    help="auto | gpu | cpu | ray [env DOTSEARCH_BACKEND]")]
RayAddress = Annotated[str | None, typer.Option(
    help="ray backend: the Ray cluster to join (auto, ray://host:10001); none starts a local "
    "Ray [env DOTSEARCH_RAY_ADDRESS]")]
Shards = Annotated[int | None, typer.Option(
    min=1, max=256, help="ray backend: shards per collection (default: the GPUs Ray sees, or 2) "
    "[env DOTSEARCH_SHARDS]")]
Weights = Annotated[str | None, typer.Option(
    help="auto | imagenet | random | PATH [env DOTSEARCH_WEIGHTS]")]
Url = Annotated[str | None, typer.Option(
    envvar="DOTSEARCH_URL", show_envvar=False,
    help="A running server to use [env DOTSEARCH_URL]; default: the configured host and port. "
         "With none answering (or with --data-dir alone), the data directory is opened")]
ApiKey = Annotated[str | None, typer.Option(
    envvar="DOTSEARCH_API_KEY", show_envvar=False,
    help="The server's API key, sent as X-API-Key [env DOTSEARCH_API_KEY]")]
# DuckDB: 'Could not set lock on file "...": Conflicting lock is held in EXE (PID 4693) ...'
LOCK_HOLDER = re.compile(r"held in (?P<exe>.+?) \(PID (?P<pid>\d+)\)")


def _settings(**overrides: Any) -> Settings:
    """Environment / .env settings with the flags that were given on top."""
    base = Settings()
    given = {k: v for k, v in overrides.items() if v is not None}
    return base.model_copy(update=given) if given else base


def _logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")


def _say(text: str) -> None:
    """One line on stderr, never wrapped, no markup."""
    err.print(text, markup=False, highlight=False, soft_wrap=True)


def _fail(text: str) -> NoReturn:
    _say(f"error: {text}")
    raise typer.Exit(1)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Errors of the service or of the server as one line and exit status 1."""
    from service.client import ServerError, Unreachable
    from service.errors import DotsearchError

    try:
        yield
    except DotsearchError as exc:
        _fail(f"{exc.error}: {exc}")
    except ServerError as exc:
        hint = " (give a key with --api-key or DOTSEARCH_API_KEY)" if exc.status == 401 else ""
        _fail(f"{exc.error}: {exc.message}{hint}")
    except Unreachable as exc:
        _fail(str(exc))


def _connect(settings: Settings, url: str | None, api_key: str | None,
             data_dir_given: bool) -> tuple[Client | None, str | None]:
    """The server to talk to when one answers, and the URL that was tried."""
    from service.client import Client, default_url

    if url is None and data_dir_given:
        return None, None  # a directory was named: use it
    target = url or default_url(settings.host, settings.port)
    client = Client(target, api_key or settings.api_key or settings.read_only_api_key)
    if client.health() is not None:
        return client, target
    return None, target


def lock_holder(exc: BaseException) -> tuple[str | None, str | None] | None:
    """(pid, program) when ``exc`` (or its cause) says the database is locked, else None."""
    texts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(texts) < 8:
        texts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    text = " ".join(texts)
    if not re.search(r"could not set lock|conflicting lock", text, re.IGNORECASE):
        return None
    match = LOCK_HOLDER.search(text)
    return (match["pid"], match["exe"]) if match else (None, None)


@contextlib.contextmanager
def _open_catalog(settings: Settings, tried: str | None, explicit: bool = False
                  ) -> Iterator[Catalog]:
    """The data directory, or one line saying who holds it and the ways out."""
    import duckdb

    from service.catalog import Catalog
    from service.errors import DotsearchError

    try:
        catalog = Catalog.from_settings(settings)
    except (DotsearchError, duckdb.Error) as exc:
        holder = lock_holder(exc)
        if holder is None:
            _fail(f"cannot open the data directory {settings.data_dir}: {exc}")
        pid, exe = holder
        who = f"process {pid} ({exe})" if pid else "another process"
        answered = f" (nothing answered at {tried})" if tried else ""
        _fail(f"the data directory {settings.data_dir} is locked by {who}. Either stop that "
              "process and run this again, or run this against a server: point --url (or "
              f"DOTSEARCH_URL) at the server holding it{answered}, or start `dotsearch serve` "
              "and use that")
    if tried and explicit:
        _say(f"no dotsearch server answers at {tried}; using {settings.data_dir} directly")
    with catalog:
        yield catalog


def _featurizer(weights: str, batch_size: int = 32) -> Any:
    from service.featurizer import Featurizer

    featurizer = Featurizer(weights, batch_size=batch_size)
    if featurizer.warning:
        err.print(f"[bold red]WARNING:[/] {escape(featurizer.warning)}")
    return featurizer


@app.command()
def serve(host: Annotated[str | None, typer.Option(help="[env DOTSEARCH_HOST]")] = None,
          port: Annotated[int | None, typer.Option(help="[env DOTSEARCH_PORT]")] = None,
          data_dir: DataDir = None, backend: Backend = None, weights: Weights = None,
          ray_address: RayAddress = None, shards: Shards = None) -> None:
    """Run the HTTP server (OpenAPI docs at /docs)."""
    import uvicorn

    from service.app import create_app
    from service.http_server import http_protocol

    settings = _settings(host=host, port=port, data_dir=data_dir, backend=backend,
                         weights=weights, ray_address=ray_address, shards=shards)
    _logging(settings.log_level)
    # http=: uvicorn's HTTP/1.1 protocol plus a request-head read timeout (slowloris)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level.lower(), timeout_graceful_shutdown=30,
                http=http_protocol(settings.header_timeout_s))


def _run_ingest(folder: Path, sink: Sink, done: set[str], settings: Settings,
                batch_size: int, label_from_dir: bool) -> FolderReport:
    from service.ingest import ingest_folder

    progress = Progress(TextColumn("[bold]ingest"), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), console=err)
    with progress:
        task = progress.add_task("ingest", total=None)
        return ingest_folder(folder, sink, done=done, limits=settings, batch_size=batch_size,
                             label_from_dir=label_from_dir,
                             on_start=lambda n: progress.update(task, total=n),
                             on_advance=lambda n: progress.advance(task, n))


@app.command()
def ingest(folder: Annotated[Path, typer.Argument(exists=True, file_okay=False)],
           collection: Annotated[str, typer.Option("--collection", "-c")],
           data_dir: DataDir = None, backend: Backend = None, weights: Weights = None,
           batch_size: Annotated[int, typer.Option(min=1)] = 32,
           label_from_dir: Annotated[bool, typer.Option(
               help="Use each file's folder name as its label")] = False,
           url: Url = None, api_key: ApiKey = None) -> None:
    """Featurize a folder of images into a collection (resumable; bad files are skipped).

    Uploads to the running server when one answers; otherwise opens the data directory.
    """
    from service.ingest import local_sink, stored_filenames

    settings = _settings(data_dir=data_dir, backend=backend, weights=weights)
    _logging("warning")
    client, tried = _connect(settings, url, api_key, data_dir is not None)
    start = time.perf_counter()
    with _errors():
        if client is not None:
            client.wait_ready(featurizer=True, on_wait=_say)
            report = _run_ingest(folder, client.sink(collection),
                                 client.stored_filenames(collection), settings, batch_size,
                                 label_from_dir)
        else:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            with _open_catalog(settings, tried, url is not None) as catalog:
                done = stored_filenames(catalog, collection)
                sink = local_sink(catalog, _featurizer(settings.weights, batch_size),
                                  collection, settings.thumbnail_size)
                report = _run_ingest(folder, sink, done, settings, batch_size, label_from_dir)
    seconds = time.perf_counter() - start
    for path, reason in report.bad:
        err.print(f"[yellow]skipped[/] {escape(path)}: {escape(reason)}", soft_wrap=True)
    where = f"at {client.url}" if client is not None else f"in {settings.data_dir}"
    console.print(f"{report.added} added, {report.skipped_existing} already there, "
                  f"{len(report.bad)} bad, of {report.found} files in {seconds:.1f} s -> "
                  f"collection [bold]{escape(collection)}[/] {escape(where)}", soft_wrap=True)


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


def _remote_result(body: dict[str, Any]) -> Any:
    from service.catalog_values import QueryResult

    return QueryResult(list(body["columns"]), list(body.get("types") or []), list(body["rows"]),
                       body.get("explain"))


@app.command()
def query(sql: Annotated[str, typer.Argument(help="SQL statement(s)")],
          data_dir: DataDir = None, backend: Backend = None, url: Url = None,
          api_key: ApiKey = None) -> None:
    """Run SQL and print a table: on the running server, or on the data directory."""
    settings = _settings(data_dir=data_dir, backend=backend)
    _logging("warning")
    client, tried = _connect(settings, url, api_key, data_dir is not None)
    with _errors():
        if client is not None:
            body = client.query(sql)
            result, took = _remote_result(body), float(body.get("took_ms") or 0.0)
        else:
            with _open_catalog(settings, tried, url is not None) as catalog:
                start = time.perf_counter()
                result = catalog.query(sql)
                took = (time.perf_counter() - start) * 1000
    print_result(result)
    console.print(f"{len(result.rows)} rows in {took:.1f} ms")


def _watch_training(name: str, poll: Any, cancel: Any, epochs: int | None) -> dict[str, Any]:
    """A progress bar over the epochs until the model is no longer training; Ctrl-C
    cancels the training. The model's final state."""
    progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(),
                        console=err)
    with progress:
        task = progress.add_task("train", total=epochs, loss="-")
        try:
            while True:
                info: dict[str, Any] = poll()
                step = info.get("progress") or {}
                loss = step.get("loss")
                progress.update(task, total=step.get("epochs") or epochs,
                                completed=step.get("epoch") or 0,
                                loss="-" if loss is None else f"{loss:.4f}")
                if info.get("state") != "training":
                    return info
                time.sleep(0.2)
        except KeyboardInterrupt:
            cancel()
            _fail(f"training of model {name!r} cancelled")


def print_model(info: dict[str, Any]) -> None:
    """A trained model's holdout metrics and confusion matrix."""
    metrics = info.get("metrics") or {}
    counts = metrics.get("counts") or {}
    console.print(f"model [bold]{escape(info['name'])}[/] ({escape(info['kind'])}, "
                  f"{info['dim']}-d, {len(info['classes'])} classes): accuracy "
                  f"{metrics.get('accuracy', 0):.4f}, macro F1 {metrics.get('macro_f1', 0):.4f} "
                  f"on {metrics.get('evaluated_on', 'holdout')} ({counts.get('train')} train, "
                  f"{counts.get('holdout')} holdout, {counts.get('skipped_null_labels')} "
                  "NULL labels skipped)", soft_wrap=True)
    confusion = metrics.get("confusion") or {}
    labels = confusion.get("labels") or []
    if labels and len(labels) <= 20:
        table = Table(title="confusion (rows: true, columns: predicted)")
        table.add_column("")
        for label in labels:
            table.add_column(escape(label), justify="right")
        for label, row in zip(labels, confusion.get("matrix") or [], strict=False):
            table.add_row(escape(label), *(str(v) for v in row))
        console.print(table)


@app.command()
def train(collection: Annotated[str, typer.Option("--collection", "-c")],
          label_column: Annotated[str, typer.Option("--label-column", "-l")],
          name: Annotated[str, typer.Option("--name", "-n", help="The model's name")],
          kind: Annotated[str, typer.Option(help="logistic | mlp")] = "logistic",
          filter: Annotated[str | None, typer.Option(
              help="A SQL condition on the collection's columns")] = None,
          holdout: Annotated[float, typer.Option(min=0.0, max=0.9)] = 0.2,
          epochs: Annotated[int | None, typer.Option(min=1)] = None,
          seed: Annotated[int | None, typer.Option(min=0)] = None,
          hidden: Annotated[int | None, typer.Option(min=1, help="mlp: hidden units")] = None,
          data_dir: DataDir = None, backend: Backend = None, url: Url = None,
          api_key: ApiKey = None) -> None:
    """Train a classifier on a collection's vectors and a label column, with a progress bar
    (Ctrl-C cancels). Trains on the running server when one answers; otherwise on the data
    directory."""
    settings = _settings(data_dir=data_dir, backend=backend)
    _logging("warning")
    client, tried = _connect(settings, url, api_key, data_dir is not None)
    spec: dict[str, Any] = {"name": name, "collection": collection,
                            "label_column": label_column, "kind": kind, "holdout": holdout}
    extra = {"filter": filter, "epochs": epochs, "seed": seed, "hidden": hidden}
    spec.update({k: v for k, v in extra.items() if v is not None})
    with _errors():
        if client is not None:
            started = client.train_model(spec)
            info = _watch_training(name, lambda: client.model(name),
                                   lambda: client.drop_model(name),
                                   started["progress"].get("epochs"))
        else:
            from service.models.usecase import train_collection

            with _open_catalog(settings, tried, url is not None) as catalog:
                started_info = train_collection(
                    catalog, name, collection, label_column, kind, filter=filter,
                    holdout=holdout, epochs=epochs, seed=seed, hidden=hidden)
                info = _watch_training(name, lambda: catalog.models.get(name).as_dict(),
                                       lambda: catalog.models.drop(name),
                                       started_info.progress.get("epochs"))
    if info.get("state") != "ready":
        _fail(f"model {name!r} is {info.get('state')}: {info.get('error') or 'not trained'}")
    print_model(info)


DEMO_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "page",
               "clock", "text", "immunohistochemistry", "hubble_deep_field")


def _png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def _demo_remote(client: Client, collection: str, images: dict[str, Image.Image],
                 query_img: Image.Image, sql: str) -> tuple[str, list[Any], Any]:
    """The demo on a running server: (weights, hits as (id, score, label), SQL result)."""
    health = client.wait_ready(featurizer=True, on_wait=_say)
    client.drop(collection)
    client.upload_images(collection, [(f"skimage.data.{n}", _png(img))
                                      for n, img in images.items()],
                         labels=list(images), ids=list(range(len(images))))
    hits = [(h["id"], h["score"], (h.get("metadata") or {}).get("label"))
            for h in client.search_image(collection, "query.png", _png(query_img), 3)]
    weights = str(health["featurizer"].get("weights") or "?")
    return weights, hits, _remote_result(client.query(sql))


def _demo_local(catalog: Catalog, featurizer: Any, collection: str,
                images: dict[str, Image.Image], query_img: Image.Image, sql: str,
                thumbnail_size: int) -> tuple[str, list[Any], Any]:
    """The demo on the data directory: (weights, hits as (id, score, label), SQL result)."""
    from service.errors import NotFound
    from service.ingest import ingest_images

    with contextlib.suppress(NotFound):
        catalog.drop_collection(collection)
    ingest_images(catalog, featurizer, collection, list(images.values()),
                  filenames=[f"skimage.data.{n}" for n in images], labels=list(images),
                  ids=np.arange(len(images), dtype=np.int64), thumbnail_size=thumbnail_size)
    found = catalog.search(collection, featurizer.featurize([query_img]), 3)[0]
    hits = [(h.id, h.score, h.metadata.get("label")) for h in found]
    return str(featurizer.weights_name), hits, catalog.query(sql)


@app.command()
def demo(data_dir: DataDir = None, weights: Weights = None,
         collection: Annotated[str, typer.Option()] = "demo_photos",
         url: Url = None, api_key: ApiKey = None) -> None:
    """Ingest scikit-image's sample photographs, then run a similar-image and a SQL query."""
    import skimage.data
    from PIL import Image, ImageOps

    settings = _settings(data_dir=data_dir, weights=weights)
    _logging("warning")
    client, tried = _connect(settings, url, api_key, data_dir is not None)
    images = {n: Image.fromarray(np.asarray(getattr(skimage.data, n)())).convert("RGB")
              for n in DEMO_PHOTOS}
    query_img = ImageOps.mirror(images["chelsea"])
    sql = (f"SELECT id, label, DOT_PRODUCT(feature, (SELECT feature FROM {collection} "
           f"WHERE label = 'coffee')) AS score FROM {collection} "
           f"ORDER BY score DESC LIMIT 3")
    with _errors():
        if client is not None:
            used, hits, result = _demo_remote(client, collection, images, query_img, sql)
        else:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            with _open_catalog(settings, tried, url is not None) as catalog:
                used, hits, result = _demo_local(catalog, _featurizer(settings.weights),
                                                 collection, images, query_img, sql,
                                                 settings.thumbnail_size)
    where = f" at {client.url}" if client is not None else ""
    console.print(f"ingested {len(images)} photographs from scikit-image into "
                  f"[bold]{escape(collection)}[/]{escape(where)} (weights: {escape(used)})")
    console.print("[bold]Similar to mirrored 'chelsea'[/] (search by image)")
    table = Table()
    for column in ("id", "score", "label"):
        table.add_column(column)
    for hit_id, score, label in hits:
        table.add_row(str(hit_id), f"{score:.4f}", str(label))
    console.print(table)
    console.print(f"[bold]SQL:[/] {escape(sql)}")
    print_result(result, title="More like 'coffee', in SQL")


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
