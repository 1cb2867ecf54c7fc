#!/bin/bash
# Every GPU check of this project in one run, for a GPU machine that is lent for minutes:
# the CUDA tests, the CUDA benchmark suite (docs/benchmarks.md's CUDA section) and the memory
# model's CUDA validation. Each step has its own time limit, so a slow one cannot starve the
# rest; results are copied to $OUT (default: work_dirs/gpu_checks).
#
#   bash bench/gpu_checks.sh            # on the GPU machine, from the repository root
#   DEVICE=cpu QUICK=1 bash bench/gpu_checks.sh   # smoke test of the script itself on a CPU
set -u
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-work_dirs/gpu_checks}
PY=${PY:-python}
mkdir -p "$OUT"
log() { echo "[$(date -u +%H:%M:%S)] $*" | tee -a "$OUT/steps.log"; }

log "device $DEVICE"
$PY -c "import torch; print(torch.__version__, torch.cuda.is_available() and torch.cuda.get_device_name(0))" \
    2>&1 | tee -a "$OUT/steps.log"

if [ "$DEVICE" = cuda ]; then
    # test_cuda.py whole, and the CUDA tests of the margin heads and of fc_state_dtype (-k matches
    # the module name too, so every test of test_cuda.py is selected).
    log "CUDA tests"
    timeout 180 $PY -m pytest -q tests/test_cuda.py tests/test_margins.py tests/test_fc_state_dtype.py -k cuda \
        > "$OUT/test_cuda.log" 2>&1
    log "tests: rc $?"
fi

log "benchmark suite"
if [ -n "${QUICK:-}" ]; then
    timeout 300 $PY bench/run_all.py --device "$DEVICE" --quick --only partial_fc_chunked > "$OUT/bench.log" 2>&1
else
    timeout 420 $PY bench/run_all.py --device "$DEVICE" > "$OUT/bench.log" 2>&1
fi
log "bench: rc $?"

if [ -z "${QUICK:-}" ]; then
    log "memory model validation"
    timeout 120 $PY bench/memory_model.py --validate --full --device "$DEVICE" --json "$OUT/memory_validation.json" \
        > "$OUT/memory_model.log" 2>&1
    log "memory model: rc $?"
fi

cp -r docs/bench_results docs/benchmarks.md docs/*.png "$OUT/" 2>/dev/null
[ -d bench/results ] && cp -r bench/results "$OUT/quick_results"
log "done: $OUT"
