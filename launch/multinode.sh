#!/bin/bash
# Generic multi-node launcher (no SLURM): run it once per node, with the same command.
#
#     MI_JAX_COORDINATOR=node0:12345 MI_JAX_NUM_NODES=2 MI_JAX_NODE_RANK=0 \
#         launch/multinode.sh mi-jax train --config configs/magicinfinite.py:full,stage2 --workdir runs/s2
#     (the same on node1 with MI_JAX_NODE_RANK=1)
#
# Starts one process per local GPU (MI_JAX_GPUS_PER_NODE, default: nvidia-smi's count), each
# seeing only its own GPU and given MI_JAX_COORDINATOR / MI_JAX_NUM_PROCESSES /
# MI_JAX_PROCESS_ID, which mi_jax.parallel.distributed.maybe_initialize passes to
# jax.distributed.initialize(). Process 0 (node rank 0, local GPU 0) hosts the coordinator, so
# MI_JAX_COORDINATOR must name node 0 and a free port. One process per GPU mirrors the SLURM
# template. Logs: MI_JAX_LOG_DIR (default ./logs)/process_<id>.log. If one process fails, the
# others on this node are stopped and its exit code is returned.
set -euo pipefail

: "${MI_JAX_COORDINATOR:?set MI_JAX_COORDINATOR=host:port of node 0}"
nodes="${MI_JAX_NUM_NODES:?set MI_JAX_NUM_NODES}"
rank="${MI_JAX_NODE_RANK:?set MI_JAX_NODE_RANK (0 .. MI_JAX_NUM_NODES-1)}"
gpus="${MI_JAX_GPUS_PER_NODE:-$(nvidia-smi --list-gpus | wc -l)}"
logs="${MI_JAX_LOG_DIR:-logs}"
if [ "$#" -eq 0 ]; then
  echo "usage: launch/multinode.sh COMMAND ... (e.g. mi-jax train --config ... --workdir ...)" >&2
  exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MI_JAX_NUM_NODES="$nodes" source "$here/xla_flags.sh" "${MI_JAX_XLA_PRESET:-h100}"
mkdir -p "$logs"

pids=()
for ((local_id = 0; local_id < gpus; local_id++)); do
  pid_global=$((rank * gpus + local_id))
  CUDA_VISIBLE_DEVICES="$local_id" MI_JAX_NUM_PROCESSES=$((nodes * gpus)) MI_JAX_PROCESS_ID="$pid_global" \
    "$@" > "$logs/process_${pid_global}.log" 2>&1 &
  pids+=("$!")
done
echo "node $rank: started ${#pids[@]} processes (ids $((rank * gpus))..$((rank * gpus + gpus - 1))), logs in $logs/"

# wait for all; on the first failure stop this node's other processes (only the ones started here)
status=0
for _ in "${pids[@]}"; do
  wait -n || { status=$?; break; }
done
if [ "$status" -ne 0 ]; then
  echo "node $rank: a process failed (exit $status); stopping the others" >&2
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
fi
wait || true
exit "$status"
