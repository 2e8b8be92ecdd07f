"""The GPU path checked on a GPU, in one command: ``bash bench/device_check.sh [OUTDIR]``.

How the work is split:

* ``bench/device_check.sh`` (thin): picks the interpreter, installs the wheels in ``.whl/``
  into ``/tmp/site`` when this interpreter lacks a package the project imports (a bare
  device machine: see ``missing`` below), logs ``nvidia-smi``, then runs ``python -m
  bench.device_check run OUTDIR``.
* ``run`` (this module): runs every step in a child process under ``timeout`` (its own
  limit, and never past the whole run's budget), appends the child's output to
  ``OUTDIR/device_check.log``, and after every step rewrites ``OUTDIR/results.json`` (the
  bench report of the suites run so far plus ``device_check``: per step status, seconds,
  exit code, limit, key figures) and ``OUTDIR/results.md``, and copies the plots (at most
  five). A run cut off at its limit still leaves what it did; at most 8 files are written,
  all in OUTDIR itself (a device machine's ``$OUT`` returns no more).
* ``step NAME`` (in the child): one step at GPU sizes, or at tiny sizes in a dry run.
* ``missing``: the distributions this interpreter lacks; ``fetch-wheels``: download them
  as cp312 manylinux wheels (``bench/fetch_device_wheels.sh``, on a machine with network).

Without a CUDA device (or with ``--dry-run``) it is a dry run: every step runs at a tiny
size on the CPU, and the steps that need a GPU say "no CUDA device: skipped".

Time budget on one H200 (the whole run: 480 s; ceilings used below: 4.3-4.8 TB/s HBM3e,
about 790 TFLOP/s dense float16/bfloat16 through cuBLAS, about 50 TFLOP/s float32 without
TF32; host parts timed on a 2-core CPU box and scaled to the device's 16 cores):

=========  =====  =========================================================================
step       limit  estimate
=========  =====  =========================================================================
setup        --   ~15 s: unzip 47 MiB of wheels, nvidia-smi
pytest      120   ~60 s: collection ~12 s (torch, cupy imports), ~60 gpu tests, small sizes
limits       60   ~25 s: host reads of 1 GiB (~10 s), host GEMMs; on the device a 2 GiB sum
                  (0.5 ms), a 2 GiB copy (1 ms), 8192^3 GEMMs: 1.1e12 FLOP = 1.4 ms float16,
                  22 ms float32; CuPy's kernel compiles (a few s) cost more than the kernels
headline    120   ~75 s: host N=2e5 d=2048 float32 (1.6 GB; ~30 s of host work); GPU N=1e6
                  float16 (4.1 GB): host random rows + float64 reference ~20 s; one Q=1 scan
                  reads 4.1 GB = 0.9 ms; Q=1024 k=100 is 4.2e12 FLOP = 5.3 ms (+ top-k)
scale       150   ~120 s: N=1e7 d=2048 float16 (41 GB) then float32 (82 GB), rows drawn on
                  the device (2 GB per 250k-row chunk: ~1 ms), float64 reference on the
                  device (1.6e10 FLOP a chunk: <1 ms), rows passed through the host into
                  GpuIndex.add, 40 chunks per dtype: ~2 s a chunk for float16 (the host's
                  float32->float16 cast of 2 GB), ~0.5 s for float32 (D2H + H2D at
                  ~10 GB/s). Q=1 scan: 41 GB / 4.5 TB/s = 9 ms float16, 18 ms float32;
                  Q=1024 k=100: 4.2e13 FLOP = 53 ms float16, ~0.85 s float32 (5 calls)
engine      120   ~90 s: N=1e5 d=512 (Q 1, 256) and N=1e6 d=2048 (Q=1 float32 and float16,
                  Q=256 float16) for every system importable, calls estimated over 0.5 s
                  skipped. Host work dominates: random rows (~20 s), the float64 reference
                  of each 1e6 cell (~7 s), each system's copy and cosine normalisation of
                  8 GB (~5 s); the device reads 4-8 GB per Q=1 call (1-2 ms)
featurize    90   ~45 s: Inception-v3 (about 5.7 GFLOP an image) at batch 256: 1.5 TFLOP =
                  2 ms at the float16 peak, so PIL preprocessing on the host dominates; the
                  same batch on the CPU (~2 s a call) and two model loads
http        150   ~100 s, only when at least 90 s are left: N=1e5 d=2048 on the gpu
                  backend, 1/8/64 clients for 3 s each, batching on and off, SQL, image search
=========  =====  =========================================================================

The sum of the estimates (about 530 s) is above the budget on purpose: the steps run in
order of importance, so the last ones (http, then featurize) are the ones cut or skipped
when the estimates are short; each step's limit is also cut to what the budget has left.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LOG_NAME = "device_check.log"
MAX_FILES = 8  # what a device machine's $OUT brings back
MAX_LOG_BYTES = 15 << 20  # each file returned must stay under 16 MiB
RESERVE_S = 5.0  # kept back from the budget for the last write

# ---------------------------------------------------------------- packages and wheels
# Modules the project imports (service, tests) that KINDS.md's 'cuda' image lacks, with
# the distribution of each; faiss is optional (headline and engine skip its peers).
NEEDED_MODULES = {
    "duckdb": "duckdb", "sqlglot": "sqlglot", "fastapi": "fastapi", "starlette": "starlette",
    "pydantic": "pydantic", "pydantic_core": "pydantic-core",
    "pydantic_settings": "pydantic-settings", "dotenv": "python-dotenv",
    "annotated_types": "annotated-types", "typing_inspection": "typing-inspection",
    "uvicorn": "uvicorn", "python_multipart": "python-multipart",
    "fastapi_standalone_docs": "fastapi-standalone-docs", "httptools": "httptools",
}
OPTIONAL_MODULES = {"faiss": "faiss-cpu"}
# Present on the device image and used here: versions are recorded in results.json.
DEVICE_MODULES = ("torch", "cupy", "numpy", "torchvision", "PIL", "skimage", "matplotlib",
                  "httpx", "anyio", "h11", "click", "typer", "rich", "prometheus_client",
                  "typing_extensions", "pytest", "hypothesis")

# The roots of what fetch-wheels downloads: the distributions above, whose own needs are
# followed through Requires-Dist (extras not followed) and skipped when the device has them.
# typing-extensions is on the device, but pydantic 2.14 wants >= 4.16, newer than the image
# may hold (unknown there): the wheel (40 KiB) shadows it, and it only ever adds names.
WHEEL_ROOTS = ("duckdb", "sqlglot", "fastapi", "fastapi-standalone-docs", "uvicorn",
               "python-multipart", "pydantic", "pydantic-settings", "httptools",
               "typing-extensions")
OPTIONAL_WHEELS = ("faiss-cpu",)
# KINDS.md, "Python packages already there" (nvidia-h200, image 'cuda', read 2026-11-17).
DEVICE_IMAGE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec
gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio
iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib
kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack
multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda
numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13
nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum
opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip
pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo
pygments pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov
pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests
rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric
torchmetrics torchvision tqdm transformers treescope triton typer typing-extensions
typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp
"""
DEVICE_HAS = frozenset(DEVICE_IMAGE_PACKAGES.split())
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
MORE_PLATFORMS = ("manylinux_2_24_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
                  "manylinux_2_35_x86_64")
