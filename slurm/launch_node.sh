#!/usr/bin/env bash
# One node's part of a harness job: started by `srun` once per node (see train_*.sbatch), never by hand.
#
#   srun --ntasks-per-node=1 bash slurm/launch_node.sh CONFIG [KEY=VALUE ...]
#
# Every value that differs between nodes is read HERE, inside the task on that node: a $SLURM_NODEID
# expanded once on the submitting node would make every node believe it is rank 0 (the rendezvous then
# times out). Environment: LAUNCH_CONFIG (accelerate config), GPUS_PER_NODE, MAIN_PORT.
set -euo pipefail
# USR1/TERM go to the launcher's children, the training processes, which checkpoint and exit 0 on them (the
# launcher itself dies on USR1). The traps are set first: a signal that came before them would end this
# script with status 138 and lose the job.
launcher=
# shellcheck disable=SC2317  # called from the traps below
forward() { [ -z "$launcher" ] || pkill "-$1" -P "$launcher" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM

CONFIG=${1:?usage: launch_node.sh CONFIG [KEY=VALUE ...]}
shift
LAUNCH_CONFIG=${LAUNCH_CONFIG:-launch_configs/accelerate/multi_gpu.yaml}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
NODE_RANK=${SLURM_NODEID:?launch_node.sh runs inside a Slurm task (SLURM_NODEID is unset)}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads all: no SIGPIPE under pipefail
MAIN_PORT=${MAIN_PORT:-29500}

launch=(accelerate launch --config_file "$LAUNCH_CONFIG"
        --num_machines "$NNODES" --num_processes $((NNODES * GPUS_PER_NODE))
        --machine_rank "$NODE_RANK" --main_process_ip "$HEAD_NODE" --main_process_port "$MAIN_PORT"
        -m harness train --config "$CONFIG" "$@")
echo "node $NODE_RANK ($(hostname)): ${launch[*]}"

"${launch[@]}" &
launcher=$!
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher" || true   # returns early (138) when a trapped signal arrives: keep waiting
done
wait "$launcher" && status=0 || status=$?   # the launcher's own exit status, which bash keeps
exit "$status"
