"""The typer CLI: ingest (resumable, bad files skipped), query, demo, flags over env."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from service.cli import _settings, app

runner = CliRunner()


@pytest.fixture
def fast_featurizer(monkeypatch, featurizer):
    """The CLI builds its own Featurizer; hand it the session's one instead."""
    import service.featurizer

    monkeypatch.setattr(service.featurizer, "Featurizer", lambda *a, **k: featurizer)
    return featurizer


def test_flags_override_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DOTSEARCH_WEIGHTS", "random")
    monkeypatch.setenv("DOTSEARCH_PORT", "9999")
    s = _settings(port=None, weights=None, data_dir=tmp_path)
    assert s.weights == "random" and s.port == 9999 and s.data_dir == tmp_path
    assert _settings(port=1234).port == 1234


def test_ingest_is_resumable_and_skips_bad_files(tmp_path, photos, encode, fast_featurizer):
    folder = tmp_path / "imgs"
    (folder / "cats").mkdir(parents=True)
    (folder / "food").mkdir()
    for name, sub in (("chelsea", "cats"), ("coffee", "food")):
        img = photos[name].copy()
        img.thumbnail((200, 200))
        (folder / sub / f"{name}.jpg").write_bytes(encode(img, "JPEG"))
    (folder / "food" / "notes.jpg").write_text("not an image")
    (folder / "readme.txt").write_text("ignored: not an image suffix")
    data = str(tmp_path / "data")
    args = ["ingest", str(folder), "--collection", "pics", "--data-dir", data,
            "--batch-size", "1", "--label-from-dir"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "2 added, 0 already there, 1 bad, of 3 files" in result.output
    assert "notes.jpg" in result.output
    result = runner.invoke(app, args)
    assert "0 added, 2 already there, 1 bad" in result.output
    result = runner.invoke(app, ["query", "SELECT label, filename FROM pics ORDER BY label",
                                 "--data-dir", data])
    assert result.exit_code == 0, result.output
    assert "cats" in result.output and "food/coffee.jpg" in result.output
    assert "2 rows" in result.output


def test_query_error_exits_1(tmp_path):
    result = runner.invoke(app, ["query", "SELEC nonsense", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "query_error" in result.output


@pytest.mark.slow
def test_demo(tmp_path, fast_featurizer):
    result = runner.invoke(app, ["demo", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "ingested 12 photographs" in result.output
    after = result.output.split("Similar to mirrored 'chelsea'")[1]
    rows = [line for line in after.splitlines() if "│" in line]
    assert "chelsea" in rows[0], result.output  # best hit first
    sql_rows = [ln for ln in result.output.split("More like 'coffee'")[1].splitlines() if "│" in ln]
    assert "coffee" in sql_rows[0]


def test_bench_passes_arguments(monkeypatch):
    import bench.__main__

    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int:
        seen.append(argv)
        return 0

    monkeypatch.setattr(bench.__main__, "main", fake_main)
    result = runner.invoke(app, ["bench", "--quick", "x"])
    assert result.exit_code == 0 and seen == [["--quick", "x"]]


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    for command in ("serve", "ingest", "query", "demo", "bench"):
        assert command in result.output
