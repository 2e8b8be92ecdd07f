"""The benchmark harness at a tiny size: every suite runs, writes valid JSON, refuses bad peers."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.engine import Cell, check_answers, exact_reference, run_engine
from bench.harness import Report, SuiteSkipped, device_info, measure, percentile
from bench.limits import run_limits
from bench.peers import Searcher, System, systems


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _report() -> Report:
    report = Report(device_info(), quick=True)
    report.limits.update({"host_read_GBps": 10.0, "host_gemm_float32_GFLOPs": 50.0})
    return report


def _written(report: Report, out: Path) -> dict:
    paths = report.write(out)
    payload = json.loads(paths["json"].read_text())
    assert paths["markdown"].read_text().startswith("# dotsearch benchmark")
    return payload


def test_measure_rotates_inputs_and_takes_a_median() -> None:
    seen: list[int] = []
    timing = measure(seen.append, [1, 2, 3], warmup=1, repeats=3, min_repeat_s=0.0)
    assert timing.repeats >= 3 and timing.median_s >= 0
    assert set(seen) == {1, 2, 3}
    assert percentile([1.0, 2.0, 3.0], 50) == 2.0


def test_exact_reference_matches_numpy_sort() -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((300, 8)).astype(np.float32)
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    ids = np.arange(300) * 2
    for metric in ("dot", "l2"):
        scores, found = exact_reference(ids, vectors, queries, 5, metric)
        exact = queries.astype(np.float64) @ vectors.T.astype(np.float64)
        if metric == "l2":
            exact = -np.linalg.norm(vectors[None] - queries[:, None], axis=2)
        assert (found == ids[np.argsort(-exact, axis=1)[:, :5]]).all()
        assert np.allclose(np.abs(scores), np.abs(np.sort(-exact, axis=1)[:, :5]), atol=1e-9)


def test_check_answers_refuses_wrong_ids_and_wrong_scores() -> None:
    ref_scores = np.array([[0.9, 0.8, 0.7]])
    ref_ids = np.array([[1, 2, 3]])
    assert check_answers(ref_scores, ref_ids, ref_scores, ref_ids, "float32") == (1.0, None)
    recall, why = check_answers(ref_scores, np.array([[7, 8, 9]]), ref_scores, ref_ids, "float32")
    assert recall == 0.0 and why is not None and "recall" in why
    _, why = check_answers(ref_scores + 0.5, ref_ids, ref_scores, ref_ids, "float32")
    assert why is not None and "scores" in why


def test_limits_suite_records_the_floors(tmp_path: Path) -> None:
    report = Report(device_info(), quick=True)
    limits = run_limits(report, tiny=True)
    assert limits["host_read_GBps"] > 0 and limits["host_gemm_float32_GFLOPs"] > 0
    payload = _written(report, tmp_path)
    assert payload["limits"]["host_read_GBps"] == pytest.approx(limits["host_read_GBps"])


def _liar(ids: np.ndarray, vectors: np.ndarray, metric: str, dtype: str) -> Searcher:
    """A peer that is fast and wrong: it returns the first k ids whatever the query."""

    def search(queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        found = np.tile(ids[:k], (len(queries), 1))
        return np.ones(found.shape, dtype=np.float32), found

    return Searcher(search)


def test_engine_suite_runs_every_system_and_refuses_a_wrong_peer(tmp_path: Path) -> None:
    report = _report()
    liar = System("liar", "peer", _liar, lambda *_: None)
    cells = [Cell(400, 32, 1, 5), Cell(800, 32, 1, 5), Cell(400, 32, 4, 5, metric="l2"),
             Cell(400, 32, 4, 5, metric="dot"), Cell(300, 16, 2, 3, dtype="float16")]
    rows = run_engine(report, cells=cells, contenders=[*systems(), liar])
    by_system: dict[str, list[dict]] = {}
    for row in rows:
        by_system.setdefault(row["system"], []).append(row)
    assert all(r["status"] == "ok" for r in by_system["dotsearch-cpu"]), by_system["dotsearch-cpu"]
    assert all(r["recall"] == 1.0 for r in by_system["numpy"] if r["status"] == "ok")
    assert all(r["status"].startswith("refused") for r in by_system["liar"])
    assert any(r["status"].startswith("skipped") for r in by_system["numpy"])  # float16 cell
    speedups = report.rows["engine-speedups"]
    assert speedups and all(r["peer"] != "liar" for r in speedups)
    payload = _written(report, tmp_path)
    assert payload["suites"]["engine"]["rows"]
    assert (tmp_path / "engine_d32_q1_k5.png").exists()


def test_engine_grid_has_bfloat16_beside_every_float16_cell() -> None:
    from bench.engine import _floor_s, engine_cells, itemsize
    from bench.reference import MIN_RECALL, SCORE_TOLERANCE

    for quick in (True, False):
        for on_gpu in (True, False):
            cells = engine_cells(quick, on_gpu)
            halves = {(c.n, c.dim, c.q, c.k, c.metric) for c in cells if c.dtype == "float16"}
            bhalves = {(c.n, c.dim, c.q, c.k, c.metric) for c in cells if c.dtype == "bfloat16"}
            assert halves and halves == bhalves, (quick, on_gpu)
    assert itemsize("bfloat16") == itemsize("float16") == 2 and itemsize("float32") == 4
    assert {"float32", "float16", "bfloat16"} <= set(MIN_RECALL) & set(SCORE_TOLERANCE)
    gpu = System("g", "dotsearch", _liar, lambda *_: None, device="gpu")
    cell = Cell(1000, 100, 1, 10, dtype="bfloat16")
    limits = {"device_read_GBps": 1.0, "device_gemm_float16_GFLOPs": 1.0}
    assert _floor_s(cell, gpu, limits) == pytest.approx(1000 * 100 * 2 / 1e9)  # float16 peak


@pytest.mark.skipif(not _has("faiss"), reason="faiss is not installed")
def test_engine_suite_runs_bfloat16_cells_against_faiss_half_precision() -> None:
    report = _report()
    cells = [Cell(300, 16, 2, 3, dtype="bfloat16"), Cell(300, 16, 2, 3, dtype="bfloat16",
                                                          metric="l2"),
             Cell(300, 16, 2, 3, dtype="float16")]
    rows = run_engine(report, cells=cells, contenders=systems(include_gpu=False))
    status = {(r["system"], r["dtype"], r["metric"]): r["status"] for r in rows}
    for metric in ("cosine", "l2"):
        for system in ("dotsearch-cpu", "faiss-cpu SQ bf16"):
            assert status[(system, "bfloat16", metric)] == "ok", status
        assert status[("faiss-cpu SQ fp16", "bfloat16", metric)].startswith("skipped")
        assert status[("numpy", "bfloat16", metric)].startswith("skipped")
    assert status[("faiss-cpu SQ fp16", "float16", "cosine")] == "ok", status
    assert status[("faiss-cpu SQ bf16", "float16", "cosine")].startswith("skipped")
    assert all(r["recall"] >= 0.9 for r in rows if r["status"] == "ok")
    peers = {(r["dtype"], r["peer"]) for r in report.rows["engine-speedups"]}
    assert {("bfloat16", "faiss-cpu SQ bf16"), ("float16", "faiss-cpu SQ fp16")} <= peers


def test_engine_headline_prints_the_ratios(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from bench.engine import main

    assert main(["--n", "3000", "--dim", "64", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "memory bandwidth" in printed and "faiss-cpu IndexFlatIP" in printed
    ratios = json.loads((tmp_path / "results.json").read_text())["suites"]["engine-headline"]
    assert all(r["value"] is not None for r in ratios["ratios"])


def test_cli_runs_named_suites_and_merges_results(tmp_path: Path) -> None:
    from bench.__main__ import main

    assert main(["limits", "--quick", "--out", str(tmp_path)]) == 0
    report = Report(device_info())
    report.add_row("other", value=1.0)
    report.write(tmp_path)
    payload = json.loads((tmp_path / "results.json").read_text())
    assert {"limits", "other"} <= set(payload["suites"])
    with pytest.raises(SystemExit):
        main(["no-such-suite"])


def _run_or_skip(function: object, report: Report, **sizes: object) -> None:
    try:
        function(report, quick=True, **sizes)  # type: ignore[operator]
    except SuiteSkipped as exc:
        pytest.skip(f"suite cannot run yet: {exc}")


@pytest.mark.skipif(not _has("service.sql.executor"), reason="the SQL executor has not landed")
def test_sql_suite_tiny(tmp_path: Path) -> None:
    from bench.sql import run_sql

    report = _report()
    _run_or_skip(run_sql, report, n=2000, dim=32)
    rows = report.rows["sql"]
    assert {r["shape"] for r in rows} >= {"direct engine", "sql top-10", "duckdb top-10"}
    assert all(r["status"] == "ok" for r in rows), rows
    assert _written(report, tmp_path)["suites"]["sql"]["ratios"]


@pytest.mark.skipif(not _has("service.collections"), reason="the storage layer has not landed")
def test_ingest_suite_tiny(tmp_path: Path) -> None:
    from bench.ingest import run_ingest

    report = _report()
    _run_or_skip(run_ingest, report, n=3000, dim=32)
    names = {r["name"] for r in report.ratios}
    assert any("ingest" in n for n in names) and any("reload" in n for n in names)
    _written(report, tmp_path)


@pytest.mark.skipif(not _has("service.featurizer"), reason="the featurizer has not landed")
def test_featurize_suite_tiny(tmp_path: Path) -> None:
    from bench.featurize import run_featurize

    report = _report()
    _run_or_skip(run_featurize, report, batch_sizes=(1,), min_repeats=1)
    rows = report.rows["featurize"]
    assert rows and all(r["images_per_s"] > 0 for r in rows)
    _written(report, tmp_path)


@pytest.mark.skipif(not _has("service.app"), reason="the service app has not landed")
def test_http_suite_tiny(tmp_path: Path) -> None:
    from bench.http import run_http

    report = _report()
    _run_or_skip(run_http, report, n=1000, dim=16, concurrency=(1, 4), seconds=0.5,
                 samples=10)
    rows = report.rows["http"]
    assert any(r["what"].startswith("search, batching on") for r in rows)
    assert any(r["what"].startswith("search, batching off") for r in rows)
    assert all(r.get("errors", 0) == 0 for r in rows), rows
    paired = [r for r in rows if r["what"].endswith("alternating blocks")]
    assert len(paired) == 2 and all(r["p50_ms"] > 0 for r in paired)
    overhead = [r for r in report.ratios if r["name"].startswith("HTTP p50 - direct p50")]
    assert len(overhead) == 1 and math.isfinite(overhead[0]["value"])
    _written(report, tmp_path)


@pytest.mark.skipif(not _has("service.app"), reason="the service app has not landed")
def test_reliability_suite_tiny(tmp_path: Path) -> None:
    from bench.reliability import PHASES, run_reliability

    report = _report()
    _run_or_skip(run_reliability, report, n=1000, dim=16, rounds=2, per_block=8, batch=200,
                 sql_timeout_s=0.5)
    rows = report.rows["reliability"]
    assert [r["phase"] for r in rows] == list(PHASES)
    assert all(r["searches"] == 16 and r["p99_ms"] > 0 for r in rows), rows
    writer, slow = rows[1], rows[2]
    assert writer["background_answers"].startswith("200 x") and writer["rows_per_s"] > 0
    assert set(slow["background_answers"].split(", ")) <= {
        f"{answer} x{count}" for answer in ("200", "400 query_timeout") for count in range(99)}
    ratios = [r for r in report.ratios if r["suite"] == "reliability"]
    assert len(ratios) == 2 and all(math.isfinite(r["value"]) for r in ratios), ratios
    _written(report, tmp_path)


def test_reliability_background_answers_are_classified() -> None:
    from bench.reliability import Background

    stats = Background()
    stats.record(200, b"{}", 0.1)
    stats.record(400, b'{"error": "query_timeout", "message": "ran past 2 s"}', 2.0)
    stats.record(500, b'{"error": "internal_error"}', 0.01)
    assert stats.answers == {"200": 1, "400 query_timeout": 1, "500 internal_error": 1}
    assert stats.seconds == [0.1, 2.0] and len(stats.unexpected) == 1


def test_load_generator_frames_responses_by_content_length() -> None:
    from bench.loadgen import encode_post, read_response

    request = encode_post("http://127.0.0.1:8765", "/v1/x", b'{"a": 1}')
    assert request == (b"POST /v1/x HTTP/1.1\r\nHost: 127.0.0.1:8765\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 8\r\n\r\n"
                       b'{"a": 1}')

    async def parse(raw: bytes) -> tuple[int, bytes]:
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await read_response(reader)

    two = (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabcHTTP/1.1 404 Not Found\r\n"
           b"Content-Length: 0\r\n\r\n")
    assert asyncio.run(parse(two)) == (200, b"abc")
    with pytest.raises(RuntimeError, match="Content-Length"):
        asyncio.run(parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"))


def test_device_check_dry_run_writes_its_results(tmp_path: Path) -> None:
    """bench/device_check.sh without a GPU: GPU steps skipped with the reason, the others
    run at tiny sizes, and results.json says what each did (rewritten after every step)."""
    import subprocess
    import sys

    out = tmp_path / "dc"
    env = {"PATH": "/usr/bin:/bin", "PYTHON": sys.executable, "HOME": str(tmp_path)}
    done = subprocess.run(["bash", "bench/device_check.sh", str(out), "--only", "limits,scale"],
                          cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    check = json.loads((out / "results.json").read_text())["device_check"]
    steps = check["steps"]
    assert check["finished"] and steps["limits"]["status"] == "ok"
    if check["mode"] == "dry run":
        assert steps["scale"]["status"] == "skipped"
        assert "no CUDA device" in steps["scale"]["reason"]
    assert (out / "device_check.log").stat().st_size > 0
    assert len(list(out.iterdir())) <= 8  # what the device tool brings back


@pytest.mark.skipif(not _has("service.models"), reason="trained models have not landed")
def test_models_suite_tiny(tmp_path: Path) -> None:
    from bench.models import run_models

    report = _report()
    _run_or_skip(run_models, report, n=600, dim=16, classes=3, epochs=2, samples=5)
    train = report.rows["models-train"]
    assert [r["kind"] for r in train] == ["logistic", "mlp"], train
    assert all(r["vectors_per_s"] > 0 and r["train_rows"] > 0 for r in train)
    predicts = report.rows["models-predict"]
    assert [r["status"] for r in predicts] == ["ok", "ok"], predicts  # SQL agrees with the API
    http = report.rows["models-http"]
    assert [r["what"] for r in http] == ["predict logistic, one vector",
                                         "predict mlp, one vector", "search top-10, one vector"]
    assert all(r["requests"] == 5 and r["p99_ms"] >= r["p50_ms"] > 0 for r in http)
    ratios = [r for r in report.ratios if r["suite"] == "models"]
    assert len(ratios) == 2 and all(r["target"] == 2.0 for r in ratios), ratios
    assert {"models", "models-train", "models-predict", "models-http"} <= set(
        _written(report, tmp_path)["suites"])
