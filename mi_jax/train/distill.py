"""DMD2 distillation of the video DiT: the adapters between mi_jax.train.dmd2 (model-agnostic)
and the DiT, and the job the one loop runs (`mi-jax distill`).

- gen / fake score: the DiT at a fixed embedded guidance (CFG baked in), LoRA over the base.
- real score: the frozen teacher with the sampler's multi-condition CFG (text, audio; one batched
  pass, `guidance.guided_velocity`), its scales set by the DMD2 core's attenuated weight g:
  scale_c = 1 + (g - 1) s_c / s_ref, where s_c is the sampling config's scale for condition c
  and s_ref = `distill.real_guidance`.
- every DiT call takes its arguments from `conditions.dit_inputs`, as pretraining and sampling.
- LoRA (`distill.lora_rank`) runs on activations inside the step (`distill.lora_activations`,
  mi_jax/nn/lora.py), its factors and their Adam moments sharded like their kernels (the step's
  memory against a fine-tuning step's: benchmarks/dmd2_memory.py).
- token_replace: frame 0 is the portrait; its velocity is set so that its x0 prediction is
  exactly the portrait, so neither the DM gradient nor the critic loss act there.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from mi_jax.convert.checkpoint import load_run_params
from mi_jax.convert.hunyuan import abstract_dit_params
from mi_jax.data.loader import batch_sharding
from mi_jax.diffusion.conditions import conditions, dit_inputs
from mi_jax.diffusion.guidance import guided_velocity
from mi_jax.models.dit import DiT
from mi_jax.models.dit_config import DiTConfig
from mi_jax.nn.lora import lora_shardings
from mi_jax.parallel.mesh import DEFAULT_RULES, logical_shardings, make_mesh
from mi_jax.train import dmd2
from mi_jax.train.loop import Job
from mi_jax.train.state import make_optimizer, state_shardings, trainable_labels

REAL_BRANCHES = ("full", "no_text", "no_audio")  # the teacher's CFG passes (guidance.py), batched as one
ADAPTER_FIELDS = ("teacher_cfg_text", "teacher_cfg_audio", "student_guidance")  # read by make_adapters


def dmd2_config(config) -> dmd2.DMD2Config:
    """`config.distill` -> DMD2Config, field by field (those a run's saved config lacks keep the
    DMD2Config default); `seed` is `config.seed`."""
    d = config.distill
    fields = {f.name for f in dataclasses.fields(dmd2.DMD2Config)} - {"seed"}
    unknown = sorted(set(d.keys()) - fields - set(ADAPTER_FIELDS))
    if unknown:
        raise ValueError(f"config.distill has {unknown}, which neither DMD2Config nor the DiT adapters read; "
                         f"known: {sorted(fields | set(ADAPTER_FIELDS))}")
    kw = {k: d[k] for k in fields if k in d}
    if "lora_targets" in kw:
        kw["lora_targets"] = tuple(kw["lora_targets"])
    return dmd2.DMD2Config(**kw, seed=config.seed)


def make_velocity(mcfg: DiTConfig):
    """`velocity(params, x_t, t[B], cond, guidance) -> v` for the DiT, frame 0 pinned to the
    reference under token_replace."""
    model = DiT(mcfg)

    def velocity(params, x_t, t, cond, guidance):
        v = model.apply({"params": params}, **dit_inputs(mcfg, x_t, t, cond, guidance)).astype(jnp.float32)
        if mcfg.image_condition_type == "token_replace":
            ref = cond["ref_latent"][:, 0].astype(jnp.float32)
            v = v.at[:, 0].set((x_t[:, 0] - ref) / jnp.maximum(t, 1e-4)[:, None, None, None])
        return v

    return velocity


def make_adapters(config):
    """(gen_apply, fake_apply, real_score, student_apply) for the DMD2 core."""
    mcfg = DiTConfig.coerce(config.model)
    velocity = make_velocity(mcfg)
    d = config.distill

    def fixed(params, x_t, t, cond):
        return velocity(params, x_t, t, cond, d.student_guidance)

    def real_score(base, x_t, t, cond, g):
        g = g.reshape((-1,) + (1,) * (x_t.ndim - 1))
        scales = (1.0 + (g - 1.0) * d.teacher_cfg_text / d.real_guidance,
                  1.0 + (g - 1.0) * d.teacher_cfg_audio / d.real_guidance, 1.0)
        return guided_velocity(lambda x, t, c: velocity(base, x, t, c, 1.0), x_t, t, cond, REAL_BRANCHES, scales)

    return fixed, fixed, real_score, velocity


def to_dmd2_batch(batch: dict) -> dict:
    """A training batch as `dmd2.make_dmd2_step` takes it: float32 latents `x0` and the conditions."""
    return {"x0": batch["latents"].astype(jnp.float32), "cond": conditions(batch)}


def make_distill_job(config, data, mesh=None, *, rules=None, need_teacher: bool = True):
    """The loop's Job for DMD2 distillation of the teacher at `config.init.checkpoint`.

    Args:
      config: a `...:distill` run config (`config.distill`: DMD2's settings).
      data: the training data (`mi_jax.train.data.TrainData`).
      mesh: the devices (default None: the mesh `config.mesh` describes).
      rules: a logical-axis rules table (default None: `mesh.DEFAULT_RULES`).
      need_teacher: False (`mi-jax plan`) accepts a config naming no teacher; everything but
        `init_state` then works on shapes alone (default True).

    Returns:
      `loop.Job` whose state holds the frozen base, the generator's and the critic's adapters
      and their optimiser states.

    Raises:
      ValueError: no teacher (`config.init.checkpoint`) while one is needed.
    """
    if need_teacher and not config.init.checkpoint:
        raise ValueError("distillation needs the teacher: set --config.init.checkpoint=RUN (a stage-2 run)")
    mesh = mesh or make_mesh(config.mesh)
    rules = rules or DEFAULT_RULES
    mcfg = DiTConfig.coerce(config.model)
    boxed = abstract_dit_params(mcfg)
    base_sh = logical_shardings(boxed, mesh, rules)
    base_abstract = nn.unbox(boxed)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    cfg = dmd2_config(config)
    adapter_shape = jax.eval_shape(lambda b: dmd2.adapter_init(b, jax.random.key(0), cfg), base_abstract)
    # the critic's trainable tree is {"score": adapter} (a GAN head would sit beside it)
    gen_tx = make_optimizer(config.train, trainable_labels(adapter_shape, [r".*"]))
    critic_tx = make_optimizer(config.train, trainable_labels({"score": adapter_shape}, [r".*"]))
    gen_apply, fake_apply, real_score, student = make_adapters(config)
    core = dmd2.make_dmd2_step(cfg, gen_apply, fake_apply, real_score, gen_tx, critic_tx,
                               student_apply=student if cfg.cfg_distill_weight else None)

    def step(state, batch):
        return core(state, to_dmd2_batch(batch))

    def init(base):
        return dmd2.init_dmd2_state(base, jax.random.key(config.seed), cfg, gen_tx, critic_tx)

    abstract_state = jax.eval_shape(init, base_abstract)
    shardings = state_shardings(abstract_state, base_sh, replicated)
    if cfg.lora_rank > 0:  # the LoRA factors and their Adam moments split like their kernels
        factor_sh = state_shardings(abstract_state, lora_shardings(adapter_shape, base_sh), replicated)
        shardings = jax.tree.map(lambda f, s: s if f is replicated else f, factor_sh, shardings)

    def first_state():
        if not config.init.checkpoint:
            raise ValueError("distillation needs the teacher: set --config.init.checkpoint=RUN (a stage-2 run)")
        teacher = load_run_params(config.init.checkpoint, base_abstract, base_sh, which="params")
        return jax.jit(init, out_shardings=shardings)(teacher)

    batch_sh = jax.tree.map(lambda _: batch_sharding(mesh, rules), data.element_spec)
    return Job(config=config, mesh=mesh, init_state=first_state, abstract_state=abstract_state,
               state_shardings=shardings, step_fn=step, batch_shardings=batch_sh, data=data,
               total_steps=config.train.steps)
