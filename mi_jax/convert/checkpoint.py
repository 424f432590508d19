"""Reading mi_jax checkpoints: one reader for training runs, distillation runs and
import_weights folders (they share a layout), used by training (init from a run), the
pipeline, export and import.

    <run>/checkpoints/<step>/state/    the saved train state: {"params", "ema", "opt_state", ...}
                                       ({"params": {"base", "lora"}, ...} for a LoRA run,
                                       {"base", "gen": {"params"}, ...} for a DMD2 run;
                                       an import folder: {"params", "vae", "wav2vec2"})
    <run>/checkpoints/<step>/config/   JSON: the run's ml_collections config (an import's configs)

Only the sub-tree asked for is read, straight into its shardings (or as host numpy arrays).
The EMA overlay (`which="ema"`) is decided by the checkpoint itself: leaves whose EMA was saved
take it, frozen leaves (saved as None) keep their params.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import linen as nn
from flax import traverse_util

from mi_jax.convert.hunyuan import abstract_dit_params
from mi_jax.convert.safetensors_io import CheckpointError
from mi_jax.models.dit_config import DiTConfig
from mi_jax.nn.lora import lora_apply, lora_run_layout, lora_shardings, merge_run
from mi_jax.parallel.mesh import DEFAULT_RULES, logical_shardings


def step_dir(path: str) -> str:
    """The checkpoint step folder of `path`.

    Args:
      path: an import folder or a training run (its newest finished step), or a step folder
        itself (`<run>/checkpoints/<step>`).

    Returns:
      The absolute step folder.

    Raises:
      CheckpointError: `path` holds no finished checkpoint (with a hint for a diffusers folder).
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "state")) and os.path.isdir(os.path.join(path, "config")):
        return path
    root = os.path.join(path, "checkpoints")
    # orbax writes a step under a temporary name and renames it when finished: digits = finished
    steps = sorted(
        (int(n) for n in os.listdir(root) if n.isdigit() and os.path.exists(os.path.join(root, n, "state")))
        if os.path.isdir(root) else []
    )
    if not steps:
        hint = ""
        if os.path.exists(os.path.join(path, "config.json")):
            hint = " It looks like a diffusers/transformers folder: run import_weights (mi-jax import-weights) first."
        raise CheckpointError(
            f"{path}: not an mi_jax checkpoint (no checkpoints/<step>/state inside). Pass an "
            f"import-weights output, a training run folder (--workdir) or a checkpoints/<step> folder.{hint}"
        )
    return os.path.join(root, str(steps[-1]))


def latest_checkpoint(run_dir: str) -> tuple[str, int]:
    """`(checkpoints folder, step)` of a run's newest finished checkpoint."""
    step = step_dir(run_dir)
    return os.path.dirname(step), int(os.path.basename(step))


def read_config(step: str) -> dict:
    """The JSON `config` item of a checkpoint step (a run's config, or an import's configs)."""
    return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(step, "config")))


def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
    """The ml_collections config saved beside a run's latest checkpoint.

    Raises:
      CheckpointError: `run_dir` holds no finished checkpoint.
    """
    return ml_collections.ConfigDict(read_config(step_dir(run_dir)))


def state_metadata(step: str) -> dict:
    """Shape/dtype metadata of the saved state tree (leaves: ArrayMetadata, or None)."""
    return ocp.StandardCheckpointHandler().metadata(epath.Path(os.path.join(step, "state"))).tree


def restore_state(step: str, target: Mapping, shardings: Mapping | None = None) -> dict:
    """Restores the sub-tree `target` (leaves: anything with .shape/.dtype) of the state.

    shardings: None -> host numpy arrays (export reads them one tensor at a time); else a tree
    like `target` of shardings -> jax arrays placed there. Other leaves are not read at all.
    """
    if shardings is None:
        args = jax.tree.map(lambda s: ocp.RestoreArgs(restore_type=np.ndarray, dtype=s.dtype), target)
        item = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), target)
    else:
        item = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
        args = ocp.checkpoint_utils.construct_restore_args(item)
    restore = ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True)
    with ocp.PyTreeCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(step, "state"), args=restore)


def load_run_tree(run_dir: str, abstract: Mapping, shardings: Mapping | None) -> dict:
    """Any sub-tree of the latest saved state (e.g. `{"base": ..., "gen": {"params": ...}}` of
    a distillation run), restored into `shardings`; nothing else is read."""
    return restore_state(step_dir(run_dir), abstract, shardings)


