#!/usr/bin/env bash
# Install defectfill the way the README tells users to (pip, the ranges of pyproject.toml,
# no ci/constraints.txt) into a fresh virtual environment, then train a tiny LoRA for 2
# steps and generate with it. This catches a set of releases that the ranges admit but
# that does not work together (e.g. transformers 5.24 beside peft 0.21), which
# the pinned environment of scripts/setup.sh cannot see. Every run resolves anew: the
# environment lives in a temporary folder that is removed afterwards.
#
#   bash scripts/check_unpinned_install.sh [extra pip install arguments, e.g. -c lowest.txt]
#
# Needs no network beyond the package index pip is configured with; CPU only (~2 min,
# most of it the install).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
TMP=$(mktemp -d "${TMPDIR:-/tmp}/defectfill-unpinned.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
start=$SECONDS

# A clean copy of the checkout (tracked and new, not ignored, files): building in the
# working tree would reuse its build/ folder, where files deleted since can linger.
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -f "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | (mkdir -p "$TMP/src" && tar -xf - -C "$TMP/src")

"$PYTHON" -m venv "$TMP/venv"
PY="$TMP/venv/bin/python"
echo "check_unpinned_install: pip install . (no project constraints) into a fresh venv"
if ! "$PY" -m pip install --quiet --disable-pip-version-check "$@" "$TMP/src" >"$TMP/pip.log" 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" "$TMP/pip.log" | tail -40
    echo "check_unpinned_install: FAILED: pip could not install the project" >&2
    exit 1
fi
"$PY" -m pip list --disable-pip-version-check 2>/dev/null \
    | grep -iE '^(torch|torchvision|diffusers|transformers|peft|accelerate|huggingface.hub) ' | tr -s ' ' | paste -sd ';' \
    | sed 's/^/check_unpinned_install: resolved: /'

# Run from the temporary folder so that the installed package, not the source tree, is imported.
cd "$TMP"
export HF_HUB_OFFLINE=1
DF="$TMP/venv/bin/defectfill"
step() {  # step NAME COMMAND...: run quietly, show the end of its output if it fails
    if ! "${@:2}" >"$TMP/$1.log" 2>&1; then
        tail -40 "$TMP/$1.log"
        echo "check_unpinned_install: FAILED at $1 (see the output above)" >&2
        exit 1
    fi
}
step make-demo-data "$DF" make-demo-data data
step tiny-model "$PY" -c "
from defectfill.model.tiny import save_tiny_pipeline
save_tiny_pipeline('model')"
step train "$DF" train --data data --category disc --defect-type scratch --output run --model model \
    --resolution 64 --steps 2 --batch-size 2 --save-every 2 --sample-every 0
step generate "$DF" generate --run run --output gen --count 1 --candidates 2 --steps 2 --lpips-random-backbone
# The LoRA must really reach both networks: diffusers only warns when it finds no keys for one.
step load-lora "$PY" -c "
import glob, sys
from diffusers import StableDiffusionInpaintPipeline
assert glob.glob('gen/**/*.png', recursive=True), 'generate wrote no image'
pipe = StableDiffusionInpaintPipeline.from_pretrained('model', safety_checker=None, requires_safety_checker=False)
pipe.load_lora_weights('run', weight_name='pytorch_lora_weights.safetensors')
for name in ('unet', 'text_encoder'):
    n = sum(1 for m, _ in getattr(pipe, name).named_modules() if m.endswith('lora_A'))
    print(name, 'LoRA layers:', n)
    if n == 0:
        sys.exit(f'the trained LoRA did not load into the {name}')"
echo "check_unpinned_install: OK (train + generate on an unpinned install, $((SECONDS - start)) s)"
