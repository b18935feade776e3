#!/usr/bin/env bash
# Multi-node training under SLURM: one task per node, each running ./run_train.sh (torchrun with
# NGPU processes); node 0 hosts the c10d rendezvous.
#   sbatch --nodes=4 scripts/slurm_train.sh --config train_configs/clt_8b.toml [--section.field=value ...]
# Environment: NGPU (GPUs per node, default: SLURM_GPUS_ON_NODE or 8), MASTER_PORT (default 29500),
# PYTHON (interpreter, as for run_train.sh), MAX_RESTARTS (in-place restarts of every node's workers
# after a crash, a lost node or a hang, default 3: run_train.sh), MAX_REQUEUES (requeues after a
# failure that the restarts did not cure, default 10, counted by SLURM_RESTART_COUNT; a preemption's
# requeue is not limited), SIGNAL_LEAD_S (the seconds of --signal below, default 120: the trainer
# warns when a checkpoint save takes longer). Run it from the repository root (sbatch keeps the cwd).
#SBATCH --job-name=torchtitan_clt
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=slurm-%x-%j.out
# Two minutes before the time limit SLURM sends USR1 to this script (B:), which forwards it to the
# training: it finishes its step, saves a checkpoint and exits with 75; the job is then requeued
# and the same command resumes from that checkpoint. If a save takes longer (metrics.jsonl's
# checkpoint rows, scripts/estimate_memory.py's save-time line), ask for the signal earlier:
#   SIGNAL_LEAD_S=300 sbatch --signal=B:USR1@300 --nodes=4 scripts/slurm_train.sh --config ...
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
set -euo pipefail

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  echo "scripts/slurm_train.sh is meant for sbatch (sbatch --nodes=N scripts/slurm_train.sh --config FILE);" \
       "on one machine use ./run_train.sh." >&2
  exit 1
fi
ROOT=${SLURM_SUBMIT_DIR:-$(pwd)}
if [[ ! -x $ROOT/run_train.sh ]]; then
  echo "run_train.sh not found in $ROOT: submit from the repository root." >&2
  exit 1
fi

export NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
export NGPU=${NGPU:-${SLURM_GPUS_ON_NODE:-8}}
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-29500}
export RDZV_ID=${RDZV_ID:-$SLURM_JOB_ID}
# NCCL: fail fast instead of hanging when a rank dies; the collective timeouts are
# parallelism.init_timeout_s / train_timeout_s, and run_train.sh turns on the flight recorder.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export MAX_RESTARTS=${MAX_RESTARTS:-3}
MAX_REQUEUES=${MAX_REQUEUES:-10}
SIGNAL_LEAD_S=${SIGNAL_LEAD_S:-120}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

echo "torchtitan_clt: $NNODES nodes × $NGPU GPUs, rendezvous $MASTER_ADDR:$MASTER_PORT (job $SLURM_JOB_ID)"
# One srun task per node; SLURM_NODEID is that node's rank. srun runs in the background so that
# this shell can take SLURM's signal and pass it on (srun forwards it to every task).
srun --ntasks="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 \
  bash -c 'NODE_RANK=$SLURM_NODEID exec "'"$ROOT"'/run_train.sh" "$@"' _ \
  "--checkpoint.signal_lead_s=$SIGNAL_LEAD_S" "$@" &
srun_pid=$!
forward() { echo "torchtitan_clt: got $1, asking the run to save and stop"; kill -"$1" "$srun_pid" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
rc=0
# `wait` returns early (> 128) when a trapped signal arrives: wait again until srun has ended.
while true; do
  wait "$srun_pid" && rc=0 || rc=$?
  kill -0 "$srun_pid" 2>/dev/null || break
done
# Exit codes (README, tools/exit_codes.py): 75 stopped by the signal after saving; 2 config or
# input, 3 non-finite training: a relaunch would fail the same way; anything else is a failure
# that torchrun's restarts (MAX_RESTARTS) did not cure (a node lost for good, restarts used up):
# the job is requeued, on other nodes if SLURM picks them, and resumes from its last checkpoint.
requeues=${SLURM_RESTART_COUNT:-0}
if [[ $rc == 75 ]]; then
  echo "torchtitan_clt: checkpoint saved; requeueing job $SLURM_JOB_ID to resume"
  scontrol requeue "$SLURM_JOB_ID"
elif [[ $rc == 0 || $rc == 2 || $rc == 3 ]]; then
  [[ $rc == 0 ]] || echo "torchtitan_clt: exit $rc (config, input or non-finite training): not requeueing"
elif (( requeues < MAX_REQUEUES )); then
  echo "torchtitan_clt: the run failed with exit $rc; requeueing job $SLURM_JOB_ID" \
       "(requeue $((requeues + 1))/$MAX_REQUEUES) to resume from its last complete checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
else
  echo "torchtitan_clt: the run failed with exit $rc after $requeues requeues (MAX_REQUEUES): giving up"
fi
exit "$rc"
