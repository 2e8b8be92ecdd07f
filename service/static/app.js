/* dotsearch web page: plain JavaScript, no dependencies, no build step.
 *
 * Every value that comes from the server is put into the DOM with textContent or as a
 * property (never innerHTML), so labels, file names and SQL errors cannot inject markup.
 */
"use strict";

(() => {
  const NAME_RE = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/;
  const MAX_TABLE_ROWS = 1000;   // a bigger answer is counted, not drawn
  const $ = (id) => document.getElementById(id);

  const state = {
    health: null,
    collections: [],          // [{name, dim, metric, columns, count, thumbnails}]
    queryFile: null,          // the image being searched with (File/Blob)
    queryUrl: null,           // its object URL for the preview
    apiKey: localStorage.getItem("dotsearch.apiKey") || "",
    healthTimer: null,
    searchSeq: 0,             // ignore answers to searches that were superseded
    pendingSearch: false,     // an image chosen while the featurizer was still loading
    models: [],               // ModelInfo of every trained model (GET /v1/models)
    watching: null,           // the model whose training the Train panel follows
    watchTimer: null,
    watchStarted: 0,
    lossTrail: [],            // [epoch, loss] of the training followed, as it was seen
    shownModel: null,         // the model whose metrics the Train panel shows
  };

  /* ---------- small helpers ---------- */

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (value === undefined || value === null) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key in node && !key.startsWith("aria") && !key.startsWith("data")) node[key] = value;
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) { node.replaceChildren(); }

  // The attribute, not the property: SVG elements have no `hidden` property.
  function show(node, visible) { node.toggleAttribute("hidden", !visible); }

  function setStatus(node, text, kind) {
    node.textContent = text || "";
    node.classList.toggle("error", kind === "error");
    node.classList.toggle("busy", kind === "busy");
  }

  function fmtScore(x) {
    return typeof x === "number" && Number.isFinite(x) ? x.toFixed(4) : String(x);
  }

  function fmtMs(ms) {
    if (typeof ms !== "number") return "";
    return ms < 10 ? `${ms.toFixed(2)} ms` : `${Math.round(ms)} ms`;
  }

  /** An error from the API: {error, message, position?} with the HTTP status. */
  class ApiError extends Error {
    constructor(status, body) {
      const message = (body && (body.message || body.detail)) || `HTTP ${status}`;
      super(typeof message === "string" ? message : JSON.stringify(message));
      this.status = status;
      this.error = (body && body.error) || "http_error";
      this.position = body && body.position ? body.position : null;
    }
  }

  function headers(extra) {
    const h = Object.assign({}, extra || {});
    if (state.apiKey) h["X-API-Key"] = state.apiKey;
    return h;
  }

  /** fetch + JSON, throwing ApiError for an error status and TypeError when unreachable. */
  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = headers(opts.headers);
    const response = await fetch(path, opts);
    let body = null;
    const type = response.headers.get("content-type") || "";
    if (type.includes("json")) {
      try { body = await response.json(); } catch (_) { body = null; }
    } else {
      const text = await response.text();
      body = { message: text.slice(0, 300) || response.statusText };
    }
    if (!response.ok) throw new ApiError(response.status, body);
    return body;
  }

  function postForm(path, form) {
    return api(path, { method: "POST", body: form });
  }

  function postJson(path, data) {
    return api(path, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(data),
    });
  }

  function errorText(err) {
    if (err instanceof ApiError) {
      let text = `${err.error}: ${err.message}`;
      if (err.status === 401 || err.status === 403) text += " (set an API key at the bottom of the page)";
      return text;
    }
    if (err instanceof TypeError) return "cannot reach the server (is it running?)";
    return String(err && err.message ? err.message : err);
  }

  function thumbnailUrl(collection, id) {
    return `/v1/collections/${encodeURIComponent(collection)}/vectors/${encodeURIComponent(id)}/thumbnail`;
  }

  /** An <img> for a stored thumbnail, or a placeholder when the collection keeps none. */
  function thumbnail(collection, id, alt) {
    const box = el("span", { class: "thumb" });
    const placeholder = () => {
      clear(box);
      box.classList.add("no-thumb");
      box.append(el("span", { text: `#${id}` }));
    };
    const info = state.collections.find((c) => c.name === collection);
    if (info && info.thumbnails === false) { placeholder(); return box; }
    const img = el("img", { alt, decoding: "async", onerror: placeholder });
    box.append(img);
    loadImage(img, thumbnailUrl(collection, id), placeholder);
    return box;
  }

  function loadImage(img, url, onFail) {
    if (!state.apiKey) {
      img.src = url;
      return;
    }
    // An <img> cannot send a header: fetch the bytes with the key instead.
    fetch(url, { headers: headers() })
      .then((r) => (r.ok ? r.blob() : Promise.reject(new Error(String(r.status)))))
      .then((blob) => { img.src = URL.createObjectURL(blob); })
      .catch(onFail);
  }

  /* ---------- server state: /health and collections ---------- */

  function scheduleHealth(ms) {
    clearTimeout(state.healthTimer);
    state.healthTimer = setTimeout(refreshHealth, ms);
  }

  async function refreshHealth() {
    const banner = $("server-banner");
    let health;
    try {
      health = await api("/health");
    } catch (err) {
      banner.className = "banner error";
      banner.textContent = err instanceof TypeError
        ? "Cannot reach the dotsearch server. Retrying every few seconds…"
        : `The server answered /health with an error: ${errorText(err)}. Retrying…`;
      show(banner, true);
      scheduleHealth(3000);
      return;
    }
    state.health = health;
    const featurizer = health.featurizer || {};
    $("info-backend").textContent = health.backend || "?";
    $("info-device").textContent = health.device || "?";
    const weights = $("info-weights");
    if (featurizer.state === "ready") {
      weights.textContent = `${featurizer.weights || "?"}${featurizer.pretrained ? " (pretrained)" : ""}` +
        (featurizer.device ? ` on ${featurizer.device}` : "");
    } else {
      weights.textContent = featurizer.state || "?";
    }

    let retry = 0;
    if (health.status !== "ok") {
      banner.className = "banner busy";
      banner.textContent = "The server is starting (opening its storage). Retrying…";
      show(banner, true);
      retry = 1000;
    } else if (featurizer.state === "loading") {
      banner.className = "banner busy";
      banner.textContent = "The featurizer is still loading: image search and uploads will work in a moment. SQL works now.";
      show(banner, true);
      retry = 1500;
    } else if (featurizer.state === "failed") {
      banner.className = "banner error";
      banner.textContent = `The featurizer failed to load: ${featurizer.error || "unknown error"}. Image search and uploads are unavailable; SQL still works.`;
      show(banner, true);
    } else if (featurizer.state === "disabled") {
      banner.className = "banner warn";
      banner.textContent = "This server runs without a featurizer: image search and uploads are unavailable; SQL works.";
      show(banner, true);
    } else {
      show(banner, false);
    }

    const notice = $("weights-notice");
    if (featurizer.state === "ready" && !featurizer.pretrained) {
      notice.textContent = `The featurizer uses ${featurizer.weights || "random"} weights, not pretrained ones: ` +
        "an image's own copy is still found first, but other similarities are not semantic, and no ImageNet labels are shown. " +
        "Start the server with --weights imagenet for meaningful neighbours.";
      if (featurizer.warning) notice.textContent += ` (${featurizer.warning})`;
      show(notice, true);
    } else if (featurizer.state === "ready" && featurizer.warning) {
      notice.textContent = featurizer.warning;
      show(notice, true);
    } else {
      show(notice, false);
    }
    updateSearchAvailability();

    if (health.status === "ok") {
      await refreshCollections();
      refreshModels();
    }
    if (state.pendingSearch && featurizerReady()) searchByImage();
    if (retry) scheduleHealth(retry);
  }

  async function refreshCollections() {
    let list;
    try {
      list = (await api("/v1/collections")).collections || [];
    } catch (err) {
      // Fall back to what /health says (it needs no API key) when the list is refused.
      list = ((state.health && state.health.collections) || []).map((c) => ({
        name: c.name, dim: c.dim, count: c.count, columns: {}, thumbnails: undefined,
      }));
      if (!(err instanceof ApiError && (err.status === 401 || err.status === 403))) {
        setStatus($("search-status"), `Could not list collections: ${errorText(err)}`, "error");
      }
    }
    state.collections = list;
    renderCollections();
  }

  function renderCollections() {
    const ul = $("collections");
    clear(ul);
    for (const c of state.collections) {
      const button = el("button", {
        type: "button", class: "chip",
        title: `${c.dim}-d, ${c.metric || "?"}; columns: id, feature${Object.keys(c.columns || {}).map((n) => ", " + n).join("")}`,
        onclick: () => { $("search-collection").value = c.name; onCollectionChange(); $("search").scrollIntoView(); },
      }, el("span", { class: "chip-name", text: c.name }),
      el("span", { class: "chip-count", text: `${c.count.toLocaleString()} ${c.count === 1 ? "vector" : "vectors"}` }));
      ul.append(el("li", {}, button));
    }
    show($("collections-empty"), state.collections.length === 0);

    const select = $("search-collection");
    const { previous, names } = fillCollectionSelect(select);
    if (names.includes(previous)) select.value = previous;
    else if (names.includes("images")) select.value = "images";
    else if (state.collections.length) {   // the largest collection is the likeliest to search
      select.value = state.collections.reduce((a, b) => (b.count > a.count ? b : a)).name;
    }

    const datalist = $("collection-names");
    clear(datalist);
    for (const c of state.collections) datalist.append(el("option", { value: c.name }));

    maybeUpdateExampleSql();
    renderTrainChoices();
    updateSearchAvailability();
  }

  function currentCollection() {
    const name = $("search-collection").value;
    return state.collections.find((c) => c.name === name) || null;
  }

  function featurizerReady() {
    return !!(state.health && state.health.featurizer && state.health.featurizer.state === "ready");
  }

  function updateSearchAvailability() {
    const c = currentCollection();
    $("search-again").disabled = !(state.queryFile && c && featurizerReady());
    const status = $("search-status");
    if (status.dataset.sticky) return;
    if (!state.health) return;
    if (state.collections.length === 0) {
      setStatus(status, "There is nothing to search yet: add images below, then drop one here.");
    } else if (c && c.count === 0) {
      setStatus(status, `Collection “${c.name}” is empty: add images to it first.`);
    } else if (!featurizerReady()) {
      setStatus(status, "Image search needs the featurizer, which is not ready.");
    } else if (!state.queryFile) {
      setStatus(status, "Choose, drop or paste an image to see the most similar stored ones.");
    }
  }

  /* ---------- search by image ---------- */

  function setQueryPreview(src, caption) {
    const img = $("query-image");
    img.hidden = false;
    img.onerror = () => { img.hidden = true; };
    if (src.startsWith("blob:")) img.src = src;
    else loadImage(img, src, () => { img.hidden = true; });
    img.alt = caption;
    $("query-caption").textContent = caption;
    show($("search-output"), true);
  }

  function useImage(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      setStatus($("search-status"), `${file.name || "That file"} is not an image (${file.type}).`, "error");
      return;
    }
    state.queryFile = file;
    if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
    state.queryUrl = URL.createObjectURL(file);
    searchByImage();
  }

  function readK() {
    const k = parseInt($("search-k").value, 10);
    return Number.isFinite(k) && k >= 1 ? Math.min(k, 100) : 8;
  }

  async function searchByImage() {
    const status = $("search-status");
    const c = currentCollection();
    if (!state.queryFile) return;
    setQueryPreview(state.queryUrl, `Your image: ${state.queryFile.name || "pasted image"}`);
    clear($("results"));
    show($("prediction"), false);
    show($("model-predictions"), false);
    show($("imagenet"), false);
    show($("results-sql-box"), false);
    $("results-title").textContent = "Most similar";
    if (!c) {
      setStatus(status, "Choose a collection first (or add images to create one).", "error");
      return;
    }
    if (!featurizerReady()) {
      state.pendingSearch = true;   // refreshHealth runs it once the featurizer is ready
      status.dataset.sticky = "1";
      setStatus(status, "The featurizer is still loading: the search runs as soon as it is ready.", "busy");
      return;
    }
    state.pendingSearch = false;
    const seq = ++state.searchSeq;
    const k = readK();
    const filter = $("search-filter").value.trim();
    status.dataset.sticky = "1";
    setStatus(status, `Searching “${c.name}”…`, "busy");
    $("search-again").disabled = true;
    const form = () => {
      const f = new FormData();
      f.append("file", state.queryFile, state.queryFile.name || "pasted.png");
      f.append("k", String(k));
      if (filter) f.append("filter", filter);
      return f;
    };
    const started = performance.now();
    try {
      const answer = await postForm(`/v1/collections/${encodeURIComponent(c.name)}/search/image`, form());
      if (seq !== state.searchSeq) return;
      const roundTrip = performance.now() - started;
      const hits = answer.results || [];
      renderHits(c.name, hits, null);
      setStatus(status, hits.length
        ? `${hits.length} most similar in “${c.name}” (${c.count} stored): ${fmtMs(answer.took_ms)} on the server including featurizing, ${fmtMs(roundTrip)} round trip.`
        : (filter ? `No stored image in “${c.name}” matches the filter.` : `Collection “${c.name}” has no images to compare with.`));
    } catch (err) {
      if (seq !== state.searchSeq) return;
      setStatus(status, `Search failed: ${errorText(err)}`, "error");
      return;
    } finally {
      if (seq === state.searchSeq) updateSearchAvailability();
    }
    // The neighbours' vote and the ImageNet labels come after the grid, without blocking it.
    if (c.columns && "label" in c.columns) {
      const f = form();
      f.set("k", String(Math.min(k, 1000)));
      postForm(`/v1/collections/${encodeURIComponent(c.name)}/classify`, f)
        .then((vote) => { if (seq === state.searchSeq) renderVote(vote); })
        .catch((err) => {
          if (seq !== state.searchSeq) return;
          $("voted-label").textContent = "no vote";
          $("vote-detail").textContent = errorText(err);
          show($("prediction"), true);
        });
    }
    // The models' predictions too, from a fresh list (one may have been trained meanwhile).
    refreshModels().then(() => {
      const models = readyModelsFor(c);
      if (seq === state.searchSeq && models.length) predictWithModels(models, seq);
    });
    const featurizer = state.health && state.health.featurizer;
    if (featurizer && featurizer.pretrained) {
      const f = new FormData();
      f.append("file", state.queryFile, state.queryFile.name || "pasted.png");
      postForm("/v1/featurize", f)
        .then((out) => { if (seq === state.searchSeq) renderImagenet(out.labels || []); })
        .catch(() => {});
    }
  }

  function renderVote(vote) {
    const box = $("prediction");
    if (!vote || vote.label === null || vote.label === undefined) {
      $("voted-label").textContent = "no labelled neighbours";
      $("vote-detail").textContent = "";
    } else {
      const votes = vote.votes || {};
      const total = Object.values(votes).reduce((a, b) => a + b, 0);
      $("voted-label").textContent = vote.label;
      const others = Object.entries(votes).map(([label, n]) => `${label}: ${n}`).join(", ");
      $("vote-detail").textContent = `${votes[vote.label] || 0} of ${total} labelled neighbours (${others})`;
    }
    show(box, true);
  }

  function renderImagenet(labels) {
    const ol = $("imagenet-labels");
    clear(ol);
    for (const l of labels) {
      ol.append(el("li", {}, el("span", { text: l.label }), " ",
        el("span", { class: "muted", text: `${(100 * l.probability).toFixed(1)}%` })));
    }
    show($("imagenet"), labels.length > 0);
  }

  /** The results grid: each hit a button that searches for more like it. */
  function renderHits(collection, hits, selfId) {
    const ol = $("results");
    clear(ol);
    hits.forEach((hit, rank) => {
      const meta = hit.metadata || {};
      const label = meta.label === undefined || meta.label === null ? "" : String(meta.label);
      const name = `#${hit.id}${label ? " " + label : ""}`;
      const button = el("button", {
        type: "button", class: "result",
        "aria-label": `Result ${rank + 1}: id ${hit.id}${label ? ", label " + label : ""}, score ${fmtScore(hit.score)}. Search for more like this one.`,
        title: meta.filename ? String(meta.filename) : undefined,
        "data-id": String(hit.id),
        onclick: () => moreLikeThis(collection, hit.id, label),
      },
      thumbnail(collection, hit.id, name),
      el("span", { class: "result-meta" },
        el("span", { class: "result-id", text: `#${hit.id}` }),
        el("span", { class: "result-score", text: fmtScore(hit.score) })),
      el("span", { class: "result-label", text: label || "\u00a0" }));
      const li = el("li", { class: selfId !== null && hit.id === selfId ? "self" : "" }, button);
      ol.append(li);
    });
    if (!hits.length) ol.append(el("li", { class: "empty", text: "No results." }));
  }

  /** "More like this one": the SQL subquery-by-id form, through /v1/query. */
  async function moreLikeThis(collection, id, label) {
    const status = $("search-status");
    const info = state.collections.find((c) => c.name === collection);
    if (!NAME_RE.test(collection) || !Number.isSafeInteger(Number(id))) {
      setStatus(status, "Cannot build the query for this result.", "error");
      return;
    }
    const k = readK();
    const hasLabel = !!(info && info.columns && "label" in info.columns);
    const sql = `SELECT id, ${hasLabel ? "label, " : ""}DOT_PRODUCT(feature, (SELECT feature FROM ${collection} WHERE id = ${Number(id)})) AS score FROM ${collection} ORDER BY score DESC LIMIT ${k}`;
    const seq = ++state.searchSeq;
    status.dataset.sticky = "1";
    setStatus(status, `Searching for more like #${id}…`, "busy");
    const started = performance.now();
    try {
      const answer = await postJson("/v1/query", { sql });
      if (seq !== state.searchSeq) return;
      const cols = answer.columns || [];
      const at = (name) => cols.indexOf(name);
      const hits = (answer.rows || []).map((row) => ({
        id: row[at("id")],
        score: row[at("score")],
        metadata: hasLabel ? { label: row[at("label")] } : {},
      }));
      const caption = `More like #${id}${label ? " (" + label + ")" : ""}`;
      setQueryPreview(thumbnailUrl(collection, id), caption);
      $("results-title").textContent = `More like #${id}`;
      show($("prediction"), false);
      show($("model-predictions"), false);
      show($("imagenet"), false);
      $("results-sql").textContent = sql;
      show($("results-sql-box"), true);
      renderHits(collection, hits, Number(id));
      setStatus(status, `${hits.length} most similar to #${id} in “${collection}” by SQL: ${fmtMs(answer.took_ms)} on the server, ${fmtMs(performance.now() - started)} round trip.`);
      $("results-title").focus({ preventScroll: true });
    } catch (err) {
      if (seq !== state.searchSeq) return;
      setStatus(status, `“More like this” failed: ${errorText(err)}`, "error");
    }
  }

  function onCollectionChange() {
    maybeUpdateExampleSql();
    delete $("search-status").dataset.sticky;
    if (state.queryFile) searchByImage();
    else updateSearchAvailability();
  }

  function setupSearch() {
    const input = $("search-file");
    $("search-pick").addEventListener("click", () => input.click());
    input.addEventListener("change", () => {
      if (input.files && input.files[0]) useImage(input.files[0]);
      input.value = "";   // choosing the same file again searches again
    });
    $("search-collection").addEventListener("change", onCollectionChange);
    $("search-form").addEventListener("submit", (event) => {
      event.preventDefault();
      if (state.queryFile) searchByImage();
    });

    const zone = $("dropzone");
    const section = $("search");
    let depth = 0;
    section.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; zone.classList.add("over"); });
    section.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; zone.classList.remove("over"); } });
    section.addEventListener("dragover", (e) => { e.preventDefault(); e.dataTransfer.dropEffect = "copy"; });
    section.addEventListener("drop", (e) => {
      e.preventDefault();
      depth = 0;
      zone.classList.remove("over");
      const file = [...(e.dataTransfer.files || [])].find((f) => f.type.startsWith("image/"));
      if (file) useImage(file);
      else setStatus($("search-status"), "Drop an image file (JPEG, PNG, WebP, GIF, BMP).", "error");
    });
    document.addEventListener("paste", (e) => {
      const items = [...((e.clipboardData && e.clipboardData.items) || [])];
      const item = items.find((i) => i.kind === "file" && i.type.startsWith("image/"));
      if (!item) return;        // a text paste into a field stays a text paste
      e.preventDefault();
      useImage(item.getAsFile());
      section.scrollIntoView({ block: "start" });
    });
  }

  /* ---------- add images ---------- */

  function setupUpload() {
    const form = $("upload-form");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const status = $("upload-status");
      const collection = $("upload-collection").value.trim();
      const label = $("upload-label").value.trim();
      const files = [...($("upload-files").files || [])];
      if (!NAME_RE.test(collection)) {
        setStatus(status, "A collection name starts with a letter or _ and has only letters, digits and _ (at most 63).", "error");
        $("upload-collection").focus();
        return;
      }
      if (label.includes(",")) {
        setStatus(status, "A label cannot contain a comma (the API reads commas as separators).", "error");
        $("upload-label").focus();
        return;
      }
      if (!files.length) {
        setStatus(status, "Choose one or more image files first.", "error");
        $("upload-files").focus();
        return;
      }
      const button = $("upload-button");
      button.disabled = true;
      const progress = $("upload-progress");
      progress.max = files.length;
      progress.value = 0;
      show($("upload-progress-box"), true);
      const list = $("upload-results");
      clear(list);
      let stored = 0;
      const started = performance.now();
      // One request per file: a per-file result (one bad file does not fail the others).
      for (let i = 0; i < files.length; i++) {
        const file = files[i];
        $("upload-progress-label").textContent = `Uploading ${i + 1} of ${files.length}: ${file.name}`;
        setStatus(status, `Uploading ${i + 1} of ${files.length}…`, "busy");
        const item = el("li", { class: "pending" }, el("span", { class: "file-name", text: file.name }), " ",
          el("span", { class: "file-result", text: "uploading…" }));
        list.append(item);
        const f = new FormData();
        f.append("files", file, file.name);
        if (label) f.append("labels", label);
        try {
          const out = await postForm(`/v1/collections/${encodeURIComponent(collection)}/images`, f);
          stored++;
          item.className = "ok";
          item.querySelector(".file-result").textContent =
            `stored as id ${(out.ids || []).join(", ")}${label ? ` with label “${label}”` : ""} (${fmtMs(out.took_ms)})`;
        } catch (err) {
          item.className = "failed";
          item.querySelector(".file-result").textContent = `not stored: ${errorText(err)}`;
        }
        progress.value = i + 1;
      }
      $("upload-progress-label").textContent = `Done: ${files.length} ${files.length === 1 ? "file" : "files"}`;
      setStatus(status, `${stored} of ${files.length} stored in “${collection}” in ${fmtMs(performance.now() - started)}.`,
        stored === files.length ? "" : "error");
      button.disabled = false;
      $("upload-files").value = "";
      await refreshCollections();
      if (stored && !currentCollection()) $("search-collection").value = collection;
      updateSearchAvailability();
    });
  }

  /* ---------- trained models: the Train panel, and predictions beside the vote ---------- */

  const TRAIN_POLL_MS = 400;
  const MODEL_STATES = { training: "training", ready: "ready", failed: "failed", cancelled: "cancelled" };
  let trainNameTouched = false;

  function modelUrl(name, suffix) {
    return `/v1/models/${encodeURIComponent(name)}${suffix || ""}`;
  }

  function fmtRatio(x) {
    return typeof x === "number" && Number.isFinite(x) ? x.toFixed(3) : "–";
  }

  function fmtLoss(x) {
    if (typeof x !== "number" || !Number.isFinite(x)) return "–";
    if (x === 0) return "0";
    return Math.abs(x) < 1e-3 ? x.toExponential(2) : x.toPrecision(4);
  }

  function fmtPercent(p) {
    return typeof p === "number" && Number.isFinite(p) ? `${(100 * p).toFixed(1)}%` : "";
  }

  async function refreshModels() {
    try {
      state.models = (await api("/v1/models")).models || [];
      // A training started elsewhere (another tab, SQL, the CLI) is followed here too.
      const training = state.models.find((m) => m.state === "training");
      if (training && !state.watching) watchModel(training);
    } catch (err) {
      state.models = [];
      if (!(err instanceof ApiError && (err.status === 401 || err.status === 403))) {
        setStatus($("train-status"), `Could not list the models: ${errorText(err)}`, "error");
      }
    }
    renderModels();
  }

  function readyModelsFor(collection) {
    return state.models.filter((m) => m.state === "ready" && m.collection === collection.name &&
      (!m.dim || !collection.dim || m.dim === collection.dim));
  }

  /** Refill a <select> with the collections; the choice it had, and the names now offered. */
  function fillCollectionSelect(select) {
    const previous = select.value;
    clear(select);
    for (const c of state.collections) {
      select.append(el("option", { value: c.name, text: `${c.name} (${c.count})` }));
    }
    return { previous, names: state.collections.map((c) => c.name) };
  }

  /** The collection and label-column choices of the form, kept in step with the collections. */
  function renderTrainChoices() {
    const select = $("train-collection");
    const { previous, names } = fillCollectionSelect(select);
    if (names.includes(previous)) select.value = previous;
    else if (state.collections.length) {  // the first collection with a label column
      const labelled = state.collections.find((c) => c.columns && "label" in c.columns);
      select.value = (labelled || state.collections[0]).name;
    }
    renderLabelChoices();
  }

  function renderLabelChoices() {
    const c = state.collections.find((x) => x.name === $("train-collection").value) || null;
    const select = $("train-label");
    const previous = select.value;
    clear(select);
    const columns = Object.entries((c && c.columns) || {});
    for (const [name, type] of columns) {
      select.append(el("option", { value: name, text: `${name} (${type})` }));
    }
    const choices = columns.map(([name]) => name);
    if (choices.includes(previous)) select.value = previous;
    else if (choices.includes("label")) select.value = "label";
    suggestModelName();
    $("train-button").disabled = !(c && columns.length) || !!state.watching;
    // A hint about what is missing, cleared once it no longer applies (and only then).
    const hint = !state.collections.length ? "There is nothing to train on yet: add labelled images first."
      : c && !columns.length ? `Collection “${c.name}” has no metadata column to learn: add a label column to it first.`
        : "";
    const status = $("train-status");
    if (hint && !state.watching) {
      setStatus(status, hint);
      status.dataset.hint = hint;
    } else if (status.dataset.hint && status.textContent === status.dataset.hint) {
      setStatus(status, "");
    }
    if (!hint) delete status.dataset.hint;
  }

  /** A free model name from the collection and kind, until the user types one. */
  function suggestModelName() {
    if (trainNameTouched) return;
    const collection = $("train-collection").value;
    if (!collection) return;
    const base = `${collection}_${$("train-kind").value}`.slice(0, 60);
    const taken = new Set(state.models.map((m) => m.name.toLowerCase()));
    let name = base;
    for (let i = 2; taken.has(name.toLowerCase()); i++) name = `${base}_${i}`;
    $("train-name").value = name;
  }

  function stateBadge(model) {
    const name = MODEL_STATES[model.state] || "unknown";
    return el("span", { class: `model-state state-${name}`, text: model.state || "?" });
  }

  function renderModels() {
    const ul = $("models");
    clear(ul);
    for (const m of state.models) {
      const progress = m.progress || {};
      const metrics = m.metrics || {};
      let detail = "";
      if (m.state === "training") {
        detail = progress.epochs ? `epoch ${progress.epoch || 0} of ${progress.epochs}` : "starting";
      } else if (m.state === "ready" && typeof metrics.accuracy === "number") {
        detail = `accuracy ${fmtRatio(metrics.accuracy)}, macro F1 ${fmtRatio(metrics.macro_f1)}`;
      } else if (m.error) {
        detail = m.error;
      }
      const training = m.state === "training";
      const actions = el("span", { class: "model-actions" });
      if (m.state === "ready") {
        actions.append(el("button", {
          type: "button", class: "show-model", text: "Show",
          "aria-label": `Show the metrics of model ${m.name}`,
          onclick: () => showModel(m.name),
        }));
      }
      actions.append(el("button", {
        type: "button", class: training ? "cancel-model" : "drop-model",
        text: training ? "Cancel" : "Drop",
        "aria-label": `${training ? "Cancel the training of" : "Drop"} model ${m.name}`,
        onclick: () => dropModel(m.name, training),
      }));
      ul.append(el("li", { class: "model-item", "data-name": m.name },
        el("span", { class: "model-name", text: m.name }),
        el("span", { class: "muted", text: `${m.kind || "?"} · ${m.collection || "?"}.${m.label_column || "?"}` +
          (Array.isArray(m.classes) && m.classes.length ? ` · ${m.classes.length} classes` : "") }),
        stateBadge(m),
        detail ? el("span", { class: "model-detail", text: detail }) : null,
        actions));
    }
    show($("models-empty"), state.models.length === 0);
    suggestModelName();
  }

  async function startTraining() {
    const status = $("train-status");
    const collection = $("train-collection").value;
    const labelColumn = $("train-label").value;
    const kind = $("train-kind").value;
    const name = $("train-name").value.trim();
    const filter = $("train-filter").value.trim();
    const epochsText = $("train-epochs").value.trim();
    const holdoutText = $("train-holdout").value.trim();
    const fail = (text, field) => { setStatus(status, text, "error"); if (field) $(field).focus(); };
    if (!collection) return fail("Choose a collection first (or add images to create one).", "train-collection");
    if (!labelColumn) return fail("Choose the column the model should predict.", "train-label");
    if (!NAME_RE.test(name)) {
      return fail("A model name starts with a letter or _ and has only letters, digits and _ (at most 63).", "train-name");
    }
    const body = { name, collection, label_column: labelColumn, kind };
    if (epochsText) {
      const epochs = Number(epochsText);
      if (!Number.isInteger(epochs) || epochs < 1) return fail("Epochs is a whole number, at least 1.", "train-epochs");
      body.epochs = epochs;
    }
    if (holdoutText) {
      const holdout = Number(holdoutText);
      if (!Number.isFinite(holdout) || holdout <= 0 || holdout >= 1) {
        return fail("The holdout is the share of rows kept for measuring, between 0 and 1.", "train-holdout");
      }
      body.holdout = holdout;
    }
    if (filter) body.filter = filter;
    $("train-button").disabled = true;
    setStatus(status, `Starting to train “${name}”…`, "busy");
    try {
      const info = await postJson("/v1/models", body);
      trainNameTouched = false;
      watchModel(info || { name, state: "training" });
      refreshModels();
    } catch (err) {
      setStatus(status, `Training did not start: ${errorText(err)}`, "error");
      $("train-button").disabled = false;
    }
  }

  /** Follow one model's training: poll GET /v1/models/{name} until it is no longer training. */
  function watchModel(info) {
    clearTimeout(state.watchTimer);
    state.watching = info.name;
    state.watchStarted = performance.now();
    state.lossTrail = [];
    show($("train-loss"), false);
    $("train-button").disabled = true;
    show($("train-progress-box"), true);
    renderProgress(info);
    if (info.state === "training") state.watchTimer = setTimeout(pollModel, TRAIN_POLL_MS);
    else trainingEnded(info);
  }

  async function pollModel() {
    const name = state.watching;
    if (!name) return;
    let info;
    try {
      info = await api(modelUrl(name));
    } catch (err) {
      if (state.watching !== name) return;
      state.watching = null;
      setStatus($("train-status"), `Lost track of “${name}”: ${errorText(err)}`, "error");
      $("train-progress-label").textContent = "Stopped";
      renderLabelChoices();
      refreshModels();
      return;
    }
    if (state.watching !== name) return;
    renderProgress(info);
    if (info.state === "training") {
      state.watchTimer = setTimeout(pollModel, TRAIN_POLL_MS);
      const row = state.models.find((m) => m.name === name);
      if (row) { row.progress = info.progress; renderModels(); }
    } else {
      trainingEnded(info);
    }
  }

  function renderProgress(info) {
    const p = info.progress || {};
    const bar = $("train-progress");
    const epochs = Number(p.epochs) || 0;
    const epoch = Number(p.epoch) || 0;
    const label = $("train-progress-label");
    if (epochs && epoch && typeof p.loss === "number" && Number.isFinite(p.loss)) {
      const last = state.lossTrail[state.lossTrail.length - 1];
      if (!last || epoch > last[0]) state.lossTrail.push([epoch, p.loss]);
      drawLoss();
    }
    if (info.state === "training") {
      if (epochs) {
        bar.max = epochs;
        bar.value = Math.min(epoch, epochs);
        label.textContent = `Training “${info.name}”: epoch ${epoch} of ${epochs}, loss ${fmtLoss(p.loss)}`;
      } else {
        bar.removeAttribute("value");   // indeterminate until the first epoch
        label.textContent = `Training “${info.name}”: preparing the data…`;
      }
      setStatus($("train-status"), `Training “${info.name}” (${info.kind || "model"} on ${info.collection || "?"}.${info.label_column || "?"})…`, "busy");
    } else if (info.state === "ready") {
      bar.max = epochs || 1;
      bar.value = epochs || 1;
      label.textContent = `Done: ${epochs || "all"} epochs${p.loss !== undefined && p.loss !== null ? `, final loss ${fmtLoss(p.loss)}` : ""}`;
    } else {
      label.textContent = info.state === "cancelled" ? `Cancelled at epoch ${epoch}` : `Stopped at epoch ${epoch}`;
    }
  }

  /** The losses seen so far, as a line over the epochs (its text: the progress label). */
  function drawLoss() {
    const trail = state.lossTrail;
    const chart = $("train-loss");
    if (trail.length < 2) { show(chart, false); return; }
    // Scaled to the epochs seen so far, so a long training's first epochs fill the chart.
    const top = Math.max(...trail.map(([, loss]) => loss)) || 1;
    const first = trail[0][0];
    const span = Math.max(trail[trail.length - 1][0] - first, 1);
    const points = trail.map(([epoch, loss]) =>
      `${(2 + 156 * (epoch - first) / span).toFixed(1)},${(30 - 28 * loss / top).toFixed(1)}`);
    $("train-loss-line").setAttribute("points", points.join(" "));
    $("train-loss-title").textContent = `Loss by epoch: from ${fmtLoss(trail[0][1])} at epoch ${trail[0][0]} ` +
      `to ${fmtLoss(trail[trail.length - 1][1])} at epoch ${trail[trail.length - 1][0]}`;
    show(chart, true);
  }

  function trainingEnded(info) {
    clearTimeout(state.watchTimer);
    state.watching = null;
    const status = $("train-status");
    const seconds = ((performance.now() - (state.watchStarted || performance.now())) / 1000).toFixed(1);
    if (info.state === "ready") {
      const m = info.metrics || {};
      setStatus(status, `Trained “${info.name}” in ${seconds} s: holdout accuracy ${fmtRatio(m.accuracy)}, macro F1 ${fmtRatio(m.macro_f1)}.`);
      renderModelResult(info);
    } else if (info.state === "cancelled") {
      setStatus(status, `The training of “${info.name}” was cancelled.`);
    } else {
      setStatus(status, `Training “${info.name}” failed: ${info.error || "no reason given"}`, "error");
    }
    renderLabelChoices();
    refreshModels();
  }

  async function showModel(name) {
    try {
      const info = await api(modelUrl(name));
      renderModelResult(info);
      $("train-result-title").focus({ preventScroll: false });
    } catch (err) {
      setStatus($("train-status"), `Could not read model “${name}”: ${errorText(err)}`, "error");
    }
  }

  async function dropModel(name, training) {
    if (!training && !window.confirm(`Drop model “${name}”? It cannot be undone.`)) return;
    const status = $("train-status");
    try {
      await api(modelUrl(name), { method: "DELETE" });
      setStatus(status, training ? `Cancelled the training of “${name}”.` : `Dropped model “${name}”.`);
      if (state.shownModel === name) show($("train-result"), false);
      if (state.watching === name) {
        clearTimeout(state.watchTimer);
        state.watching = null;
        $("train-progress-label").textContent = "Cancelled";
        renderLabelChoices();
      }
    } catch (err) {
      setStatus(status, `Could not ${training ? "cancel" : "drop"} “${name}”: ${errorText(err)}`, "error");
    }
    refreshModels();
  }

  /** Holdout metrics: the figures, the confusion matrix as a heat map, and per-class scores. */
  function renderModelResult(info) {
    state.shownModel = info.name;
    const m = info.metrics || {};
    const counts = m.counts || {};
    const opts = info.options || {};
    $("train-result-title").textContent = `Model “${info.name}”`;
    const classes = Array.isArray(info.classes) ? info.classes : [];
    $("train-result-meta").textContent = `${info.kind || "?"} on ${info.collection || "?"}.${info.label_column || "?"}, ` +
      `${info.dim || "?"}-d vectors, ${classes.length} classes` +
      (opts.epochs ? `, ${opts.epochs} epochs` : "") +
      (info.kind === "mlp" && opts.hidden ? `, ${opts.hidden} hidden units` : "") +
      (info.created_at ? `, created ${new Date(info.created_at).toLocaleString()}` : "");
    const dl = $("train-metrics");
    clear(dl);
    const item = (term, value, cls) => dl.append(el("div", { class: cls || "" }, el("dt", { text: term }), el("dd", { text: value })));
    item("Accuracy", `${fmtRatio(m.accuracy)} (${fmtPercent(m.accuracy) || "–"})`, "metric-accuracy");
    item("Macro F1", fmtRatio(m.macro_f1), "metric-f1");
    if (counts.train !== undefined) item("Training rows", String(counts.train));
    if (counts.holdout !== undefined) item("Holdout rows", String(counts.holdout));
    if (counts.skipped_null_labels) item("Skipped (no label)", String(counts.skipped_null_labels));
    renderConfusion(m.confusion || null);
    const tbody = $("per-class").tBodies[0];
    clear(tbody);
    for (const [label, c] of Object.entries(m.per_class || {})) {
      tbody.append(el("tr", {}, el("th", { scope: "row", text: label }),
        el("td", { class: "num", text: fmtRatio(c.precision) }),
        el("td", { class: "num", text: fmtRatio(c.recall) }),
        el("td", { class: "num", text: c.support === undefined ? "" : String(c.support) })));
    }
    show($("train-result"), true);
  }

  function renderConfusion(confusion) {
    const table = $("confusion");
    const thead = table.tHead;
    const tbody = table.tBodies[0];
    clear(thead);
    clear(tbody);
    const labels = (confusion && confusion.labels) || [];
    const matrix = (confusion && confusion.matrix) || [];
    // Many or long labels: the column headers stand upright so the grid stays square.
    table.classList.toggle("upright", labels.length > 6 || labels.some((l) => String(l).length > 8));
    const head = el("tr", {}, el("td", { class: "corner", text: "true \u2193 predicted \u2192" }));
    for (const label of labels) head.append(el("th", { scope: "col", text: label, title: `predicted ${label}` }));
    thead.append(head);
    labels.forEach((truth, i) => {
      const row = matrix[i] || [];
      const total = row.reduce((a, b) => a + (Number(b) || 0), 0);
      const tr = el("tr", {}, el("th", { scope: "row", text: truth, title: `true ${truth}` }));
      labels.forEach((predicted, j) => {
        const n = Number(row[j]) || 0;
        const share = total ? n / total : 0;
        const cell = el("td", {
          class: `cell${i === j ? " diag" : ""}${share > 0.55 ? " dark" : ""}`,
          text: String(n),
          title: `true ${truth}, predicted ${predicted}: ${n} of ${total} (${fmtPercent(share)})`,
        });
        // Colour is a share of the row, so a rare class is as readable as a common one.
        cell.style.backgroundColor = `rgba(31, 95, 191, ${(0.06 + 0.94 * share).toFixed(3)})`;
        cell.dataset.share = share.toFixed(4);
        tr.append(cell);
      });
      tbody.append(tr);
    });
    show(table.closest(".confusion-figure"), labels.length > 0);
  }

  /** Each ready model of the collection predicts the query image: beside the neighbours' vote. */
  async function predictWithModels(models, seq) {
    const box = $("model-predictions");
    const list = $("model-prediction-list");
    clear(list);
    const rows = new Map();
    for (const m of models) {
      const li = el("li", { class: "pending", "data-model": m.name },
        el("span", { class: "model-name", text: m.name }), " ",
        el("span", { class: "predicted-label", text: "…" }), " ",
        el("span", { class: "muted predicted-detail", text: "" }));
      rows.set(m.name, li);
      list.append(li);
    }
    show(box, true);
    // One model: it featurizes the image itself. Several: featurize once, send the vector.
    let input;
    try {
      if (models.length === 1) {
        input = () => {
          const f = new FormData();
          f.append("file", state.queryFile, state.queryFile.name || "pasted.png");
          return { method: "POST", body: f };
        };
      } else {
        const f = new FormData();
        f.append("file", state.queryFile, state.queryFile.name || "pasted.png");
        const vector = (await postForm("/v1/featurize", f)).vector;
        input = () => ({ method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ vector }) });
      }
    } catch (err) {
      if (seq !== state.searchSeq) return;
      for (const li of rows.values()) {
        li.className = "failed";
        li.querySelector(".predicted-label").textContent = "no prediction";
        li.querySelector(".predicted-detail").textContent = errorText(err);
      }
      return;
    }
    await Promise.all(models.map(async (m) => {
      const li = rows.get(m.name);
      try {
        const out = await api(modelUrl(m.name, "/predict"), input());
        if (seq !== state.searchSeq) return;
        const probs = out.probabilities || [];
        const top = probs.find((p) => p.label === out.label);
        li.className = "ok";
        li.querySelector(".predicted-label").textContent = out.label === null || out.label === undefined ? "?" : String(out.label);
        const rest = probs.filter((p) => p.label !== out.label).slice(0, 2)
          .map((p) => `${p.label} ${fmtPercent(p.probability)}`);
        li.querySelector(".predicted-detail").textContent =
          `${top ? fmtPercent(top.probability) : ""}${rest.length ? ` (then ${rest.join(", ")})` : ""} · ${m.kind || "model"}`;
      } catch (err) {
        if (seq !== state.searchSeq) return;
        li.className = "failed";
        li.querySelector(".predicted-label").textContent = "no prediction";
        li.querySelector(".predicted-detail").textContent = errorText(err);
      }
    }));
  }

  function setupTrain() {
    $("train-form").addEventListener("submit", (event) => {
      event.preventDefault();
      startTraining();
    });
    $("train-collection").addEventListener("change", renderLabelChoices);
    $("train-kind").addEventListener("change", suggestModelName);
    $("train-name").addEventListener("input", () => { trainNameTouched = $("train-name").value.trim() !== ""; });
  }


  /* ---------- SQL console ---------- */

  let exampleTouched = false;

  /** Point the example query at a collection that exists, until the user edits it. */
  function maybeUpdateExampleSql() {
    if (exampleTouched) return;
    const names = state.collections.map((c) => c.name);
    if (!names.length || names.includes("images")) return;
    const c = currentCollection() || state.collections[0];
    if (!NAME_RE.test(c.name)) return;
    const label = c.columns && "label" in c.columns ? "label, " : "";
    $("sql-input").value = `SELECT id, ${label}DOT_PRODUCT(feature, (SELECT feature FROM ${c.name} WHERE id = 1)) AS score FROM ${c.name} ORDER BY score DESC LIMIT 10`;
  }

  function showSqlError(sql, err) {
    $("sql-error-message").textContent = errorText(err);
    const where = $("sql-error-where");
    const pos = err instanceof ApiError ? err.position : null;
    if (pos && Number.isInteger(pos.line) && Number.isInteger(pos.column)) {
      const lines = sql.split("\n");
      const line = lines[pos.line - 1];
      if (line !== undefined) {
        const col = Math.max(1, pos.column);
        where.textContent = `line ${pos.line}, column ${pos.column}:\n${line}\n${" ".repeat(col - 1)}^`;
      } else {
        where.textContent = `line ${pos.line}, column ${pos.column}`;
      }
      show(where, true);
    } else {
      show(where, false);
    }
    show($("sql-error"), true);
  }

  function cellText(value) {
    if (value === null || value === undefined) return { text: "NULL", cls: "null" };
    if (typeof value === "number") {
      return { text: Number.isInteger(value) ? String(value) : String(Number(value.toPrecision(7))), cls: "num" };
    }
    if (Array.isArray(value)) {
      const head = value.slice(0, 4).map((v) => (typeof v === "number" ? Number(v.toPrecision(4)) : v));
      return { text: value.length > 4 ? `[${head.join(", ")}, … (${value.length})]` : JSON.stringify(value), cls: "" };
    }
    let text = typeof value === "object" ? JSON.stringify(value) : String(value);
    if (text.length > 120) text = `${text.slice(0, 60)}… (${text.length} characters)`;
    return { text, cls: "" };
  }

  function renderTable(result) {
    const table = $("sql-table");
    const thead = table.tHead;
    const tbody = table.tBodies[0];
    clear(thead);
    clear(tbody);
    const columns = result.columns || [];
    const types = result.types || [];
    const headRow = el("tr");
    columns.forEach((name, i) => {
      headRow.append(el("th", { scope: "col", title: types[i] || undefined }, el("span", { text: name }),
        types[i] ? el("span", { class: "type", text: types[i] }) : null));
    });
    thead.append(headRow);
    for (const row of (result.rows || []).slice(0, MAX_TABLE_ROWS)) {
      const tr = el("tr");
      for (const value of row) {
        const { text, cls } = cellText(value);
        tr.append(el("td", { class: cls, text }));
      }
      tbody.append(tr);
    }
    show($("sql-table-wrap"), columns.length > 0);
  }

  async function runSql(sqlText) {
    const sql = sqlText.trim();
    const status = $("sql-status");
    show($("sql-error"), false);
    if (!sql) {
      setStatus(status, "Type a query first.", "error");
      return;
    }
    setStatus(status, "Running…", "busy");
    $("sql-run").disabled = true;
    const started = performance.now();
    try {
      const result = await postJson("/v1/query", { sql });
      const plan = typeof result.explain === "string" && result.explain;
      if (plan) {
        $("sql-plan").textContent = plan;
        show($("sql-plan-box"), true);
        show($("sql-table-wrap"), false);
      } else {
        show($("sql-plan-box"), false);
        renderTable(result);
      }
      const n = (result.rows || []).length;
      const shown = n > MAX_TABLE_ROWS ? ` (the first ${MAX_TABLE_ROWS} shown; add a LIMIT)` : "";
      setStatus(status, `${plan ? "Plan" : `${n} ${n === 1 ? "row" : "rows"}`} in ${fmtMs(result.took_ms)} on the server (${fmtMs(performance.now() - started)} round trip)${plan ? "" : shown}.`);
      if (!/^\s*(select|with|explain|show|describe|desc)\b/i.test(sql)) {
        refreshCollections();
        refreshModels();   // CREATE MODEL and DROP MODEL run here too
      }
    } catch (err) {
      setStatus(status, "The query failed.", "error");
      show($("sql-plan-box"), false);     // no stale results beside the error
      show($("sql-table-wrap"), false);
      showSqlError(sqlText, err);
    } finally {
      $("sql-run").disabled = false;
    }
  }

  function setupSql() {
    const input = $("sql-input");
    input.addEventListener("input", () => { exampleTouched = true; });
    input.addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        runSql(input.value);
      }
    });
    $("sql-form").addEventListener("submit", (e) => { e.preventDefault(); runSql(input.value); });
    $("sql-explain").addEventListener("click", () => {
      const sql = input.value.trim();
      runSql(/^explain\b/i.test(sql) ? sql : `EXPLAIN ${sql}`);
    });
    $("sql-tables").addEventListener("click", () => {
      input.value = "SHOW TABLES";
      exampleTouched = true;
      runSql(input.value);
    });
  }

  /* ---------- API key ---------- */

  function setupKey() {
    const input = $("api-key");
    input.value = state.apiKey;
    $("key-form").addEventListener("submit", (e) => {
      e.preventDefault();
      state.apiKey = input.value.trim();
      if (state.apiKey) localStorage.setItem("dotsearch.apiKey", state.apiKey);
      else localStorage.removeItem("dotsearch.apiKey");
      refreshHealth();
    });
  }

  setupSearch();
  setupUpload();
  setupTrain();
  setupSql();
  setupKey();
  refreshHealth();
})();