DEVICE_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3",
                 "implementation_name": "cpython", "platform_python_implementation": "CPython",
                 "sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
                 "platform_machine": "x86_64", "extra": ""}


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _has_module(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_distributions(optional: bool = False) -> list[str]:
    """The distributions whose modules this interpreter cannot find."""
    wanted = {**NEEDED_MODULES, **(OPTIONAL_MODULES if optional else {})}
    return sorted({dist for module, dist in wanted.items() if not _has_module(module)})


def _wheel_name(path: Path) -> str:
    return normalise(path.name.split("-")[0])


def _requires(wheel: Path) -> list[str]:
    """Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        text = archive.read(meta).decode("utf-8", "replace")
    return [line.split(":", 1)[1].strip() for line in text.splitlines()
            if line.startswith("Requires-Dist:")]


def _download(name: str, version: str, dest: Path) -> Path:
    """pip download one cp312 manylinux x86_64 wheel (no dependencies) into ``dest``."""
    for platforms in (PLATFORMS, PLATFORMS + MORE_PLATFORMS):
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
               "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
               *[arg for p in platforms for arg in ("--platform", p)],
               "-d", str(dest), f"{name}=={version}"]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if done.returncode == 0:
            found = [w for w in dest.glob("*.whl") if _wheel_name(w) == normalise(name)
                     and f"-{version}-" in w.name]
            if found:
                return found[0]
    raise SystemExit(f"no cp312 manylinux x86_64 wheel of {name}=={version} found:\n"
                     f"{done.stderr[-2000:]}")


def fetch_wheels(dest: Path, limit_mib: float) -> int:
    """Download exactly what the device lacks (roots and their missing needs), one version
    each, at this interpreter's installed versions; faiss-cpu only if the total fits."""
    from packaging.requirements import Requirement

    dest.mkdir(parents=True, exist_ok=True)
    wanted: dict[str, Path] = {}
    floors: dict[str, set[str]] = {}

    def fetch(root: str) -> None:
        queue = [root]
        while queue:
            name = normalise(queue.pop())
            if name in wanted:
                continue
            version = importlib.metadata.version(name)
            for old in dest.glob("*.whl"):  # keep one version of each
                if _wheel_name(old) == name and f"-{version}-" not in old.name:
                    old.unlink()
            wheel = _download(name, version, dest)
            wanted[name] = wheel
            for line in _requires(wheel):
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate(DEVICE_PYTHON):
                    continue
                need = normalise(req.name)
                if need in DEVICE_HAS:
                    floors.setdefault(need, set()).add(f"{req.specifier or 'any'} ({name})")
                else:
                    queue.append(need)

    for root in WHEEL_ROOTS:
        fetch(root)
    mib = 1 << 20
    for root in OPTIONAL_WHEELS:
        before = dict(wanted)
        fetch(root)
        total = sum(w.stat().st_size for w in wanted.values()) / mib
        if total > limit_mib:
            for name in set(wanted) - set(before):
                wanted.pop(name).unlink()
            print(f"left out {root}: the wheels would total {total:.1f} MiB > {limit_mib:g} "
                  "MiB (headline and engine skip its peers)")
    for extra in dest.glob("*.whl"):
        if extra not in wanted.values():
            extra.unlink()
    for _, wheel in sorted(wanted.items()):
        print(f"{wheel.stat().st_size / mib:7.2f} MiB  {wheel.name}")
    total = sum(w.stat().st_size for w in wanted.values()) / mib
    print(f"{total:7.2f} MiB  total, {len(wanted)} wheels in {dest}")
    print("needs the device image must meet (its versions: results.json 'imports'):")
    for name, specs in sorted(floors.items()):
        if name not in wanted:
            print(f"  {name}: {'; '.join(sorted(specs))}")
    return 0 if total <= limit_mib else 1


# ---------------------------------------------------------------- steps
@dataclass(frozen=True)
class Step:
    name: str
    limit_s: int  # its own timeout on a GPU box
    dry_limit_s: int  # and in a dry run
    needs_gpu: bool = False
    min_s: int = 20  # not started with less than this left of the budget
    suites: tuple[str, ...] = ()


STEPS = (
    Step("pytest", 120, 60),
    Step("limits", 60, 30, suites=("limits",)),
    Step("headline", 120, 40, suites=("engine-headline", "engine-headline-gpu")),
    Step("scale", 150, 60, needs_gpu=True, suites=("engine-scale-gpu",)),
    Step("engine", 120, 40, suites=("engine", "engine-speedups")),
    Step("featurize", 90, 60, suites=("featurize",)),
    Step("http", 150, 60, min_s=90, suites=("http",)),
)
STEP_BY_NAME = {step.name: step for step in STEPS}


def _bench_dir(work: Path) -> Path:
    return work / "bench"


def _load_limits(work: Path) -> dict[str, float]:
    try:
        payload = json.loads((_bench_dir(work) / "results.json").read_text())
        return {k: float(v) for k, v in payload.get("limits", {}).items()}
    except (OSError, ValueError):
        return {}


def step_limits(report: Any, tiny: bool, write: Callable[[], None]) -> None:
    from bench.limits import run_limits

    run_limits(report, quick=False, tiny=tiny)


def step_headline(report: Any, tiny: bool, write: Callable[[], None]) -> None:
    """bench.headline's two sets, GPU N=1e6; its N=1e7 figure is the scale step's."""
    from bench.harness import gpu_status
    from bench.headline import cpu_headlines, gpu_headlines
    from bench.peers import release

    n, dim, gpu_n = (4_000, 256, 20_000) if tiny else (200_000, 2048, 1_000_000)
    cpu_headlines(report, n, dim)
    write()
    usable, why = gpu_status()
    if not usable:
        report.note("engine-headline-gpu", f"no CUDA device: skipped ({why})")
        return
    gpu_headlines(report, gpu_n, dim)
    release()


def step_scale(report: Any, tiny: bool, write: Callable[[], None]) -> None:
    """GpuIndex at N=1e7 d=2048, float16 then float32, rows drawn on the device."""
    from bench.harness import SuiteSkipped, gpu_status
    from bench.peers import release

    usable, why = gpu_status()
    if not usable:
        raise SuiteSkipped(f"no CUDA device: skipped ({why})")
    for dtype in ("float16", "float32"):
        scale_one(report, 100_000 if tiny else 10_000_000, 2048, dtype)
        release()  # the index went with scale_one's frame: free the device pools
        write()


def scale_one(report: Any, n: int, dim: int, dtype: str, batch: int = 1024, k: int = 100,
              chunk: int = 250_000) -> None:
    """Build a GpuIndex of ``n`` unit rows drawn on the device (the host's generator would
    take minutes at 1e7 x 2048), check 16 queries against a float64 reference computed on
    the device from the same float32 rows, and time Q=1 k=10 and Q=``batch`` k=``k``."""
    import cupy
    import numpy as np

    from bench.harness import SEED, fits_on_device, measure, random_vectors
    from bench.headline import _checked, _merge
    from gpu import GpuIndex

    suite = "engine-scale-gpu"
    itemsize = 2 if dtype == "float16" else 4
    nbytes = n * dim * itemsize
    if not fits_on_device(nbytes * 1.1 + (6 << 30)):
        report.note(suite, f"N={n} d={dim} {dtype} does not fit in device memory: skipped")
        return
    sync = cupy.cuda.Device().synchronize
    singles = random_vectors(16, dim, offset=2)
    batches = [random_vectors(batch, dim, offset=3 + r) for r in range(2)]
    queries64 = cupy.asarray(singles, dtype=cupy.float64)
    generator = cupy.random.default_rng(SEED + 17)
    index = GpuIndex(dim, metric="dot", dtype=dtype)
    reference: tuple[np.ndarray, np.ndarray] | None = None
    started = time.perf_counter()
    for lo in range(0, n, chunk):
        count = min(chunk, n - lo)
        block = generator.standard_normal((count, dim), dtype=cupy.float32)
        block /= cupy.linalg.norm(block, axis=1, keepdims=True)
        scores = cupy.matmul(queries64, block.astype(cupy.float64).T)  # (16, count) float64
        order = cupy.argsort(-scores, axis=1)[:, :k]
        best = (cupy.asnumpy(cupy.take_along_axis(scores, order, 1)),
                cupy.asnumpy(order).astype(np.int64) + lo)
        reference = _merge(reference, best, k)
        index.add(np.arange(lo, lo + count, dtype=np.int64), cupy.asnumpy(block))
        del block, scores, order
    sync()
    build_s = time.perf_counter() - started
    assert reference is not None
    report.add_row(suite, measure=f"GpuIndex.add N={n} d={dim} {dtype}", value=n / build_s,
                   unit="vectors/s", detail=f"{build_s:.1f} s, rows drawn on the device and "
                                            "passed through the host")
    if _checked(report, suite, f"GpuIndex {dtype} N={n}", index.search, singles, k,
                reference, dtype):
        single = measure(lambda q: index.search(q, 10), [s[None] for s in singles],
                         sync=sync, warmup=2, budget_s=5.0)
        many = measure(lambda b: index.search(b, k), batches, sync=sync, warmup=1,
                       budget_s=10.0)
        scan = nbytes / single.median_s
        report.add_row(suite, measure=f"GpuIndex {dtype} N={n} d={dim} Q=1 k=10",
                       value=scan / 1e9, unit="GB/s",
                       detail=f"{single.median_s * 1e3:.2f} ms, "
                              f"{n / single.median_s:.3g} vectors/s")
        flops = 2.0 * n * dim * batch / many.median_s
        report.add_row(suite, measure=f"GpuIndex {dtype} N={n} d={dim} Q={batch} k={k}",
                       value=flops / 1e12, unit="TFLOP/s",
                       detail=f"{many.median_s * 1e3:.1f} ms, "
                              f"{n * batch / many.median_s:.3g} vectors scored/s")
        bandwidth = report.limits.get("device_read_GBps")
        report.add_ratio(suite, f"{dtype} N={n} Q=1 scan / device read bandwidth",
                         scan / 1e9 / bandwidth if bandwidth else None, 0.8,
                         detail=f"{scan / 1e9:.0f} / {bandwidth or 0:.0f} GB/s")
        peak = report.limits.get(f"device_gemm_{dtype}_GFLOPs")
        report.add_ratio(suite, f"{dtype} N={n} Q={batch} k={k} FLOP/s / cuBLAS GEMM peak",
                         flops / 1e9 / peak if peak else None, None,
                         detail=f"{flops / 1e12:.1f} / {(peak or 0) / 1e3:.1f} TFLOP/s")
        for label, seconds, count in (("Q=1 k=10", single.median_s, 1),
                                      (f"Q={batch} k={k}", many.median_s, batch)):
            report.add_ratio(suite, f"{dtype} vectors/s at N={n} {label} / MemSQL 1.25e7 "
                             "per node", n * count / seconds / 1.25e7, None)


def step_engine(report: Any, tiny: bool, write: Callable[[], None]) -> None:
    """bench.engine's grid at a reduced size: N=1e5 d=512 and N=1e6 d=2048."""
    from bench.engine import Cell, plot_engine, run_cells
    from bench.harness import gpu_status
    from bench.peers import systems

    if not report.limits:
        from bench.limits import run_limits

        run_limits(report, quick=True, tiny=tiny)
    if tiny:
        cells = [Cell(2_000, 128, 1, 10), Cell(2_000, 128, 16, 10, metric="dot"),
                 Cell(2_000, 128, 1, 10, "float16")]
    else:
        # N=1e6 float32 at Q=1024 is the scale step's (at 1e7), float16 Q=1024 headline's.
        cells = [Cell(100_000, 512, 1, 10), Cell(100_000, 512, 256, 10),
                 Cell(1_000_000, 2048, 1, 10), Cell(1_000_000, 2048, 1, 10, "float16"),
                 Cell(1_000_000, 2048, 256, 10, "float16"),
                 Cell(1_000_000, 2048, 256, 10, "bfloat16")]
    contenders = systems()
    report.note("engine", f"device check, reduced grid; systems: "
                          f"{', '.join(s.name for s in contenders)}; GPU: {gpu_status()[1]}")
    rows = run_cells(report, cells, contenders, report.limits,
                     max_call_s=0.5 if not tiny else 0.2, budget_s=2.0 if not tiny else 0.3)
    plot_engine(report, rows)


def step_featurize(report: Any, tiny: bool, write: Callable[[], None]) -> None:
    """Inception-v3 at batch 256 (float16 on CUDA: the featurizer halves there itself)."""
    from bench.featurize import run_featurize

    run_featurize(report, quick=tiny, batch_sizes=(2,) if tiny else (256,),
                  min_repeats=2 if tiny else 3)


def step_http(report: Any, tiny: bool, write: Callable[[], None]) -> None:
    """The HTTP suite on the backend the service picks here (gpu on a GPU box)."""
    from bench.http import run_http
    from bench.ingest import backend_name

    report.note("http", f"backend {backend_name()}")
    if tiny:
        run_http(report, quick=True, n=2_000, dim=64, concurrency=(1, 4), seconds=0.5,
                 samples=10)
    else:
        run_http(report, quick=False, n=100_000, dim=2048, concurrency=(1, 8, 64),
                 seconds=3.0, samples=100)


STEP_FUNCTIONS: dict[str, Callable[[Any, bool, Callable[[], None]], None]] = {
    "limits": step_limits, "headline": step_headline, "scale": step_scale,
    "engine": step_engine, "featurize": step_featurize, "http": step_http,
}


def run_step(name: str, work: Path, tiny: bool) -> int:
    """One step in this (child) process: write its report into the work folder as it goes,
    and its status (ok / skipped with a reason) into work/status-NAME.json."""
    import traceback

    from bench.harness import Report, SuiteSkipped, device_info

    report = Report(device_info(), quick=tiny)
    report.limits.update(_load_limits(work))  # earlier steps' floors (the engine's, scale's)

    def write() -> None:
        report.write(_bench_dir(work))  # merged by suite with what earlier steps wrote

    status: dict[str, Any] = {"status": "ok"}
    code = 0
    started = time.perf_counter()
    try:
        STEP_FUNCTIONS[name](report, tiny, write)
    except SuiteSkipped as exc:
        status = {"status": "skipped", "reason": str(exc)}
        print(f"[{name}] skipped: {exc}", flush=True)
    except Exception as exc:
        traceback.print_exc()
        status = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]}
        code = 1
    suite = STEP_BY_NAME[name].suites[0]
    report.note(suite, f"device check step {name} took {time.perf_counter() - started:.1f} s")
    write()
    (work / f"status-{name}.json").write_text(json.dumps(status))
    return code


