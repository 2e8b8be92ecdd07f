"""Trained models through the Python API and SQL: accuracy against scikit-learn, determinism,
NULL labels, metrics, PREDICT / PREDICT_PROBA anywhere an expression is, durability across a
restart, the v2 -> v3 migration, limits, cancellation and every refused input."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import torch

from service.catalog import Catalog
from service.errors import Conflict, Forbidden, InvalidInput, NotFound, QueryError
from service.models import ModelLimits, ModelNotReady
from service.models.training import metrics, split
from service.storage import DB_FILENAME, META_TABLE, MODELS_TABLE

C = 4
D = 32
N = 1200
LABELS = [f"c{i}" for i in range(C)]


def clusters(seed: int = 0, n: int = N, d: int = D, spread: float = 1.0
             ) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters with imbalanced classes (50/25/15/10 %): vectors and class ids."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((C, d)) * spread
    y = rng.choice(C, size=n, p=[0.5, 0.25, 0.15, 0.10])
    x = (centers[y] + rng.standard_normal((n, d))).astype(np.float32)
    return x, y.astype(np.int64)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    return clusters()


@pytest.fixture
def cat(tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> Any:
    """Collection `pts` (dot, float32): the clusters, label (every 20th NULL) and year."""
    x, y = data
    with Catalog(tmp_path / "data", backend="cpu") as catalog:
        catalog.create_collection("pts", D, "dot", columns={"label": "VARCHAR",
                                                             "year": "BIGINT"})
        meta = [{"label": None if i % 20 == 0 else LABELS[v], "year": 2000 + i % 5}
                for i, v in enumerate(y)]
        catalog.upsert("pts", np.arange(N), x, meta)
        yield catalog


def _labels(y: np.ndarray) -> list[str | None]:
    return [None if i % 20 == 0 else LABELS[v] for i, v in enumerate(y)]


def test_logistic_accuracy_matches_scikit_learn(cat: Any, data: Any) -> None:
    from sklearn.linear_model import LogisticRegression

    x, y = data
    info = cat.models.train("lr", "logistic", x, _labels(y), seed=7, background=False)
    assert info.state == "ready" and info.classes == LABELS and info.dim == D
    m = info.metrics
    assert m["accuracy"] >= 0.95 and m["evaluated_on"] == "holdout"
    # The same split: the first draws of the seeded generator, over the labelled rows.
    keep = np.arange(N) % 20 != 0
    xs, ys = x[keep], y[keep]
    train, held = split(ys, C, 0.2, torch.Generator().manual_seed(7))
    assert m["counts"] == {"train": len(train), "holdout": len(held),
                           "skipped_null_labels": int((~keep).sum())}
    reference = LogisticRegression(max_iter=2000).fit(xs[train], ys[train])
    ours = np.asarray([LABELS.index(lab) for lab in cat.models.predict("lr", xs[held])[0]])
    assert float((ours == ys[held]).mean()) == pytest.approx(m["accuracy"])
    assert abs(m["accuracy"] - reference.score(xs[held], ys[held])) <= 0.02


def test_mlp_trains_and_metrics_are_consistent(cat: Any, data: Any) -> None:
    x, y = data
    info = cat.models.train("mlp1", "mlp", x, _labels(y), seed=1, epochs=15, hidden=64,
                            background=False)
    m = info.metrics
    assert m["accuracy"] >= 0.95 and 0 < m["macro_f1"] <= 1
    matrix = np.asarray(m["confusion"]["matrix"])
    assert m["confusion"]["labels"] == LABELS and matrix.shape == (C, C)
    assert matrix.sum() == m["counts"]["holdout"]
    assert [m["per_class"][c]["support"] for c in LABELS] == matrix.sum(axis=1).tolist()
    assert info.progress["epoch"] == info.progress["epochs"] == 15
    assert info.options["hidden"] == 64


def test_metrics_agree_with_scikit_learn() -> None:
    from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

    rng = np.random.default_rng(3)
    y_true, y_pred = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    got = metrics(y_true, y_pred, ["a", "b", "c"])
    p, r, _, s = precision_recall_fscore_support(y_true, y_pred, labels=[0, 1, 2])
    assert got["confusion"]["matrix"] == confusion_matrix(y_true, y_pred).tolist()
    assert got["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    for i, label in enumerate("abc"):
        assert got["per_class"][label] == pytest.approx(
            {"precision": p[i], "recall": r[i], "support": s[i]})


def test_the_seed_makes_training_deterministic(cat: Any, data: Any) -> None:
    x, y = data
    runs = [cat.models.train(name, "mlp", x, _labels(y), seed=seed, epochs=3, hidden=16,
                             background=False) for name, seed in (("a", 5), ("b", 5), ("c", 6))]
    probs = [cat.models.predict(r.name, x[:50])[1] for r in runs]
    np.testing.assert_array_equal(probs[0], probs[1])
    assert runs[0].metrics == runs[1].metrics and runs[0].progress == runs[1].progress
    assert not np.array_equal(probs[0], probs[2])


def test_sql_create_show_describe_predict_drop(cat: Any, data: Any) -> None:
    x, y = data
    assert cat.query("CREATE MODEL m KIND logistic WITH (holdout = 0.25, epochs = 20, "
                     "seed = 3) AS SELECT feature, label FROM pts WHERE year >= 2000").rows == [[0]]
    show = cat.query("SHOW MODELS")
    assert show.columns[:3] == ["name", "kind", "state"]
    assert show.rows[0][:6] == ["m", "logistic", "ready", "pts", "label", D]
    described = dict(cat.query("DESCRIBE MODEL m").rows)
    assert described["options"]["holdout"] == 0.25 and described["options"]["epochs"] == 20
    assert described["source"].startswith("CREATE MODEL m KIND logistic")
    assert described["metrics"]["counts"]["skipped_null_labels"] > 0
    # The Python API, the index-served join, a constant vector and the row-by-row fallback
    # all predict the same labels.
    labels, probs, classes = cat.models.predict("m", x)
    rows = cat.query("SELECT id, PREDICT(m, feature), PREDICT_PROBA(m, feature) FROM pts "
                     "ORDER BY id").rows
    assert [r[1] for r in rows] == labels
    assert rows[7][2] == pytest.approx(dict(zip(classes, probs[7].tolist(), strict=True)))
    slow = cat.query("SELECT id, PREDICT(M, JSON_ARRAY_PACK(JSON_ARRAY_UNPACK(feature))) "
                     "FROM pts WHERE id < 40 ORDER BY id").rows
    assert [r[1] for r in slow] == labels[:40]
    one = cat.query("SELECT PREDICT('m', :q), PREDICT_PROBA(m, :q)", {"q": x[9].tolist()})
    assert one.rows[0][0] == labels[9]
    assert one.rows[0][1] == pytest.approx(dict(zip(classes, probs[9].tolist(), strict=True)))
    # In WHERE, GROUP BY (also by alias) and HAVING.
    agree = cat.query("SELECT count(*) FROM pts WHERE PREDICT(m, feature) = label").rows[0][0]
    assert agree == sum(lab == t for lab, t in zip(labels, _labels(y), strict=True))
    grouped = cat.query("SELECT PREDICT(m, feature) AS p, count(*) FROM pts GROUP BY p "
                        "HAVING count(*) > 0 ORDER BY p").rows
    assert grouped == [[c, labels.count(c)] for c in sorted(set(labels))]
    same = cat.query("SELECT PREDICT(m, feature), count(*) FROM pts "
                     "GROUP BY PREDICT(m, feature) ORDER BY 1").rows
    assert same == grouped
    assert cat.query("DROP MODEL m").rows == [[0]]
    assert cat.query("SHOW MODELS").rows == []
    cat.query("DROP MODEL IF EXISTS m")
    with pytest.raises(QueryError, match="unknown model"):
        cat.query("DROP MODEL m")


def test_a_model_is_a_snapshot_and_survives_a_restart(tmp_path: Path, data: Any) -> None:
    x, y = data
    with Catalog(tmp_path, backend="cpu") as cat:
        cat.create_collection("pts", D, "dot", columns={"label": "VARCHAR"})
        cat.upsert("pts", np.arange(N), x, [{"label": LABELS[v]} for v in y])
        cat.query("CREATE MODEL snap KIND mlp WITH (epochs = 5, hidden = 32) AS "
                  "SELECT feature, label FROM pts")
        before = cat.models.predict("snap", x[:100])
        info = cat.models.get("snap")
        cat.delete("pts", np.arange(N // 2))  # the collection changes; the model does not
        assert cat.models.predict("snap", x[:100])[0] == before[0]
    with Catalog(tmp_path, backend="cpu") as cat:
        again = cat.models.get("snap")
        assert again.as_dict() == info.as_dict()
        labels, probs, _ = cat.models.predict("snap", x[:100])
        assert labels == before[0]
        np.testing.assert_allclose(probs, before[1], rtol=1e-6)
        assert len(cat.query("SELECT PREDICT(snap, feature) FROM pts").rows) == N - N // 2


def test_a_version_2_directory_gains_the_models_table(tmp_path: Path, data: Any) -> None:
    x, y = data
    with Catalog(tmp_path, backend="cpu") as cat:
        cat.create_collection("pts", D, "dot", columns={"label": "VARCHAR"})
        cat.upsert("pts", np.arange(100), x[:100], [{"label": LABELS[v]} for v in y[:100]])
    con = duckdb.connect(str(tmp_path / DB_FILENAME))  # as version 2 left it
    con.execute(f"DROP TABLE {MODELS_TABLE}")
    con.execute(f"UPDATE {META_TABLE} SET value = '2' WHERE key = 'schema_version'")
    con.close()
    with Catalog(tmp_path, backend="cpu") as cat:
        assert cat.models.list() == [] and cat.get_collection("pts").count == 100
        cat.query("CREATE MODEL m KIND logistic WITH (epochs = 2) AS SELECT feature, label "
                  "FROM pts")
    with Catalog(tmp_path, backend="cpu") as cat:
        assert cat.models.get("m").state == "ready"
    con = duckdb.connect(str(tmp_path / DB_FILENAME))
    assert con.execute(f"SELECT value FROM {META_TABLE} WHERE key = 'schema_version'"
                       ).fetchone() == ("3",)
    con.close()


@pytest.mark.parametrize(("sql", "message"), [
    ("CREATE MODEL m KIND logistic AS SELECT feature, label FROM nope", "unknown table"),
    ("CREATE MODEL m KIND logistic AS SELECT feature, nope FROM pts", "nope"),
    ("CREATE MODEL m KIND logistic AS SELECT feature, feature FROM pts", "is a vector"),
    ("CREATE MODEL m KIND logistic AS SELECT label, feature FROM pts", "must be a vector"),
    ("CREATE MODEL m KIND logistic AS SELECT feature FROM pts", "two columns"),
    ("CREATE MODEL m KIND logistic AS SELECT feature, 'x' FROM pts", "at least two classes"),
    ("CREATE MODEL m KIND logistic AS SELECT feature, label FROM pts WHERE label = 'c1'",
     "at least two classes"),
    ("CREATE MODEL m KIND logistic AS SELECT feature, label FROM pts WHERE id < 0",
     "no rows"),
    ("CREATE MODEL m KIND forest AS SELECT feature, label FROM pts", "kind must be one of"),
    ("CREATE MODEL m KIND logistic WITH (epochs = 0) AS SELECT feature, label FROM pts",
     "epochs must be"),
    ("CREATE MODEL m KIND logistic WITH (holdout = 0.95) AS SELECT feature, label FROM pts",
     "holdout must be"),
    ("CREATE MODEL m KIND logistic WITH (depth = 3) AS SELECT feature, label FROM pts",
     "unknown model option"),
    ("CREATE MODEL m AS SELECT feature, label FROM pts", "expected KIND"),
    ("SELECT PREDICT(nope, feature) FROM pts", "unknown model 'nope'"),
    ("SELECT PREDICT(1, feature) FROM pts", "names a model"),
    ("SELECT PREDICT(m) FROM pts", "takes two arguments"),
    ("DESCRIBE MODEL nope", "unknown model"),
])
def test_bad_model_sql_is_a_query_error_and_creates_nothing(cat: Any, sql: str,
                                                            message: str) -> None:
    with pytest.raises(QueryError, match=message):
        cat.query(sql)
    assert cat.models.list() == []


def test_name_clash_and_dimension_mismatch(cat: Any, data: Any) -> None:
    x, y = data
    cat.models.train("m", "logistic", x, _labels(y), epochs=2, background=False)
    with pytest.raises(Conflict, match="already exists"):
        cat.query("CREATE MODEL M KIND mlp AS SELECT feature, label FROM pts")
    assert cat.query("CREATE MODEL IF NOT EXISTS m KIND mlp AS SELECT feature, label "
                     "FROM pts").rows == [[0]]
    assert cat.models.get("m").kind == "logistic"
    cat.create_collection("wide", D + 1, "dot")
    cat.upsert("wide", [1], np.ones((1, D + 1), np.float32))
    with pytest.raises(QueryError, match=f"takes {D}-d vectors"):
        cat.query("SELECT PREDICT(m, feature) FROM wide")
    with pytest.raises(InvalidInput, match=f"takes {D}-d vectors, got {D + 1}-d"):
        cat.models.predict("m", np.ones((2, D + 1), np.float32))
    with pytest.raises(NotFound):
        cat.models.predict("nope", x[:1])


def test_the_python_api_refuses_bad_input_before_creating_anything(cat: Any, data: Any) -> None:
    x, y = data
    models = cat.models
    bad: list[tuple[dict[str, Any], str]] = [
        ({"labels": ["a"] * N}, "at least two classes"),
        ({"labels": [None] * N}, "at least two classes"),
        ({"labels": ["a", "b"]}, "2 labels for"),
        ({"labels": [[1, 2]] * N}, "must be text"),
        ({"labels": [b"xx"] * N}, "vectors or bytes"),
        ({"vectors": np.full((N, D), np.nan, np.float32)}, "NaN"),
        ({"kind": "svm"}, "kind must be"),
        ({"name": "1bad"}, "model name"),
        ({"seed": -1}, "seed must be"),
        ({"epochs": 10**9}, "epochs must be"),
    ]
    for change, message in bad:
        args: dict[str, Any] = {"name": "m", "kind": "logistic", "vectors": x,
                                "labels": _labels(y), **change}
        with pytest.raises(InvalidInput, match=message):
            models.train(args.pop("name"), args.pop("kind"), args.pop("vectors"),
                         args.pop("labels"), background=False, **args)
    assert models.list() == []


def test_limits_bound_rows_classes_and_time(tmp_path: Path, data: Any) -> None:
    x, y = data
    limits = ModelLimits(max_rows=500, max_classes=3, train_timeout_s=0.05)
    with Catalog(tmp_path, backend="cpu", model_limits=limits) as cat:
        with pytest.raises(InvalidInput, match="DOTSEARCH_MODEL_MAX_ROWS"):
            cat.models.train("m", "logistic", x, _labels(y), background=False)
        with pytest.raises(InvalidInput, match="DOTSEARCH_MODEL_MAX_CLASSES"):
            cat.models.train("m", "logistic", x[:400], _labels(y)[:400], background=False)
        cat.create_collection("pts", D, "dot", columns={"label": "VARCHAR"})
        cat.upsert("pts", np.arange(N), x, [{"label": LABELS[v]} for v in y])
        with pytest.raises(QueryError, match="DOTSEARCH_MODEL_MAX_ROWS"):
            cat.query("CREATE MODEL m KIND logistic AS SELECT feature, label FROM pts")
        two = [lab if lab in ("c0", "c1") else None for lab in _labels(y)][:500]
        with pytest.raises(Exception, match="DOTSEARCH_MODEL_TRAIN_TIMEOUT_S"):
            cat.models.train("slow", "mlp", x[:500], two, epochs=1000, background=False)
        assert cat.models.list() == []


def test_cancel_while_training_leaves_nothing(tmp_path: Path, data: Any) -> None:
    x, y = data
    with Catalog(tmp_path, backend="cpu") as cat:
        info = cat.models.train("long", "mlp", x, _labels(y), epochs=1000, batch_size=16)
        assert info.state == "training"
        with pytest.raises(ModelNotReady, match="still training"):
            cat.models.predict("long", x[:1])
        with pytest.raises(Conflict, match="is training"):
            cat.models.train("LONG", "logistic", x, _labels(y))
        deadline = time.monotonic() + 10
        while cat.models.get("long").progress["epoch"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert cat.models.drop("long")
        after = cat.models.get("long")
        assert after.state == "cancelled" and after.metrics is None
        with pytest.raises(ModelNotReady, match="cancelled"):
            cat.models.predict("long", x[:1])
        cat.models.drop("long")  # forgets it
        with pytest.raises(NotFound):
            cat.models.get("long")
    with Catalog(tmp_path, backend="cpu") as cat:
        assert cat.models.list() == []
    con = duckdb.connect(str(tmp_path / DB_FILENAME))
    assert con.execute(f"SELECT count(*) FROM {MODELS_TABLE}").fetchone() == (0,)
    con.close()


def test_the_read_only_key_may_predict_but_not_create_or_drop(cat: Any, data: Any) -> None:
    x, y = data
    cat.models.train("m", "logistic", x, _labels(y), epochs=2, background=False)
    for sql in ("CREATE MODEL n KIND logistic AS SELECT feature, label FROM pts",
                "DROP MODEL m", "DROP MODEL IF EXISTS m"):
        with pytest.raises(Forbidden):
            cat.query(sql, access="read")
    assert cat.query("SHOW MODELS", access="read").rows[0][0] == "m"
    assert dict(cat.query("DESCRIBE MODEL m", access="read").rows)["state"] == "ready"
    got = cat.query("SELECT PREDICT(m, feature) FROM pts WHERE id = 3", access="read")
    assert got.rows == [[cat.models.predict("m", x[3:4])[0][0]]]
    assert json.loads(json.dumps(cat.query("SELECT PREDICT_PROBA(m, feature) FROM pts "
                                           "WHERE id = 3", access="read").rows))


def test_update_labels_the_unlabelled_rows_with_predict(cat: Any, data: Any) -> None:
    x, _ = data
    cat.query("CREATE MODEL m KIND logistic WITH (epochs = 5) AS SELECT feature, label "
              "FROM pts")
    unlabelled = [r[0] for r in cat.query("SELECT id FROM pts WHERE label IS NULL "
                                          "ORDER BY id").rows]
    got = cat.query("UPDATE pts SET label = PREDICT(m, feature) WHERE label IS NULL")
    assert got.rows == [[len(unlabelled)]]
    rows = cat.query("SELECT id, label FROM pts WHERE id IN (SELECT unnest(:ids)) "
                     "ORDER BY id", {"ids": unlabelled}).rows
    assert [r[1] for r in rows] == cat.models.predict("m", x[unlabelled])[0]


def test_a_diverging_training_fails_clearly_and_stores_nothing(
        cat: Any, data: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.models.registry as registry

    def diverging(*args: Any, on_epoch: Any, **kwargs: Any) -> Any:
        on_epoch(1, float("nan"))  # as a loss that overflowed would

    monkeypatch.setattr(registry, "fit", diverging)
    x, y = data
    with pytest.raises(InvalidInput, match="diverged"):
        cat.models.train("wild", "mlp", x, _labels(y), background=False)
    assert cat.models.list() == []
    info = cat.models.train("wild", "mlp", x, _labels(y))
    deadline = time.monotonic() + 30
    while cat.models.get("wild").state == "training" and time.monotonic() < deadline:
        time.sleep(0.02)
    after = cat.models.get("wild")
    assert info.state == "training" and after.state == "failed" and "diverged" in after.error
    assert cat.query("SHOW MODELS").rows[0][2] == "failed"
    with pytest.raises(ModelNotReady, match="failed to train"):
        cat.query("SELECT PREDICT(wild, feature) FROM pts")
