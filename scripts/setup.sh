#!/usr/bin/env bash
# Create .venv (if missing) and install defectfill with its test tools, the Ray extra
# (tests/test_distributed.py runs `run --executor ray` on a real local Ray), the browser UI extra and the
# formats extra (annotation imports and exports: pycocotools, datasets, label-studio-converter).
# ci/constraints.txt pins the versions known to work on this project's CI machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -c ci/constraints.txt -e ".[test,ray,ui,formats]"

# The browser test of `defectfill ui` (tests/test_ui_browser.py) drives Debian's chromium through
# chromium-driver. Install both when missing and when we may (root, or sudo without a password);
# otherwise that one test is skipped and says why.
if ! command -v chromedriver >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        SUDO=(none)
    fi
    if [ "${SUDO[0]:-}" = none ]; then
        echo "setup: chromium-driver missing and not root: the browser UI test will be skipped" >&2
    else
        { "${SUDO[@]}" apt-get update -qq &&
          "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
              chromium chromium-driver >/dev/null; } ||
            echo "setup: could not install chromium and chromium-driver: the browser UI test will be skipped" >&2
    fi
fi
