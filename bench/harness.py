"""Benchmark plumbing: timing (warm-up, sync, median, rotated inputs), device naming, reports."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
SEED = 20260


class SuiteSkipped(Exception):
    """A suite cannot run here (a dependency has not landed or is absent); the message says why."""


@dataclass
class Timing:
    """Seconds per call: median over repeats (each repeat averages ``number`` calls)."""

    median_s: float
    min_s: float
    repeats: int
    number: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median_s": self.median_s, "min_s": self.min_s,
                "repeats": self.repeats, "number": self.number}


def _no_sync() -> None:
    return None


def measure(
    fn: Callable[[T], object],
    inputs: Sequence[T],
    *,
    warmup: int = 1,
    repeats: int = 5,
    sync: Callable[[], None] | None = None,
    min_repeat_s: float = 0.02,
    budget_s: float = 8.0,
    min_repeats: int = 3,
) -> Timing:
    """Time ``fn`` over ``inputs`` rotated call by call, synchronising before reading a clock.

    Warm-up calls run first; one call is timed to choose how many calls make a repeat (at
    least ``min_repeat_s``); the number of repeats shrinks to fit ``budget_s`` but never
    below ``min_repeats``. The median of the repeats is the answer.
    """
    if not inputs:
        raise ValueError("measure() needs at least one input")
    sync = sync or _no_sync
    position = 0

    def call() -> None:
        nonlocal position
        fn(inputs[position % len(inputs)])
        position += 1

    for _ in range(max(warmup, 0)):
        call()
    sync()
    start = time.perf_counter()
    call()
    sync()
    first = max(time.perf_counter() - start, 1e-9)
    number = max(1, math.ceil(min_repeat_s / first))
    affordable = int(budget_s / (first * number))
    repeats = max(min_repeats, min(repeats, affordable))
    samples: list[float] = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(number):
            call()
        sync()
        samples.append((time.perf_counter() - start) / number)
    return Timing(statistics.median(samples), min(samples), repeats, number)


def measure_interleaved(
    fns: Mapping[str, Callable[[T], object]],
    inputs: Sequence[T],
    *,
    rounds: int = 9,
    warmup: int = 1,
    settle: int = 1,
    sync: Callable[[], None] | None = None,
    pause_s: float = 0.0,
) -> dict[str, Timing]:
    """Time several systems side by side: every round times each one once, in a rotating
    order and on rotating inputs, so a machine that speeds up or slows down during the run
    (a shared box) moves all of them alike. The median per system is the answer.

    Before each timed call the system runs ``settle`` untimed calls: BLAS and OpenMP
    worker threads keep spinning for a while after a call, and would otherwise slow down
    whichever system runs next. ``pause_s`` also sleeps that long before each settle, so
    that the previous system's spinning threads (OpenBLAS's spin for about 0.1 s) have gone
    idle even when one call is shorter than their spin."""
    sync = sync or _no_sync
    names = list(fns)
    for name in names:
        for i in range(max(warmup, 0)):
            fns[name](inputs[i % len(inputs)])
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for j in range(len(names)):
            name = names[(r + j) % len(names)]
            if pause_s:
                time.sleep(pause_s)
            for _ in range(settle):
                fns[name](inputs[r % len(inputs)])
            sync()
            start = time.perf_counter()
            fns[name](inputs[r % len(inputs)])
            sync()
            samples[name].append(time.perf_counter() - start)
    return {name: Timing(statistics.median(t), min(t), rounds, 1) for name, t in samples.items()}


def latencies(
    fn: Callable[[T], object], inputs: Sequence[T], count: int, warmup: int = 3
) -> list[float]:
    """Per-call latencies in seconds of ``count`` calls over rotated inputs (after warm-up)."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    out: list[float] = []
    for i in range(count):
        start = time.perf_counter()
        fn(inputs[i % len(inputs)])
        out.append(time.perf_counter() - start)
    return out


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (0-100) of ``values`` (linear interpolation)."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), pct))


def rng(offset: int = 0) -> np.random.Generator:
    """The fixed-seed generator every suite draws its random data from."""
    return np.random.default_rng(SEED + offset)


