# XLA / JAX settings for NVIDIA H100 nodes. Source it before launching (bash):
#
#     source launch/xla_flags.sh [h100|h100-single|none]   # default h100 (8 GPUs per node)
#
# Appends to XLA_FLAGS (your own flags stay). Every flag name below is parsed by the XLA in
# jax 0.10.2 (an unknown name aborts XLA at start-up; tests/test_plan.py checks this file), but
# the values are starting points taken from public docs, not tuned on this model: measure with
# benchmarks/gpu_window.py and a few training steps before keeping them.
#
# Sources:
#  [jax]  JAX docs, "GPU performance tips" (docs.jax.dev/en/latest/gpu_performance_tips.html)
#  [nv]   NVIDIA JAX-Toolbox, rosetta/docs/GPU_performance.md ("Tips for High-Performance LLMs
#         with JAX and XLA"); the JAX-Toolbox container bakes in the latency hiding scheduler.
#  [runs] public multi-GPU run scripts that size the combine thresholds as 1 GiB divided by the
#         number of GPUs (reduce-scatter: by 2x that); unverified for this model.

_mi_preset="${1:-h100}"
_mi_gpn="${MI_JAX_GPUS_PER_NODE:-8}"
_mi_nodes="${SLURM_NNODES:-${MI_JAX_NUM_NODES:-1}}"
_mi_gpus=$((_mi_gpn * _mi_nodes))
_mi_threshold=1073741824  # 1 GiB

_mi_flags=""
case "$_mi_preset" in
  h100)
    # overlap collectives with compute: schedule async collectives early [jax][nv]
    _mi_flags+=" --xla_gpu_enable_latency_hiding_scheduler=true"
    _mi_flags+=" --xla_gpu_enable_highest_priority_async_stream=true"  # [nv]
    # FSDP: prefetch the next layer's all-gather / pipeline reduce-scatter across scan steps [nv]
    _mi_flags+=" --xla_gpu_enable_pipelined_all_gather=true"
    _mi_flags+=" --xla_gpu_enable_pipelined_reduce_scatter=true"
    _mi_flags+=" --xla_gpu_enable_pipelined_all_reduce=true"
    _mi_flags+=" --xla_gpu_enable_while_loop_double_buffering=true"
    # fewer, larger collectives: combine per-parameter gathers / scatters up to these sizes [nv][runs]
    _mi_flags+=" --xla_gpu_all_reduce_combine_threshold_bytes=${_mi_threshold}"
    _mi_flags+=" --xla_gpu_all_gather_combine_threshold_bytes=$((_mi_threshold / _mi_gpus))"
    _mi_flags+=" --xla_gpu_reduce_scatter_combine_threshold_bytes=$((_mi_threshold / (_mi_gpus * 2)))"
    _mi_flags+=" --xla_gpu_enable_all_gather_combine_by_dim=false"  # [nv]
    _mi_flags+=" --xla_gpu_enable_reduce_scatter_combine_by_dim=false"  # [nv]
    ;;
  h100-single)
    # one GPU (benchmarks/gpu_window.py): no collectives to overlap; only the memory setting
    ;;
  none)
    ;;
  *)
    echo "xla_flags.sh: unknown preset '$_mi_preset' (h100, h100-single, none)" >&2
    return 2 2>/dev/null || exit 2
    ;;
esac

export XLA_FLAGS="${XLA_FLAGS:-}${_mi_flags}"
# let XLA take 90% of each GPU; the rest is for cuDNN / NCCL workspaces [nv]
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
unset _mi_preset _mi_gpn _mi_nodes _mi_gpus _mi_threshold _mi_flags
