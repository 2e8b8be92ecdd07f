"""The web page, end to end in a real browser (Debian's chromium driven by Playwright).

`dotsearch serve` runs as a subprocess with real photographs loaded; the page uploads an
image, shows its neighbours (its own stored copy first), searches "more like this" by SQL,
runs SQL and shows a broken query's error; a second test trains a classifier in the Train
panel and sees its prediction beside the neighbours' vote. Screenshots of every step go to
the test's output folder; with DOTSEARCH_UPDATE_SCREENSHOTS=1 the main ones are also copied
to docs/screenshots/ for the README.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve_support import serving

pytestmark = pytest.mark.slow

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "service" / "static"
DOCS_SHOTS = REPO / "docs" / "screenshots"
COLLECTION = "photos"
# Stored through the API before the page opens (label each); "camera" goes in through the page.
STORED = {"astronaut": "person", "coffee": "cup", "chelsea": "cat", "rocket": "rocket",
          "coins": "coins", "moon": "moon"}
EVIL = '<img src=x onerror="window.__xss=1">'
THUMBS_LOADED = ("[...document.querySelectorAll('#results img')]"
                 ".every(i => i.complete && i.naturalWidth > 0)")

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the playwright Python package is not installed")
if not CHROMIUM.exists():
    pytest.skip(f"no browser: {CHROMIUM} is missing (apt-get install chromium)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`dotsearch serve --weights random --backend cpu` on a free port; stopped at the end."""
    with serving(tmp_path_factory.mktemp("web_ui_server"), cwd=REPO) as (base, _):
        yield base


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("web_ui_screenshots")


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory: pytest.TempPathFactory, photos: Any, encode: Any
                ) -> dict[str, Path]:
    """The photographs as JPEG files, the bytes the page and the API both send."""
    folder = tmp_path_factory.mktemp("web_ui_photos")
    out = {}
    for name in (*STORED, "camera", "page"):
        path = folder / f"{name}.jpg"
        path.write_bytes(encode(photos[name], "JPEG", quality=90))
        out[name] = path
    return out


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                              headless=True)
        try:
            yield b
        finally:
            b.close()


def upload(base: str, files: list[Path], labels: list[str]) -> list[int]:
    parts = [("files", (f.name, f.read_bytes(), "image/jpeg")) for f in files]
    r = httpx.post(f"{base}/v1/collections/{COLLECTION}/images", files=parts,
                   data={"labels": labels}, timeout=120)
    assert r.status_code == 200, r.text
    return list(r.json()["ids"])


