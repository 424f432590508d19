"""Multi-process start-up: one call at the top of every entry point, before any JAX work.

- Local launcher (launch/local.py) and generic clusters: `MI_JAX_COORDINATOR=host:port`,
  `MI_JAX_NUM_PROCESSES`, `MI_JAX_PROCESS_ID` (and, for CPU runs, `MI_JAX_CPU_DEVICES`).
- SLURM: `jax.distributed.initialize()` detects everything by itself (one process per GPU:
  its auto-detection gives each process its local GPU only, `local_device_ids=[SLURM_LOCALID]`).
- Otherwise: a single process.
"""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> None:
    cpu_devices = os.environ.get("MI_JAX_CPU_DEVICES")
    if cpu_devices:
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    coordinator = os.environ.get("MI_JAX_COORDINATOR")
    if coordinator:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["MI_JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["MI_JAX_PROCESS_ID"]),
        )
    elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        jax.distributed.initialize()
