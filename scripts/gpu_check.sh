#!/usr/bin/env bash
# GPU checks in one call, under 8 minutes: compiled-kernel tests, then the kernel benchmark suite.
# Writes under $OUT (the device tool's output folder) or benchmarks/results/:
#   gpu_tests.log, kernels_gpu.json, bench.log, nvidia_smi.txt
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)
# Needs only torch + triton + pytest (all in the GPU image); --quick halves the suite.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
QUICK=${1:-}

nvidia-smi >"$OUT_DIR/nvidia_smi.txt" 2>&1 || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# 1) compiled kernels vs torch / float64 references (tests/unit/test_kernels_gpu.py), ~1-2 min
timeout 200 $PY -m pytest -q -x -p no:cacheprovider tests/unit/test_kernels_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# 2) the suite: ops vs dense torch and the torch fallback, with floor ratios; the whole CLT step
timeout 330 $PY scripts/benchmark_kernels.py --device cuda $QUICK --budget-s 240 --out "$OUT_DIR/kernels_gpu.json" 2>&1 \
  | tee "$OUT_DIR/bench.log" | cut -c1-220
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc bench rc=$bench_rc (results in $OUT_DIR)"
exit $(( tests_rc != 0 || bench_rc != 0 ))
