"""``python -m bench.readme DIR...``: print README "Performance" tables from results.json."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.harness import RESULTS_ROOT, markdown_table

REPO_ROOT = RESULTS_ROOT.parent.parent


def _latest() -> list[Path]:
    runs = sorted(RESULTS_ROOT.glob("*/results.json"), key=lambda p: p.stat().st_mtime)
    return [runs[-1].parent] if runs else []


def section(run_dir: Path) -> str:
    """One run as markdown: device, headline ratios, per-suite highlights, plot links."""
    payload: dict[str, Any] = json.loads((run_dir / "results.json").read_text())
    device = payload["device"]
    try:
        where = run_dir.resolve().relative_to(REPO_ROOT)
    except ValueError:
        where = run_dir
    lines = [f"### {device.get('gpu') or device['cpu']} ({device['name']})", "",
             f"{device['cores']} CPU cores; run of {payload['created']}"
             f"{' (quick mode)' if payload.get('quick') else ''}; "
             f"full results in [`{where}/results.md`]({where}/results.md).", ""]
    ratios = [r for suite in payload["suites"].values() for r in suite["ratios"]]
    if ratios:
        lines.append(markdown_table([
            {"suite": r["suite"], "measure": r["name"], "value": r["value"],
             "target": (None if r["target"] is None else
                        f"{'>=' if r['better'] == 'higher' else '<='} {r['target']}"),
             "met": {True: "yes", False: "no", None: ""}[r["met"]]} for r in ratios]))
    if payload.get("limits"):
        lines.append("Limits measured in the same run: " + ", ".join(
            f"{key} = {value:.4g}" for key, value in payload["limits"].items()) + ".")
        lines.append("")
    for png in sorted(run_dir.glob("*.png")):
        lines.append(f"![{png.stem}]({where}/{png.name})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Print one section per results directory (default: the newest under bench/results)."""
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=main.__doc__)
    parser.add_argument("dirs", nargs="*", type=Path)
    args = parser.parse_args(argv)
    dirs = args.dirs or _latest()
    if not dirs:
        print("no results under bench/results yet: run `python -m bench` first", file=sys.stderr)
        return 1
    print("\n".join(section(d) for d in dirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
