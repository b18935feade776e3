#!/usr/bin/env bash
# GPU checks in one call, under 8 minutes: compiled-kernel tests, the trainer as a user runs it
# (scripts/gpu_trainer_check.py: 20 bf16 steps per case, tokens/s, MFU, peak memory against the
# traced dry run), then the kernel benchmark suite.
# Writes under $OUT (the device tool's output folder) or benchmarks/results/:
#   gpu_tests.log, trainer_gpu.json, trainer.log, kernels_gpu.json, bench.log, nvidia_smi.txt
#   run(command="bash scripts/gpu_check.sh", timeout_s=540)
# The kernels need only torch + triton + pytest (all in the GPU image); the trainer also needs
# torchdata, which the image lacks: carry its wheel in .whl/ (the device README's pip download,
# --no-deps; it is installed from there below). --quick halves the suite.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
QUICK=${1:-}

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
nvidia-smi >"$OUT_DIR/nvidia_smi.txt" 2>&1 || true
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

# 1) compiled kernels vs torch / float64 references (tests/unit/test_kernels_gpu.py), ~1-2 min
timeout 150 $PY -m pytest -q -x -p no:cacheprovider tests/unit/test_kernels_gpu.py 2>&1 | tee "$OUT_DIR/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# 2) the trainer: N·L past the grid limit (JumpReLU, BatchTopK layer/all), >= 1e5 tokens per step,
#    the stream path on the tiny Llama, and two GPUs over NCCL when there are two; ~3 min
timeout 200 $PY scripts/gpu_trainer_check.py --timeout 90 --trace batchtopk_all_NL_past_65535 \
  --out "$OUT_DIR/trainer_gpu.json" 2>&1 | tee "$OUT_DIR/trainer.log" | cut -c1-220
trainer_rc=${PIPESTATUS[0]}

# 3) the suite: ops vs dense torch and the torch fallback, with floor ratios; the whole CLT step
timeout 150 $PY scripts/benchmark_kernels.py --device cuda $QUICK --budget-s 110 --out "$OUT_DIR/kernels_gpu.json" 2>&1 \
  | tee "$OUT_DIR/bench.log" | cut -c1-220
bench_rc=${PIPESTATUS[0]}

echo "gpu_check: tests rc=$tests_rc trainer rc=$trainer_rc bench rc=$bench_rc (results in $OUT_DIR)"
exit $(( tests_rc != 0 || trainer_rc != 0 || bench_rc != 0 ))