# ---------------------------------------------------------------- the run
def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, timeout=10, check=False)
        return done.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    """What each module the check needs is here: its version, 'missing' or the error."""
    out: dict[str, str] = {}
    for module in (*NEEDED_MODULES, *OPTIONAL_MODULES, *DEVICE_MODULES):
        if not _has_module(module):
            out[module] = "missing"
            continue
        dist = {**NEEDED_MODULES, **OPTIONAL_MODULES}.get(module, module)
        dist = {"cupy": "cupy-cuda13x", "PIL": "pillow", "skimage": "scikit-image",
                "prometheus_client": "prometheus-client"}.get(dist, dist)
        try:
            out[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[module] = "present"
    return out


def _pytest_figures(text: str) -> dict[str, Any]:
    summary = [line for line in text.splitlines() if re.search(r" in [\d.]+s", line)]
    if not summary:
        return {}
    counts = re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)",
                        summary[-1])
    return {word.rstrip("s") if word.startswith("error") else word: int(count)
            for count, word in counts}


def _round(value: Any) -> Any:
    return float(f"{value:.4g}") if isinstance(value, float) else value


def _figures(step: Step, bench: dict[str, Any], log_text: str) -> dict[str, Any]:
    """The key figures of a step: ratios (and limits, rows that matter) of its suites."""
    if step.name == "pytest":
        return _pytest_figures(log_text)
    suites = bench.get("suites", {})
    figures: dict[str, Any] = {}
    if step.name == "limits":
        figures.update({k: _round(v) for k, v in bench.get("limits", {}).items()})
    for name in step.suites:
        body = suites.get(name, {})
        for ratio in body.get("ratios", []):
            figures[ratio["name"]] = _round(ratio["value"])
        if name == "engine":
            rows = body.get("rows", [])
            states = [str(r.get("status", "")).split(":")[0] for r in rows]
            figures["engine rows"] = {s: states.count(s) for s in sorted(set(states))}
            for row in rows:
                if row.get("status") == "ok" and str(row.get("system")).endswith("gpu"):
                    key = (f"{row['system']} N={row['n']} d={row['dim']} Q={row['q']} "
                           f"k={row['k']} {row['dtype']} {row['metric']}")
                    figures[key] = {"ms": _round(row.get("median_ms")),
                                    "floor_frac": _round(row.get("floor_frac"))}
        if name == "engine-speedups":
            for row in body.get("rows", []):
                if str(row.get("system")).endswith("gpu"):
                    key = (f"speed-up {row['system']} over {row['peer']} N={row['n']} "
                           f"d={row['dim']} Q={row['q']} {row['dtype']}")
                    figures[key] = _round(row.get("speedup"))
        if name == "featurize":
            for row in body.get("rows", []):
                figures[f"{row['device']} batch {row['batch']} images/s"] = _round(
                    row.get("images_per_s"))
        if name in ("engine-headline-gpu", "engine-scale-gpu"):
            for row in body.get("rows", []):
                if row.get("unit") in ("GB/s", "TFLOP/s", "vectors/s"):
                    figures[f"{row['measure']} ({row['unit']})"] = _round(row.get("value"))
    return figures


