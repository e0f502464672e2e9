#!/usr/bin/env bash
# The GPU measurements of benchmarks/README.md, part by part, each with its own time limit, so a part that
# hangs or fails still leaves time and output for the rest.
#
#   bash benchmarks/gpu_session.sh                  # on a CUDA machine; output in ./gpu-out (or $OUT)
#   PARTS="train_compiled train_warm floor_compiled" bash benchmarks/gpu_session.sh   # the second call: training
#   PARTS="ckpt_compiled" bash benchmarks/gpu_session.sh                   # what does not fit in the first two
#   PARTS="train_eager generate_eager" bash benchmarks/gpu_session.sh     # the eager step and LoRA layers
#   CHECK_ON_CPU=1 bash benchmarks/gpu_session.sh   # the same parts on a CPU with the tiny pipeline and
#                                                   # small sizes (minutes): checks the script first
#
# The default parts fit one call of 9 minutes (about 8 with the set-up), in order of priority: a CUDA smoke
# run of the real trainer and generator (tiny pipeline, bf16, checkpointing, resume, compiled, merged LoRA,
# 2 images per call); generation at 512 px with 8 candidates, LoRA merged and UNet compiled: one image per call
# with 50 DDIM steps (today's path), 4 images per call with 50 DDIM steps (cross-image batching), 4 images per
# call with 20 DPM-Solver++ steps (the solver at fewer steps; its compile cache is the part before's). The
# training parts (the compiled 512 px batch 4 bf16 step, and again with the compile cache warm) are the second
# call: PARTS="train_compiled train_warm floor_compiled". Results: $OUT/session.log (everything) and one JSON
# table per part in $OUT (benchmarks/README.md explains the columns).
#
# The machine's python3, torch and accelerate are used. On a GPU machine without network access that
# lacks diffusers, transformers, peft, lpips or open_clip_torch, run benchmarks/gpu_wheels.sh first on
# a machine with access and copy the repository with its .whl/ folder: this script installs those
# wheels into /tmp/site.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ "${CHECK_ON_CPU:-0}" = 1 ]; then
    DEV=cpu SIZE=tiny RES=64 STEPS=2 SOLVER_STEPS=2 WARMUP=1 ITERS=1 REPEATS=1 PY=.venv/bin/python
    export DEFECTFILL_COMPILE_BACKEND=aot_eager  # compiles in seconds on a CPU; inductor would take minutes
else
    DEV=cuda SIZE=sd2 RES=512 STEPS=50 SOLVER_STEPS=20 WARMUP=2 ITERS=5 REPEATS=3 PY=python3
fi
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session.log") 2>&1
date -u

