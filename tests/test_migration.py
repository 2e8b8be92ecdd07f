"""Storage schema version 1 -> 3: a version-1 data directory, written here with the SQL
that version 1 ran, is migrated in place at open, in one transaction."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import duckdb
import numpy as np
import pytest

import service.storage
from service.collections import CollectionStore
from service.errors import StorageError
from service.storage import (
    COLLECTIONS_TABLE,
    DB_FILENAME,
    META_TABLE,
    RECORD_FIELDS,
    SCHEMA_VERSION,
)

D = 6
N = 40
V1_FIELDS = ["name", "dim", "metric", "dtype", "columns", "thumbnails", "vector_column"]
# (name, metric, dtype, metadata columns in stored order, thumbnails, vector column)
V1_COLLECTIONS = [
    ("photos", "dot", "float32", {"year": "BIGINT", "label": "VARCHAR", "extra": "JSON"}, True,
     "feature"),
    ("tiny", "l2", "float16", {}, False, "vec"),
]


def _vectors(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((N, D)).astype(np.float32)


def _write_v1(data: Path) -> None:
    """A data directory as version 1 left it (its catalog tables, tables and rows)."""
    data.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(data / DB_FILENAME))
    con.execute("BEGIN")
    con.execute(f"CREATE TABLE {META_TABLE} (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute(f"CREATE TABLE {COLLECTIONS_TABLE} (name VARCHAR PRIMARY KEY, dim INTEGER, "
                "metric VARCHAR, dtype VARCHAR, columns VARCHAR, thumbnails BOOLEAN, "
                "vector_column VARCHAR)")
    con.execute(f"INSERT INTO {META_TABLE} VALUES ('schema_version', $v)", {"v": "1"})
    con.execute("COMMIT")
    for seq, (name, metric, dtype, columns, thumbs, vector) in enumerate(V1_COLLECTIONS, 1):
        cols = ["id BIGINT PRIMARY KEY", f'"{vector}" BLOB NOT NULL']
        cols += [f'"{c}" {t}' for c, t in columns.items()]
        if thumbs:
            cols.append("_thumbnail BLOB")
        con.execute("BEGIN")
        con.execute(f'CREATE TABLE "{name}" ({", ".join(cols)})')
        con.execute(f"INSERT INTO {COLLECTIONS_TABLE} VALUES ($n, $d, $m, $t, $c, $th, $v)",
                    {"n": name, "d": D, "m": metric, "t": dtype, "c": json.dumps(columns),
                     "th": thumbs, "v": vector})
        con.execute("COMMIT")
        vectors = _vectors(seq)
        con.execute("BEGIN")
        for i in range(N):
            row: list[object] = [i, vectors[i].astype("<f4").tobytes()]
            if columns:
                row += [2000 + i, f"l{i % 3}", json.dumps({"i": i})]
            if thumbs:
                row.append(bytes([i]) * 4 if i % 2 == 0 else None)
            con.execute(f'INSERT INTO "{name}" VALUES ({", ".join("?" * len(row))})', row)
        con.execute(f"INSERT OR REPLACE INTO {META_TABLE} VALUES ('commit_seq', $s)",
                    {"s": str(seq)})
        con.execute("COMMIT")
    con.close()


def _stored(data: Path) -> tuple[str | None, list[str]]:
    """The schema version and the catalog table's columns, read with plain DuckDB."""
    con = duckdb.connect(str(data / DB_FILENAME))
    try:
        row = con.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'"
                          ).fetchone()
        fields = [r[0] for r in con.execute(f"DESCRIBE {COLLECTIONS_TABLE}").fetchall()]
    finally:
        con.close()
    return (row[0] if row else None), fields


