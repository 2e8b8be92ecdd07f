"""Ingest suite: durable bulk upsert MB/s through the Catalog, and start-up reload MB/s."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.harness import Report, SuiteSkipped, fits_in_memory, gpu_status, random_vectors

SUITE = "ingest"


def catalog_class() -> Any:
    """The storage engineer's Catalog, or SuiteSkipped when it has not landed."""
    try:
        from service.catalog import Catalog
    except ImportError as exc:
        raise SuiteSkipped(f"service.collections.Catalog is not importable ({exc})") from exc
    return Catalog


def backend_name() -> str:
    """The backend the service would pick here: gpu on a GPU box, else cpu."""
    return "gpu" if gpu_status()[0] else "cpu"


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run_ingest(report: Report, quick: bool = False, n: int | None = None,
               dim: int | None = None, batch: int = 10_000) -> dict[str, float]:
    """Upsert N vectors in committed batches, close, reopen (rebuilding the index), and time both.

    MB/s counts vector payload only (N * dim * 4 bytes). The reload runs right after the
    write, so the database file is likely in the OS page cache: a warm reload.
    """
    catalog_type = catalog_class()
    n = n or (20_000 if quick else 200_000)
    dim = dim or (512 if quick else 2048)
    if not fits_in_memory(n * dim * 4 * 4):
        report.note(SUITE, f"skipped N={n} d={dim}: does not fit in memory with headroom")
        return {}
    payload_mb = n * dim * 4 / 1e6
    backend = backend_name()
    with tempfile.TemporaryDirectory(prefix="dotsearch-bench-") as tmp:
        data_dir = Path(tmp)
        catalog = catalog_type(data_dir, backend=backend)
        catalog.create_collection("ingest", dim, "dot", "float32", columns={"label": "VARCHAR"})
        blocks = [(np.arange(lo, min(n, lo + batch), dtype=np.int64),
                   random_vectors(min(batch, n - lo), dim, offset=500 + lo))
                  for lo in range(0, n, batch)]
        labels = [[{"label": f"l{int(i) % 100}"} for i in ids] for ids, _ in blocks]
        started = time.perf_counter()
        for (ids, vectors), meta in zip(blocks, labels, strict=True):
            catalog.upsert("ingest", ids, vectors, metadata=meta)
        ingest_s = time.perf_counter() - started
        count = catalog.get_collection("ingest").count
        probe_ids, probe_vectors = blocks[0][0][:3], blocks[0][1][:3]
        before = catalog.search("ingest", probe_vectors, 1)
        catalog.close()
        disk_mb = _dir_bytes(data_dir) / 1e6
        del blocks, labels
        started = time.perf_counter()
        reopened = catalog_type(data_dir, backend=backend)
        reload_s = time.perf_counter() - started
        reloaded = reopened.get_collection("ingest").count
        after = reopened.search("ingest", probe_vectors, 1)
        reopened.close()
    same = [h[0].id for h in before] == [h[0].id for h in after] == probe_ids.tolist()
    status = "ok" if count == reloaded == n and same else (
        f"failed: stored {count}, reloaded {reloaded} of {n}; same answers {same}")
    report.add_row(SUITE, step=f"bulk ingest (durable, batches of {batch})", n=n, dim=dim,
                   backend=backend, seconds=ingest_s, MB_per_s=payload_mb / ingest_s,
                   vectors_per_s=n / ingest_s, disk_MB=disk_mb, status=status)
    report.add_row(SUITE, step="reload at start (warm page cache)", n=n, dim=dim,
                   backend=backend, seconds=reload_s, MB_per_s=payload_mb / reload_s,
                   vectors_per_s=n / reload_s, disk_MB=disk_mb, status=status)
    ok = status == "ok"
    report.add_ratio(SUITE, f"durable bulk ingest MB/s (N={n}, d={dim})",
                     payload_mb / ingest_s if ok else None, 100.0)
    report.add_ratio(SUITE, f"reload at start MB/s (N={n}, d={dim})",
                     payload_mb / reload_s if ok else None, 500.0)
    return {"ingest_MBps": payload_mb / ingest_s, "reload_MBps": payload_mb / reload_s}
