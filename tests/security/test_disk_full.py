"""A full disk under the data directory (tmpfs): writes fail in our words, reads go on, no loss."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import numpy as np
import pytest

from service.duck_values import map_duckdb_error
from service.errors import InvalidInput, StorageError
from service.storage import CollectionRecord, Storage
from tests.serve_support import free_port, start_server, stop_server, wait_ready

DIM = 256  # 1 KB a vector
LEAKS = ("Error:", "Exception", "TransactionContext", "FATAL", "Could not", ".wal", ".duckdb",
         "errno", "Errno")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` for the block; unmounted whatever happens."""
    path.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command here")
    if done.returncode != 0:
        if re.search(r"permission denied|not permitted|superuser", done.stderr, re.I):
            pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
        raise AssertionError(f"mount failed: {done.stderr}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)


def fill(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for chunk in (1 << 16, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * chunk):
                    pass
    finally:
        os.close(fd)


def clean_storage_message(message: str, data_dir: Path) -> str:
    """The message of a storage failure, checked to be in our words: no DuckDB exception
    names or "Error:" prefixes, no file-system paths."""
    for leak in LEAKS:
        assert leak not in message, message
    assert str(data_dir) not in message, message
    assert not re.search(r"(^|[\s\"'(=])/\w", message), message
    return message


def vectors(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


# -- DuckDB's errors in our words --------------------------------------------------------


def test_duckdb_storage_errors_are_told_in_our_words() -> None:
    wal = 'Could not write file "/srv/data/dotsearch.duckdb.wal": No space left on device'
    err = map_duckdb_error(duckdb.TransactionException(
        f"TransactionContext Error: Failed to commit: {wal}"), "upsert into 'x'")
    assert isinstance(err, StorageError)
    assert "disk holding the data directory is full" in clean_storage_message(
        err.message, Path("/srv/data"))
    err = map_duckdb_error(duckdb.FatalException(
        "FATAL Error: Failed: database has been invalidated because of a previous fatal "
        'error.\nOriginal error: "Failed to create checkpoint because of error: '
        f'{wal}"'), "query failed")
    assert isinstance(err, StorageError)
    assert "restart the server" in clean_storage_message(err.message, Path("/srv/data"))
    # A user's value that happens to read like a storage failure is no storage failure.
    err = map_duckdb_error(duckdb.ConversionException(
        "Conversion Error: Could not convert string 'No space left' to INT64"), "insert")
    assert isinstance(err, InvalidInput)


# -- the storage layer on a full tmpfs -----------------------------------------------------


def _write(storage: Storage, rec: CollectionRecord, ids: np.ndarray, vecs: np.ndarray) -> None:
    storage.begin()
    try:
        storage.stage_upsert(rec, ids, vecs, None, None, overwrite=False)
    except duckdb.Error as exc:
        storage.rollback()
        raise map_duckdb_error(exc, "upsert") from exc
    storage.commit()


def _stored(data: Path, rec: CollectionRecord) -> dict[int, np.ndarray]:
    storage = Storage(data)
    try:
        return {int(i): v for ids, vs in storage.iter_vectors(rec)
                for i, v in zip(ids, vs, strict=True)}
    finally:
        storage.close()


def _fill_until_refused(storage: Storage, rec: CollectionRecord, data: Path,
                        acked: dict[int, np.ndarray], failed: list[int]) -> str:
    """Upsert 100-row batches (the disk topped up with a filler after a few) until one is
    refused; the refusal's message."""
    for b in range(400):
        if b == 3:
            fill(data / "filler")
        ids = np.arange(b * 100, b * 100 + 100, dtype=np.int64)
        vecs = vectors(b, 100)
        try:
            _write(storage, rec, ids, vecs)
        except StorageError as exc:
            failed.extend(ids.tolist())
            return clean_storage_message(exc.message, data)
        acked.update(zip(ids.tolist(), vecs, strict=True))
    raise AssertionError("the disk never filled up")


def _count(storage: Storage) -> int:
    row = storage.reader().execute('SELECT count(*) FROM "docs"').fetchall()[0]
    return int(row[0])


def test_failed_checkpoint_reopens_the_database(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With checkpoint pacing off, a commit's checkpoint runs out of space and DuckDB
    invalidates its database: storage reopens it, reads go on, nothing acked is lost."""
    monkeypatch.setattr(Storage, "_pace_checkpoints", lambda self: None)
    rec = CollectionRecord("docs", DIM, "l2", "float32")
    acked: dict[int, np.ndarray] = {}
    failed: list[int] = []
    with tmpfs(tmp_path / "data", "8m") as data:
        storage = Storage(data, checkpoint_threshold="0MB")
        try:
            storage.create_table(rec)
            message = _fill_until_refused(storage, rec, data, acked, failed)
            assert "full" in message and "engine stopped" in message, message
            assert "reopened" in message, message
            assert _count(storage) == len(acked)  # reads go on in the reopened database
            (data / "filler").unlink()
            _write(storage, rec, np.array([10**6]), vectors(99, 1))  # space back: no restart
            acked[10**6] = vectors(99, 1)[0]
            assert _count(storage) == len(acked)
        finally:
            storage.close()
        stored = _stored(data, rec)
    assert sorted(stored) == sorted(acked) and not set(failed) & set(stored)
    for i, v in acked.items():
        np.testing.assert_array_equal(stored[i], v)


def test_paced_checkpoints_leave_the_database_running(tmp_path: Path) -> None:
    """With pacing on, a nearly full disk pauses checkpoints: a write that finds no room
    fails its WAL append alone, and DuckDB keeps working (the same cursors go on)."""
    rec = CollectionRecord("docs", DIM, "l2", "float32")
    acked: dict[int, np.ndarray] = {}
    failed: list[int] = []
    with tmpfs(tmp_path / "data", "8m") as data:
        storage = Storage(data, checkpoint_threshold="0MB")
        try:
            storage.create_table(rec)
            cursor = storage.reader()
            message = _fill_until_refused(storage, rec, data, acked, failed)
            assert "full" in message and "stopped" not in message, message
            assert storage.reader() is cursor and _count(storage) == len(acked)
            with pytest.raises(StorageError):
                _write(storage, rec, np.arange(10**6, 10**6 + 50), vectors(98, 50))
            failed.extend(range(10**6, 10**6 + 50))
            (data / "filler").unlink()
            _write(storage, rec, np.array([2 * 10**6]), vectors(97, 1))
            acked[2 * 10**6] = vectors(97, 1)[0]
        finally:
            storage.close()
        stored = _stored(data, rec)
    assert sorted(stored) == sorted(acked) and not set(failed) & set(stored)
    for i, v in acked.items():
        np.testing.assert_array_equal(stored[i], v)


# -- a real server on a full disk --------------------------------------------------------



def _refused(r: httpx.Response, data: Path) -> str:
    assert r.status_code == 507, r.text
    body = r.json()
    assert body["error"] == "storage_error", body
    return clean_storage_message(body["message"], data)


def _upsert(base: str, ids: list[int], vecs: np.ndarray) -> httpx.Response:
    return httpx.post(f"{base}/v1/collections/disk/vectors", timeout=60, json={
        "ids": ids, "vectors": vecs.tolist(), "metadata": [{"label": f"l{i}"} for i in ids]})


def _sql(base: str, sql: str, params: Any = None) -> httpx.Response:
    return httpx.post(f"{base}/v1/query", json={"sql": sql, "params": params}, timeout=60)


def _check_reads(base: str, acked: dict[int, np.ndarray]) -> None:
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    some = sorted(acked)[len(acked) // 2]
    r = httpx.post(f"{base}/v1/collections/disk/search", timeout=60,
                   json={"vector": acked[some].tolist(), "k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["id"] == some  # l2: the vector itself, distance 0
    r = httpx.get(f"{base}/v1/collections/disk/vectors/{some}", timeout=30)
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(r.json()["vector"], dtype=np.float32), acked[some])
    assert r.json()["metadata"] == {"label": f"l{some}"}
    r = _sql(base, "SELECT count(*) AS n FROM disk")
    assert r.status_code == 200 and r.json()["rows"] == [[len(acked)]], r.text


def _stored_over_rest(base: str) -> dict[int, np.ndarray]:
    r = _sql(base, "SELECT id, feature FROM disk ORDER BY id")
    assert r.status_code == 200, r.text
    return {int(i): _vector(v) for i, v in r.json()["rows"]}


def _vector(value: Any) -> np.ndarray:
    """A projected vector: a JSON array, or its packed float32 bytes as 0x-hex."""
    if isinstance(value, str) and value.startswith("0x"):
        return np.frombuffer(bytes.fromhex(value[2:]), dtype="<f4").astype(np.float32)
    return np.asarray(value, dtype=np.float32)


def _fill_server(base: str, data: Path, acked: dict[int, np.ndarray],
                 failed: list[int]) -> None:
    """Upsert 64-row batches, the disk topped up with a filler after 1024 rows, until one is
    refused; then take the last free byte too."""
    for b in range(300):
        if b == 16:
            fill(data / "filler")
        ids = list(range(b * 64, b * 64 + 64))
        vecs = vectors(b, 64)
        r = _upsert(base, ids, vecs)
        if r.status_code != 200:
            assert "full" in _refused(r, data)
            failed.extend(ids)
            fill(data / "filler")  # DuckDB truncated its WAL back: take that room too
            return
        acked.update(zip(ids, vecs, strict=True))
    raise AssertionError("the disk never filled up")


@pytest.mark.slow
def test_server_on_a_full_disk(tmp_path: Path) -> None:
    log = tmp_path / "server.log"  # outside the tmpfs
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    acked: dict[int, np.ndarray] = {}
    failed: list[int] = []
    with tmpfs(tmp_path / "data", "8m") as data:
        proc = start_server(data, port, log)
        try:
            wait_ready(base, proc, log)
            r = httpx.post(f"{base}/v1/collections", timeout=30, json={
                "name": "disk", "dim": DIM, "metric": "l2", "columns": {"label": "VARCHAR"}})
            assert r.status_code == 201, r.text
            _fill_server(base, data, acked, failed)
            _check_reads(base, acked)
            # More writes on the full disk: REST upsert, REST delete, SQL INSERT.
            ids = list(range(10**6, 10**6 + 32))
            _refused(_upsert(base, ids, vectors(7, 32)), data)
            failed.extend(ids)
            # A delete logs 8 bytes a row: 1000 rows outgrow the slack in the WAL's last page.
            gone = sorted(acked)[:1000]
            r = httpx.request("DELETE", f"{base}/v1/collections/disk/vectors",
                              json={"ids": gone}, timeout=60)
            if r.status_code == 200:  # should DuckDB's WAL still find room for it
                for i in gone:
                    del acked[i]
            else:
                _refused(r, data)
            rows = ", ".join(f"({2 * 10**6 + i}, :v{i}, 'sql')" for i in range(16))
            sql_vectors = vectors(8, 16)
            params = {f"v{i}": sql_vectors[i].tolist() for i in range(16)}
            _refused(_sql(base, f"INSERT INTO disk (id, feature, label) VALUES {rows}", params),
                     data)
            failed.extend(2 * 10**6 + i for i in range(16))
            _check_reads(base, acked)
            # Space is back: writes work again without a restart.
            (data / "filler").unlink()
            ids = list(range(3 * 10**6, 3 * 10**6 + 32))
            r = _upsert(base, ids, vectors(9, 32))
            assert r.status_code == 200, r.text
            acked.update(zip(ids, vectors(9, 32), strict=True))
            _check_reads(base, acked)
        finally:
            stop_server(proc)
        proc = start_server(data, port, log)
        try:
            wait_ready(base, proc, log)
            stored = _stored_over_rest(base)
            _check_reads(base, acked)
        finally:
            stop_server(proc)
    assert sorted(stored) == sorted(acked)
    assert not set(failed) & set(stored), "a refused batch was stored, in part or whole"
    for i, v in acked.items():
        np.testing.assert_array_equal(stored[i], v)
