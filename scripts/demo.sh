#!/usr/bin/env bash
# Install defectfill into .venv, then run the whole job on the built-in demo (no data, GPU or network).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/defectfill demo --output demo-output "$@"
