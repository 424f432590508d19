"""Stage-1 / stage-2 flow-matching step (the loop in train/loop.py runs it).

Batch (global arrays, batch axis first; see mi_jax/data/store.py):
    latents [B, T, h, w, C]   ref_latent [B, 1, h, w, C]   audio_states [B, (S,) F, n_layers, A]
    text_embeds [B, L, D]     text_mask [B, L]             pooled [B, P]
    face_mask, mouth_mask [B, T, h, w]                     speaker_masks [B, S, T, h, w]

The stages differ only in data (`config.stage`): which conditions are on, their dropout
probabilities (for classifier-free guidance; `conditions.random_drop`), which parameters train
and the loss weights. The DiT's arguments come from `conditions.dit_inputs`, as in distillation
and sampling.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import linen as nn

from mi_jax.convert.checkpoint import load_run_params
from mi_jax.convert.hunyuan import load_diffusers_transformer
from mi_jax.data.loader import batch_sharding
from mi_jax.diffusion.conditions import conditions, dit_inputs, random_drop
from mi_jax.diffusion.flow import interpolate, sample_time, velocity_target
from mi_jax.models.dit import DiT, example_inputs
from mi_jax.models.dit_config import DIFFUSERS_FIELDS, DiTConfig
from mi_jax.nn.lora import activation_lora, is_lora_run, lora_init, lora_params, lora_run_layout, lora_trainable
from mi_jax.parallel.mesh import logical_shardings, make_mesh, with_rules
from mi_jax.train.loop import Job
from mi_jax.train.losses import LossWeights, flow_matching_loss
from mi_jax.train.state import (TrainState, freeze, guarded_update, init_state, make_optimizer, state_shardings,
                                trainable_labels)


def step_params(params):
    """The tree the train step runs the DiT with (under `activation_lora()`): with LoRA the
    factors sit beside their frozen kernels and act on activations, `x W + (x a) b`, so no
    adapted kernel (nor its gradient) is formed at full size inside the step, and the factors
    keep their kernels' sharding (`lora_shardings`); benchmarks/dmd2_memory.py measures what
    merging there would cost."""
    return lora_params(params["base"], params["lora"], 1.0) if is_lora_run(params) else params


def sample_keys(rng, batch) -> jax.Array:
    """One key per sample. Keyed by the sample's store index when the batch has one, so a
    sample draws the same noise whatever its position in the batch: results do not depend on
    how processes split the batch (one process or many give the same losses)."""
    b = batch["latents"].shape[0]
    ids = batch["index"] if "index" in batch else jnp.arange(b)
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, ids)


def make_loss_fn(config) -> Callable:
    """`loss_fn(params, batch, rng) -> (loss, metrics)` for the DiT of `config.model`."""
    model = DiT(config.model)
    mcfg = model.config
    stage = config.stage
    weights = LossWeights(stage.loss.global_weight, stage.loss.face_weight, stage.loss.mouth_weight)

    def loss_fn(params, batch, rng):
        keys = sample_keys(rng, batch)
        k_noise, k_time, k_drop = (jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys) for i in range(3))
        x0 = batch["latents"].astype(jnp.float32)
        noise = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(k_noise)
        t = jax.vmap(lambda k: sample_time(k, 1, kind=stage.timestep_sampling, shift=stage.timestep_shift)[0])(k_time)
        cond = random_drop(conditions(batch, use_audio=stage.use_audio), k_drop, stage.dropout)
        inputs = dit_inputs(mcfg, interpolate(x0, noise, t), t, cond, stage.guidance)
        with activation_lora():  # a no-op without LoRA factors
            v = model.apply({"params": step_params(params)}, **inputs)
        target = velocity_target(x0, noise)
        face, mouth = batch.get("face_mask"), batch.get("mouth_mask")
        if mcfg.image_condition_type == "token_replace":
            # latent frame 0 is the given portrait, not a prediction
            v, target = v[:, 1:], target[:, 1:]
            face = None if face is None else face[:, 1:]
            mouth = None if mouth is None else mouth[:, 1:]
        loss, parts = flow_matching_loss(v, target, face_mask=face, mouth_mask=mouth, weights=weights)
        return loss, {"loss": loss, **parts}

    return loss_fn


def make_train_step(config, tx, labels, loss_fn: Callable | None = None) -> Callable:
    """`step(state, batch) -> (state, metrics)`: gradient accumulation over
    `config.train.grad_accum` micro-batches, clipping and AdamW (in `tx`), EMA, and the
    NaN/Inf guard (a non-finite loss or gradient skips the update and is counted)."""
    loss_fn = loss_fn or make_loss_fn(config)
    accum = config.train.grad_accum
    seed = config.seed

    def grads_of(params, batch, rng):
        return jax.value_and_grad(lambda p: loss_fn(freeze(p, labels), batch, rng), has_aux=True)(params)

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.key(seed), state.step)
        if accum == 1:
            (_, metrics), grads = grads_of(state.params, batch, rng)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def body(carry, xs):
                i, mb = xs
                (_, m), g = grads_of(state.params, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, m)), None

            zeros = grads_of_shape(state.params, micro, rng)
            (grads, metrics), _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
            grads, metrics = jax.tree.map(lambda x: x / accum, (grads, metrics))
        new_state, finite, grad_norm = guarded_update(state, grads, metrics["loss"], tx, config.train.ema_decay)
        metrics = dict(metrics, grad_norm=grad_norm, skipped=(~finite).astype(jnp.int32),
                       nan_count=new_state.nan_count, nan_streak=new_state.nan_streak)
        return new_state, metrics

    def grads_of_shape(params, micro, rng):
        one = jax.tree.map(lambda x: x[0], micro)
        (_, m), g = jax.eval_shape(grads_of, params, one, rng)
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (g, m))

    return step


# ------------------------------------------------------------------ job


def initial_params(config, mesh, param_shardings, abstract_params):
    """The step-0 parameters: from a diffusers folder, from an earlier mi_jax run (stage 2
    after stage 1), or freshly initialised; always created directly in their shards."""
    mcfg = DiTConfig.coerce(config.model)
    init = config.init
    if init.diffusers and init.checkpoint:
        raise ValueError("set init.diffusers or init.checkpoint, not both")
    if init.diffusers:
        run_fields = {f.name: getattr(mcfg, f.name) for f in dataclasses.fields(mcfg) if f.name not in DIFFUSERS_FIELDS}
        loaded_cfg, params = load_diffusers_transformer(init.diffusers, mesh=mesh, rng=jax.random.key(config.seed), **run_fields)
        if loaded_cfg != mcfg:
            diff = {k: (getattr(mcfg, k), getattr(loaded_cfg, k)) for k in DIFFUSERS_FIELDS
                    if getattr(mcfg, k) != getattr(loaded_cfg, k)}
            raise ValueError(f"init.diffusers={init.diffusers}: its config.json differs from config.model: {diff} "
                             "(config value, checkpoint value); use the matching model config")
        return params
    if init.checkpoint:
        return load_run_params(init.checkpoint, abstract_params, param_shardings)
    model = DiT(mcfg)
    with with_rules(mesh):
        fn = jax.jit(lambda k: nn.unbox(model.init(k, **example_inputs(mcfg)))["params"], out_shardings=param_shardings)
        return fn(jax.random.key(config.seed))


def make_job(config, data, mesh=None):
    """Everything `loop.run` needs for stage-1 / stage-2 training of `config`.

    Args:
      config: a run config; `config.stage` says what trains and with which loss,
        `config.init` where the parameters start (`initial_params`).
      data: the training data (`mi_jax.train.data.TrainData`): its `element_spec` gives the
        batch shardings.
      mesh: the devices (default None: the mesh `config.mesh` describes).

    Returns:
      `loop.Job`: abstract state and its shardings, the jitted step, a first-state builder
      (parameters created in their shards), the data and the step count.

    Raises:
      ValueError: from the first state: both `init.diffusers` and `init.checkpoint` set, or a
        diffusers folder whose config differs from `config.model`.
    """
    mesh = mesh or make_mesh(config.mesh)
    mcfg = DiTConfig.coerce(config.model)
    boxed = jax.eval_shape(lambda: DiT(mcfg).init(jax.random.key(0), **example_inputs(mcfg))["params"])
    param_sh = logical_shardings(boxed, mesh)
    abstract_params = nn.unbox(boxed)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rank = config.init.lora_rank

    def make_params():
        params = initial_params(config, mesh, param_sh, abstract_params)
        if rank:
            return {"base": params, "lora": lora_init(params, jax.random.key(config.seed + 1), rank)}
        return params

    # labels from shapes only (no allocation); with LoRA the factors and the audio modules train
    if rank:
        abstract_all, all_param_sh = lora_run_layout(abstract_params, param_sh, rank)  # factors split like kernels
        patterns = lora_trainable(config.stage.trainable)
    else:
        abstract_all, patterns, all_param_sh = abstract_params, list(config.stage.trainable), param_sh
    labels = trainable_labels(abstract_all, patterns)
    tx = make_optimizer(config.train, labels)
    abstract_state = jax.eval_shape(lambda p: init_state(p, tx, labels), abstract_all)
    shardings = state_shardings(abstract_state, all_param_sh, replicated)

    def first_state():
        params = make_params()
        return jax.jit(lambda p: init_state(p, tx, labels), out_shardings=shardings)(params)

    step = make_train_step(config, tx, labels)
    batch_sh = jax.tree.map(lambda _: batch_sharding(mesh), data.element_spec)
    return Job(config=config, mesh=mesh, init_state=first_state, abstract_state=abstract_state,
               state_shardings=shardings, step_fn=step, batch_shardings=batch_sh, data=data,
               total_steps=config.train.steps)