def _notes(step: Step, bench: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for name in step.suites:
        out += [n for n in bench.get("suites", {}).get(name, {}).get("notes", [])
                if not n.startswith(("suite took", "device check step"))]
    return out[-8:]


class Run:
    """The state of one device check: steps done, results rewritten after each."""

    def __init__(self, out: Path, work: Path, budget_s: float, started: float, dry: bool,
                 why: str) -> None:
        from bench.harness import device_info

        self.out, self.work, self.budget_s, self.started = out, work, budget_s, started
        self.dry = dry
        self.log = out / LOG_NAME
        self.device = device_info()
        self.state: dict[str, Any] = {
            "what": "dotsearch device check (bench/device_check.sh)",
            "mode": "dry run" if dry else "gpu",
            "why": why, "started": _now(), "updated": _now(), "finished": False,
            "budget_s": budget_s, "elapsed_s": 0.0, "commit": _git_commit(),
            "python": sys.version.split()[0], "executable": sys.executable,
            "setup": {"wheels": os.environ.get("DEVICE_CHECK_WHEELS", "not reported"),
                      "seconds": _float(os.environ.get("DEVICE_CHECK_SETUP_S"))},
            "imports": _versions(), "log": LOG_NAME, "work": str(work), "steps": {},
        }

    def elapsed(self) -> float:
        return time.time() - self.started

    def say(self, text: str) -> None:
        print(text, flush=True)
        with self.log.open("a", encoding="utf-8") as handle:
            handle.write(text + "\n")

    def write(self) -> None:
        """results.json (bench report + device_check), results.md, plots: at most 8 files."""
        from bench.harness import render_markdown

        self.state["updated"] = _now()
        self.state["elapsed_s"] = round(self.elapsed(), 1)
        bench = self._bench()
        payload = {"device": bench.get("device", self.device),
                   "quick": bench.get("quick", self.dry), "limits": bench.get("limits", {}),
                   "created": bench.get("created", _now()), "suites": bench.get("suites", {}),
                   "device_check": self.state}
        _atomic(self.out / "results.json", json.dumps(payload, indent=1, allow_nan=False,
                                                      default=str))
        table = ["| step | status | seconds | limit s | exit | note |", "|---|---|---|---|---|---|"]
        for name, step in self.state["steps"].items():
            table.append(f"| {name} | {step['status']} | {step.get('seconds', '')} | "
                         f"{step.get('limit_s', '')} | {step.get('exit_code', '')} | "
                         f"{str(step.get('reason', '')).replace('|', '/')[:120]} |")
        head = [f"# dotsearch device check ({self.state['mode']})", "",
                f"{self.state['why']}; started {self.state['started']}, "
                f"{self.state['elapsed_s']} s of {self.budget_s:g} s; commit "
                f"{self.state['commit']}; log `{LOG_NAME}`.", "", *table, ""]
        body = render_markdown(payload) if payload["suites"] else ""
        _atomic(self.out / "results.md", "\n".join(head) + "\n" + body)
        room = MAX_FILES - 3
        for png in sorted(_bench_dir(self.work).glob("*.png"))[:room]:
            shutil.copyfile(png, self.out / png.name)
        self._trim_log()

    def _bench(self) -> dict[str, Any]:
        try:
            found: dict[str, Any] = json.loads((_bench_dir(self.work) / "results.json")
                                               .read_text())
            return found
        except (OSError, ValueError):
            return {}

    def _trim_log(self) -> None:
        size = self.log.stat().st_size if self.log.exists() else 0
        if size > MAX_LOG_BYTES:
            data = self.log.read_bytes()[-(MAX_LOG_BYTES - 4096):]
            self.log.write_bytes(b"[log cut to its last 15 MiB]\n" + data)

    def step(self, step: Step) -> None:
        record: dict[str, Any] = {"status": "running", "log": LOG_NAME}
        self.state["steps"][step.name] = record
        left = self.budget_s - self.elapsed() - RESERVE_S
        if step.needs_gpu and not self.state["gpu_usable"]:
            record.update(status="skipped", seconds=0.0,
                          reason=f"no CUDA device: skipped ({self.state['gpu']})")
        elif left < (needed := min(step.min_s, 20) if self.dry else step.min_s):
            record.update(status="skipped", seconds=0.0,
                          reason=f"not enough time left ({left:.0f} s of the {self.budget_s:g}"
                                 f" s budget; needs {needed} s)")
        else:
            self._run(step, record, min(float(step.dry_limit_s if self.dry else step.limit_s),
                                        left))
        self.write()
        shown = f" ({record['reason']})" if record.get("reason") else ""
        self.say(f"== {step.name}: {record['status']} in {record['seconds']:.1f} s{shown}")

    def _run(self, step: Step, record: dict[str, Any], limit: float) -> None:
        if step.name == "pytest":
            cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                   "--continue-on-collection-errors"]
        else:
            cmd = [sys.executable, "-m", "bench.device_check", "step", step.name,
                   "--work", str(self.work)] + (["--tiny"] if self.dry else [])
        limit_s = max(1, int(limit))
        if shutil.which("timeout"):
            cmd = ["timeout", "-k", "10", str(limit_s), *cmd]
        record.update(limit_s=limit_s, command=" ".join(cmd))
        self.write()
        self.say(f"\n===== step {step.name}: limit {limit_s} s, at {_now()} "
                 f"({self.elapsed():.0f} s into the run) =====")
        offset = self.log.stat().st_size
        status_file = self.work / f"status-{step.name}.json"
        status_file.unlink(missing_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
               "PYTHONPATH": os.pathsep.join(
                   p for p in (os.environ.get("PYTHONPATH", ""), str(REPO)) if p)}
        started = time.perf_counter()
        with self.log.open("ab") as handle:
            try:
                code = subprocess.run(cmd, cwd=REPO, env=env, stdout=handle,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      timeout=limit_s + 30, check=False).returncode
            except subprocess.TimeoutExpired:
                code = 124
        record["seconds"] = round(time.perf_counter() - started, 1)
        record["exit_code"] = code
        with self.log.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", "replace")
        child: dict[str, Any] = {}
        if status_file.exists():
            child = json.loads(status_file.read_text())
        if code in (124, 137):
            record.update(status="timeout", reason=f"cut at its {limit_s} s limit")
        elif code != 0:
            record.update(status="failed",
                          reason=child.get("reason") or _last_line(text) or f"exit {code}")
        else:
            record.update(status=child.get("status", "ok"))
            if child.get("reason"):
                record["reason"] = child["reason"]
        if step.name == "pytest" and record["status"] == "ok" and not self.state["gpu_usable"]:
            record["reason"] = "no CUDA device: every gpu test skipped"
        bench = self._bench()
        record["figures"] = _figures(step, bench, text)
        notes = _notes(step, bench)
        if notes:
            record["notes"] = notes
        tail = text.rstrip().splitlines()[-12:]
        print("\n".join("   | " + line[:200] for line in tail), flush=True)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None


