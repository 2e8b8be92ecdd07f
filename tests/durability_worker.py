"""Durability test subprocess: ingests deterministic batches, printing each acknowledged one."""

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


def main() -> None:
    from service.collections import Catalog

    data_dir, start = sys.argv[1], int(sys.argv[2])
    cat = Catalog(data_dir, backend="cpu")
    if not any(c.name == "dur" for c in cat.list_collections()):
        cat.create_collection("dur", DIM, "dot", columns={"batch": "BIGINT", "tag": "TEXT",
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