if [ "$DEV" = cuda ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site
else
    echo "no .whl/ folder: using the Python packages installed on this machine (benchmarks/gpu_wheels.sh fills .whl/)"
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
"$PY" - <<'PY' || exit 1
import accelerate, diffusers, peft, torch, transformers
print("python3", __import__("sys").version.split()[0], "torch", torch.__version__, "diffusers", diffusers.__version__,
      "transformers", transformers.__version__, "peft", peft.__version__, "accelerate", accelerate.__version__,
      "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
PY

part() {  # part NAME SECONDS COMMAND...: run with a limit, say how it ended
    local name=$1 limit=$2
    shift 2
    echo "### $name (limit ${limit} s) $(date -u +%H:%M:%S)"
    local t0=$SECONDS
    timeout "$limit" "$@"
    echo "### $name exit $? after $((SECONDS - t0)) s"
}

smoke() {  # the trainer and generator on CUDA: bf16, checkpointing, checkpoint + resume, LFS generation
    local w=/tmp/smoke
    rm -rf "$w"
    "$PY" -c "
from defectfill.demo.dataset import make_demo_dataset
from defectfill.model.tiny import save_tiny_pipeline
make_demo_dataset('$w/data'); save_tiny_pipeline('$w/model')" || return 1
    local common=(--data "$w/data" --category disc --defect-type scratch --model "$w/model" --output "$w/run"
                  --resolution 64 --batch-size 2 --mixed-precision bf16 --gradient-checkpointing --save-every 4
                  --sample-every 0 --log-every 2 --compile yes)
    "$PY" -m defectfill train "${common[@]}" --steps 4 || return 1
    "$PY" -m defectfill train "${common[@]}" --steps 8 --resume latest || return 1
    "$PY" -m defectfill generate --run "$w/run" --output "$w/gen" --count 4 --steps 5 --candidates 4 \
        --lpips-random-backbone --device "$DEV" --mixed-precision bf16 --compile yes --batch-images 2 || return 1
    find "$w/run" "$w/gen" -maxdepth 2 | sort | head -40
    tail -3 "$w/run/train.log"
}

export -f smoke
export PY DEV
# Parts, each with its own limit. The default set fits one call of 9 minutes; the second set measures the
# training step: PARTS="train_compiled train_warm floor_compiled" bash benchmarks/gpu_session.sh
PARTS=${PARTS:-"smoke generate_merged generate_images generate_solver"}
for name in $PARTS; do
    case $name in
    smoke)  # 140 s: trainer (compiled, bf16, checkpointing, resume) and generator (merged LoRA, compiled) on CUDA
        part smoke 140 bash -c smoke ;;
    train_compiled)  # 180 s: our step compiled (UNet and VAE encoder), 512 px, batch 4, bf16; "first s" = compile
        part train_compiled 180 "$PY" benchmarks/train_step.py --size "$SIZE" --device "$DEV" --mixed-precision bf16 \
            --resolution "$RES" --batch-size 4 --compile yes --modes ours --warmup "$WARMUP" --iters "$ITERS" \
            --json "$OUT/train_compiled.json" ;;
    train_warm)  # 100 s: the same in a new process: the first step with inductor's on-disk cache warm
        part train_warm 100 "$PY" benchmarks/train_step.py --size "$SIZE" --device "$DEV" --mixed-precision bf16 \
            --resolution "$RES" --batch-size 4 --compile yes --modes ours --warmup 1 --iters 2 \
            --json "$OUT/train_warm.json" ;;
    generate_merged)  # 110 s: 8 candidates, 50 DDIM steps, 512 px, merged LoRA, UNet compiled, one image per call
        part generate_merged 110 "$PY" benchmarks/generate.py --size "$SIZE" --device "$DEV" --dtype bf16 \
            --resolution "$RES" --steps "$STEPS" --repeats "$REPEATS" --ways batched --merge-lora --compile yes \
            --json "$OUT/generate_merged.json" ;;
    generate_images)  # 150 s: the same with 4 images per call (64-row guided UNet calls; compiles that shape)
        part generate_images 150 "$PY" benchmarks/generate.py --size "$SIZE" --device "$DEV" --dtype bf16 \
            --resolution "$RES" --steps "$STEPS" --repeats "$REPEATS" --ways batched --merge-lora --compile yes \
            --batch-images 4 --json "$OUT/generate_images.json" ;;
    generate_solver)  # 100 s: 4 images per call, DPM-Solver++ at 20 steps (the shapes above: compile cache warm)
        part generate_solver 100 "$PY" benchmarks/generate.py --size "$SIZE" --device "$DEV" --dtype bf16 \
            --resolution "$RES" --steps "$SOLVER_STEPS" --repeats "$REPEATS" --ways batched --merge-lora \
            --compile yes --batch-images 4 --scheduler dpm++ --json "$OUT/generate_solver.json" ;;
    floor_compiled)  # 240 s: the floor compiled the same way (ours/floor), and its eager-cache-warm ours
        part floor_compiled 240 "$PY" benchmarks/train_step.py --size "$SIZE" --device "$DEV" --mixed-precision bf16 \
            --resolution "$RES" --batch-size 4 --compile yes --modes ours floor --warmup "$WARMUP" --iters "$ITERS" \
            --json "$OUT/floor_compiled.json" ;;
    ckpt_compiled)  # 240 s: peak memory of the compiled step with gradient checkpointing
        part ckpt_compiled 240 "$PY" benchmarks/train_step.py --size "$SIZE" --device "$DEV" --mixed-precision bf16 \
            --resolution "$RES" --batch-size 4 --compile yes --gradient-checkpointing yes --modes ours \
            --warmup "$WARMUP" --iters "$ITERS" --json "$OUT/ckpt_compiled.json" ;;
    train_eager)  # 300 s: ours, floor and naive eager, without and with gradient checkpointing
        part train_eager 300 "$PY" benchmarks/train_step.py --size "$SIZE" --device "$DEV" --mixed-precision bf16 \
            --resolution "$RES" --batch-size 4 --gradient-checkpointing both --warmup "$WARMUP" --iters "$ITERS" \
            --json "$OUT/train_eager.json" ;;
    generate_eager)  # 240 s: LoRA layers (not merged), eager, batched against one at a time
        part generate_eager 240 "$PY" benchmarks/generate.py --size "$SIZE" --device "$DEV" --dtype bf16 \
            --resolution "$RES" --steps "$STEPS" --repeats "$REPEATS" --no-merge-lora --json "$OUT/generate_eager.json" ;;
    *) echo "unknown part $name" ;;
    esac
done
date -u
