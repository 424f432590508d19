"""DMD2 distillation of the video DiT: the adapters between mi_jax.train.dmd2 (model-agnostic)
and the DiT, and the job the one loop runs (`mi-jax distill`).

- gen / fake score: the DiT at a fixed embedded guidance (CFG baked in), LoRA over the base.
- real score: the frozen teacher with multi-condition CFG (text, audio; one batched pass),
  its scales set by the DMD2 core's attenuated weight g: scale_c = 1 + (g - 1) s_c / s_ref,
  where s_c is the sampling config's scale for condition c and s_ref = `distill.real_guidance`.
- LoRA (`distill.lora_rank`) runs on activations inside the step (`distill.lora_activations`,
  mi_jax/nn/lora.py), its factors and their Adam moments sharded like their kernels: the step
  then needs 1.09x a fine-tuning step's memory on the 13B shapes (benchmarks/dmd2_memory.py).
- token_replace: frame 0 is the portrait; its velocity is set so that its x0 prediction is
  exactly the portrait, so neither the DM gradient nor the critic loss act there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mi_jax.diffusion.flow import TIMESTEP_SCALE
from mi_jax.diffusion.guidance import stack_branches
from mi_jax.models.dit import DiT, image_condition_input
from mi_jax.models.dit_config import DiTConfig
from mi_jax.train import dmd2

COND_KEYS = ("text_embeds", "text_mask", "pooled", "ref_latent", "audio_states", "speaker_masks")


def dmd2_config(config) -> dmd2.DMD2Config:
    d = config.distill
    return dmd2.DMD2Config(num_steps=d.num_steps, time_shift=d.time_shift, ttur=d.ttur,
                           curriculum_steps=d.curriculum_steps, real_guidance=d.real_guidance,
                           lora_rank=d.lora_rank, lora_activations=d.get("lora_activations", True),
                           cfg_distill_weight=d.cfg_distill_weight, seed=config.seed)


def make_velocity(mcfg: DiTConfig):
    """`velocity(params, x_t, t[B], cond, guidance) -> v` for the DiT, frame 0 pinned to the
    reference under token_replace."""
    model = DiT(mcfg)

    def velocity(params, x_t, t, cond, guidance):
        b = x_t.shape[0]
        kw = dict(hidden_states=image_condition_input(x_t, cond["ref_latent"], mcfg.image_condition_type),
                  timestep=t * TIMESTEP_SCALE, encoder_hidden_states=cond["text_embeds"],
                  encoder_attention_mask=cond["text_mask"], pooled_projections=cond["pooled"])
        if mcfg.guidance_embeds:
            kw["guidance"] = jnp.broadcast_to(guidance * TIMESTEP_SCALE, (b,))
        if mcfg.audio_blocks and "audio_states" in cond:
            audio = cond["audio_states"]
            kw["audio_states"] = audio if audio.ndim == 5 else audio[:, None]
            if "speaker_masks" in cond:
                kw["audio_mask"] = cond["speaker_masks"]
        v = model.apply({"params": params}, **kw).astype(jnp.float32)
        if mcfg.image_condition_type == "token_replace":
            ref = cond["ref_latent"][:, 0].astype(jnp.float32)
            v = v.at[:, 0].set((x_t[:, 0] - ref) / jnp.maximum(t, 1e-4)[:, None, None, None])
        return v

    return velocity


def make_adapters(config):
    """(gen_apply, fake_apply, real_score, student_apply) for the DMD2 core."""
    mcfg = DiTConfig.coerce(config.model)
    velocity = make_velocity(mcfg)
    g_student = config.distill.student_guidance
    d = config.distill
    s_ref = d.real_guidance
    branches = ("full", "no_text", "no_audio")

    def fixed(params, x_t, t, cond):
        return velocity(params, x_t, t, cond, g_student)

    def real_score(base, x_t, t, cond, g):
        stacked = stack_branches({k: cond[k] for k in ("text_embeds", "text_mask", "pooled", "ref_latent")
                                  if k in cond} | ({"audio_states": cond["audio_states"]} if "audio_states" in cond else {}),
                                 branches)
        if "speaker_masks" in cond:
            stacked["speaker_masks"] = jnp.concatenate([cond["speaker_masks"]] * len(branches), 0)
        n = len(branches)
        v = velocity(base, jnp.concatenate([x_t] * n, 0), jnp.concatenate([t] * n, 0), stacked, 1.0)
        full, no_text, no_audio = jnp.split(v, n, axis=0)
        g = g.reshape((-1,) + (1,) * (x_t.ndim - 1))
        s_text = 1.0 + (g - 1.0) * d.teacher_cfg_text / s_ref
        s_audio = 1.0 + (g - 1.0) * d.teacher_cfg_audio / s_ref
        return no_audio + s_audio * (no_text - no_audio) + s_text * (full - no_text)

    def student(params, x_t, t, cond, g):
        return velocity(params, x_t, t, cond, g)

    return fixed, fixed, real_score, student


def to_dmd2_batch(batch: dict) -> dict:
    return {"x0": batch["latents"].astype(jnp.float32), "cond": {k: batch[k] for k in COND_KEYS if k in batch}}


def load_student(run_dir: str, config):
    """The distilled generator's parameter tree (base + its LoRA, merged) of a distill run."""
    from flax import linen as nn

    from mi_jax.convert.hunyuan import abstract_dit_params
    from mi_jax.train.checkpoints import load_run_tree

    cfg = dmd2_config(config)
    base = nn.unbox(abstract_dit_params(DiTConfig.coerce(config.model)))
    adapter = jax.eval_shape(lambda b: dmd2.adapter_init(b, jax.random.key(0), cfg), base)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {"base": base, "gen": {"params": adapter}}
    tree = load_run_tree(run_dir, target, jax.tree.map(lambda _: device, target))
    return dmd2.merged(tree["base"], tree["gen"]["params"], cfg)


def make_distill_job(config, data, mesh=None, *, rules=None, need_teacher: bool = True):
    """The loop's Job for DMD2 distillation of the teacher at `config.init.checkpoint`.
    `need_teacher=False` (`mi-jax plan`): no teacher is named; everything but `init_state` works
    on shapes alone. `rules`: a logical-axis rules table instead of mesh.DEFAULT_RULES."""
    from flax import linen as nn

    from mi_jax.convert.hunyuan import abstract_dit_params
    from mi_jax.nn.lora import lora_shardings
    from mi_jax.parallel.mesh import DEFAULT_RULES, logical_shardings, make_mesh
    from mi_jax.train.checkpoints import load_run_params
    from mi_jax.train.loop import Job
    from mi_jax.train.pretrain import batch_sharding
    from mi_jax.train.state import make_optimizer, state_shardings, trainable_labels

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
