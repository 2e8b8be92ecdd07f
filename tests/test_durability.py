"""Durability: a writer killed with SIGKILL at random moments loses no acknowledged batch and
never leaves part of a batch behind."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from service.catalog import Catalog
from tests.durability_worker import BATCH, batch_data

ROOT = Path(__file__).resolve().parent.parent


def _run_and_kill(data_dir: Path, start: int, rng: random.Random) -> int:
    """Start the worker at batch ``start``, kill it at a random moment; last acked batch or -1."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.durability_worker", str(data_dir), str(start)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", line
    time.sleep(rng.uniform(0.0, 0.4))
    proc.send_signal(signal.SIGKILL)
    acked = -1
    for out in proc.stdout.read().splitlines():  # what was printed before the kill
        if out.startswith("ack "):
            acked = int(out.split()[1])
    proc.wait(timeout=10)
    return acked


def _check(data_dir: Path, last_acked: int) -> int:
    """Every acked batch is there exactly; a later batch is all there or absent. Next batch."""
    with Catalog(data_dir, backend="cpu") as cat:
        rows = cat.query("SELECT id, batch, tag, x FROM dur ORDER BY id").rows
        meta_by_id = {r[0]: tuple(r[1:]) for r in rows}
        # The stored vectors, read the way a restart reads them.
        rec = cat._collections["dur"].record
        stored: dict[int, np.ndarray] = {}
        for ids_chunk, vec_chunk in cat._storage.iter_vectors(rec):
            stored.update(zip(ids_chunk.tolist(), vec_chunk, strict=True))
        assert set(stored) == set(meta_by_id)
        present = -1
        b = 0
        while True:
            ids, vectors, meta = batch_data(b)
            there = [int(i) in stored for i in ids[1:]]
            if not any(there):
                assert b > last_acked, f"acknowledged batch {b} lost"
                break
            assert all(there), f"batch {b} partly present: {sum(there)} of {BATCH - 1} rows"
            for i in range(1, BATCH):
                rid = int(ids[i])
                assert meta_by_id[rid] == (b, f"b{b}-{i}", float(vectors[i, 0]))
                np.testing.assert_array_equal(stored[rid], vectors[i])
            present = b
            b += 1
        assert len(stored) == (present + 1) * (BATCH - 1) + (1 if present >= 0 else 0)
        if present >= 0:
            # id 0 belongs to the newest batch present, all of it (vector and metadata).
            _, vectors, meta = batch_data(present)
            vec, meta0 = cat.get_vector("dur", 0)
            np.testing.assert_array_equal(vec, vectors[0])
            assert meta0 == meta[0]
            hits = cat.search("dur", vectors[5], 1)  # l2: a vector is its own nearest
            assert hits[0][0].id == present * BATCH + 5
            assert cat.get_collection("dur").count == len(stored)
        return present + 1


@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_batch(tmp_path: Path) -> None:
    rng = random.Random(1234)
    next_batch = 0
    cycles = 0
    acked_any = 0
    deadline = time.monotonic() + 50
    while cycles < 12 and (cycles < 10 or time.monotonic() < deadline):
        acked = _run_and_kill(tmp_path, next_batch, rng)
        acked_any += acked >= 0
        next_batch = _check(tmp_path, acked)
        assert next_batch >= acked + 1
        cycles += 1
    assert cycles >= 10
    assert acked_any >= 5, "the worker was killed before acknowledging anything too often"
