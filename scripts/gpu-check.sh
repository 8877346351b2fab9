#!/usr/bin/env bash
# On a machine with a CUDA GPU and a CUDA build of torch: the GPU tests, then the GPU benchmarks.
# Logs and results go to $OUT (default gpu-out/). From the repository root:
#     bash scripts/gpu-check.sh            # tests, `diagssm bench --device cuda`, the backends by dtype
#     bash scripts/gpu-check.sh tests      # the tests only
# The package runs from src/ (PYTHONPATH), so nothing needs installing beyond torch, pytest, pyyaml
# and tqdm (matplotlib for the plot). Each step has its own time limit; a failed step does not
# stop the others, and the script's exit status is the number of failed steps.
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
failed=0
step() {  # step SECONDS LOG COMMAND...: run COMMAND with a time limit, its output to LOG and the terminal
    local limit=$1 log=$2
    shift 2
    echo "== $* (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "== FAILED (rc $rc): $*"; failed=$((failed + 1)); }
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())" \
    | tee -a "$OUT/gpu.txt"
step 240 tests.log $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
if [ "${1:-all}" != tests ]; then
    step 300 layers-gpu.md $PY -m diagssm bench --device cuda --inline --repeats 10 --max-gb 60 \
        --json "$OUT/layers-gpu.json" --plot "$OUT/layers-gpu.png"
    step 150 backends-gpu.md $PY benchmarks/bench_backends.py --device cuda --repeats 10 \
        --lengths 1024 4096 16384 65536
fi
exit $failed
