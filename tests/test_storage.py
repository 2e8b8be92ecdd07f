"""Storage contract: exact round trips, restart equivalence, schema version, errors."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pytest

from service.catalog import Catalog
from service.errors import (
    ALL_ERRORS,
    Conflict,
    DotsearchError,
    InvalidInput,
    NotFound,
    QueryError,
    SchemaVersionError,
    StorageError,
)
from service.storage import DB_FILENAME, META_TABLE, SCHEMA_VERSION

D = 8


def _fill_vectors(n: int) -> np.ndarray:
    return np.random.default_rng(3).standard_normal((n, D)).astype(np.float32)


def _fill(cat: Catalog, name: str = "docs", metric: str = "dot", dtype: str = "float32",
          n: int = 200) -> np.ndarray:
    vectors = _fill_vectors(n)
    cat.create_collection(name, D, metric, dtype, {
        "label": "TEXT", "year": "BIGINT", "w": "DOUBLE", "ok": "BOOLEAN", "at": "TIMESTAMP",
        "extra": "JSON"}, thumbnails=True)
    meta = [{"label": f"l{i % 4}", "year": 2000 + i, "w": i / 7, "ok": i % 2 == 0,
             "at": f"2024-01-{1 + i % 28:02d}T10:00:00", "extra": {"i": i, "tags": ["a", "b"]}}
            for i in range(n)]
    thumbs = [bytes([i % 256]) * 3 if i % 3 == 0 else None for i in range(n)]
    cat.upsert(name, np.arange(n) * 2, vectors, meta, thumbs)
    return vectors


def test_errors_map_to_http_in_one_place() -> None:
    codes = {cls.error: cls.status_code for cls in ALL_ERRORS}
    assert codes["query_error"] == 400 and codes["not_found"] == 404
    assert codes["conflict"] == 409 and codes["invalid_input"] == 422
    assert codes["storage_error"] == 507 and codes["not_ready"] == 503
    err = QueryError("bad", position={"line": 1, "column": 5})
    assert err.to_dict() == {"error": "query_error", "message": "bad",
                             "position": {"line": 1, "column": 5}}
    assert NotFound("x").to_dict() == {"error": "not_found", "message": "x"}
    assert all(issubclass(c, DotsearchError) for c in ALL_ERRORS)


def test_round_trip_is_exact_across_restart(tmp_path: Path) -> None:
    with Catalog(tmp_path, backend="cpu") as cat:
        vectors = _fill(cat)
        vec, meta = cat.get_vector("docs", 10)
        before = cat.search("docs", vectors[:3], 5, filter="year > 2010")
        sql_before = cat.query("SELECT label, COUNT(*) FROM (SELECT label FROM docs ORDER BY "
                               "DOT_PRODUCT(feature, :q) DESC LIMIT 20) GROUP BY label "
                               "ORDER BY label", {"q": vectors[0].tolist()}).rows
    with Catalog(tmp_path, backend="cpu") as cat:
        info = cat.get_collection("docs")
        assert (info.count, info.dim, info.metric, info.thumbnails) == (200, D, "dot", True)
        vec2, meta2 = cat.get_vector("docs", 10)
        np.testing.assert_array_equal(vec2, vectors[5])
        np.testing.assert_array_equal(vec, vec2)
        assert meta2 == meta == {"label": "l1", "year": 2005, "w": 5 / 7, "ok": False,
                                 "at": "2024-01-06T10:00:00", "extra": {"i": 5, "tags": ["a", "b"]}}
        assert cat.get_thumbnail("docs", 0) == b"\x00\x00\x00"
        assert cat.get_thumbnail("docs", 2) is None
        after = cat.search("docs", vectors[:3], 5, filter="year > 2010")
        assert [[h.id for h in row] for row in after] == [[h.id for h in row] for row in before]
        for r1, r2 in zip(before, after, strict=True):
            np.testing.assert_allclose([h.score for h in r1], [h.score for h in r2], rtol=1e-6)
            assert [h.metadata for h in r1] == [h.metadata for h in r2]
        assert cat.query("SELECT label, COUNT(*) FROM (SELECT label FROM docs ORDER BY "
                         "DOT_PRODUCT(feature, :q) DESC LIMIT 20) GROUP BY label ORDER BY label",
                         {"q": vectors[0].tolist()}).rows == sql_before
        # Fresh ids continue above everything stored.
        assert cat.next_ids("docs", 3).tolist() == [399, 400, 401]


def test_upsert_replaces_and_delete_takes_effect(tmp_path: Path) -> None:
    with Catalog(tmp_path, backend="cpu") as cat:
        vectors = _fill(cat, n=10)
        new = np.full((1, D), 0.5, dtype=np.float32)
        cat.upsert("docs", [4], new, [{"label": "new"}])
        vec, meta = cat.get_vector("docs", 4)
        np.testing.assert_array_equal(vec, new[0])
        assert meta["label"] == "new" and meta["year"] is None
        assert cat.get_collection("docs").count == 10
        # Duplicate ids in one batch: the last one wins, like the index.
        cat.upsert("docs", [100, 100], np.stack([vectors[0], vectors[1]]),
                   [{"label": "first"}, {"label": "second"}])
        vec, meta = cat.get_vector("docs", 100)
        np.testing.assert_array_equal(vec, vectors[1])
        assert meta["label"] == "second"
        assert cat.delete("docs", [4, 100, 12345]) == 2
        with pytest.raises(NotFound):
            cat.get_vector("docs", 4)
        hits = cat.search("docs", new, 20)[0]
        assert 4 not in [h.id for h in hits] and len(hits) == 9
        # Fresh ids take a plain INSERT, a batch with a stored id INSERT OR REPLACE: a
        # deleted id is fresh again, and a mixed batch replaces what is stored.
        cat.upsert("docs", [100], new, [{"label": "again"}])
        cat.upsert("docs", [200, 6], np.stack([vectors[2], new[0]]),
                   [{"label": "fresh"}, {"label": "replaced"}])
        assert cat.get_vector("docs", 100)[1]["label"] == "again"
        assert cat.get_vector("docs", 6)[1]["label"] == "replaced"
        np.testing.assert_array_equal(cat.get_vector("docs", 200)[0], vectors[2])
        cat.delete("docs", [100, 200])
    with Catalog(tmp_path, backend="cpu") as cat:
        assert cat.get_collection("docs").count == 9
        assert cat.get_vector("docs", 6)[1]["label"] == "replaced"
        with pytest.raises(NotFound):
            cat.get_vector("docs", 100)


def test_float16_and_cosine_collections_reload(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    v = rng.standard_normal((50, D)).astype(np.float32)
    with Catalog(tmp_path, backend="cpu") as cat:
        cat.create_collection("half", D, "dot", "float16")
        cat.create_collection("cos", D, "cosine")
        cat.upsert("half", np.arange(50), v)
        cat.upsert("cos", np.arange(50), v)
        before = [cat.search(n, v[:2], 5) for n in ("half", "cos")]
    with Catalog(tmp_path, backend="cpu") as cat:
        assert cat.get_collection("half").dtype == "float16"
        # Stored as written for dot; unit length under cosine.
        np.testing.assert_array_equal(cat.get_vector("half", 7)[0], v[7])
        unit = cat.get_vector("cos", 7)[0]
        np.testing.assert_allclose(unit, v[7] / np.linalg.norm(v[7]), rtol=1e-6)
        after = [cat.search(n, v[:2], 5) for n in ("half", "cos")]
        for b, a in zip(before, after, strict=True):
            assert [[h.id for h in r] for r in b] == [[h.id for h in r] for r in a]


@pytest.mark.parametrize(("stored", "shown"), [("999", "'999'"), ("4", "'4'"), ("x", "'x'"),
                                               (None, "None")])
def test_schema_version_mismatch_is_refused(tmp_path: Path, stored: str | None,
                                            shown: str) -> None:
    Catalog(tmp_path, backend="cpu").close()
    con = duckdb.connect(str(tmp_path / DB_FILENAME))
    if stored is None:
        con.execute(f"DELETE FROM {META_TABLE} WHERE key = 'schema_version'")
    else:
        con.execute(f"UPDATE {META_TABLE} SET value = $v WHERE key = 'schema_version'",
                    {"v": stored})
    con.close()
    with pytest.raises(SchemaVersionError,
                       match=rf"schema version {shown}.*reads version {SCHEMA_VERSION}"):
        Catalog(tmp_path, backend="cpu")
    with pytest.raises(SchemaVersionError):  # the refused open let the directory go
        Catalog(tmp_path, backend="cpu")


def test_second_process_on_same_dir_is_a_storage_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    with Catalog(tmp_path, backend="cpu"):
        code = ("import sys\nfrom service.catalog import Catalog\nfrom service.errors import "
                "StorageError\ntry:\n    Catalog(sys.argv[1], backend='cpu')\nexcept StorageError "
                "as e:\n    print('refused', e.message[:40])\n")
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                             text=True, cwd=Path(__file__).resolve().parent.parent, timeout=60)
        assert "refused" in out.stdout, out.stderr[-500:]


def test_invalid_writes_change_nothing(tmp_path: Path) -> None:
    with Catalog(tmp_path, backend="cpu") as cat:
        _fill(cat, n=5)
        bad = [
            dict(ids=[1], vectors=np.ones((1, D + 1))),
            dict(ids=[1, 2], vectors=np.ones((1, D))),
            dict(ids=[-1], vectors=np.ones((1, D))),
            dict(ids=[1.5], vectors=np.ones((1, D))),
            dict(ids=[1], vectors=[[np.nan] * D]),
            dict(ids=[1], vectors=[["a"] * D]),
            dict(ids=[], vectors=np.ones((0, D))),
            dict(ids=[1], vectors=np.ones((1, D)), metadata=[{"nope": 1}]),
            dict(ids=[1], vectors=np.ones((1, D)), metadata=[{"year": "2001"}]),
            dict(ids=[1], vectors=np.ones((1, D)), metadata=[{"year": True}]),
            dict(ids=[1], vectors=np.ones((1, D)), metadata=[{"w": float("inf")}]),
            dict(ids=[1], vectors=np.ones((1, D)), metadata=[{"at": "not a time"}]),
            dict(ids=[1, 3], vectors=np.ones((2, D)), metadata=[{"label": "x"}]),
        ]
        for kwargs in bad:
            with pytest.raises(InvalidInput):
                cat.upsert("docs", **kwargs)  # type: ignore[arg-type]
        assert cat.get_collection("docs").count == 5
        np.testing.assert_array_equal(cat.get_vector("docs", 2)[0], _fill_vectors(5)[1])
        with pytest.raises(NotFound):
            cat.upsert("missing", [1], np.ones((1, D)))
        with pytest.raises(Conflict):
            cat.create_collection("docs", D)
        with pytest.raises(InvalidInput):
            cat.create_collection("bad name", D)
        with pytest.raises(InvalidInput):
            cat.create_collection("x", 0)
        with pytest.raises(InvalidInput):
            cat.create_collection("x", D, "hamming")
        with pytest.raises(InvalidInput):
            cat.create_collection("x", D, columns={"id": "BIGINT"})
        with pytest.raises(InvalidInput):
            cat.create_collection("x", D, columns={"c": "BLOB"})
        cat.create_collection("cz", D, "cosine")
        with pytest.raises(InvalidInput, match="zero vector"):
            cat.upsert("cz", [1], np.zeros((1, D)))
    with Catalog(tmp_path, backend="cpu") as cat:
        assert cat.get_collection("docs").count == 5


def test_storage_error_on_unwritable_dir(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("not a directory")
    with pytest.raises(StorageError):
        Catalog(target / "sub", backend="cpu")


def test_disk_full_fails_the_write_and_reads_go_on(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, "-m", "tests.durability_worker", "disk-full", str(tmp_path)],
        capture_output=True, text=True, cwd=root, timeout=120,
    )
    lines = out.stdout.splitlines()
    assert lines[:4] == ["storage_error 507", "search 0 500", "sql 500", "small write ok"], (
        out.stdout, out.stderr[-800:])
    with Catalog(tmp_path, backend="cpu") as cat:
        assert cat.get_collection("f").count == 501
        assert cat.get_vector("f", 5000)[1] == {"label": "after"}


def test_float16_overflow_is_refused_before_anything_is_stored(tmp_path):
    """A value beyond float16's range is refused before the commit, not by the index after
    it (which left storage and index out of step)."""
    with Catalog(tmp_path / "d", "cpu") as cat:
        cat.create_collection("h", 4, "dot", "float16")
        with pytest.raises(InvalidInput, match="overflow"):
            cat.upsert("h", [1], [[1e6, 0, 0, 0]])
        assert cat.get_collection("h").count == 0
        assert cat.query("SELECT count(*) FROM h").rows == [[0]]
        cat.upsert("h", [2], [[1, 2, 3, 4]])
        assert cat.get_collection("h").count == 1
