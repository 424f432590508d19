"""The one training loop: pretraining (stage 1, stage 2) and distillation differ only in the
step and the state they hand to `run`.

Read top to bottom: mesh -> state (restored or new, created sharded) -> the step compiled
ahead of time (memory and FLOPs printed before step 0) -> loop (data, step, metrics,
checkpoints) -> final checkpoint. Preemption: SIGTERM saves a checkpoint and returns; a
killed run resumes from its latest checkpoint, weights and data-iterator state alike, and
replays the same batches and random keys (keys are `fold_in(seed, step)`), so a resumed run is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import jax
import orbax.checkpoint as ocp

from mi_jax.parallel.mesh import with_rules
from mi_jax.train.metrics import MetricWriter


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row."""


@dataclasses.dataclass
class Job:
    """What a trainer (pretrain, distill) hands to the loop."""

    config: Any  # ml_collections.ConfigDict (saved as JSON beside each checkpoint)
    mesh: jax.sharding.Mesh
    init_state: Callable[[], Any]  # builds the first state (already sharded)
    abstract_state: Any  # jax.eval_shape of it
    state_shardings: Any
    step_fn: Callable  # (state, batch) -> (state, metrics)
    batch_shardings: Any
    data: Any  # iterator of global batches with get_state() / set_state()
    total_steps: int


# ------------------------------------------------------------------ checkpoints


def checkpoint_manager(workdir: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
    return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"), options=options)


def save(manager, step: int, state, data, config) -> None:
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data.get_state() if data is not None else {}),
            config=ocp.args.JsonSave(json.loads(config.to_json())),
        ),
    )


def restore(manager, step: int, abstract_state, shardings):
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings)
    out = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore())
    )
    return out["state"], out["data"]


# ------------------------------------------------------------------ AOT compile


def compile_step(job: Job):
    """Lowers and compiles the step on abstract inputs before step 0; prints memory and FLOPs."""
    abstract_batch = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), job.data.element_spec, job.batch_shardings
    )
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), job.abstract_state, job.state_shardings
    )
    jitted = jax.jit(job.step_fn, out_shardings=(job.state_shardings, None), donate_argnums=0)
    t0 = time.time()
    with with_rules(job.mesh):
        compiled = jitted.lower(abstract_state, abstract_batch).compile()
    report = {"compile_seconds": round(time.time() - t0, 1)}
    mem = compiled.memory_analysis()
    if mem is not None:
        gib = 1024**3
        report.update(
            arguments_gib=mem.argument_size_in_bytes / gib,
            outputs_gib=mem.output_size_in_bytes / gib,
            temporaries_gib=mem.temp_size_in_bytes / gib,
        )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost and "flops" in cost:
        report["tflops_per_step_per_device"] = cost["flops"] / 1e12
    return compiled, report


# ------------------------------------------------------------------ the loop


def run(job: Job, workdir: str, *, log=print) -> dict:
    """Trains until `job.total_steps` (or SIGTERM). Returns the last metrics (host floats)."""
    cfg = job.config
    is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    manager = checkpoint_manager(workdir, cfg.train.keep_checkpoints)

    # --- state: resume from the latest checkpoint, or start fresh
    latest = manager.latest_step()
    if latest is not None:
        state, data_state = restore(manager, latest, job.abstract_state, job.state_shardings)
        job.data.set_state(data_state)
        log(f"resumed from step {latest} ({workdir})")
    else:
        state = job.init_state()
    start = int(jax.device_get(state.step))

    # --- compile before step 0
    compiled, report = compile_step(job)
    log("compiled train step: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()))

    # --- preemption
    stop = {"flag": False}
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    writer = MetricWriter(workdir, enabled=is_main, config=cfg)
    last: dict = {}
    try:
        t_last, steps_since = time.time(), 0
        progress = writer.progress(start, job.total_steps)
        pending = None  # the previous step's NaN streak, read one step late so as not to stall
        for step in range(start, job.total_steps):
            batch = next(job.data)
            state, metrics = compiled(state, batch)
            steps_since += 1
            done = step + 1
            progress.update(1)
            if pending is not None and int(pending) >= cfg.train.nan_patience:
                raise TrainingDiverged(
                    f"{int(pending)} steps in a row had a non-finite loss or gradient (up to step {step}); "
                    "lower train.learning_rate, check the data for NaN/Inf, or raise train.nan_patience"
                )
            pending = metrics["nan_streak"]
            if done % cfg.train.log_every == 0 or done == job.total_steps:
                last = {k: float(v) for k, v in jax.device_get(metrics).items()}
                last["steps_per_second"] = steps_since / max(time.time() - t_last, 1e-9)
                t_last, steps_since = time.time(), 0
                writer.write(done, last)
                progress.set_postfix(loss=f"{last['loss']:.4f}", skipped=int(last["nan_count"]))
            if done % cfg.train.checkpoint_every == 0 or done == job.total_steps or stop["flag"]:
                save(manager, done, state, job.data, cfg)
            if stop["flag"]:
                log(f"SIGTERM: saved step {done}, exiting")
                break
            if os.environ.get("MI_JAX_FAULT_KILL_AT_STEP") == str(done):  # fault injection for tests
                os.kill(os.getpid(), signal.SIGKILL)
        progress.close()
    finally:
        manager.wait_until_finished()
        manager.close()
        writer.close()
        signal.signal(signal.SIGTERM, previous)
    last["final_step"] = int(jax.device_get(state.step))
    return last