def test_static_files_are_served_and_self_contained(server: str) -> None:
    page = httpx.get(f"{server}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js"' in page.text
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        r = httpx.get(f"{server}/static/{name}", timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    assert httpx.get(f"{server}/static/nothing.js", timeout=10).status_code == 404
    assert httpx.get(f"{server}/static/..%2Fapp.py", timeout=10).status_code == 404
    # Nothing from a CDN: the page must work with no internet at all.
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path.name
    # Server data never goes through innerHTML.
    script = (STATIC / "app.js").read_text()
    assert not re.search(r"\.(inner|outer)HTML\s*\+?=|insertAdjacentHTML|document\.write", script)



def open_page(browser: Any, shots: Path, prefix: str) -> tuple[Any, Any, list[str], list[Path],
                                                               Callable[..., None]]:
    """A desktop-sized context and page whose script errors are collected, and ``shot``,
    which saves numbered screenshots (``prefix``NN_name.png) into ``shots``."""
    errors: list[str] = []
    context = browser.new_context(viewport={"width": 1200, "height": 900})
    page = context.new_page()
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.set_default_timeout(60_000)
    saved: list[Path] = []

    def shot(name: str, target: Any = None, **options: Any) -> None:
        path = shots / f"{prefix}{len(saved) + 1:02d}_{name}.png"
        (target or page).screenshot(path=str(path), **options)
        saved.append(path)

    return context, page, errors, saved, shot


def publish_screenshots(saved: list[Path], rename: Callable[[str], str],
                        only: set[str] | None = None) -> None:
    """With DOTSEARCH_UPDATE_SCREENSHOTS=1, copy screenshots into docs/screenshots as
    web_<rename(name)> (those in ``only`` when given), in 256 colours: a fraction of the
    size, still sharp enough for a README."""
    if os.environ.get("DOTSEARCH_UPDATE_SCREENSHOTS") != "1":
        return
    from PIL import Image

    DOCS_SHOTS.mkdir(parents=True, exist_ok=True)
    for path in saved:
        name = rename(path.name)
        if only is None or name in only:
            with Image.open(path) as img:
                small_png = img.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE)
            small_png.save(DOCS_SHOTS / f"web_{name}", optimize=True)

def test_page_end_to_end(server: str, browser: Any, photo_files: dict[str, Path],
                         shots: Path) -> None:
    context, page, errors, saved, shot = open_page(browser, shots, "")

    # 1. A fresh server: the header says what serves it; the empty state is explained.
    page.goto(f"{server}/")
    sync_api.expect(page.locator("#info-backend")).to_have_text("cpu")
    sync_api.expect(page.locator("#info-weights")).to_contain_text("random")
    sync_api.expect(page.locator("#weights-notice")).to_be_visible()
    sync_api.expect(page.locator("#weights-notice")).to_contain_text("not pretrained")
    sync_api.expect(page.locator("#collections-empty")).to_be_visible()
    sync_api.expect(page.locator("#search-status")).to_contain_text("nothing to search yet")
    shot("empty", full_page=True)

    # 2. Real photographs stored through the API, then one more through the page's form.
    ids = dict(zip(STORED, upload(server, [photo_files[n] for n in STORED],
                                  list(STORED.values())), strict=True))
    page.reload()
    chip = page.locator("#collections li", has_text=COLLECTION)
    sync_api.expect(chip).to_contain_text(f"{len(STORED)} vectors")
    page.fill("#upload-collection", COLLECTION)
    page.fill("#upload-label", "camera")
    page.set_input_files("#upload-files", [str(photo_files["camera"])])
    page.click("#upload-button")
    result = page.locator("#upload-results li")
    sync_api.expect(result).to_have_count(1)
    sync_api.expect(result).to_contain_text("stored as id")
    sync_api.expect(result).to_have_class("ok")
    camera_id = int(re.search(r"stored as id (\d+)", result.inner_text()).group(1))  # type: ignore[union-attr]
    assert camera_id not in ids.values()
    sync_api.expect(page.locator("#upload-progress")).to_have_attribute("value", "1")
    sync_api.expect(chip).to_contain_text(f"{len(STORED) + 1} vectors")
    shot("upload", page.locator("#add"))
    # A file that is not an image gets its own reason, and does not stop the others.
    bad = shots / "notes.txt"
    bad.write_text("not an image")
    page.set_input_files("#upload-files", [str(bad)])
    page.click("#upload-button")
    sync_api.expect(result).to_have_class("failed")
    sync_api.expect(result).to_contain_text("not stored")
    sync_api.expect(page.locator("#upload-status")).to_contain_text("0 of 1 stored")
    shot("upload_failed", page.locator("#add"))

    # 2b. A server that cannot be reached, then one whose featurizer is still loading:
    # the page says so, keeps retrying /health, and runs a search chosen meanwhile.
    page.route("**/health", lambda route: route.abort())
    page.reload()
    sync_api.expect(page.locator("#server-banner")).to_contain_text("Cannot reach")
    shot("unreachable", full_page=False)

    def loading(route: Any) -> None:
        body = route.fetch().json()
        body["featurizer"] = {"state": "loading"}
        route.fulfill(json=body)

    page.unroute("**/health")
    page.route("**/health", loading)
    sync_api.expect(page.locator("#server-banner")).to_contain_text("still loading",
                                                                    timeout=10_000)
    page.select_option("#search-collection", COLLECTION)
    page.set_input_files("#search-file", str(photo_files["rocket"]))
    sync_api.expect(page.locator("#search-status")).to_contain_text("runs as soon as")
    assert page.locator("#results li").count() == 0
    page.unroute("**/health")
    sync_api.expect(page.locator("#server-banner")).to_be_hidden(timeout=10_000)
    sync_api.expect(page.locator("#results li button.result").first).to_have_attribute(
        "data-id", str(ids["rocket"]))

    # 3. Search by image through the page: the photo's own stored copy comes first.
    page.select_option("#search-collection", COLLECTION)
    page.set_input_files("#search-file", str(photo_files["chelsea"]))
    first = page.locator("#results li button.result").first
    sync_api.expect(first).to_be_visible()
    sync_api.expect(page.locator("#results li button.result")).to_have_count(len(STORED) + 1)
    assert first.get_attribute("data-id") == str(ids["chelsea"])
    sync_api.expect(first.locator(".result-label")).to_have_text("cat")
    assert float(first.locator(".result-score").inner_text()) == pytest.approx(1.0, abs=2e-3)
    scores = [float(s) for s in page.locator("#results .result-score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    sync_api.expect(page.locator("#query-caption")).to_contain_text("chelsea.jpg")
    sync_api.expect(page.locator("#search-status")).to_contain_text(" ms on the server")
    # Every stored label is a single vote; the tie goes to the closest, the cat itself.
    sync_api.expect(page.locator("#voted-label")).to_have_text("cat")
    sync_api.expect(page.locator("#imagenet")).to_be_hidden()  # random weights: no labels
    page.wait_for_function(THUMBS_LOADED)
    assert page.locator("#results img").count() == len(STORED) + 1  # thumbnails, no placeholder
    shot("search", page.locator("#search"))

    # 4. Click a result: "more like this one" with the SQL subquery-by-id form.
    second = page.locator("#results li button.result").nth(1)
    second_id = second.get_attribute("data-id")
    assert second_id is not None and second_id != str(ids["chelsea"])
    second.click()
    sync_api.expect(page.locator("#results-title")).to_have_text(f"More like #{second_id}")
    sync_api.expect(page.locator("#results-sql")).to_contain_text(
        f"DOT_PRODUCT(feature, (SELECT feature FROM {COLLECTION} WHERE id = {second_id}))")
    sync_api.expect(page.locator("#results li button.result").first).to_have_attribute(
        "data-id", second_id)
    sync_api.expect(page.locator("#results li button.result")).to_have_count(len(STORED) + 1)
    sync_api.expect(page.locator("#search-status")).to_contain_text("by SQL")
    page.wait_for_function(THUMBS_LOADED)
    shot("more_like_this", page.locator("#search"))

    # 4b. With pretrained weights the page also shows the ImageNet labels. No pretrained
    # weights can be downloaded here, so /health and /v1/featurize are answered by the test
    # (the search itself is real); this checks the page's side of the contract.
    def pretrained(route: Any) -> None:
        body = route.fetch().json()
        body["featurizer"].update(weights="imagenet", pretrained=True)
        route.fulfill(json=body)

    page.route("**/health", pretrained)
    page.route("**/v1/featurize", lambda route: route.fulfill(json={
        "vector": [0.0], "dim": 1, "weights": "imagenet", "took_ms": 1.0,
        "labels": [{"label": "tabby cat", "index": 281, "probability": 0.61},
                   {"label": "<b>tiger cat</b>", "index": 282, "probability": 0.2}]}))
    page.reload()
    sync_api.expect(page.locator("#info-weights")).to_contain_text("imagenet (pretrained)")
    sync_api.expect(page.locator("#weights-notice")).to_be_hidden()
    page.select_option("#search-collection", COLLECTION)
    page.set_input_files("#search-file", str(photo_files["chelsea"]))
    labels = page.locator("#imagenet-labels li")
    sync_api.expect(labels).to_have_count(2)
    sync_api.expect(labels.first).to_have_text("tabby cat 61.0%")
    sync_api.expect(labels.nth(1)).to_contain_text("<b>tiger cat</b>")
    page.unroute("**/health")
    page.unroute("**/v1/featurize")

    # 5. The SQL console: the example query, run with Ctrl+Enter, as a table.
    sql = (f"SELECT id, label, DOT_PRODUCT(feature, (SELECT feature FROM {COLLECTION} "
           f"WHERE id = {ids['coffee']})) AS score FROM {COLLECTION} "
           f"ORDER BY score DESC LIMIT 4")
    page.fill("#sql-input", sql)
    page.focus("#sql-input")
    page.keyboard.press("Control+Enter")
    rows = page.locator("#sql-table tbody tr")
    sync_api.expect(rows).to_have_count(4)
    headers = page.locator("#sql-table thead th").all_inner_texts()
    assert [h.split()[0] for h in headers] == ["id", "label", "score"]
    assert rows.first.locator("td").all_inner_texts()[:2] == [str(ids["coffee"]), "cup"]
    sync_api.expect(page.locator("#sql-status")).to_contain_text("4 rows in")
    sync_api.expect(page.locator("#sql-error")).to_be_hidden()
    shot("sql_table", page.locator("#sql"))
    # 6. EXPLAIN shows the plan instead of a table.
    page.click("#sql-explain")
    sync_api.expect(page.locator("#sql-plan-box")).to_be_visible()
    sync_api.expect(page.locator("#sql-plan")).to_contain_text(f"collection {COLLECTION}")
    sync_api.expect(page.locator("#sql-table-wrap")).to_be_hidden()
    shot("sql_explain", page.locator("#sql"))
    # SingleStore's forms in the console: a user variable, an alias in WHERE (a range
    # search), and a VECTOR column projected as a JSON array.
    page.fill("#sql-input", f"SET @q = (SELECT feature FROM {COLLECTION} WHERE id = "
                            f"{ids['coffee']}); SELECT id, feature, feature <*> @q AS score "
                            f"FROM {COLLECTION} WHERE score > 0.999 ORDER BY score DESC")
    page.click("#sql-run")
    sync_api.expect(page.locator("#sql-status")).to_contain_text("1 row in")
    cells = rows.first.locator("td").all_inner_texts()
    assert cells[0] == str(ids["coffee"]) and cells[1].startswith("[") and "…" in cells[1]

    # A big answer is counted in full but only its first 1000 rows are drawn.
    n = len(STORED) + 1
    page.fill("#sql-input", f"SELECT a.id, b.id AS b, c.id AS c, d.id AS d FROM {COLLECTION} a, "
                            f"{COLLECTION} b, {COLLECTION} c, {COLLECTION} d")
    page.click("#sql-run")
    sync_api.expect(page.locator("#sql-status")).to_contain_text(
        f"{n ** 4} rows in", timeout=30_000)
    sync_api.expect(page.locator("#sql-status")).to_contain_text("first 1000 shown")
    sync_api.expect(rows).to_have_count(1000)

    # 7. A broken query: the server's message and where it went wrong.
    page.fill("#sql-input", f"SELECT id, label FROM {COLLECTION} WHERE")
    page.focus("#sql-input")
    page.keyboard.press("Control+Enter")
    sync_api.expect(page.locator("#sql-error")).to_be_visible()
    sync_api.expect(page.locator("#sql-error-message")).to_contain_text("query_error")
    sync_api.expect(page.locator("#sql-error-where")).to_contain_text("line 1, column")
    sync_api.expect(page.locator("#sql-plan-box")).to_be_hidden()
    page.fill("#sql-input", "SELECT nope FROM photos")
    page.click("#sql-run")
    sync_api.expect(page.locator("#sql-error-message")).to_contain_text("nope")
    shot("sql_error", page.locator("#sql"))

    # 8. A phone-sized screen: one column, nothing wider than the screen.
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                has_touch=True)
    small = phone.new_page()
    small.on("pageerror", lambda exc: errors.append(str(exc)))
    small.goto(f"{server}/")
    small.select_option("#search-collection", COLLECTION)
    small.set_input_files("#search-file", str(photo_files["coffee"]))
    sync_api.expect(small.locator("#results li button.result").first).to_have_attribute(
        "data-id", str(ids["coffee"]), timeout=60_000)
    assert small.evaluate("document.documentElement.scrollWidth") <= 390
    small.wait_for_function(THUMBS_LOADED)
    sync_api.expect(small.locator("#voted-label")).to_have_text("cup")
    small.locator("#query-caption").evaluate("e => e.scrollIntoView()")
    shot("phone", small)
    phone.close()

    # 9. Server data is text, never markup: a label that looks like HTML stays a label.
    upload(server, [photo_files["page"]], [EVIL])
    page.fill("#sql-input", f"SELECT id, label FROM {COLLECTION} WHERE label LIKE '<img%'")
    page.click("#sql-run")
    sync_api.expect(page.locator("#sql-table tbody tr")).to_have_count(1)
    sync_api.expect(page.locator("#sql-table tbody td").nth(1)).to_have_text(EVIL)
    assert page.locator("#sql-table img").count() == 0
    page.click("#search-again")  # image search again: the new photo is among the hits
    sync_api.expect(page.locator("#results-title")).to_have_text("Most similar")
    sync_api.expect(page.locator("#results .result-label", has_text=EVIL)).to_have_count(1)
    n_hits = page.locator("#results li button.result").count()
    assert page.locator("#results img").count() == n_hits
    assert page.evaluate("window.__xss") is None

    # 10. Keyboard: the controls are reachable with Tab and show where the focus is.
    page.goto(f"{server}/")
    focused = []
    for _ in range(12):
        page.keyboard.press("Tab")
        focused.append(page.evaluate(
            "[document.activeElement.tagName, document.activeElement.id, "
            "getComputedStyle(document.activeElement).outlineStyle]"))
    ids_reached = [f[1] for f in focused]
    assert "search-pick" in ids_reached and "search-collection" in ids_reached
    assert all(f[2] != "none" for f in focused if f[1] in ("search-pick", "search-collection"))
    context.close()

    assert not errors, errors
    publish_screenshots(saved, lambda name: re.sub(r"^\d+_", "", name), {
        "search.png", "more_like_this.png", "upload.png", "sql_table.png", "sql_explain.png",
        "sql_error.png", "phone.png"})
    print(f"screenshots: {shots}")


TRAIN = "trainset"
# A class per photograph: its feature vector and noisy copies of it, stored as vectors.
TRAIN_CLASSES = {"astronaut": "person", "coffee": "cup", "chelsea": "cat"}
PER_CLASS = 30
SLOW = 60_000  # ms: what waits on the server's featurizer or training on 2 shared cores


def labelled_vectors(base: str, photo_files: dict[str, Path]) -> None:
    """The TRAIN collection: PER_CLASS noisy copies of each photograph's feature vector
    (the server's own featurizer), labelled with its class; `single` has one value only."""
    import numpy as np

    centres = {}
    for name in TRAIN_CLASSES:
        r = httpx.post(f"{base}/v1/featurize", timeout=120, files={
            "file": (f"{name}.jpg", photo_files[name].read_bytes(), "image/jpeg")})
        assert r.status_code == 200, r.text
        centres[name] = np.asarray(r.json()["vector"], dtype=np.float64)
    dim = len(next(iter(centres.values())))
    # Noise well inside half the smallest distance between centres: clusters that a linear
    # model separates, and whose nearest neighbours vote for the right class.
    gap = min(np.linalg.norm(a - b) for i, a in enumerate(centres.values())
              for b in list(centres.values())[i + 1:])
    rng = np.random.default_rng(11)
    vectors, metadata = [], []
    for name, label in TRAIN_CLASSES.items():
        noise = rng.standard_normal((PER_CLASS, dim))
        noise *= 0.2 * gap / np.linalg.norm(noise, axis=1, keepdims=True)
        vectors += (centres[name] + noise).tolist()
        metadata += [{"label": label, "single": "same"}] * PER_CLASS
    r = httpx.post(f"{base}/v1/collections", timeout=30, json={
        "name": TRAIN, "dim": dim, "columns": {"label": "VARCHAR", "single": "VARCHAR"}})
    assert r.status_code == 201, r.text
    r = httpx.post(f"{base}/v1/collections/{TRAIN}/vectors", timeout=120,
                   json={"vectors": vectors, "metadata": metadata})
    assert r.status_code == 200, r.text


def test_train_panel_end_to_end(server: str, browser: Any, photo_files: dict[str, Path],
                                shots: Path) -> None:
    """Train a classifier through the page, watch it, read its metrics and confusion
    matrix, see its prediction beside the neighbours' vote, cancel a training, drop a model."""
    labelled_vectors(server, photo_files)
    context, page, errors, saved, shot = open_page(browser, shots, "train_")

    page.goto(f"{server}/")

    # 1. The form offers the collection's metadata columns and a model name of its own.
    page.select_option("#train-collection", TRAIN)
    sync_api.expect(page.locator("#train-label")).to_have_value("label")
    labels = page.locator("#train-label option").all_inner_texts()
    assert [t.split()[0] for t in labels] == ["label", "single"]
    page.select_option("#train-kind", "logistic")
    sync_api.expect(page.locator("#train-name")).to_have_value(f"{TRAIN}_logistic")

    # 2. A column with one value cannot be learnt: the service's own message is shown.
    page.select_option("#train-label", "single")
    page.fill("#train-epochs", "20")
    page.click("#train-button")
    status = page.locator("#train-status")
    sync_api.expect(status).to_have_class(re.compile(r"\berror\b"), timeout=SLOW)
    sync_api.expect(status).to_contain_text("class")
    sync_api.expect(page.locator("#train-button")).to_be_enabled()
    assert not page.locator(f"#models li[data-name='{TRAIN}_logistic'] .state-ready").count()

    # 3. Train on the label column: progress to done, then accuracy and the confusion matrix.
    page.select_option("#train-label", "label")
    page.click("#train-button")
    sync_api.expect(page.locator("#train-progress-box")).to_be_visible()
    sync_api.expect(page.locator("#train-progress-label")).to_contain_text("Done", timeout=SLOW)
    sync_api.expect(status).to_contain_text("holdout accuracy")
    progress = page.locator("#train-progress")
    assert progress.get_attribute("value") == progress.get_attribute("max") == "20"
    accuracy = page.locator("#train-metrics .metric-accuracy dd")
    sync_api.expect(accuracy).to_be_visible()
    assert float(accuracy.inner_text().split()[0]) >= 0.9
    assert float(page.locator("#train-metrics .metric-f1 dd").inner_text()) >= 0.9
    cells = page.locator("#confusion tbody td.cell")
    sync_api.expect(cells).to_have_count(len(TRAIN_CLASSES) ** 2)
    assert sorted(page.locator("#confusion thead th").all_inner_texts()) == sorted(
        TRAIN_CLASSES.values())
    diagonal = page.locator("#confusion tbody td.diag")
    sync_api.expect(diagonal).to_have_count(len(TRAIN_CLASSES))
    holdout = sum(int(c) for c in cells.all_inner_texts())
    assert holdout > 0 and sum(int(c) for c in diagonal.all_inner_texts()) >= 0.9 * holdout
    # The picture: each cell is shaded by its share of the row (opaque at 1), so here the
    # diagonal is dark and the rest pale.
    shading = ("cells => cells.map(e => [Number(e.dataset.share), "
               "getComputedStyle(e).backgroundColor])")
    for share, colour in cells.evaluate_all(shading):
        assert colour.startswith("rgb")
        assert (share > 0.8) == (colour == "rgb(31, 95, 191)") or 0.0 < share <= 0.8
    assert min(share for share, _ in diagonal.evaluate_all(shading)) > 0.8
    sync_api.expect(page.locator("#per-class tbody tr")).to_have_count(len(TRAIN_CLASSES))
    model = page.locator(f"#models li[data-name='{TRAIN}_logistic']")
    sync_api.expect(model.locator(".model-state")).to_have_text("ready")
    sync_api.expect(model).to_contain_text("accuracy")
    sync_api.expect(page.locator("#train-name")).to_have_value(f"{TRAIN}_logistic_2")
    shot("trained", page.locator("#train"))

    # 4. Keyboard: "Show" is a button reached with Tab and pressed with Enter.
    page.locator("#train-result").evaluate("e => { e.hidden = true; }")
    model.locator(".show-model").focus()
    page.keyboard.press("Enter")
    sync_api.expect(page.locator("#train-result")).to_be_visible()
    sync_api.expect(page.locator("#train-result-title")).to_be_focused()
    sync_api.expect(page.locator("#train-result-title")).to_contain_text(f"{TRAIN}_logistic")

    # 4b. On a phone-sized screen the panel and its matrix fit the width.
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                has_touch=True)
    small = phone.new_page()
    small.on("pageerror", lambda exc: errors.append(str(exc)))
    small.goto(f"{server}/")
    small.locator(f"#models li[data-name='{TRAIN}_logistic'] .show-model").click()
    sync_api.expect(small.locator("#confusion tbody td.cell")).to_have_count(
        len(TRAIN_CLASSES) ** 2, timeout=SLOW)
    assert small.evaluate("document.documentElement.scrollWidth") <= 390
    shot("phone", small.locator("#train"))
    phone.close()

    # 5. Search by image in the collection: the model's prediction beside the kNN vote.
    page.select_option("#search-collection", TRAIN)
    page.set_input_files("#search-file", str(photo_files["chelsea"]))
    sync_api.expect(page.locator("#voted-label")).to_have_text("cat", timeout=SLOW)
    predicted = page.locator(f"#model-prediction-list li[data-model='{TRAIN}_logistic']")
    sync_api.expect(predicted).to_have_class("ok", timeout=SLOW)
    sync_api.expect(predicted.locator(".predicted-label")).to_have_text("cat")
    sync_api.expect(predicted.locator(".predicted-detail")).to_contain_text("%")
    shot("prediction", page.locator("#search"))

    # 6. A long training started elsewhere (here over REST) is followed, and cancelled from
    # the list.
    r = httpx.post(f"{server}/v1/models", timeout=30, json={
        "name": f"{TRAIN}_mlp", "collection": TRAIN, "label_column": "label", "kind": "mlp",
        "hidden": 8192, "epochs": 1000})
    assert r.status_code == 202, r.text
    page.reload()
    mlp = page.locator(f"#models li[data-name='{TRAIN}_mlp']")
    sync_api.expect(mlp.locator(".model-state")).to_have_text("training", timeout=SLOW)
    sync_api.expect(page.locator("#train-progress-label")).to_contain_text(
        re.compile(r"epoch \d+ of 1000"), timeout=SLOW)
    sync_api.expect(page.locator("#train-button")).to_be_disabled()
    sync_api.expect(page.locator("#train-loss")).to_be_visible(timeout=SLOW)  # epoch by epoch
    sync_api.expect(page.locator("#train-loss-title")).to_contain_text("Loss by epoch: from")
    shot("training", page.locator("#train"))
    mlp.locator(".cancel-model").click()
    sync_api.expect(status).to_contain_text(f"Cancelled the training of “{TRAIN}_mlp”",
                                             timeout=SLOW)
    sync_api.expect(page.locator("#models .state-training")).to_have_count(0)
    sync_api.expect(page.locator("#train-button")).to_be_enabled()
    shot("cancelled", page.locator("#train"))

    # 7. Drop the model (after a confirmation): no prediction beside the vote any more.
    page.once("dialog", lambda dialog: dialog.accept())
    model.locator(".drop-model").click()
    sync_api.expect(status).to_contain_text(f"Dropped model “{TRAIN}_logistic”")
    sync_api.expect(model).to_have_count(0)
    sync_api.expect(page.locator("#train-result")).to_be_hidden()
    page.select_option("#search-collection", TRAIN)
    page.set_input_files("#search-file", str(photo_files["chelsea"]))
    sync_api.expect(page.locator("#voted-label")).to_have_text("cat", timeout=SLOW)
    sync_api.expect(page.locator("#model-predictions")).to_be_hidden()
    assert httpx.get(f"{server}/v1/models/{TRAIN}_logistic", timeout=10).status_code == 404
    context.close()

    assert not errors, errors
    # train_01_trained.png -> train_trained.png
    publish_screenshots(saved, lambda name: re.sub(r"_\d+_", "_", name))
    print(f"screenshots: {shots}")
