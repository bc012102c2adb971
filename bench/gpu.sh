#!/usr/bin/env bash
# Every check and figure that needs a CUDA GPU, in one call, in order of priority: the kernel
# tests (fp32 and the model), the end-to-end CUDA tests, the kernels' bf16/fp16 tests, the tile
# sweep, attention against SDPA, training throughput against transformers, then the same
# throughput under torch.compile. Each stage is bounded so that the whole fits in BUDGET seconds
# (default 540); a stage that would not fit is skipped and says so. ONLY="kernels throughput"
# runs just those stages; TILES_JSON=FILE gives the benches a tile table when the sweep does not
# run (bench/tiles-h200.json: the sweep of 2026-12-04). A stage that runs out of time gets SIGINT
# first, so pytest still prints its failures. Logs go to $OUT (default gpu-out/), one file per
# stage, at most 8 files. From the repository root:
#     bash bench/gpu.sh
set -u
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
rm -f "$OUT/tiles.json"  # a sweep of an earlier run must not stand in for TILES_JSON
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
START=$(date +%s)
BUDGET=${BUDGET:-540}
ONLY=${ONLY:-}
PY=${PYTHON:-python3}
PYTEST=($PY -m pytest -q -rfE --tb=short -p no:cacheprovider)

stage() {  # stage NAME MAX_SECONDS COMMAND...: runs it into $OUT/NAME.log within the budget
    local name=$1 secs=$2 left t0 rc
    shift 2
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
    left=$((BUDGET - ($(date +%s) - START)))
    if ((left < 30)); then echo "== $name: skipped, ${left}s of the budget left"; return; fi
    ((secs > left)) && secs=$left
    echo "== $name (at most ${secs}s): $*"
    t0=$(date +%s)
    timeout -s INT -k 20 "$secs" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - t0))s"
    tail -n "${TAIL:-40}" "$OUT/$name.log" | cut -c1-400
}

nvidia-smi -L
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)"
TILES=()
stage kernels 150 "${PYTEST[@]}" tests/test_kernels.py -k "not low_precision"
stage cuda-tests 180 "${PYTEST[@]}" tests/test_cuda.py
stage kernels-lowp 180 "${PYTEST[@]}" tests/test_kernels.py -k low_precision
TAIL=60 stage tiles 150 $PY bench/flash_tiles.py --out "$OUT/tiles.json"
# the sweep's winners if it ran; else TILES_JSON, e.g. bench/tiles-h200.json (2026-12-04's sweep)
[ -f "$OUT/tiles.json" ] && TILES_JSON="$OUT/tiles.json"
[ -n "${TILES_JSON:-}" ] && TILES=(--tiles "$TILES_JSON")
TAIL=90 stage attention 120 $PY bench/attention.py "${TILES[@]}"
TAIL=12 stage throughput 200 $PY bench/throughput.py --batch 256 --attention sdpa,triton,triton-varlen "${TILES[@]}"
TAIL=12 stage throughput-compile 300 $PY bench/throughput.py --batch 256 --compile --attention sdpa,triton-varlen "${TILES[@]}"
echo "== done in $(($(date +%s) - START))s"
