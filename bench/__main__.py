"""``python -m bench [suites] [--quick] [--out DIR]``: run suites, write JSON, markdown, plots."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench.harness import Report, SuiteSkipped, default_out_dir, device_info

# suite name -> (module, function); every function is run(report, quick) -> object
SUITES: dict[str, tuple[str, str]] = {
    "limits": ("bench.limits", "run_limits"),
    "engine": ("bench.engine", "run_engine"),
    "headline": ("bench.headline", "run_headline"),
    "sql": ("bench.sql", "run_sql"),
    "ingest": ("bench.ingest", "run_ingest"),
    "http": ("bench.http", "run_http"),
    "featurize": ("bench.featurize", "run_featurize"),
    "reliability": ("bench.reliability", "run_reliability"),
    "cluster": ("bench.cluster", "run_cluster"),
    "models": ("bench.models", "run_models"),
}


def _suite(name: str) -> Callable[..., object]:
    module_name, function = SUITES[name]
    found: Callable[..., object] = getattr(importlib.import_module(module_name), function)
    return found


def main(argv: list[str] | None = None) -> int:
    """Run the named suites (all when none are named); 0 when every suite ran or was skipped."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=main.__doc__)
    parser.add_argument("suites", nargs="*", metavar="SUITE",
                        help=f"any of {', '.join(SUITES)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes: under two minutes")
    parser.add_argument("--out", default=None,
                        help="results directory (default bench/results/<device>-<date>)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.suites if name not in SUITES]
    if unknown:
        parser.error(f"unknown suite {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    names = list(dict.fromkeys(args.suites)) or list(SUITES)
    report = Report(device_info(), quick=args.quick)
    print(f"dotsearch bench on {report.device['name']}: {', '.join(names)}"
          f"{' (quick)' if args.quick else ''}", flush=True)
    failures = 0
    for name in names:
        started = time.perf_counter()
        try:
            _suite(name)(report, quick=args.quick)
        except SuiteSkipped as exc:
            report.note(name, f"suite skipped: {exc}")
        except Exception as exc:
            failures += 1
            traceback.print_exc()
            report.note(name, f"suite failed: {type(exc).__name__}: {exc}")
        report.note(name, f"suite took {time.perf_counter() - started:.1f} s")
    out = Path(args.out) if args.out else default_out_dir(report.device)
    paths = report.write(out)
    print()
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
