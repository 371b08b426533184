#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite: unit tests and end-to-end tests with
# real Orthanc and dcmtk peers on loopback ports.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TCP_NODELAY=1
.venv/bin/ruff check dicomnode tests benchmarks
.venv/bin/ruff format --check dicomnode tests benchmarks
.venv/bin/python -m pytest -q "$@"
