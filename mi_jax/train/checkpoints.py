"""Reading parameters out of another run's checkpoints (stage 2 starts from stage 1; the
distilled student from the teacher; export and generation read the EMA or the raw weights)."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


def latest_checkpoint(run_dir: str) -> tuple[str, int]:
    """`(checkpoint folder, step)` of a run's newest finished checkpoint."""
    root = os.path.join(os.path.abspath(run_dir), "checkpoints")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{run_dir}: no checkpoints/ folder; is this an mi_jax run folder (--workdir)?")
    with ocp.CheckpointManager(root) as manager:
        step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"{run_dir}: no finished checkpoint in {root}")
    return root, step


def load_run_params(run_dir: str, abstract_params, shardings, *, which: str = "params"):
    """The `params` (or `ema`) tree of the latest checkpoint of `run_dir`, restored straight
    into `shardings` (the rest of the saved train state is not read)."""
    return load_run_tree(run_dir, {which: abstract_params}, {which: shardings})[which]


def load_run_tree(run_dir: str, abstract: dict, shardings: dict) -> dict:
    """Any sub-tree of the latest saved state (e.g. `{"base": ..., "gen": {"params": ...}}` of
    a distillation run), restored into `shardings`; nothing else is read."""
    root, step = latest_checkpoint(run_dir)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    restore_args = ocp.checkpoint_utils.construct_restore_args(target)
    with ocp.CheckpointManager(root) as manager:
        out = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)))
    return out["state"]


def load_run_config(run_dir: str):
    """The ml_collections config saved beside a run's latest checkpoint."""
    import ml_collections

    root, step = latest_checkpoint(run_dir)
    with ocp.CheckpointManager(root) as manager:
        out = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return ml_collections.ConfigDict(out["config"])
