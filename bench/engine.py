"""Engine suite: dotsearch's indexes against peers on one grid (and ``python -m bench.engine``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from bench.harness import (
    Report,
    clean,
    default_out_dir,
    device_info,
    fits_in_memory,
    fits_on_device,
    gpu_status,
    measure,
    random_vectors,
)
from bench.peers import Searcher, System, release, systems
from bench.reference import check_answers, exact_reference

CHECK_QUERIES = 64
HALF_DTYPES = ("float16", "bfloat16")  # two bytes an element; every other storage dtype four


def itemsize(dtype: str) -> int:
    """Bytes one stored element of ``dtype`` takes."""
    return 2 if dtype in HALF_DTYPES else 4


@dataclass(frozen=True)
class Cell:
    """One point of the grid."""

    n: int
    dim: int
    q: int
    k: int
    dtype: str = "float32"
    metric: str = "cosine"


def engine_cells(quick: bool, on_gpu: bool) -> list[Cell]:
    """The grid: an N x d sweep at Q in (1, 256 or 16), then Q, k, dtype and metric sweeps.

    Every half-precision cell is there for both half dtypes (float16 and bfloat16 side by
    side), so each is compared with float32 and with faiss's own half-precision index.
    """
    cells: list[Cell] = []
    if quick:
        cells += [Cell(n, 2048, q, 10) for n in (10_000, 50_000) for q in (1, 16)]
        cells += [Cell(10_000, 128, 1, 10)]
        cells += [Cell(10_000, 2048, 1, 10, half) for half in HALF_DTYPES]
        cells += [Cell(10_000, 512, 256, 100), Cell(10_000, 512, 16, 10, metric="l2"),
                  Cell(10_000, 512, 16, 10, metric="dot")]
        if on_gpu:
            cells += [Cell(1_000_000, 2048, q, k, half) for q, k in ((1, 10), (1024, 100))
                      for half in HALF_DTYPES]
        return cells
    ns = [10_000, 100_000, 1_000_000] + ([10_000_000] if on_gpu else [])
    for n in ns:
        for dim in (128, 512, 2048):
            for q in (1, 256):
                cells.append(Cell(n, dim, q, 10))
                if on_gpu:
                    cells += [Cell(n, dim, q, 10, half) for half in HALF_DTYPES]
    base_n = 1_000_000 if on_gpu else 100_000
    cells += [Cell(base_n, 2048, q, 10) for q in (16, 1024)]
    cells += [Cell(base_n, 2048, 256, k) for k in (1, 100, 1000)]
    if not on_gpu:
        cells += [Cell(base_n, 2048, q, 10, half) for q in (1, 16, 256, 1024)
                  for half in HALF_DTYPES]
    cells += [Cell(base_n, 2048, q, 10, metric=m) for m in ("dot", "l2") for q in (1, 256)]
    return list(dict.fromkeys(cells))


def _floor_s(cell: Cell, system: System, limits: dict[str, float]) -> float | None:
    """The time the hardware needs at least: bytes / bandwidth or flops / GEMM peak.

    The device GEMM peak is the cell's dtype's; bench.limits measures no bfloat16 peak
    (yet), so bfloat16 uses float16's (the same dense tensor-core rate on A100/H100-class
    GPUs). On the host it is the float32 BLAS peak whatever
    the storage (half-precision rows are widened and scored in float32 there).
    """
    if system.device == "gpu":
        bandwidth = limits.get("device_read_GBps")
        peak = limits.get(f"device_gemm_{cell.dtype}_GFLOPs")
        if not peak and cell.dtype == "bfloat16":
            peak = limits.get("device_gemm_float16_GFLOPs")
    else:
        bandwidth = limits.get("host_read_GBps")
        peak = limits.get("host_gemm_float32_GFLOPs")
    if not bandwidth or not peak:
        return None
    return max(cell.n * cell.dim * itemsize(cell.dtype) / (bandwidth * 1e9),
               2.0 * cell.n * cell.dim * cell.q / (peak * 1e9))


def run_cells(report: Report, cells: Iterable[Cell], contenders: list[System],
              limits: dict[str, float], max_call_s: float, budget_s: float,
              suite: str = "engine") -> list[dict[str, Any]]:
    """Run every contender on every cell; refuse wrong answers; record rows and speed-ups."""
    out: list[dict[str, Any]] = []
    data_key: tuple[int, int] | None = None
    vectors = np.empty((0, 0), dtype=np.float32)
    ids = np.empty(0, dtype=np.int64)
    for cell in cells:
        if not fits_in_memory(cell.n * cell.dim * 4 * 2.5):
            report.note(suite, f"skipped {cell}: {cell.n * cell.dim * 4 / 2**30:.1f} GiB of "
                               "vectors does not fit in this machine's memory with headroom")
            continue
        if data_key != (cell.n, cell.dim):
            vectors, ids = np.empty((0, 0), dtype=np.float32), np.empty(0, dtype=np.int64)
            release()
            vectors = random_vectors(cell.n, cell.dim, offset=cell.n + cell.dim)
            ids = np.arange(cell.n, dtype=np.int64) * 7 + 3  # ids that are not row numbers
            data_key = (cell.n, cell.dim)
        rotations = 8 if cell.q == 1 else 2
        batches = [random_vectors(cell.q, cell.dim, offset=1000 + r) for r in range(rotations)]
        check = np.concatenate(batches)[: min(CHECK_QUERIES, max(cell.q, 8))]
        ref_scores, ref_ids = exact_reference(ids, vectors, check, cell.k, cell.metric)
        cell_rows: list[dict[str, Any]] = []
        for system in contenders:
            row: dict[str, Any] = {**asdict(cell), "system": system.name}
            reason = system.skip(cell.n, cell.dim, cell.q, cell.k, cell.metric, cell.dtype)
            work = cell.n * cell.dim * cell.q
            estimate = work / system.rate if system.rate else _floor_s(cell, system, limits)
            if reason is None and estimate and estimate > max_call_s:
                reason = f"estimated over {max_call_s:g} s per call"
            if reason is None and not fits_in_memory(vectors.nbytes * system.extra_copies):
                reason = "its copy of the vectors does not fit in memory"
            if reason is None and system.device == "gpu" and not fits_on_device(
                    cell.n * cell.dim * itemsize(cell.dtype) * 1.5):
                reason = "does not fit in device memory"
            if reason is not None:
                row["status"] = f"skipped: {reason}"
                cell_rows.append(row)
                continue
            try:
                searcher = system.build(ids, vectors, cell.metric, cell.dtype)
                got_scores, got_ids = np.empty(0), np.empty(0)
                for lo in range(0, len(check), cell.q):
                    part_scores, part_ids = searcher.search(check[lo : lo + cell.q], cell.k)
                    got_scores = np.concatenate([got_scores.reshape(-1, part_scores.shape[1]),
                                                 np.asarray(part_scores)])
                    got_ids = np.concatenate([got_ids.reshape(-1, part_ids.shape[1]),
                                              np.asarray(part_ids)])
                recall, refusal = check_answers(got_scores, got_ids, ref_scores, ref_ids,
                                                cell.dtype)
                row["recall"] = round(recall, 4)
                if refusal is not None:
                    row["status"] = f"refused: {refusal}"
                    cell_rows.append(row)
                    report.note(suite, f"{system.name} refused on {cell}: {refusal}")
                    continue
                timing = measure(_bound_search(searcher, cell.k), batches,
                                 sync=searcher.sync, budget_s=budget_s)
            except MemoryError as exc:
                row["status"] = f"skipped: out of memory ({exc})"
                cell_rows.append(row)
                continue
            except Exception as exc:
                row["status"] = f"failed: {type(exc).__name__}: {exc}"[:200]
                cell_rows.append(row)
                continue
            finally:
                searcher = None  # type: ignore[assignment]
                release()
            seconds = timing.median_s
            floor = _floor_s(cell, system, limits)
            row.update(status="ok", median_ms=seconds * 1e3, qps=cell.q / seconds,
                       vectors_per_s=cell.n * cell.q / seconds,
                       GB_per_s=cell.n * cell.dim * itemsize(cell.dtype) / seconds / 1e9,
                       GFLOP_per_s=2.0 * cell.n * cell.dim * cell.q / seconds / 1e9,
                       floor_frac=clean(floor / seconds) if floor else None)
            cell_rows.append(row)
        for row in cell_rows:
            print(_line(row), flush=True)
        _speedups(report, suite, cell_rows)
        for row in cell_rows:
            report.add_row(suite, **{k: clean(v) for k, v in row.items()})
        out += cell_rows
    del vectors, ids
    release()
    return out


def _bound_search(searcher: Searcher, k: int) -> Callable[[np.ndarray], object]:
    return lambda batch: searcher.search(batch, k)


def _line(row: dict[str, Any]) -> str:
    head = (f"N={row['n']} d={row['dim']} Q={row['q']} k={row['k']} {row['dtype']} "
            f"{row['metric']} {row['system']:<17}")
    if row.get("status") != "ok":
        return f"{head} {row.get('status')}"
    return (f"{head} {row['median_ms']:9.3f} ms {row['qps']:10.1f} q/s "
            f"{row['GB_per_s']:7.2f} GB/s floor {row.get('floor_frac') or 0:.2f} "
            f"recall {row['recall']}")


def _speedups(report: Report, suite: str, cell_rows: list[dict[str, Any]]) -> None:
    """dotsearch's speed-up over every peer that answered correctly in the same cell."""
    ok = [r for r in cell_rows if r.get("status") == "ok"]
    for mine in (r for r in ok if r["system"].startswith("dotsearch")):
        for peer in (r for r in ok if not r["system"].startswith("dotsearch")):
            report.add_row(f"{suite}-speedups", n=mine["n"], dim=mine["dim"], q=mine["q"],
                           k=mine["k"], dtype=mine["dtype"], metric=mine["metric"],
                           system=mine["system"], peer=peer["system"],
                           speedup=peer["median_ms"] / mine["median_ms"])


