#!/usr/bin/env bash
# The GPU path checked on a GPU, in one command, from anywhere in the repo:
#
#   bash bench/device_check.sh [OUTDIR] [--dry-run] [--budget S] [--only pytest,limits,...]
#
# OUTDIR: default $OUT when set (a device machine's folder that comes back), else
# bench/results/device-check-<date>. Writes OUTDIR/results.json (bench report of the suites
# run + "device_check": per step status, seconds, exit code, limit, key figures),
# results.md, device_check.log and up to five plots: at most 8 files, rewritten after every
# step, so a run cut off at its limit still leaves what it did.
#
# This wrapper only sets up: the interpreter ($PYTHON, else .venv/bin/python, else
# python3), the wheels in .whl/ (bench/fetch_device_wheels.sh) installed into /tmp/site
# when this interpreter lacks a package the project imports, and nvidia-smi in the log.
# The steps, their time limits and the time budget (the arithmetic for an H200) are in
# bench/device_check.py. Without a CUDA device it is a dry run at tiny sizes (~2-3 min).
set -u
START=$(date +%s)
cd "$(dirname "$0")/.." || exit 2

OUTDIR=${OUT:-bench/results/device-check-$(date +%Y-%m-%d)}
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
    OUTDIR=$1
    shift
fi
mkdir -p "$OUTDIR" || exit 2
LOG=$OUTDIR/device_check.log
: >"$LOG"

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg

say() { echo "$*" | tee -a "$LOG"; }

say "== setup $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname): $("$PY" -V 2>&1) ($PY), $(nproc) cores"
if command -v nvidia-smi >/dev/null 2>&1; then
    # Read only: never change the card's settings.
    nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.max.sm,temperature.gpu,power.draw,power.limit \
        --format=csv >>"$LOG" 2>&1 || say "nvidia-smi failed"
else
    say "nvidia-smi: not found"
fi

MISSING=$("$PY" -m bench.device_check missing 2>>"$LOG")
WHEELS="every package the project imports is importable; no wheels installed"
if [ -n "$MISSING" ]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        say "missing here: $MISSING; installing .whl/*.whl into /tmp/site"
        if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl >>"$LOG" 2>&1; then
            export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
            STILL=$("$PY" -m bench.device_check missing 2>>"$LOG")
            WHEELS="installed $(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l) wheels from .whl/ into /tmp/site (was missing: $MISSING)${STILL:+; still missing: $STILL}"
        else
            WHEELS="pip could not install .whl/*.whl (see the log); going on without: $MISSING"
        fi
    else
        WHEELS="no .whl/ folder (bench/fetch_device_wheels.sh makes it); going on with what is installed; missing: $MISSING"
    fi
fi
say "wheels: $WHEELS"

export DEVICE_CHECK_STARTED=$START DEVICE_CHECK_WHEELS=$WHEELS
export DEVICE_CHECK_SETUP_S=$(( $(date +%s) - START ))
"$PY" -m bench.device_check run "$OUTDIR" "$@"
