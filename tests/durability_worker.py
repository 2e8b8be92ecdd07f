"""Subprocess for storage tests: batch ingest until SIGKILL (durability), or a full disk."""

from __future__ import annotations

import sys

import numpy as np

BATCH = 64
DIM = 32


def batch_data(b: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, object]]]:
    """Batch b: ids [b*BATCH, (b+1)*BATCH) plus id 0 rewritten, vectors and metadata from seed b."""
    rng = np.random.default_rng(b)
    ids = np.concatenate([[0], np.arange(b * BATCH + 1, (b + 1) * BATCH)]).astype(np.int64)
    vectors = rng.standard_normal((BATCH, DIM)).astype(np.float32)
    meta: list[dict[str, object]] = [
        {"batch": b, "tag": f"b{b}-{i}", "x": float(vectors[i, 0])} for i in range(BATCH)
    ]
    return ids, vectors, meta


def disk_full(data_dir: str) -> None:
    """A file-size limit makes DuckDB's writes fail as on a full disk (ENOSPC/EFBIG)."""
    import os
    import resource
    import signal

    from service.catalog import Catalog
    from service.errors import StorageError

    cat = Catalog(data_dir, backend="cpu")
    cat.create_collection("f", 64, "dot", columns={"label": "TEXT"})
    v = np.random.default_rng(0).standard_normal((500, 64)).astype(np.float32)
    cat.upsert("f", np.arange(500), v, [{"label": "a"}] * 500)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    used = sum(os.path.getsize(os.path.join(data_dir, f)) for f in os.listdir(data_dir))
    resource.setrlimit(resource.RLIMIT_FSIZE, (used + (256 << 10), resource.RLIM_INFINITY))
    big = np.random.default_rng(1).standard_normal((20000, 64)).astype(np.float32)
    try:
        cat.upsert("f", np.arange(1000, 21000), big)
        print("no error")
    except StorageError as exc:
        print("storage_error", exc.status_code)
    hits = cat.search("f", v[0], 3)[0]
    print("search", hits[0].id, cat.get_collection("f").count)
    print("sql", cat.query("SELECT COUNT(*) FROM f").rows[0][0])
    cat.upsert("f", [5000], v[:1], [{"label": "after"}])
    print("small write ok")
    cat.close()


def main() -> None:
    from service.catalog import Catalog

    if sys.argv[1] == "disk-full":
        disk_full(sys.argv[2])
        return
    data_dir, start = sys.argv[1], int(sys.argv[2])
    cat = Catalog(data_dir, backend="cpu")
    if not any(c.name == "dur" for c in cat.list_collections()):
        cat.create_collection("dur", DIM, "l2", columns={"batch": "BIGINT", "tag": "TEXT",
                                                          "x": "DOUBLE"})
    print("ready", flush=True)
    b = start
    while True:
        ids, vectors, meta = batch_data(b)
        cat.upsert("dur", ids, vectors, meta)
        print(f"ack {b}", flush=True)
        b += 1


if __name__ == "__main__":
    main()