def plot_engine(report: Report, rows: list[dict[str, Any]], suite: str = "engine") -> None:
    """Vectors scored per second versus N, one line per system and dtype, per (d, Q)."""
    groups: dict[tuple[int, int, int], dict[str, list[tuple[float, float]]]] = {}
    for row in rows:
        if row.get("status") != "ok" or row["metric"] != "cosine":
            continue
        series = groups.setdefault((row["dim"], row["q"], row["k"]), {})
        series.setdefault(f"{row['system']} {row['dtype']}", []).append(
            (row["n"], row["vectors_per_s"]))
    for (dim, q, k), series in groups.items():
        if max(len(points) for points in series.values()) >= 2:
            report.add_plot(f"{suite}_d{dim}_q{q}_k{k}",
                            f"Exact top-{k}, d={dim}, Q={q} (cosine)",
                            "N (vectors)", "vectors scored per second", series)


def run_engine(report: Report, quick: bool = False, cells: list[Cell] | None = None,
               contenders: list[System] | None = None) -> list[dict[str, Any]]:
    """The engine suite (measures the limits first when this run has not yet)."""
    if not report.limits:
        from bench.limits import run_limits

        run_limits(report, quick=quick)
    on_gpu = gpu_status()[0]
    contenders = systems() if contenders is None else contenders
    report.note("engine", "systems: " + ", ".join(s.name for s in contenders))
    rows = run_cells(report, cells if cells is not None else engine_cells(quick, on_gpu),
                     contenders, report.limits, max_call_s=0.1 if quick else 5.0,
                     budget_s=0.5 if quick else 6.0)
    plot_engine(report, rows)
    return rows


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.engine``: the engine issue's headline ratios (see bench.headline)."""
    from bench.headline import run_headlines

    parser = argparse.ArgumentParser(prog="python -m bench.engine", description=main.__doc__)
    parser.add_argument("--n", type=int, default=200_000, help="CPU vectors (default 200000)")
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--gpu-n", type=int, default=1_000_000, help="GPU vectors")
    parser.add_argument("--gpu-scale-n", type=int, default=10_000_000,
                        help="GPU vectors for the vectors/s figure (0: skip)")
    parser.add_argument("--out", default=None, help="results directory")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    report = Report(device_info())
    run_headlines(report, args.n, args.dim, args.gpu_n, args.gpu_scale_n)
    if not args.no_write:
        from pathlib import Path

        out = Path(args.out) if args.out else default_out_dir(report.device)
        paths = report.write(out)
        print(f"wrote {paths['json']} and {paths['markdown']}")
    failed = [r for r in report.ratios if r["value"] is None]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