def test_a_version_1_directory_is_migrated_at_open(tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    _write_v1(tmp_path)
    with caplog.at_level(logging.INFO, logger="service.storage"):
        store = CollectionStore(tmp_path, backend="cpu")
    assert sum("migrated" in r.getMessage() for r in caplog.records) == 1
    with store:
        assert store.names() == ["photos", "tiny"]
        photos, tiny = store.get_collection("photos"), store.get_collection("tiny")
        assert photos.column_order == ["id", "feature", "year", "label", "extra"]
        assert list(photos.columns) == ["year", "label", "extra"]
        assert (photos.vector_type, photos.auto_increment, photos.count) == ("VECTOR(6)",
                                                                             False, N)
        assert tiny.column_order == ["id", "vec"] and tiny.vector_type == "VECTOR(6, F16)"
        assert (tiny.dtype, tiny.count, tiny.auto_increment) == ("float16", N, False)
        vectors = _vectors(1)
        hits = store.search("photos", vectors[7], 3)[0]
        assert hits[0].id == int(np.argmax(vectors @ vectors[7]))
        assert hits[0].metadata == {"year": 2000 + hits[0].id, "label": f"l{hits[0].id % 3}",
                                    "extra": {"i": hits[0].id}}
        assert store.search("tiny", _vectors(2)[5], 1)[0][0].id == 5
        vec, meta = store.get_vector("photos", 4)
        np.testing.assert_array_equal(vec, vectors[4])
        assert meta["year"] == 2004
        assert store.get_thumbnail("photos", 4) == bytes([4]) * 4
        assert store.get_thumbnail("photos", 5) is None
        # Writes after the migration: rows (ids go on after the stored ones) and columns.
        assert store.next_ids("photos", 1).tolist() == [N]
        store.upsert("photos", [N], vectors[:1], [{"label": "new"}], [b"t"])
        store.add_column("photos", "score", "DOUBLE")
        store.upsert("tiny", [N], _vectors(2)[:1])
    assert _stored(tmp_path) == (str(SCHEMA_VERSION), list(RECORD_FIELDS))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="service.storage"):
        store = CollectionStore(tmp_path, backend="cpu")
    assert not any("migrated" in r.getMessage() for r in caplog.records)
    with store:
        photos = store.get_collection("photos")
        assert photos.column_order == ["id", "feature", "year", "label", "extra", "score"]
        assert photos.count == N + 1 and store.get_collection("tiny").count == N + 1
        assert store.get_vector("photos", N)[1] == {"year": None, "label": "new",
                                                    "extra": None, "score": None}
        assert store.get_thumbnail("photos", N) == b"t"
    assert _stored(tmp_path)[0] == str(SCHEMA_VERSION)


def test_an_empty_version_1_directory_is_migrated(tmp_path: Path) -> None:
    con = duckdb.connect(str(tmp_path / DB_FILENAME))
    con.execute(f"CREATE TABLE {META_TABLE} (key VARCHAR PRIMARY KEY, value VARCHAR)")
    con.execute(f"CREATE TABLE {COLLECTIONS_TABLE} (name VARCHAR PRIMARY KEY, dim INTEGER, "
                "metric VARCHAR, dtype VARCHAR, columns VARCHAR, thumbnails BOOLEAN, "
                "vector_column VARCHAR)")
    con.execute(f"INSERT INTO {META_TABLE} VALUES ('schema_version', '1')")
    con.close()
    with CollectionStore(tmp_path, backend="cpu") as store:
        assert store.names() == []
        assert store.create_collection("c", D).column_order == ["id", "feature"]
    assert _stored(tmp_path) == (str(SCHEMA_VERSION), list(RECORD_FIELDS))


@pytest.mark.parametrize("broken", ["statement", "row"])
def test_a_failed_migration_leaves_version_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             broken: str) -> None:
    _write_v1(tmp_path)
    if broken == "statement":  # the last ALTER fails after the others ran
        monkeypatch.setattr(service.storage, "V2_COLUMNS",
                            (*service.storage.V2_COLUMNS, "broken !! VARCHAR"))
    else:  # a collection's row cannot be read
        con = duckdb.connect(str(tmp_path / DB_FILENAME))
        con.execute(f"UPDATE {COLLECTIONS_TABLE} SET columns = 'not json' WHERE name = 'tiny'")
        con.close()
    with pytest.raises(StorageError, match="left at version 1"):
        CollectionStore(tmp_path, backend="cpu")
    assert _stored(tmp_path) == ("1", V1_FIELDS)
    if broken == "row":
        con = duckdb.connect(str(tmp_path / DB_FILENAME))
        con.execute(f"UPDATE {COLLECTIONS_TABLE} SET columns = '{{}}' WHERE name = 'tiny'")
        con.close()
    monkeypatch.undo()
    with CollectionStore(tmp_path, backend="cpu") as store:  # the next open migrates
        assert store.get_collection("photos").column_order == ["id", "feature", "year",
                                                               "label", "extra"]
        assert store.get_collection("tiny").count == N
    assert _stored(tmp_path) == (str(SCHEMA_VERSION), list(RECORD_FIELDS))
