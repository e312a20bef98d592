#!/usr/bin/env bash
# The body of slurm/train_single_node.sbatch and slurm/train_multi_node.sbatch (they exec it, so this
# process is the batch shell Slurm signals). Runs `harness plan`, one launcher per node through srun,
# forwards USR1 to the training processes, and requeues the job unless training finished.
set -uo pipefail

CONFIG=${1:?usage: sbatch slurm/train_multi_node.sbatch CONFIG [KEY=VALUE ...] (or train_single_node.sbatch)}
shift
export LAUNCH_CONFIG=${LAUNCH_CONFIG:-launch_configs/accelerate/multi_gpu.yaml}
export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
export MAIN_PORT=${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export TOKENIZERS_PARALLELISM=false  # no tokenizer threads forked into dataloader workers
# Optional settings real clusters often need:
# export NCCL_DEBUG=INFO                  # see which interface and transport NCCL picks; first stop for hangs
# export NCCL_SOCKET_IFNAME=ib0           # the interface the nodes reach each other on (e.g. ib0, eth0)
# export NCCL_IB_DISABLE=1                # no InfiniBand: use TCP sockets
# export HF_HOME=/shared/cache/huggingface         # models and datasets cache on shared storage
# export HF_DATASETS_CACHE=/shared/cache/datasets  # tokenized data reused by every node and every requeue

echo "job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NUM_NODES:-?} node(s): $SLURM_JOB_NODELIST"
python -m harness plan --config "$CONFIG" --launch-config "$LAUNCH_CONFIG" "$@" || exit $?

preempted=0
step=
# srun passes USR1 on to the task on every node (slurm/launch_node.sh), which passes it to the ranks
trap 'preempted=1; echo "USR1: asking the training processes to checkpoint"; [ -n "$step" ] && kill -USR1 "$step"' USR1
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash slurm/launch_node.sh "$CONFIG" "$@" &
step=$!
while kill -0 "$step" 2>/dev/null; do
  wait "$step" || true   # returns early (138) when the USR1 trap runs: keep waiting
done
wait "$step" && status=0 || status=$?   # srun's own exit status, which bash keeps (not the 138 of a cut-short wait)

# the run folder decides whether the run is finished (harness/run_folder.py), not this script
run_status=$(python -m harness plan --config "$CONFIG" --status "$@" 2>/dev/null | tail -n 1)
if [ "$run_status" = finished ]; then
  echo "training finished: $(python -m harness plan --config "$CONFIG" --get train.output_dir "$@")/final"
  exit 0
fi
if [ "$preempted" = 1 ] && [ "$status" = 0 ]; then
  echo "checkpoint written; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
# any other failure (exit codes: harness/errors.py): the run folder says why, and nothing is requeued
out_dir=$(python -m harness plan --config "$CONFIG" --get train.output_dir "$@" 2>/dev/null)
reason=
if [ -n "$out_dir" ] && [ -f "$out_dir/stop_reason.txt" ]; then reason=": $(head -n 1 "$out_dir/stop_reason.txt")"; fi
echo "training stopped with status $status and no final model$reason; not requeueing"
exit "$status"
