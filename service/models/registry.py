"""The model registry: trained models by name, their training threads, their durable rows and
batched prediction."""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from service.duck_values import NAME_RE
from service.errors import (
    Conflict,
    DotsearchError,
    InvalidInput,
    NotFound,
    NotReady,
    QueryTimeout,
)
from service.models.training import (
    KINDS,
    TrainingStopped,
    TrainOptions,
    fit,
    for_inference,
    from_bytes,
    predict_proba,
    to_bytes,
)
from service.storage import Storage

log = logging.getLogger(__name__)

STATES = ("training", "ready", "failed", "cancelled")
MAX_HIDDEN = 8192
MAX_BATCH = 65_536
SEED_MAX = 2**32 - 1
# How long a DELETE of a training model waits for its thread to stop.
CANCEL_WAIT_S = 30.0


class ModelNotReady(Conflict):
    """A model that exists but cannot predict (still training, failed, or cancelled)."""

    error = "model_not_ready"


@dataclass(frozen=True)
class ModelLimits:
    """What one training may use; each bound is a setting (DOTSEARCH_MODEL_*)."""

    max_rows: int = 1_000_000
    max_bytes: int = 4 << 30
    max_classes: int = 1000
    max_dim: int = 65536
    max_epochs: int = 1000
    max_count: int = 1000
    max_training: int = 2
    train_timeout_s: float = 3600.0
    threads: int = 2

    @classmethod
    def from_settings(cls, settings: Any) -> ModelLimits:
        return cls(max_rows=settings.model_max_rows, max_bytes=settings.model_max_bytes,
                   max_classes=settings.model_max_classes, max_dim=settings.model_max_dim,
                   max_epochs=settings.model_max_epochs, max_count=settings.model_max_count,
                   max_training=settings.model_max_training,
                   train_timeout_s=settings.model_train_timeout_s,
                   threads=settings.model_threads)


@dataclass
class ModelInfo:
    """One model as the API shows it (see ``as_dict`` for the JSON form)."""

    name: str
    kind: str
    state: str
    dim: int
    classes: list[str]
    created_at: str
    source: str
    collection: str | None = None
    label_column: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "collection": self.collection,
                "label_column": self.label_column, "kind": self.kind, "state": self.state,
                "dim": self.dim, "classes": list(self.classes), "created_at": self.created_at,
                "source": self.source, "options": dict(self.options),
                "progress": dict(self.progress), "metrics": self.metrics, "error": self.error}


@dataclass(eq=False)
class _Entry:
    info: ModelInfo
    net: nn.Module | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    failure: DotsearchError | None = None  # why training failed, for a caller that waits


def label_text(value: Any) -> str | None:
    """A label as text (models predict text): None stays None (the row is skipped); JSON
    objects, arrays and vectors are refused."""
    if value is None or isinstance(value, str):
        return None if value is None else str(value)
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        f = float(value)
        if not math.isfinite(f):
            return None
        return str(int(f)) if f.is_integer() else repr(f)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, bytes | bytearray | memoryview):
        raise InvalidInput("the label column holds vectors or bytes; labels must be text, "
                           "numbers or booleans")
    raise InvalidInput(f"a label must be text, a number or a boolean, got a "
                       f"{type(value).__name__}")


