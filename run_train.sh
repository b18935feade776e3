#!/usr/bin/env bash
# Launch training through torchrun, one node or many.
#   ./run_train.sh                                  the CPU demo (train_configs/demo_smollm2_clt.toml)
#   ./run_train.sh --config FILE [--section.field=value ...]
#   NGPU=8 NNODES=4 NODE_RANK=0 MASTER_ADDR=host0 ./run_train.sh --config train_configs/clt_8b.toml
# Environment: NGPU (processes per node, default 1), NNODES (default 1), NODE_RANK (default 0),
# MASTER_ADDR / MASTER_PORT (rendezvous, default localhost:29500), RDZV_ID (job id for rendezvous),
# PYTHON (interpreter; default .venv/bin/python when present), MAX_RESTARTS (how often torchrun
# restarts every node's workers after a crash, a killed worker, a lost node or a hang; each restart
# resumes from the last complete checkpoint; default 3 on several nodes, 0 on one), LOG_RANK.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-}
if [[ -z $PYTHON ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! "$PYTHON" -c "import torchtitan_clt" 2>/dev/null; then
  echo "torchtitan_clt is not installed for $PYTHON: run scripts/setup.sh first." >&2
  exit 1
fi

args=("$@")
has_config=0
for a in "${args[@]+"${args[@]}"}"; do
  case $a in --config|--config=*|--help|-h) has_config=1;; esac
done
[[ $has_config == 1 ]] || args=(--config "${CONFIG_FILE:-train_configs/demo_smollm2_clt.toml}" "${args[@]+"${args[@]}"}")

if [[ " ${args[*]} " == *" --help "* || " ${args[*]} " == *" -h "* ]]; then
  exec "$PYTHON" -m torchtitan_clt.train --help
fi
# Check the config before any worker starts (no torch import: well under a second); a bad field,
# value or file prints one line and exits 2 (exit codes: README, "Exit codes").
# Exit 3: the run folder holds this run finished (the check said so): nothing to do, exit 0.
"$PYTHON" -m torchtitan_clt.prelaunch "${args[@]}" || { rc=$?; [[ $rc == 3 ]] && exit 0; exit $rc; }

NGPU=${NGPU:-1}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ $NNODES == 1 ]]; then MAX_RESTARTS=${MAX_RESTARTS:-0}; else MAX_RESTARTS=${MAX_RESTARTS:-3}; fi

if [[ $NNODES == 1 ]]; then
  rdzv=(--standalone)
else
  rdzv=(--nnodes "$NNODES" --node-rank "$NODE_RANK" --rdzv-backend c10d
        --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-torchtitan_clt}")
fi

export PYTHONUNBUFFERED=1
# glibc returns large freed blocks to the OS at once, so every step's fresh gradients fault their
# pages in again; raising the thresholds keeps them mapped (a large win for CPU training).
export MALLOC_MMAP_THRESHOLD_=${MALLOC_MMAP_THRESHOLD_:-4294967296}
export MALLOC_TRIM_THRESHOLD_=${MALLOC_TRIM_THRESHOLD_:-4294967296}
# NCCL: on a collective timeout (parallelism.train_timeout_s) the flight recorder dumps each rank's
# last collectives to $TORCH_FR_DUMP_TEMP_FILE<rank> (read them with
# `python -m torch.distributed.flight_recorder.fr_trace DIR`); gloo runs have tools/watchdog.py.
if command -v nvidia-smi >/dev/null; then
  export TORCH_FR_BUFFER_SIZE=${TORCH_FR_BUFFER_SIZE:-2000}
  export TORCH_NCCL_DUMP_ON_TIMEOUT=${TORCH_NCCL_DUMP_ON_TIMEOUT:-1}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  if [[ -z ${TORCH_FR_DUMP_TEMP_FILE:-} ]]; then
    export TORCH_FR_DUMP_TEMP_FILE=${TMPDIR:-/tmp}/torchtitan_clt_nccl_trace_${RDZV_ID:-$$}/rank_
    mkdir -p "$(dirname "$TORCH_FR_DUMP_TEMP_FILE")"
  fi
fi
# torchtitan_clt.tools.launch is torchrun (same options) that exits with the worker's code without
# a traceback, forwards SIGTERM / SIGUSR1 to the workers (which save and exit with 75), and
# restarts the workers after a failure, but never after a config error (exit codes: README).
exec "$PYTHON" -m torchtitan_clt.tools.launch --nproc-per-node "$NGPU" "${rdzv[@]}" \
  --max-restarts "$MAX_RESTARTS" \
  --local-ranks-filter "${LOG_RANK:-0}" --role rank --tee 3 \
  -m torchtitan_clt.train "${args[@]}"