def _atomic(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def run(out: Path, budget_s: float | None, dry_run: bool, only: list[str] | None) -> int:
    from bench.harness import gpu_status

    started = _float(os.environ.get("DEVICE_CHECK_STARTED")) or time.time()
    out.mkdir(parents=True, exist_ok=True)
    usable, why = gpu_status()
    dry = dry_run or not usable
    reason = (f"GPU {why}" if usable else f"no CUDA device ({why})") + (
        "; dry run: tiny sizes" if dry else "")
    budget = budget_s or (180.0 if dry else 480.0)
    work = Path(tempfile.mkdtemp(prefix="dotsearch-device-check-"))
    state = Run(out, work, budget, started, dry, reason)
    state.state.update(gpu=why, gpu_usable=usable)
    state.say(f"== dotsearch device check into {out}: {reason}; budget {budget:g} s "
              f"(work folder {work})")
    for step in STEPS:
        if only and step.name not in only:
            continue
        state.step(step)
    state.state["finished"] = True
    state.write()
    print("\nstep       status    seconds  figures")
    for name, record in state.state["steps"].items():
        figures = json.dumps(record.get("figures", {}))
        print(f"{name:<10} {record['status']:<9} {record.get('seconds', 0):7.1f}  "
              f"{figures[:160]}")
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / LOG_NAME}")
    bad = [n for n, r in state.state["steps"].items() if r["status"] in ("failed", "timeout")]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.device_check",
                                     description="The GPU path checked on a GPU, in one command.")
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run", help="every step, results into OUTDIR")
    go.add_argument("out", type=Path)
    go.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default 480; 180 in a dry run)")
    go.add_argument("--dry-run", action="store_true",
                    help="tiny sizes even on a GPU (automatic without a CUDA device)")
    go.add_argument("--only", default=None, help="comma-separated steps: "
                    + ", ".join(s.name for s in STEPS))
    one = commands.add_parser("step", help="one step (what run starts in a child)")
    one.add_argument("name", choices=sorted(STEP_FUNCTIONS))
    one.add_argument("--work", type=Path, required=True)
    one.add_argument("--tiny", action="store_true")
    miss = commands.add_parser("missing", help="the distributions this interpreter lacks")
    miss.add_argument("--optional", action="store_true", help="faiss-cpu too")
    fetch = commands.add_parser("fetch-wheels", help="download them as cp312 wheels")
    fetch.add_argument("--dest", type=Path, default=REPO / ".whl")
    fetch.add_argument("--limit-mib", type=float, default=52.0)
    args = parser.parse_args(argv)
    if args.command == "run":
        only = [s.strip() for s in args.only.split(",")] if args.only else None
        return run(args.out.resolve(), args.budget, args.dry_run, only)
    if args.command == "step":
        return run_step(args.name, args.work, args.tiny)
    if args.command == "missing":
        print(" ".join(missing_distributions(args.optional)))
        return 0
    return fetch_wheels(args.dest, args.limit_mib)


if __name__ == "__main__":
    sys.exit(main())