def random_vectors(n: int, dim: int, offset: int = 0, normalise: bool = True) -> np.ndarray:
    """Gaussian float32 (n, dim) from the fixed seed, unit length by default; built in chunks."""
    generator = rng(offset)
    out = np.empty((n, dim), dtype=np.float32)
    step = max(1, (1 << 24) // max(dim, 1))
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        out[lo:hi] = generator.standard_normal((hi - lo, dim), dtype=np.float32)
    if normalise:
        for lo in range(0, n, step):
            block = out[lo : lo + step]
            block /= np.linalg.norm(block, axis=1, keepdims=True)
    return out


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (or a conservative guess elsewhere)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def fits_in_memory(nbytes: float, fraction: float = 0.7) -> bool:
    """Whether ``nbytes`` more can be allocated while leaving headroom."""
    return nbytes <= available_memory_bytes() * fraction


def fits_on_device(nbytes: float, fraction: float = 0.8) -> bool:
    """Whether ``nbytes`` more fit in the free memory of CUDA device 0 (False without one)."""
    try:
        import cupy

        cupy.get_default_memory_pool().free_all_blocks()
        free, _ = cupy.cuda.runtime.memGetInfo()
        return bool(nbytes <= free * fraction)
    except Exception:
        return False


def gpu_status() -> tuple[bool, str]:
    """(usable, reason or device name) for a CUDA device through the project's gpu package."""
    try:
        from gpu import gpu_available

        return gpu_available()
    except ImportError:
        pass
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            props = cupy.cuda.runtime.getDeviceProperties(0)
            return True, props["name"].decode()
        return False, "no CUDA device visible"
    except Exception as exc:  # cupy absent or no driver
        return False, f"cupy unusable: {type(exc).__name__}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> dict[str, Any]:
    """What this run ran on: CPU model and cores, memory, GPU name and memory when present."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(available_memory_bytes() / 2**30, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gpu": None,
    }
    usable, detail = gpu_status()
    if usable:
        try:
            import cupy

            props = cupy.cuda.runtime.getDeviceProperties(0)
            info["gpu"] = props["name"].decode()
            info["gpu_memory_gib"] = round(props["totalGlobalMem"] / 2**30, 1)
        except Exception:
            info["gpu"] = detail
    else:
        info["gpu_note"] = detail
    name = info["gpu"] or f"{info['cpu']} {info['cores']}c cpu"
    info["name"] = _slug(str(name))
    return info


def default_out_dir(device: dict[str, Any]) -> Path:
    """bench/results/<device>-<date>/."""
    return RESULTS_ROOT / f"{device['name']}-{_dt.date.today().isoformat()}"


@dataclass
class Report:
    """Rows, headline ratios, notes and plots of one run, written as JSON, markdown and PNG."""

    device: dict[str, Any]
    quick: bool = False
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    ratios: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, list[str]] = field(default_factory=dict)
    plots: dict[str, dict[str, Any]] = field(default_factory=dict)
    limits: dict[str, float] = field(default_factory=dict)

    def add_row(self, suite: str, **fields: Any) -> dict[str, Any]:
        self.rows.setdefault(suite, []).append(fields)
        return fields

    def note(self, suite: str, text: str) -> None:
        self.notes.setdefault(suite, []).append(text)
        print(f"[{suite}] note: {text}", flush=True)

    def add_ratio(
        self, suite: str, name: str, value: float | None, target: float | None = None,
        better: str = "higher", detail: str = "",
    ) -> None:
        """A headline ratio; ``better`` says whether the target is a floor or a ceiling."""
        met: bool | None = None
        if value is not None and target is not None and math.isfinite(value):
            met = value >= target if better == "higher" else value <= target
        self.ratios.append({"suite": suite, "name": name, "value": value, "target": target,
                            "better": better, "met": met, "detail": detail})
        shown = "n/a" if value is None else f"{value:.3f}"
        sign = ">=" if better == "higher" else "<="
        goal = "" if target is None else f" (target {sign} {target})"
        print(f"[{suite}] {name}: {shown}{goal} {detail}".rstrip(), flush=True)

    def add_plot(self, name: str, title: str, xlabel: str, ylabel: str,
                 series: dict[str, list[tuple[float, float]]], logx: bool = True,
                 logy: bool = True) -> None:
        self.plots[name] = {"title": title, "xlabel": xlabel, "ylabel": ylabel,
                            "series": series, "logx": logx, "logy": logy}

    def suites(self) -> list[str]:
        names = set(self.rows) | set(self.notes) | {r["suite"] for r in self.ratios}
        return sorted(names)

    def as_dict(self) -> dict[str, Any]:
        return {"device": self.device, "quick": self.quick, "limits": self.limits,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "suites": {s: {"rows": self.rows.get(s, []), "notes": self.notes.get(s, []),
                               "ratios": [r for r in self.ratios if r["suite"] == s]}
                           for s in self.suites()}}

    def write(self, out_dir: Path) -> dict[str, Path]:
        """Write results.json (merged with earlier suites in the directory), results.md, plots."""
        out_dir.mkdir(parents=True, exist_ok=True)
        payload = self.as_dict()
        json_path = out_dir / "results.json"
        if json_path.exists():
            try:
                previous = json.loads(json_path.read_text())
                merged = dict(previous.get("suites", {}))
                merged.update(payload["suites"])
                payload["suites"] = merged
                payload["limits"] = {**previous.get("limits", {}), **payload["limits"]}
            except (json.JSONDecodeError, AttributeError):
                pass
        json_path.write_text(json.dumps(payload, indent=1, default=_json_default, allow_nan=False))
        md_path = out_dir / "results.md"
        md_path.write_text(render_markdown(payload))
        paths = {"json": json_path, "markdown": md_path}
        for name, spec in self.plots.items():
            png = out_dir / f"{name}.png"
            if _plot(png, spec):
                paths[name] = png
        return paths


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def clean(value: Any) -> Any:
    """Replace non-finite floats by None so the JSON stays strict."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(float(value)) else None
    return value


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value).replace("|", "/")


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """Rows as a GitHub markdown table (columns: the union of keys, first-seen order)."""
    if not rows:
        return "_no rows_\n"
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(key for key in row if key not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render_markdown(payload: dict[str, Any]) -> str:
    """The whole run as markdown: device, limits, headline ratios, then one table per suite."""
    device = payload["device"]
    out = [f"# dotsearch benchmark: {device['name']}", "",
           f"CPU {device['cpu']} ({device['cores']} cores), GPU {device.get('gpu') or 'none'}; "
           f"created {payload['created']}{' (quick mode)' if payload.get('quick') else ''}.", ""]
    if payload.get("limits"):
        out += ["## Limits measured in this run", "",
                markdown_table([{"limit": k, "value": v} for k, v in payload["limits"].items()])]
    ratios = [r for s in payload["suites"].values() for r in s["ratios"]]
    if ratios:
        shown = [{"suite": r["suite"], "ratio": r["name"], "value": r["value"],
                  "target": (None if r["target"] is None else
                             f"{'>=' if r['better'] == 'higher' else '<='} {r['target']}"),
                  "met": {True: "yes", False: "NO", None: ""}[r["met"]], "detail": r["detail"]}
                 for r in ratios]
        out += ["## Headline ratios", "", markdown_table(shown)]
    for suite, body in payload["suites"].items():
        out += [f"## {suite}", ""]
        out += [f"- {note}" for note in body["notes"]]
        if body["notes"]:
            out.append("")
        if body["rows"]:
            out.append(markdown_table(body["rows"]))
    return "\n".join(out) + "\n"


def _plot(path: Path, spec: dict[str, Any]) -> bool:
    """Render one line plot; False when there is nothing to draw."""
    series = {k: v for k, v in spec["series"].items() if v}
    if not series:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(7, 4.5))
    for label, points in sorted(series.items()):
        xs, ys = zip(*sorted(points), strict=True)
        axis.plot(xs, ys, marker="o", label=label)
    if spec["logx"]:
        axis.set_xscale("log")
    if spec["logy"]:
        axis.set_yscale("log")
    axis.set_title(spec["title"])
    axis.set_xlabel(spec["xlabel"])
    axis.set_ylabel(spec["ylabel"])
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
