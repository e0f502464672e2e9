#!/usr/bin/env bash
# Run HERE (a machine with PyPI), before a session's first call to the lent GPU machine.
# That machine reaches no registry and lacks diffusers, lpips and open_clip_torch; its transformers
# and peft are older than the pair the tests run with. This fills .whl/ (git-ignored) with the
# wheels benchmarks/gpu_session.sh installs there. Python 3.12 x86-64: that machine's python3.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl \
    diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 lpips==0.1.4 open_clip_torch==3.3.0 'regex>=2025.10.22'
ls -l .whl
du -sh .whl  # carried with the working tree: the whole call may carry 64 MiB
