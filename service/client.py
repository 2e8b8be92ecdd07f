"""A small HTTP client of a running dotsearch server (standard library only), for the CLI."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from service.ingest import FileItem, Sink

PROBE_TIMEOUT_S = 1.0
REQUEST_TIMEOUT_S = 600.0


class ServerError(Exception):
    """The server answered with an error: its HTTP status, error name and message."""

    def __init__(self, status: int, error: str, message: str) -> None:
        super().__init__(f"{error}: {message}")
        self.status = status
        self.error = error
        self.message = message


class Unreachable(Exception):
    """The server stopped answering (connection refused, reset, timed out)."""


def default_url(host: str, port: int) -> str:
    """The URL of a server bound to host:port, as seen from this machine."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _quote_param(value: str) -> str:
    """A quoted Content-Disposition parameter (python-multipart undoes these escapes)."""
    text = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + text.replace("\r", "%0D").replace("\n", "%0A") + '"'


def encode_multipart(fields: Sequence[tuple[str, str]],
                     files: Sequence[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """(name, value) fields and (field, filename, bytes) files -> body and content type."""
    boundary = f"dotsearch-{uuid.uuid4().hex}"
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; "
                     f"name={_quote_param(name)}\r\n\r\n".encode() + value.encode() + b"\r\n")
    for name, filename, data in files:
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name={_quote_param(name)}; "
                f"filename={_quote_param(filename)}\r\n"
                "Content-Type: application/octet-stream\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


class Client:
    """JSON over HTTP to one server; errors become ``ServerError`` or ``Unreachable``."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key or None

    def _send(self, method: str, path: str, body: bytes | None = None,
              content_type: str | None = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        request = urllib.request.Request(self.url + path, data=body, headers=headers,
                                         method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                payload = json.loads(raw)
                error = str(payload.get("error", "http_error"))
                message = str(payload.get("message") or payload.get("detail") or raw[:200])
            except (ValueError, AttributeError):
                error, message = "http_error", f"HTTP {exc.code}: {raw[:200]!r}"
            raise ServerError(exc.code, error, message) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"no answer from {self.url}: {reason}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError as exc:
            raise ServerError(200, "bad_response", f"not JSON from {self.url}{path}") from exc

    def get(self, path: str, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        return self._send("GET", path, timeout=timeout)

    def post_json(self, path: str, payload: Any) -> Any:
        return self._send("POST", path, json.dumps(payload).encode(), "application/json")

    def post_form(self, path: str, fields: Sequence[tuple[str, str]],
                  files: Sequence[tuple[str, str, bytes]]) -> Any:
        body, content_type = encode_multipart(fields, files)
        return self._send("POST", path, body, content_type)

    def delete(self, path: str) -> Any:
        return self._send("DELETE", path)

    # -- the server --------------------------------------------------------------------

    def health(self, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any] | None:
        """/health when a dotsearch server answers at this URL, else None."""
        try:
            health = self.get("/health", timeout=timeout)
        except (ServerError, Unreachable):
            return None
        if isinstance(health, dict) and "status" in health and "featurizer" in health:
            return health
        return None

    def wait_ready(self, *, featurizer: bool, timeout: float = 300.0,
                   on_wait: Callable[[str], None] | None = None) -> dict[str, Any]:
        """/health once the server has opened its data (and its featurizer is ready)."""
        deadline = time.monotonic() + timeout
        told = ""
        while True:
            health = self.health(timeout=5.0)
            if health is None:
                raise Unreachable(f"the server at {self.url} stopped answering")
            state = str(health["featurizer"].get("state"))
            if featurizer and state in ("failed", "disabled"):
                why = health["featurizer"].get("error") or "not loaded"
                raise ServerError(503, "not_ready", f"the server's featurizer is {state}: {why}")
            waiting = ("starting" if health.get("status") != "ok"
                       else "loading its featurizer" if featurizer and state != "ready" else "")
            if not waiting:
                return health
            if time.monotonic() > deadline:
                raise ServerError(503, "not_ready", f"the server at {self.url} is still "
                                  f"{waiting} after {timeout:.0f} s")
            if on_wait and waiting != told:
                on_wait(f"waiting for the server at {self.url}: {waiting}")
                told = waiting
            time.sleep(0.5)

    # -- collections, SQL, images ------------------------------------------------------

    @staticmethod
    def _path(collection: str, tail: str = "") -> str:
        return f"/v1/collections/{urllib.parse.quote(collection, safe='')}{tail}"

    def collection(self, name: str) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = self.get(self._path(name))
        except ServerError as exc:
            if exc.status == 404:
                return None
            raise
        return info

    def drop(self, name: str) -> bool:
        try:
            self.delete(self._path(name))
        except ServerError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def query(self, sql: str) -> dict[str, Any]:
        result: dict[str, Any] = self.post_json("/v1/query", {"sql": sql})
        return result

    # -- trained models ----------------------------------------------------------------

    @staticmethod
    def _model_path(name: str, tail: str = "") -> str:
        return f"/v1/models/{urllib.parse.quote(name, safe='')}{tail}"

    def train_model(self, spec: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/models: the model in state "training" (202)."""
        info: dict[str, Any] = self.post_json("/v1/models", spec)
        return info

    def model(self, name: str) -> dict[str, Any]:
        info: dict[str, Any] = self.get(self._model_path(name))
        return info

    def drop_model(self, name: str) -> Any:
        return self.delete(self._model_path(name))

    def predict(self, name: str, vectors: Sequence[Sequence[float]]) -> list[dict[str, Any]]:
        """{"label", "probabilities"} for each vector."""
        got: dict[str, Any] = self.post_json(self._model_path(name, "/predict"),
                                             {"vectors": [list(map(float, v)) for v in vectors]})
        results: list[dict[str, Any]] = got["results"]
        return results

    def stored_filenames(self, collection: str) -> set[str]:
        """Filenames already in the collection (resumable ingest); none if it is new."""
        info = self.collection(collection)
        if info is None:
            return set()
        if "filename" not in info.get("columns", {}):
            raise ServerError(422, "invalid_input",
                              f"collection {collection!r} has no 'filename' column")
        result = self.query(f'SELECT filename FROM "{collection}" WHERE filename IS NOT NULL')
        return {str(row[0]) for row in result["rows"]}

    def upload_images(self, collection: str, files: Sequence[tuple[str, bytes]], *,
                      labels: Sequence[str] | None = None,
                      ids: Sequence[int] | None = None) -> dict[str, Any]:
        """POST /v1/collections/{name}/images: (filename, bytes) files, one commit."""
        fields = [("labels", lab) for lab in labels or []]
        fields += [("ids", str(i)) for i in ids or []]
        result: dict[str, Any] = self.post_form(
            self._path(collection, "/images"), fields,
            [("files", name, data) for name, data in files])
        return result

    def search_image(self, collection: str, filename: str, data: bytes, k: int
                     ) -> list[dict[str, Any]]:
        result = self.post_form(self._path(collection, "/search/image"), [("k", str(k))],
                                [("file", filename, data)])
        hits: list[dict[str, Any]] = result["results"]
        return hits

    def sink(self, collection: str) -> Sink:
        """A folder-ingest sink that uploads each batch; when the server refuses a batch for
        one file (too large, unreadable there), the files go one by one and only the
        refused ones are reported."""

        def upload(items: Sequence[FileItem]) -> None:
            labels = [i.label for i in items if i.label is not None]
            self.upload_images(collection, [(i.name, i.data) for i in items],
                               labels=labels if len(labels) == len(items) else None)

        def store(items: list[FileItem]) -> list[tuple[str, str]]:
            try:
                upload(items)
                return []
            except ServerError as exc:
                if exc.status not in (413, 415) or len(items) == 1:
                    if exc.status in (413, 415):
                        return [(items[0].name, exc.message)]
                    raise
            refused = []
            for item in items:
                try:
                    upload([item])
                except ServerError as exc:
                    if exc.status not in (413, 415):
                        raise
                    refused.append((item.name, exc.message))
            return refused

        return store
