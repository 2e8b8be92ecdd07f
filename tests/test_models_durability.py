"""A trained model survives kill -9 once its creation was acknowledged, and a training killed
half-way leaves no model behind. Run as a module, this file is the worker that is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from service.catalog import Catalog

ROOT = Path(__file__).resolve().parent.parent
D = 16
N = 300


def _data() -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(4)
    centers = rng.standard_normal((3, D)) * 2
    y = rng.integers(0, 3, N)
    x = (centers[y] + rng.standard_normal((N, D))).astype(np.float32)
    return x, [f"k{v}" for v in y]


def worker(data_dir: str) -> None:
    """Create a model in SQL, print its predictions and "ack", then start a long training
    and print "training"; wait to be killed."""
    x, labels = _data()
    cat = Catalog(data_dir, backend="cpu")
    cat.create_collection("pts", D, "dot", columns={"label": "VARCHAR"})
    cat.upsert("pts", np.arange(N), x, [{"label": lab} for lab in labels])
    cat.query("CREATE MODEL kept KIND mlp WITH (epochs = 5, hidden = 16, seed = 2) AS "
              "SELECT feature, label FROM pts")
    print(json.dumps(cat.models.predict("kept", x[:20])[0]), flush=True)
    print("ack", flush=True)
    cat.models.train("half", "mlp", x, labels, epochs=1000, batch_size=8)
    while cat.models.get("half").progress["epoch"] < 1:
        time.sleep(0.01)
    print("training", flush=True)
    time.sleep(600)


def test_kill_9_after_the_acknowledgement_keeps_the_model(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_models_durability", str(tmp_path)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout is not None
    predicted = json.loads(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ack"
    assert proc.stdout.readline().strip() == "training"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    x, _ = _data()
    with Catalog(tmp_path, backend="cpu") as cat:
        assert [m.name for m in cat.models.list()] == ["kept"]  # nothing of "half"
        assert cat.models.predict("kept", x[:20])[0] == predicted
        rows = cat.query("SELECT PREDICT(kept, feature) FROM pts WHERE id < 20 ORDER BY id")
        assert [r[0] for r in rows.rows] == predicted


if __name__ == "__main__":
    worker(sys.argv[1])
