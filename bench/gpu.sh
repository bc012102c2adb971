#!/usr/bin/env bash
# Every check and figure that needs a CUDA GPU, in one call, in order of priority: the kernel
# tests, the tile sweep, attention against SDPA, training throughput against transformers, the
# end-to-end CUDA tests, then the same throughput under torch.compile. Each stage is bounded so
# that the whole fits in BUDGET seconds (default 540); a stage that would not fit is skipped and
# says so. Logs go to $OUT (default gpu-out/), one file per stage. From the repository root:
#     bash bench/gpu.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
START=$(date +%s)
BUDGET=${BUDGET:-540}
PY=${PYTHON:-python3}

stage() {  # stage NAME MAX_SECONDS COMMAND...: runs it into $OUT/NAME.log within the budget
    local name=$1 secs=$2 left t0 rc
    shift 2
    left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 30)); then echo "== $name: skipped, ${left}s of the budget left"; return; fi
    ((secs > left)) && secs=$left
    echo "== $name (at most ${secs}s): $*"
    t0=$(date +%s)
    timeout -k 5 "$secs" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - t0))s"
    tail -n "${TAIL:-40}" "$OUT/$name.log" | cut -c1-400
}

{ nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total \
    --format=csv; $PY -c "import torch, triton, transformers; print('torch', torch.__version__, \
'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} >"$OUT/env.log" 2>&1
cat "$OUT/env.log"
TILES=()
stage kernels 150 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_kernels.py
TAIL=60 stage tiles 150 $PY bench/flash_tiles.py --out "$OUT/tiles.json"
[ -f "$OUT/tiles.json" ] && TILES=(--tiles "$OUT/tiles.json")
TAIL=90 stage attention 150 $PY bench/attention.py "${TILES[@]}"
TAIL=12 stage throughput 100 $PY bench/throughput.py --batch 256 --attention sdpa,triton,triton-varlen "${TILES[@]}"
stage cuda-tests 120 $PY -m pytest -q -rfE -p no:cacheprovider tests/test_cuda.py
TAIL=12 stage throughput-compile 200 $PY bench/throughput.py --batch 256 --compile --attention sdpa,triton-varlen "${TILES[@]}"
echo "== done in $(($(date +%s) - START))s"
