#!/usr/bin/env bash
# The GPU checks of the GPU serving path (docs/gpu.md), as one script for a session that has a CUDA GPU.
#
#   scripts/gpu_check.sh                      # writes into $OUT (the device tool's folder) or docs/
#   SHAPES=3b,8b CONTEXTS=2048 scripts/gpu_check.sh
#
# 1. the CUDA-only tests (CUDA-graph replay, the engine bench on the GPU, a bf16 load onto the GPU);
# 2. `trimode bench gpu` at the 8B shape: engine steps at 1 / 16 / 64 requests, every mode, 2K and 8K context,
#    against the weight + KV bandwidth / compute floor, plus the load_model memory check (a 3B checkpoint).
# The bench rewrites its report after every cell, so a run stopped by BENCH_TIMEOUT keeps the rows it measured.
# Uses the machine's python3 (PYTHON=...) with this checkout on PYTHONPATH: nothing is installed.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-docs}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
    "$py" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.is_available())"
} 2>&1 | tee "$out/gpu-env.txt"

timeout "${TEST_TIMEOUT:-300}" "$py" -m pytest -q -rs -p no:cacheprovider \
    tests/test_bench_gpu.py tests/test_loading.py 2>&1 | tail -20 | tee "$out/gpu-tests.txt"

timeout "${BENCH_TIMEOUT:-420}" "$py" -m trimode.cli bench gpu --shapes "${SHAPES:-8b}" \
    --contexts "${CONTEXTS:-2048,8192}" --requests "${REQUESTS:-1,16,64}" ${EXTRA:-} \
    --out "$out/gpu-bench.md" 2>&1 | tail -60 | tee "$out/gpu-bench-log.txt"
echo "bench exit status ${PIPESTATUS[0]} (124: stopped by BENCH_TIMEOUT; the report keeps the cells it finished)"
