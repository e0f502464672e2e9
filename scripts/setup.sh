#!/usr/bin/env bash
# Create .venv (if missing) and install defectfill with its test tools and the Ray extra
# (tests/test_distributed.py runs `run --executor ray` on a real local Ray).
# ci/constraints.txt pins the versions known to work on this project's CI machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c ci/constraints.txt -e ".[test,ray]"
