#!/usr/bin/env bash
# Everything issue 6 asks of a CUDA machine, in one command, from the repository root:
#   1. the CUDA tests (tests/test_triton.py, tests/test_torch_backend.py: float32, float16 and
#      bfloat16 at GPT-2 sizes, the triton model against the torch model, the kernels over
#      hypothesis' shapes compiled for the GPU instead of interpreted);
#   2. generate, eval and finetune through the CLI on --backend torch and --backend triton
#      (the fixture model tests/fixtures/hf-tiny, full vocabulary), finetune also under torchrun
#      (one process per GPU, NCCL);
#   3. the benchmark: python -m bench --suite limits,ops,generate,finetune,train --backends torch,triton.
#
# It uses the Python environment it finds (python3, or $PYTHON) with the repository on
# PYTHONPATH, so it also runs where nothing can be installed. Outputs go to $OUT (default
# gpu-results/): gpu.log (steps 1-2), bench.log, and bench/ (results.json, report.md, PNGs).
# Each step has its own time limit (seconds: $TEST_S, $BENCH_S) and a failing step does not
# stop the next one; the exit status is the number of failed steps.
#
#   bash bench/tools/gpu_check.sh                    # all of it
#   STEPS=bench BENCH_ARGS="--quick" bash bench/tools/gpu_check.sh

set -u
OUT=${OUT:-gpu-results}
PY=${PYTHON:-python3}
STEPS=${STEPS:-env,tests,cli,bench}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CI=1
LOG="$OUT/gpu.log"
failed=0

step() { # name limit command...: run, append to the log, print a one-line verdict
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s)
    echo "=== $name: $*" >>"$LOG"
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    echo "=== $name: rc=$rc in $(($(date +%s) - t0)) s" | tee -a "$LOG"
    [ $rc -eq 0 ] || failed=$((failed + 1))
    return 0
}
want() { [[ ",$STEPS," == *",$1,"* ]]; }

if want env; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
        --format=csv >>"$LOG" 2>&1
    step versions 60 "$PY" -c "import sys, torch, triton, numpy; print(sys.version); \
print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); \
print('triton', triton.__version__, 'numpy', numpy.__version__)"
fi

if want tests; then
    # -n: hypothesis' shapes compile many kernel variants; xdist spreads the compiles
    xdist=()
    "$PY" -c "import xdist" 2>/dev/null && xdist=(-n "${TEST_WORKERS:-8}")
    step tests "${TEST_S:-300}" "$PY" -m pytest -q -rs "${xdist[@]}" \
        tests/test_triton.py tests/test_torch_backend.py
    grep -E "passed|failed|error" "$LOG" | tail -n 3
fi

if want cli; then
    M=tests/fixtures/hf-tiny
    D=weights/data/tinyshakespeare.txt
    head -c 20000 $D >"$OUT/eval.txt"
    for be in torch triton; do
        step "generate-$be" 60 "$PY" -m gpt2 generate --model $M --backend $be \
            --max-new-tokens 24 --seed 1 --temperature 0.8 "The GPU says"
        step "generate-$be-json" 60 "$PY" -m gpt2 generate --model $M --backend $be \
            --max-new-tokens 8 --num-beams 3 --json "Hello"
        step "eval-$be" 60 "$PY" -m gpt2 eval "$OUT/eval.txt" --model $M --backend $be --json
        step "finetune-$be" 90 "$PY" -m gpt2 finetune --model $M --backend $be --data $D \
            --steps 4 --batch-size 4 --context-length 64 --out "$OUT/ft-$be" --json
    done
    step finetune-torchrun 90 "$PY" -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-$(nvidia-smi -L | wc -l)}" \
        -m gpt2 finetune --model $M --backend triton --data $D --steps 4 --batch-size 4 \
        --context-length 64 --out "$OUT/ft-ddp" --json
    rm -rf "$OUT"/ft-* "$OUT/eval.txt" # not results
fi

if want bench; then
    # shellcheck disable=SC2086
    step bench "${BENCH_S:-420}" "$PY" -m bench --suite limits,ops,generate,finetune,train \
        --backends torch,triton --sizes 124M --out "$OUT/bench" ${BENCH_ARGS:-}
    awk '/^## Key ratios/{on=1} /^## All ratios/{on=0} on' "$OUT/bench/report.md" 2>/dev/null
fi
exit $failed