def load_run_params(run_dir: str, abstract_params, shardings, *, which: str = "params"):
    """The saved `params` (or `ema`) tree of the latest checkpoint of `run_dir`, restored
    straight into `shardings` (the rest of the saved train state is not read)."""
    return load_run_tree(run_dir, {which: abstract_params}, {which: shardings})[which]


def restore_weights(step: str, abstract: Mapping, shardings: Mapping | None = None, *, which: str = "params"):
    """The parameters of checkpoint `step`, from its params or its EMA.

    Args:
      step: a checkpoint step folder (`step_dir`).
      abstract: the params tree to read (leaves with `.shape` / `.dtype`).
      shardings: as `restore_state` (default None: host numpy arrays).
      which: "params" (default), or "ema": every leaf the run kept an EMA of (its trainable
        ones) from the EMA, the rest (frozen) from the params.

    Returns:
      The tree `abstract` describes, restored.

    Raises:
      ValueError: `which` is neither "params" nor "ema".
      CheckpointError: `which="ema"` and the checkpoint holds no EMA weights.
    """
    if which not in ("params", "ema"):
        raise ValueError(f"which={which!r}; choose 'params' or 'ema'")
    flat = traverse_util.flatten_dict(abstract)
    sources = dict.fromkeys(flat, "params")
    if which == "ema":
        ema = traverse_util.flatten_dict(state_metadata(step).get("ema") or {})
        ema = [p for p, v in ema.items() if v is not None and p in sources]
        if not ema:
            raise CheckpointError(f"{step}: holds no EMA weights (import folders have none); use which='params'.")
        sources.update(dict.fromkeys(ema, "ema"))
    flat_sh = None if shardings is None else traverse_util.flatten_dict(shardings)
    target, target_sh = {}, {}
    for src in ("params", "ema"):
        paths = [p for p, s in sources.items() if s == src]
        if paths:
            target[src] = traverse_util.unflatten_dict({p: flat[p] for p in paths})
            if flat_sh is not None:
                target_sh[src] = traverse_util.unflatten_dict({p: flat_sh[p] for p in paths})
    state = restore_state(step, target, None if shardings is None else target_sh)
    out = traverse_util.flatten_dict(state.get("params", {}))
    out.update(traverse_util.flatten_dict(state.get("ema", {})))
    return traverse_util.unflatten_dict(out)


def load_dit(run_dir: str, mesh: jax.sharding.Mesh, rules=DEFAULT_RULES, *, which: str = "ema"):
    """A run's config and DiT parameters, ready to sample with.

    Restored straight into the shards the logical `rules` give on `mesh`, LoRA factors
    (sharded like their kernels) merged.

    Args:
      run_dir: a training or distillation run, or one of its step folders.
      mesh: the devices.
      rules: the logical-axis rules (default `DEFAULT_RULES`).
      which: "ema" (default) or "params": a training run's EMA of what it trained, or its raw
        params. A DMD2 run (`"distill"` in its config) gives its generator, base + adapter
        merged, either way (it keeps no EMA).

    Returns:
      `(config, params)`: the run's ml_collections config and the DiT's parameters.

    Raises:
      CheckpointError: no finished checkpoint, or no EMA weights with `which="ema"`.
      ValueError: `which` is neither "params" nor "ema".
    """
    step = step_dir(run_dir)
    config = ml_collections.ConfigDict(read_config(step))
    boxed = abstract_dit_params(DiTConfig.coerce(config.model))
    abstract, shardings = nn.unbox(boxed), logical_shardings(boxed, mesh, rules)
    if "distill" in config:
        d = config.distill
        meta = state_metadata(step)["gen"]["params"]
        adapter = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), meta)
        adapter_sh = lora_shardings(adapter, shardings) if d.lora_rank > 0 else shardings
        tree = restore_state(step, {"base": abstract, "gen": {"params": adapter}},
                             {"base": shardings, "gen": {"params": adapter_sh}})
        gen = tree["gen"]["params"]
        # as train/dmd2.py `merged`: LoRA over the base, or a full copy
        return config, lora_apply(tree["base"], gen, d.get("lora_scale", 1.0)) if d.lora_rank > 0 else gen
    if config.init.lora_rank:
        abstract, shardings = lora_run_layout(abstract, shardings, config.init.lora_rank)
    return config, merge_run(restore_weights(step, abstract, shardings, which=which))
