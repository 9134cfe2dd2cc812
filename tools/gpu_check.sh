#!/usr/bin/env bash
# The GPU check (issue 18 item 11), prepared to run in under 8 minutes on one H100/H200:
#   1. env        the GPU, driver, torch/CUDA versions
#   2. tests      the CUDA tests of the suite (tests/test_cuda.py; they skip without a GPU)
#   3. model      SimMIM training step and inference, ours vs timm's SwinV2, bf16 autocast, eager and compiled
#   4. memory     activation memory per image per recompute mode vs timm, bf16
#   5. pipeline   a short pretraining (bf16, asynchronous saves) -> fine-tuning -> export, on CUDA
#   6. fsdp       FSDP on one process (accelerate launch, configs/accelerate/fsdp.yaml): a smoke test
#   7. save       seconds a checkpoint save blocks training, direct vs run.async_save, swinv2_large from the GPU
# Each step runs under `timeout`; its output goes to DIR/<step>.log (benchmarks also write DIR/<step>.json), and
# DIR/summary.txt lists every step with its exit code and seconds. A failed step does not stop the others; the
# script exits 1 if any failed.
#
# Usage: tools/gpu_check.sh [DIR]        (DIR default: $OUT if set, else runs/gpu_check), after `pip install -e .`
#        (from any folder: the script runs in the repository root, which holds tests/)
#        GPU_CHECK_DRY=1 tools/gpu_check.sh DIR   run nothing, only list the commands in DIR/commands.txt:
#                                                 tests/test_gpu_check.py parses each of them (flags, config keys)
# Environment: PYTHON (default python), GPU_CHECK_MODEL (default swinv2_base), GPU_CHECK_BATCH (default 64).
set -euo pipefail

DIR="${1:-${OUT:-runs/gpu_check}}"
PY="${PYTHON:-python}"
MODEL="${GPU_CHECK_MODEL:-swinv2_base}"
BATCH="${GPU_CHECK_BATCH:-64}"
DRY="${GPU_CHECK_DRY:-0}"
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: >"$DIR/summary.txt"
: >"$DIR/commands.txt"
failed=0

# run PROGRAM ARGS...: run PROGRAM (simmim, accelerate-launch, pytest) with this Python; in dry mode only record
# the command line in DIR/commands.txt (arguments separated by \x1f), for tests/test_gpu_check.py to parse
run() {
    local program=$1
    shift
    if [[ "$DRY" == 1 ]]; then
        (IFS=$'\x1f'; printf '%s\n' "$program"$'\x1f'"$*") >>"$DIR/commands.txt"
        return
    fi
    case "$program" in
        simmim) "$PY" -m simmim "$@" ;;
        accelerate-launch) "$PY" -m accelerate.commands.launch "$@" ;;
        pytest) "$PY" -m pytest "$@" ;;
        *) echo "unknown program $program" >&2; return 2 ;;
    esac
}

# step NAME SECONDS COMMAND...: run COMMAND under timeout with its output in DIR/NAME.log; record rc and seconds
step() {
    local name=$1 limit=$2 rc=0 start
    shift 2
    start=$(date +%s)
    echo "== $name (at most ${limit}s)"
    timeout --signal=TERM --kill-after=15 "$limit" bash -c 'set -euo pipefail; "$@"' step "$@" >"$DIR/$name.log" 2>&1 || rc=$?
    echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$DIR/summary.txt"
    if [[ $rc -ne 0 ]]; then
        failed=1
        tail -n 20 "$DIR/$name.log"
    fi
}

env_info() {
    if [[ "$DRY" == 1 ]]; then echo "dry run"; return; fi
    nvidia-smi || true
    "$PY" -c "import simmim.models, torch; print(simmim.__file__, torch.__version__, torch.version.cuda,
torch.cuda.get_device_name())"
}

cuda_tests() {
    run pytest -q -rs tests/test_cuda.py
}

pipeline() {
    local pre="$DIR/pretrain" ft="$DIR/finetune" ckpt
    run simmim pretrain demo/pretrain --output "$pre" --overwrite schedule.max_steps=40 run.save_every=20 \
        run.mixed_precision=bf16 run.async_save=true run.progress=false run.image_every=0
    run simmim finetune demo/finetune --pretrained "$pre/checkpoints/ckpt-00000040.pt" --output "$ft" --overwrite \
        schedule.epochs=1 run.mixed_precision=bf16 run.progress=false
    ckpt="$ft/checkpoints/ckpt-LAST.pt"  # the dry run's stand-in: the real name depends on the epoch's steps
    [[ "$DRY" == 1 ]] || ckpt=$(ls "$ft"/checkpoints/ckpt-*.pt | tail -n 1)
    run simmim export "$ckpt" --out "$DIR/export/classifier.safetensors" --overwrite
}

fsdp() {
    local config
    config=$("$PY" -c "from simmim.configs import resolve; print(resolve('accelerate/fsdp'))")
    run accelerate-launch --config_file "$config" --num_processes 1 -m simmim pretrain demo/pretrain \
        --output "$DIR/fsdp" --overwrite schedule.max_steps=10 run.progress=false run.image_every=0 \
        run.mixed_precision=bf16
}

export DIR PY DRY
export -f run env_info cuda_tests pipeline fsdp
step env 30 env_info
step tests 80 cuda_tests
step model 140 run simmim benchmark --what model --device cuda --model "$MODEL" --batch-size "$BATCH" \
    --dtype bfloat16 --compile --rounds 5 --iters 3 --json "$DIR/model.json"
step memory 45 run simmim benchmark --what memory --device cuda --model "$MODEL" --dtype bfloat16 \
    --memory-batch-sizes 8 16 --rounds 3 --json "$DIR/memory.json"
step pipeline 75 pipeline
step fsdp 45 fsdp
step save 60 run simmim benchmark --what save --device cuda --model swinv2_large --rounds 3 --save-dir "$DIR" \
    --json "$DIR/save.json"

echo "summary in $DIR/summary.txt"
exit "$failed"
