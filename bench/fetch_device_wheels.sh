#!/usr/bin/env bash
# Download, on a machine with network to PyPI, the Python packages the project imports that
# a bare GPU box lacks (the device image listed in the workplace's KINDS.md): duckdb,
# sqlglot, fastapi, starlette, pydantic (+ core, settings), uvicorn, python-multipart, ...
# and their own needs that the box lacks too (followed through each wheel's Requires-Dist),
# as cp312 manylinux x86_64 wheels, --no-deps, at the versions installed in this repo's
# .venv, one version of each, into the git-ignored .whl/. faiss-cpu is added only if the
# total stays under the limit (default 52 MiB: the working tree sent to a device machine,
# wheels included, must stay under 64 MiB). Then carry .whl/ and run
# bash bench/device_check.sh, which installs them into /tmp/site.
#
#   bash bench/fetch_device_wheels.sh [--dest DIR] [--limit-mib MIB]
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" -m bench.device_check fetch-wheels "$@"
