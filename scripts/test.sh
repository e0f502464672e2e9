#!/usr/bin/env bash
# Install what the tests need, then run ruff and the test suite (CPU, no network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/ruff check defectfill tests benchmarks
.venv/bin/python -m pytest "$@"