def check_name(name: Any) -> str:
    """A model is named as a collection is: NAME_RE, and not starting with `duckdb`."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) \
            or name.lower().startswith("duckdb"):
        raise InvalidInput(f"model name {name!r} must be a letter, then up to 62 letters, "
                           "digits or underscores, not starting with 'duckdb'")
    return name


def as_matrix(vectors: Any, what: str = "vectors") -> npt.NDArray[np.float32]:
    """A finite float32 (n, d) matrix, or InvalidInput."""
    try:
        x = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what} must be numbers: {exc}") from exc
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2 or x.shape[1] == 0:
        raise InvalidInput(f"{what} must be a matrix (n, d), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise InvalidInput(f"{what} must not contain NaN or infinity")
    return x


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class ModelRegistry:
    """Every model of one data directory; thread safe.

    A model is trained in a thread of its own (torch limited to ``limits.threads`` CPU
    threads there) and written to storage in one transaction only when training is done,
    so a crash or a cancel leaves no half-written model. Only finished models are durable;
    the state of a failed or cancelled training is kept in memory until replaced or dropped.
    """

    def __init__(self, storage: Storage, write_order: Callable[[], AbstractContextManager[Any]],
                 limits: ModelLimits | None = None, device: str = "cpu") -> None:
        self._storage = storage
        self._write_order = write_order
        self.limits = limits or ModelLimits()
        self.device = torch.device(device)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._closed = False

    # -- names and reads ----------------------------------------------------------------

    def load(self) -> None:
        """Read every stored model (at start)."""
        for row in self._storage.load_models():
            options = json.loads(row["options"])
            classes = json.loads(row["classes"])
            info = ModelInfo(row["name"], row["kind"], "ready", int(row["dim"]), classes,
                             row["created_at"], row["source"], row["collection"],
                             row["label_column"], options, json.loads(row["progress"]),
                             json.loads(row["metrics"]))
            net = from_bytes(info.kind, info.dim, len(classes), int(options["hidden"]),
                             bytes(row["weights"]), self.device)
            self._entries[info.name] = _Entry(info, for_inference(net))
        if self._entries:
            log.info("loaded %d trained models", len(self._entries))

    def resolve(self, name: str) -> str | None:
        """The model a (case-insensitive, as in SQL) name refers to, or None."""
        with self._lock:
            return self.resolve_locked(name)

    def resolve_locked(self, name: str) -> str | None:
        if name in self._entries:
            return name
        matches = [n for n in self._entries if n.lower() == str(name).lower()]
        return matches[0] if len(matches) == 1 else None

    def _entry(self, name: str) -> _Entry:
        found = self.resolve_locked(name) if isinstance(name, str) else None
        entry = self._entries.get(found) if found is not None else None
        if entry is None:
            raise NotFound(f"no model named {name!r}")
        return entry

    def get(self, name: str) -> ModelInfo:
        with self._lock:
            return _copy(self._entry(name).info)

    def ready(self, name: str) -> tuple[ModelInfo, nn.Module]:
        """A model that can predict (NotFound, or 409 model_not_ready)."""
        with self._lock:
            entry = self._entry(name)
            if entry.info.state != "ready" or entry.net is None:
                why = {"training": "is still training; wait until its state is ready",
                       "failed": f"failed to train: {entry.info.error}",
                       "cancelled": "was cancelled before it finished training"}
                raise ModelNotReady(f"model {entry.info.name!r} "
                                    f"{why.get(entry.info.state, 'is not ready')}")
            return _copy(entry.info), entry.net

    # -- prediction ---------------------------------------------------------------------

    def predict(self, name: str, vectors: Any
                ) -> tuple[list[str], npt.NDArray[np.float32], list[str]]:
        """(labels, probabilities (n, C) float32, classes) for a batch of vectors."""
        info, net = self.ready(name)
        x = as_matrix(vectors)
        self.check_dim(info, x.shape[1])
        probs = self.proba(net, x)
        best = probs.argmax(axis=1) if len(probs) else np.empty(0, np.int64)
        return [info.classes[i] for i in best], probs, list(info.classes)

    def proba(self, net: nn.Module, x: npt.NDArray[np.float32] | torch.Tensor
              ) -> npt.NDArray[np.float32]:
        """Probabilities for checked inputs, batched on the model's device."""
        torch.set_num_threads(self.limits.threads)  # this thread only (OpenMP)
        return predict_proba(net, x, self.device)

    @staticmethod
    def check_dim(info: ModelInfo, dim: int) -> None:
        if dim != info.dim:
            raise InvalidInput(f"model {info.name!r} takes {info.dim}-d vectors, got {dim}-d")

    # -- training -----------------------------------------------------------------------

    def options(self, kind: str, *, holdout: Any = None, epochs: Any = None, seed: Any = None,
                hidden: Any = None, lr: Any = None, batch_size: Any = None,
                weight_decay: Any = None) -> TrainOptions:
        """Checked training options (InvalidInput naming the first bad one)."""
        if kind not in KINDS:
            raise InvalidInput(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        base = TrainOptions()
        out = TrainOptions(
            holdout=_number("holdout", base.holdout if holdout is None else holdout, 0.0, 0.9),
            epochs=_integer("epochs", base.epochs if epochs is None else epochs, 1,
                            self.limits.max_epochs),
            seed=_integer("seed", base.seed if seed is None else seed, 0, SEED_MAX),
            hidden=_integer("hidden", base.hidden if hidden is None else hidden, 1, MAX_HIDDEN),
            lr=_number("lr", base.lr if lr is None else lr, 1e-8, 10.0),
            batch_size=_integer("batch_size", base.batch_size if batch_size is None
                                else batch_size, 1, MAX_BATCH),
            weight_decay=_number("weight_decay", base.weight_decay if weight_decay is None
                                 else weight_decay, 0.0, 1.0))
        return out

    def check_new(self, name: str) -> None:
        """Conflict when ``name`` is taken (any case) by a ready or training model, and the
        count limits; nothing is reserved."""
        check_name(name)
        with self._lock:
            self._check_new_locked(name)

    def _check_new_locked(self, name: str) -> None:
        if self._closed:
            raise NotReady("the model registry is closed")
        for other, entry in self._entries.items():
            if other.lower() == name.lower() and entry.info.state in ("training", "ready"):
                what = "is training" if entry.info.state == "training" else "exists"
                raise Conflict(f"model {other!r} already {what}; drop it first")
        live = [e for e in self._entries.values() if e.info.state in ("training", "ready")]
        if len(live) >= self.limits.max_count:
            raise Conflict(f"there are {len(live)} models, the limit "
                           "(DOTSEARCH_MODEL_MAX_COUNT); drop some first")
        training = sum(e.info.state == "training" for e in self._entries.values())
        if training >= self.limits.max_training:
            raise NotReady(f"{training} models are training, the most at once "
                           "(DOTSEARCH_MODEL_MAX_TRAINING); retry when one is done")

    def check_size(self, rows: int, dim: int) -> None:
        """The row, dimension and byte bounds of a training matrix, before it is read."""
        lim = self.limits
        if dim > lim.max_dim:
            raise InvalidInput(f"vectors of {dim} dimensions; models take at most "
                               f"{lim.max_dim} (DOTSEARCH_MODEL_MAX_DIM)")
        if rows > lim.max_rows:
            raise InvalidInput(f"{rows} training rows; the limit is {lim.max_rows} "
                               "(DOTSEARCH_MODEL_MAX_ROWS): narrow the query or filter")
        if rows * dim * 4 > lim.max_bytes:
            raise InvalidInput(f"{rows} x {dim} training vectors take more than "
                               f"{lim.max_bytes} bytes (DOTSEARCH_MODEL_MAX_BYTES)")

    def train(self, name: str, kind: str, vectors: Any, labels: Sequence[Any], *,
              holdout: Any = None, epochs: Any = None, seed: Any = None,
              source: str = "", collection: str | None = None,
              label_column: str | None = None, background: bool = True,
              **options: Any) -> ModelInfo:
        """Train a model on ``vectors`` (n, d) and ``labels`` (n; None skipped and counted).

        Everything is checked before anything is created. ``background``: answer at once
        with the model in state "training" (see ``get`` for progress); otherwise wait and
        return it ready, or raise why it is not (nothing is left behind then).
        """
        check_name(name)
        opts = self.options(kind, holdout=holdout, epochs=epochs, seed=seed, **options)
        x = as_matrix(vectors)
        self.check_size(len(x), x.shape[1])
        if len(labels) != len(x):
            raise InvalidInput(f"{len(labels)} labels for {len(x)} vectors")
        texts = [label_text(v) for v in labels]
        keep = np.fromiter((t is not None for t in texts), dtype=bool, count=len(texts))
        skipped = int(len(texts) - keep.sum())
        kept = [t for t in texts if t is not None]
        classes = sorted(set(kept))
        if len(classes) < 2:
            raise InvalidInput(f"training needs at least two classes; the labels hold "
                               f"{len(classes)} ({', '.join(map(repr, classes)) or 'none'}) "
                               f"in {len(kept)} rows with a label")
        if len(classes) > self.limits.max_classes:
            raise InvalidInput(f"{len(classes)} classes; the limit is "
                               f"{self.limits.max_classes} (DOTSEARCH_MODEL_MAX_CLASSES)")
        index = {c: i for i, c in enumerate(classes)}
        y = np.fromiter((index[t] for t in kept), dtype=np.int64, count=len(kept))
        x = x[keep] if skipped else x
        info = ModelInfo(name, kind, "training", int(x.shape[1]), classes, _now(), source,
                         collection, label_column, opts.as_dict(),
                         {"epoch": 0, "epochs": opts.epochs, "loss": None})
        entry = _Entry(info)
        with self._lock:
            self._check_new_locked(name)
            for other in [n for n in self._entries if n.lower() == name.lower()]:
                del self._entries[other]  # a failed or cancelled one of that name
            self._entries[name] = entry
        entry.thread = threading.Thread(target=self._run, args=(entry, x, y, opts, skipped),
                                        name=f"dotsearch-train-{name}", daemon=True)
        started = _copy(info)  # as it was when training started (the 202's answer)
        entry.thread.start()
        if background:
            return started
        entry.thread.join()
        with self._lock:
            if entry.info.state != "ready":
                if self._entries.get(name) is entry:
                    del self._entries[name]
                raise entry.failure or _failure(entry.info)
            return _copy(entry.info)

    def _run(self, entry: _Entry, x: npt.NDArray[np.float32], y: npt.NDArray[np.int64],
             opts: TrainOptions, skipped: int) -> None:
        info = entry.info
        deadline = time.monotonic() + self.limits.train_timeout_s

        def stop() -> str | None:
            if entry.cancel.is_set():
                return "cancelled"
            return "timeout" if time.monotonic() > deadline else None

        def on_epoch(epoch: int, loss: float) -> None:
            if not math.isfinite(loss):
                raise InvalidInput(f"training diverged at epoch {epoch} (the loss is not "
                                   "finite); lower lr")
            with self._lock:
                info.progress = {"epoch": epoch, "epochs": opts.epochs, "loss": loss}

        try:
            torch.set_num_threads(self.limits.threads)  # this thread only (OpenMP)
            net, result = fit(info.kind, x, y, info.classes, opts, device=self.device,
                              on_epoch=on_epoch, stop=stop)
            result["counts"]["skipped_null_labels"] = skipped
            blob = to_bytes(net)
            if entry.cancel.is_set():
                raise TrainingStopped("cancelled")
            with self._lock:
                info.metrics = result
            row = {"name": info.name, "kind": info.kind, "collection": info.collection,
                   "label_column": info.label_column, "dim": info.dim,
                   "classes": json.dumps(info.classes), "source": info.source,
                   "options": json.dumps(info.options), "metrics": json.dumps(result),
                   "progress": json.dumps(info.progress), "created_at": info.created_at,
                   "weights": blob}
            with self._write_order():
                if entry.cancel.is_set():
                    raise TrainingStopped("cancelled")
                self._storage.put_model(row)  # one transaction: all of the model or none
                with self._lock:
                    entry.net = for_inference(net)
                    info.state = "ready"
            log.info("model %s trained: %s", info.name, {
                k: result.get(k) for k in ("accuracy", "macro_f1", "counts")})
        except TrainingStopped as stopped:
            with self._lock:
                if stopped.reason == "cancelled":
                    info.state = "cancelled"
                else:
                    entry.failure = QueryTimeout(
                        f"training ran longer than {self.limits.train_timeout_s:g} s "
                        "(DOTSEARCH_MODEL_TRAIN_TIMEOUT_S)")
                    info.state, info.error = "failed", entry.failure.message
        except DotsearchError as exc:
            with self._lock:
                entry.failure = exc
                info.state, info.error = "failed", exc.message
        except Exception as exc:  # never a thread dying silently: the state says it failed
            log.exception("training model %s failed", info.name)
            with self._lock:
                info.state, info.error = "failed", f"training failed: {type(exc).__name__}"

    # -- dropping -----------------------------------------------------------------------

    def drop(self, name: str, *, if_exists: bool = False) -> bool:
        """Drop a model, or cancel its training (waiting for it to stop). False when there
        is none and ``if_exists``."""
        with self._lock:
            found = self.resolve_locked(name)
            if found is None:
                if if_exists:
                    return False
                raise NotFound(f"no model named {name!r}")
            entry = self._entries[found]
            training = entry.info.state == "training"
            if training:
                entry.cancel.set()
        if training:
            if entry.thread is not None:
                entry.thread.join(CANCEL_WAIT_S)
            with self._lock:
                if entry.info.state != "ready":
                    if entry.info.state == "training":
                        entry.info.state = "cancelled"  # it will stop at its next step
                    return True
        with self._write_order():
            with self._lock:
                if self._entries.get(found) is not entry:
                    return True
                stored = entry.info.state == "ready"
            if stored:
                self._storage.delete_model(found)  # commits: only then is it gone
            with self._lock:
                if self._entries.get(found) is entry:
                    del self._entries[found]
        return True

    def close(self) -> None:
        """Cancel every training and wait for it to stop (before storage closes)."""
        with self._lock:
            self._closed = True
            running = [e for e in self._entries.values() if e.info.state == "training"]
            for entry in running:
                entry.cancel.set()
        for entry in running:
            if entry.thread is not None:
                entry.thread.join(CANCEL_WAIT_S)

    # Last in the class: below it, `list` would name this method in annotations.
    def list(self) -> list[ModelInfo]:
        with self._lock:
            return [_copy(e.info) for _, e in sorted(self._entries.items())]


def _copy(info: ModelInfo) -> ModelInfo:
    return ModelInfo(info.name, info.kind, info.state, info.dim, list(info.classes),
                     info.created_at, info.source, info.collection, info.label_column,
                     dict(info.options), dict(info.progress),
                     None if info.metrics is None else json.loads(json.dumps(info.metrics)),
                     info.error)


def _failure(info: ModelInfo) -> DotsearchError:
    if info.state == "cancelled":
        return Conflict(f"training of model {info.name!r} was cancelled")
    return DotsearchError(f"training of model {info.name!r} failed: {info.error}")


def _number(what: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{what} must be a number in {low:g}..{high:g}, got {value!r}")
    if not math.isfinite(float(value)) or not low <= float(value) <= high:
        raise InvalidInput(f"{what} must be a number in {low:g}..{high:g}, got {value!r}")
    return float(value)


def _integer(what: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidInput(f"{what} must be an integer in {low}..{high}, got {value!r}")
    return int(value)
