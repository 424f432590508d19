"""DMD2 step distillation and CFG distillation, model-agnostic (the 2-D toy and the DiT alike).

Sources:
  DMD2     Yin et al., "Improved Distribution Matching Distillation for Fast Image Synthesis",
           NeurIPS 2024, arXiv 2405.14867; repo tianweiy/DMD2 (main/sd_guidance.py,
           main/sd_unified_model.py, main/train_sd.py).
  CausVid  tianweiy/CausVid causvid/dmd.py; Self-Forcing guandeh17/Self-Forcing model/dmd.py:
           the same loss on rectified-flow video models (x0 = x_t - t v, flow critic loss).
  MagicInfinite (arXiv 2503.05978, Fig. 3): curriculum from the base loss to the DM loss, 2-3x
           CFG attenuation of the real score, LoRA, unified step + CFG distillation.
  CFG distillation: Meng et al. 2023, "On Distillation of Guided Diffusion Models" (student
           conditioned on w ~ U[w_min, w_max]); HunyuanVideo's `guidance_embeds`.

Conventions (rectified flow, mi_jax/diffusion/flow.py): x_t = (1 - t) x0 + t noise, t = 1 is
noise, velocity target noise - x0, x0 = x_t - t v. Every network is a callable; t is `[B]` in
[0, 1] (an adapter converts to the DiT's 1000 t), `cond` is any pytree with batch axis first:

    gen_apply(params, x_t, t, cond) -> v          the few-step generator (initialised from the teacher)
    fake_apply(params, x_t, t, cond) -> v         the critic / fake score, no CFG (DMD2 asserts
                                                  fake_guidance_scale == 1)
    real_score(base, x_t, t, cond, g) -> v        the frozen teacher with CFG weight g `[B]`
                                                  (single condition: `cfg_velocity`; multi-condition
                                                  CFG is the caller's)
    student_apply(params, x_t, t, cond, g) -> v   CFG distillation: g through the guidance embedding
    critic_features(params, x_t, t, cond) -> [B, F] and head_apply(head, feats) -> [B] logits: GAN

State: one frozen `base` tree shared by the real score, the generator and the critic; the
generator and the critic are LoRA factors over it (`lora_rank > 0`, `nn/lora.py`) or full
copies (DMD2's and CausVid's choice). With `lora_activations` the step runs LoRA on activations
(x W + (x a) b, PEFT's form) rather than on merged kernels, which takes far less memory per
device (benchmarks/dmd2_memory.py measures merged, on activations and full copies against a
plain fine-tuning step). A step is `step(state, batch) -> (state, metrics)` with
`batch = {"x0": real latents [B, ...], "cond": pytree}`, so it runs in train/loop.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from mi_jax.diffusion.flow import interpolate, predict_x0, sample_time, sampling_times, shift_time
from mi_jax.nn.lora import DEFAULT_TARGETS, activation_lora, lora_apply, lora_init, lora_params
from mi_jax.train.state import TRAIN, TrainState, count_nonfinite, guarded_update, init_state

sg = jax.lax.stop_gradient


@dataclasses.dataclass(frozen=True)
class DMD2Config:
    """Distillation settings; defaults follow a published recipe where one exists (named beside
    each field). The lead's ml_collections config maps onto it field by field."""

    num_steps: int = 4  # K generator steps (1-8); DMD2 SDXL / CausVid / Self-Forcing use 4
    time_shift: float = 5.0  # grid = shift(linspace(1, 0, K + 1))[:-1]: Self-Forcing's warped
    #                          [1000, 937.5, 833.3, 625] for K = 4, shift 5
    backward_simulation: bool = True  # DMD2 sd_unified_model.sample_backward; False: real data noised
    dm_t_min: float = 0.02  # DMD2 min/max_step_percent 0.02 / 0.98
    dm_t_max: float = 0.98
    dm_t_shift: float = 1.0  # CausVid 8, Self-Forcing 5 (shift, then clamp); DMD2 1
    real_guidance: float = 1.0  # the teacher's sampling CFG weight g in v_u + g (v_c - v_u): DMD2
    #                             SDXL 8, SD1.5 1.75; HunyuanVideo-Avatar 7.5 (before attenuation)
    cfg_attenuation_high: float = 2.0  # MagicInfinite: 2x-3x attenuation of the real-score CFG;
    cfg_attenuation_low: float = 3.0  # one reading of the paper: 2x for t >= 0.75, 3x below
    cfg_attenuation_boundary: float = 0.75  # (unverified): set both equal for a constant factor
    ttur: int = 5  # critic updates per generator update: DMD2 SDXL 5, SD1.5 10, CausVid 5
    curriculum_steps: int = 0  # MagicInfinite: base loss -> DM loss linearly; 0 = DM from step 0
    base_t_kind: str = "logit_normal"  # the base (flow) loss samples t as pretraining does
    base_t_shift: float = 7.0
    lora_rank: int = 0  # > 0: generator and critic are LoRA factors over the one frozen base
    lora_scale: float = 1.0  # alpha / rank (DMD2 SDXL LoRA: rank 64, alpha 8)
    lora_targets: Sequence[str] = DEFAULT_TARGETS
    lora_activations: bool = False  # True: LoRA on activations, x W + (x a) b, inside the step (nn/lora.py
    #                                 `activation_lora`; layers y = x @ kernel); False: merged W + a b
    gan_g_weight: float = 0.0  # > 0 turns the GAN head on: DMD2 5e-3 (SDXL), 1e-3 (SD1.5)
    gan_d_weight: float = 1e-2  # DMD2 guidance_cls_loss_weight
    cfg_distill_weight: float = 0.0  # > 0 adds the CFG-distillation term to the generator loss
    cfg_g_min: float = 1.0  # CFG distillation samples g ~ U[g_min, g_max] (Meng et al. 2023)
    cfg_g_max: float = 8.0
    ema_decay: float = 0.0  # generator EMA; DMD2 / CausVid: none, Self-Forcing: 0.99
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.num_steps <= 8:
            raise ValueError(f"num_steps must be in [1, 8], got {self.num_steps}")
        if self.ttur < 1:
            raise ValueError(f"ttur must be >= 1, got {self.ttur}")


@struct.dataclass
class DMD2State:
    """Everything a distillation step changes. `base` is the one frozen copy (never updated,
    returned as is); `gen` / `critic` are TrainStates over LoRA factors or full copies
    (`critic.params = {"score": ..., "head": ...}`, head only with the GAN); `critic` is None for
    CFG distillation alone. `last`: the latest generator metrics, reported again on critic-only
    steps (TTUR)."""

    step: jax.Array
    base: Any
    gen: TrainState
    critic: TrainState | None
    last: dict
    nan_count: jax.Array
    nan_streak: jax.Array


GEN_METRICS = ("gen_loss", "dm_loss", "base_loss", "cfg_loss", "gan_g_loss", "dm_grad_norm", "gen_grad_norm")


# ------------------------------------------------------------------ schedules and guidance


def generator_times(num_steps: int, shift: float) -> jax.Array:
    """`[K]` input times of the generator's steps, from 1 (pure noise) down; the last step's
    x0 prediction is the output. DMD2's [999, 749, 499, 249] is this with shift 1."""
    return sampling_times(num_steps, shift)[:-1]


def curriculum_weight(step, curriculum_steps: int) -> jax.Array:
    """MagicInfinite's curriculum: w rises linearly 0 -> 1 over `curriculum_steps`, and the
    generator loss is (1 - w) base + w dm. `curriculum_steps = 0` gives w = 1 throughout."""
    if curriculum_steps <= 0:
        return jnp.ones((), jnp.float32)
    return jnp.clip(jnp.asarray(step, jnp.float32) / curriculum_steps, 0.0, 1.0)


def attenuated_guidance(t: jax.Array, cfg: DMD2Config) -> jax.Array:
    """`[B]` CFG weight for the real score: 1 + (g - 1) / a(t), a = 2 at high noise and 3 below
    (MagicInfinite's "2x-3x CFG attenuation"; the split by t is one reading of the paper). We divide
    the extrapolation beyond the conditional score, so the weight never drops below 1."""
    a = jnp.where(t >= cfg.cfg_attenuation_boundary, cfg.cfg_attenuation_high, cfg.cfg_attenuation_low)
    return 1.0 + (cfg.real_guidance - 1.0) / a


def cfg_velocity(apply: Callable, params, x, t, cond, uncond, scale) -> jax.Array:
    """Classifier-free guidance `v_u + scale (v_c - v_u)`; scale: scalar or `[B]`."""
    v_c = apply(params, x, t, cond).astype(jnp.float32)
    v_u = apply(params, x, t, uncond).astype(jnp.float32)
    s = jnp.asarray(scale, jnp.float32)
    s = s.reshape(s.shape + (1,) * (x.ndim - s.ndim))
    return v_u + s * (v_c - v_u)


def dm_times(rng, batch: int, cfg: DMD2Config) -> jax.Array:
    """`[B]` times for the DM loss and the critic: u ~ U[t_min, t_max] (DMD2), then the SD3
    shift and a clamp back into [t_min, t_max] (CausVid / Self-Forcing)."""
    u = jax.random.uniform(rng, (batch,), minval=cfg.dm_t_min, maxval=cfg.dm_t_max)
    return jnp.clip(shift_time(u, cfg.dm_t_shift), cfg.dm_t_min, cfg.dm_t_max)


# ------------------------------------------------------------------ the few-step generator


def _full(t, batch: int) -> jax.Array:
    return jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))


def generator_x0(gen_apply: Callable, params, x_t, t, cond) -> jax.Array:
    """One generator step: the x0 prediction `x_t - t v` at time t (scalar or `[B]`)."""
    t = _full(t, x_t.shape[0])
    return predict_x0(x_t.astype(jnp.float32), gen_apply(params, x_t, t, cond).astype(jnp.float32), t)


def generate(gen_apply: Callable, params, noise, cond, times, rng) -> jax.Array:
    """The K-step sampler: predict x0 at each grid time, re-noise it with fresh noise to the next
    (DMD2 sd_unified_model / CausVid's consistency-style sampler). noise: `[B, ...]`,
    times: `[K]` from `generator_times`; returns x0 `[B, ...]`."""
    x = noise.astype(jnp.float32)
    k_steps = times.shape[0]
    for k in range(k_steps):
        x0 = generator_x0(gen_apply, params, x, times[k], cond)
        if k + 1 < k_steps:
            eps = jax.random.normal(jax.random.fold_in(rng, k), x.shape, jnp.float32)
            x = interpolate(x0, eps, _full(times[k + 1], x.shape[0]))
    return x0


def backward_simulate(gen_apply: Callable, params, noise, cond, times, k, rng) -> jax.Array:
    """DMD2's backward simulation (sd_unified_model.sample_backward): the generator's own input
    at step k (traced int), made by running it from pure noise for k steps without gradient
    and re-noising each x0 prediction with fresh noise (so the input at times[k] is
    `(1 - t_k) x0_{k-1} + t_k eps`, uncorrelated with earlier noise). k = 0 returns `noise`."""
    params = sg(params)

    def body(j, x):
        x0 = generator_x0(gen_apply, params, x, times[j], cond)
        eps = jax.random.normal(jax.random.fold_in(rng, j), x.shape, jnp.float32)
        return interpolate(x0, eps, _full(times[j + 1], x.shape[0]))

    return sg(jax.lax.fori_loop(0, k, body, noise.astype(jnp.float32)))


def generator_input(gen_apply, gen_params, x_data, cond, times, rng, cfg: DMD2Config):
    """`(x_k [B, ...], t_k [B])`: the input of a random generator step k (one k per batch, as
    DMD2 broadcasts it from rank 0). Backward simulation runs the generator; without it, real
    data is noised to times[k] (DMD2's path when backward_simulation is off)."""
    k_step, k_noise, k_sim = jax.random.split(rng, 3)
    k = jax.random.randint(k_step, (), 0, times.shape[0])
    noise = jax.random.normal(k_noise, x_data.shape, jnp.float32)
    t_k = _full(times[k], x_data.shape[0])
    if cfg.backward_simulation:
        return backward_simulate(gen_apply, gen_params, noise, cond, times, k, k_sim), t_k
    return interpolate(x_data.astype(jnp.float32), noise, t_k), t_k


# ------------------------------------------------------------------ losses


def _mean_rest(x: jax.Array) -> jax.Array:
    return jnp.mean(x, axis=tuple(range(1, x.ndim)), keepdims=True)


def dm_gradient(x0_gen, x0_real, x0_fake) -> jax.Array:
    """DMD2 sd_guidance.py::compute_distribution_matching_loss (all under no_grad there):
        p_real = x - x0_real,  p_fake = x - x0_fake
        grad   = (p_real - p_fake) / mean_{C,H,W} |p_real|  = (x0_fake - x0_real) / mean|x - x0_real|
    per sample, then nan_to_num. The 1e-8 floor (ours) keeps an exact match finite."""
    norm = jnp.maximum(_mean_rest(jnp.abs(x0_gen - x0_real)), 1e-8)
    return jnp.nan_to_num((x0_fake - x0_real) / norm)


def distribution_matching_loss(x0_gen, x0_real, x0_fake) -> tuple[jax.Array, jax.Array]:
    """`loss = 0.5 * mean((x - stopgrad(x - grad))^2)` (DMD2): its gradient with respect to the
    generator's sample x is grad / N, i.e. the KL gradient s_fake - s_real of DMD, pushed
    through the generator. Returns (loss, rms of grad)."""
    x0_gen = x0_gen.astype(jnp.float32)
    grad = sg(dm_gradient(sg(x0_gen), sg(x0_real).astype(jnp.float32), sg(x0_fake).astype(jnp.float32)))
    loss = 0.5 * jnp.mean(jnp.square(x0_gen - sg(x0_gen - grad)))
    return loss, jnp.sqrt(jnp.mean(jnp.square(grad)))


def flow_loss(apply: Callable, params, x0, cond, rng, kind: str, shift: float) -> jax.Array:
    """The base (pretraining) loss: mean (v - (noise - x0))^2 at t from `sample_time`."""
    k_t, k_n = jax.random.split(rng)
    t = sample_time(k_t, x0.shape[0], kind=kind, shift=shift)
    noise = jax.random.normal(k_n, x0.shape, jnp.float32)
    v = apply(params, interpolate(x0.astype(jnp.float32), noise, t), t, cond)
    return jnp.mean(jnp.square(v.astype(jnp.float32) - (noise - x0.astype(jnp.float32))))


def cfg_distill_loss(student_apply: Callable, params, real_score: Callable, base, x0, cond, rng,
                     cfg: DMD2Config) -> jax.Array:
    """Guidance distillation in one pass: mean (student(x_t, t, c, g) - cfg_teacher(x_t, t, c, g))^2
    with g ~ U[g_min, g_max] per sample (Meng et al. 2023), the student taking g through its
    guidance embedding (HunyuanVideo `guidance_embeds`, guidance = g * 1000 in the adapter).
    x_t is real data noised at the base loss's times."""
    k_t, k_n, k_g = jax.random.split(rng, 3)
    b = x0.shape[0]
    t = sample_time(k_t, b, kind=cfg.base_t_kind, shift=cfg.base_t_shift)
    x_t = interpolate(x0.astype(jnp.float32), jax.random.normal(k_n, x0.shape, jnp.float32), t)
    g = jax.random.uniform(k_g, (b,), minval=cfg.cfg_g_min, maxval=cfg.cfg_g_max)
    target = sg(real_score(base, x_t, t, cond, g)).astype(jnp.float32)
    return jnp.mean(jnp.square(student_apply(params, x_t, t, cond, g).astype(jnp.float32) - target))


def gan_logits(critic_features, head_apply, params, head, x0, cond, rng, cfg: DMD2Config) -> jax.Array:
    """`[B]` logits of DMD2's classifier head (cls_pred_branch) on critic features of x0 noised
    at the critic's times (diffusion GAN, DMD2 `diffusion_gan=True`)."""
    k_t, k_n = jax.random.split(rng)
    t = dm_times(k_t, x0.shape[0], cfg)
    x_t = interpolate(x0.astype(jnp.float32), jax.random.normal(k_n, x0.shape, jnp.float32), t)
    return head_apply(head, critic_features(params, x_t, t, cond)).reshape(-1).astype(jnp.float32)


# ------------------------------------------------------------------ state


def _copy(tree):
    """New buffers (not aliases): the loop donates the state, and one buffer must not appear twice."""
    return jax.tree.map(jnp.copy, tree)


def _train_state(params, tx, ema_decay: float) -> TrainState:
    """train/state.py's state over trainable weights only (adapters, critic): no frozen leaves."""
    return init_state(params, tx, jax.tree.map(lambda _: TRAIN, params), ema=ema_decay > 0)


def adapter_init(base, rng, cfg: DMD2Config):
    """Trainable weights of a generator or a critic initialised at the teacher: LoRA factors
    (b = 0, so merged == base) or a full copy."""
    if cfg.lora_rank > 0:
        return lora_init(base, rng, cfg.lora_rank, cfg.lora_targets)
    return _copy(base)


def merged(base, adapter, cfg: DMD2Config):
    """The parameter tree a network runs with outside the step (sampling, export): base + LoRA
    merged, or the copy."""
    return lora_apply(base, adapter, cfg.lora_scale) if cfg.lora_rank > 0 else adapter


def adapted(base, adapter, cfg: DMD2Config):
    """The parameter tree a network runs with inside the step: `merged`, or with
    `cfg.lora_activations` the factors beside the base kernels (`lora_params`), applied on
    activations under `_lora_context`. Merging inside the step forms every adapted kernel (and
    its gradient) at full size, replicated when the factors are (benchmarks/dmd2_memory.py
    measures the cost)."""
    if cfg.lora_rank > 0 and cfg.lora_activations:
        return lora_params(base, adapter, cfg.lora_scale)
    return merged(base, adapter, cfg)


def _lora_context(cfg: DMD2Config):
    return activation_lora() if cfg.lora_rank > 0 and cfg.lora_activations else contextlib.nullcontext()


def init_dmd2_state(base, rng, cfg: DMD2Config, gen_tx: optax.GradientTransformation,
                    critic_tx: optax.GradientTransformation | None = None, head_params=None) -> DMD2State:
    """The step-0 state over `base` (kept as given: the caller places it once). `critic_tx=None`
    builds a CFG-distillation-only state (no critic). `head_params`: the GAN head's weights,
    needed when `cfg.gan_g_weight > 0`."""
    k_gen, k_critic = jax.random.split(rng)
    zero = jnp.zeros((), jnp.int32)
    gen = _train_state(adapter_init(base, k_gen, cfg), gen_tx, cfg.ema_decay)
    critic = None
    if critic_tx is not None:
        if cfg.gan_g_weight > 0 and head_params is None:
            raise ValueError("gan_g_weight > 0 needs head_params (the GAN head's weights)")
        cp = {"score": adapter_init(base, k_critic, cfg)}
        if cfg.gan_g_weight > 0:
            cp["head"] = head_params
        critic = _train_state(cp, critic_tx, 0.0)  # no EMA of the critic in any recipe
    last = {k: jnp.zeros((), jnp.float32) for k in GEN_METRICS}
    return DMD2State(step=zero, base=base, gen=gen, critic=critic, last=last, nan_count=zero, nan_streak=zero)


def _finish(state: DMD2State, finite, **fields) -> DMD2State:
    nan_count, nan_streak = count_nonfinite(state.nan_count, state.nan_streak, finite)
    return state.replace(step=state.step + 1, nan_count=nan_count, nan_streak=nan_streak, **fields)


def _under_lora(cfg: DMD2Config, one_step: Callable) -> Callable:
    def step(state: DMD2State, batch):
        with _lora_context(cfg):  # every network call of the step is traced under it
            return one_step(state, batch)

    return step


# ------------------------------------------------------------------ the DMD2 step


def make_dmd2_step(cfg: DMD2Config, gen_apply: Callable, fake_apply: Callable, real_score: Callable,
                   gen_tx: optax.GradientTransformation, critic_tx: optax.GradientTransformation, *,
                   student_apply: Callable | None = None, critic_features: Callable | None = None,
                   head_apply: Callable | None = None) -> Callable:
    """`step(state, batch) -> (state, metrics)` for train/loop.py; batch = {"x0", "cond"}.

    Per step (DMD2 main/train_sd.py::train_one_step, order kept): the generator's input at a
    random step k (backward simulation); on every `ttur`-th step a generator update
        L_gen = (1 - w) L_base + w L_dm + cfg_distill_weight L_cfg + gan_g_weight L_gan_g
    (w: MagicInfinite's curriculum); then, every step, a critic update on the same detached
    samples: flow matching, `mean (fake(x_t) - (noise - x0_gen))^2` (CausVid FlowPredLoss), plus
    DMD2's discriminator loss with the GAN head. Real score: the frozen base with CFG at the
    attenuated weight. On critic-only steps the generator's forward runs without gradient
    (lax.cond: its backward pass is not executed) and `last` re-reports its latest metrics.
    """
    if cfg.cfg_distill_weight > 0 and student_apply is None:
        raise ValueError("cfg_distill_weight > 0 needs student_apply(params, x_t, t, cond, g)")
    gan = cfg.gan_g_weight > 0
    if gan and (critic_features is None or head_apply is None):
        raise ValueError("gan_g_weight > 0 needs critic_features and head_apply")
    times = generator_times(cfg.num_steps, cfg.time_shift)

    def gen_loss(gp, base, critic_params, x_k, t_k, x_data, cond, w, rng):
        k_dm_t, k_dm_n, k_base, k_cfg, k_gan = jax.random.split(rng, 5)
        gen = adapted(base, gp, cfg)
        x0_gen = generator_x0(gen_apply, gen, x_k, t_k, cond)
        # distribution matching: real and fake scores at a random t of the detached sample
        b = x0_gen.shape[0]
        t = dm_times(k_dm_t, b, cfg)
        x_t = interpolate(sg(x0_gen), jax.random.normal(k_dm_n, x0_gen.shape, jnp.float32), t)
        critic = adapted(base, sg(critic_params["score"]), cfg)
        v_real = real_score(base, x_t, t, cond, attenuated_guidance(t, cfg)).astype(jnp.float32)
        x0_real = predict_x0(x_t, v_real, t)
        x0_fake = predict_x0(x_t, fake_apply(critic, x_t, t, cond).astype(jnp.float32), t)
        dm, dm_norm = distribution_matching_loss(x0_gen, x0_real, x0_fake)
        # the base loss is skipped once the curriculum has moved all weight to the DM loss
        base_l = jax.lax.cond(
            w < 1.0, lambda: flow_loss(gen_apply, gen, x_data, cond, k_base, cfg.base_t_kind, cfg.base_t_shift),
            lambda: jnp.zeros((), jnp.float32))
        total = (1.0 - w) * base_l + w * dm
        cfg_l = gan_g = jnp.zeros((), jnp.float32)
        if cfg.cfg_distill_weight > 0:
            cfg_l = cfg_distill_loss(student_apply, gen, real_score, base, x_data, cond, k_cfg, cfg)
            total = total + cfg.cfg_distill_weight * cfg_l
        if gan:  # DMD2 generator GAN loss softplus(-D(fake)), the critic frozen
            head = sg(critic_params["head"])
            logits = gan_logits(critic_features, head_apply, critic, head, x0_gen, cond, k_gan, cfg)
            gan_g = jnp.mean(jax.nn.softplus(-logits))
            total = total + cfg.gan_g_weight * gan_g
        parts = dict(gen_loss=total, dm_loss=dm, base_loss=base_l, cfg_loss=cfg_l, gan_g_loss=gan_g,
                     dm_grad_norm=dm_norm)
        return total, (parts, sg(x0_gen))

    def critic_loss(cp, base, x0_gen, x_data, cond, rng):
        k_t, k_n, k_f, k_r = jax.random.split(rng, 4)
        b = x0_gen.shape[0]
        t = dm_times(k_t, b, cfg)
        noise = jax.random.normal(k_n, x0_gen.shape, jnp.float32)
        critic = adapted(base, cp["score"], cfg)
        v = fake_apply(critic, interpolate(x0_gen, noise, t), t, cond).astype(jnp.float32)
        flow = jnp.mean(jnp.square(v - (noise - x0_gen)))
        gan_d = jnp.zeros((), jnp.float32)
        if gan:  # DMD2 discriminator loss softplus(D(fake)) + softplus(-D(real))
            fake = gan_logits(critic_features, head_apply, critic, cp["head"], x0_gen, cond, k_f, cfg)
            real = gan_logits(critic_features, head_apply, critic, cp["head"], x_data, cond, k_r, cfg)
            gan_d = jnp.mean(jax.nn.softplus(fake)) + jnp.mean(jax.nn.softplus(-real))
        return flow + cfg.gan_d_weight * gan_d, dict(critic_loss=flow, gan_d_loss=gan_d)

    def one_step(state: DMD2State, batch):
        rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        k_in, k_gen, k_critic = jax.random.split(rng, 3)
        base, x_data, cond = state.base, batch["x0"].astype(jnp.float32), batch["cond"]
        w = curriculum_weight(state.step, cfg.curriculum_steps)
        x_k, t_k = generator_input(gen_apply, adapted(base, sg(state.gen.params), cfg), x_data, cond, times, k_in,
                                   cfg)

        def update_gen(gen_state):
            grad_fn = jax.value_and_grad(gen_loss, has_aux=True)
            (loss, (parts, x0)), grads = grad_fn(gen_state.params, base, state.critic.params, x_k, t_k, x_data,
                                                 cond, w, k_gen)
            new, finite, norm = guarded_update(gen_state, grads, loss, gen_tx, cfg.ema_decay)
            return new, x0, dict(parts, gen_grad_norm=norm), finite

        def skip_gen(gen_state):
            x0 = generator_x0(gen_apply, adapted(base, gen_state.params, cfg), x_k, t_k, cond)
            return gen_state, x0, dict(state.last), jnp.ones((), bool)

        due = state.step % cfg.ttur == 0
        gen_state, x0_gen, gen_metrics, gen_finite = jax.lax.cond(due, update_gen, skip_gen, state.gen)
        x0_gen = sg(x0_gen)

        grad_fn = jax.value_and_grad(critic_loss, has_aux=True)
        (c_loss, c_parts), c_grads = grad_fn(state.critic.params, base, x0_gen, x_data, cond, k_critic)
        critic_state, c_finite, c_norm = guarded_update(state.critic, c_grads, c_loss, critic_tx, 0.0)

        finite = gen_finite & c_finite
        new = _finish(state, finite, gen=gen_state, critic=critic_state, last=gen_metrics)
        metrics = dict(gen_metrics, **c_parts, loss=gen_metrics["gen_loss"], critic_grad_norm=c_norm,
                       curriculum_w=w, gen_updated=due.astype(jnp.int32),
                       nan_count=new.nan_count, nan_streak=new.nan_streak)
        return new, metrics

    return _under_lora(cfg, one_step)


def make_cfg_distill_step(cfg: DMD2Config, student_apply: Callable, real_score: Callable,
                          tx: optax.GradientTransformation) -> Callable:
    """`step(state, batch) -> (state, metrics)`: CFG distillation alone (state from
    `init_dmd2_state(..., critic_tx=None)`); the student learns to reproduce the CFG teacher's
    velocity in one pass at any g in [g_min, g_max] (`cfg_distill_loss`)."""

    def loss_fn(gp, base, x0, cond, rng):
        return cfg_distill_loss(student_apply, adapted(base, gp, cfg), real_score, base, x0, cond, rng, cfg)

    def one_step(state: DMD2State, batch):
        rng = jax.random.fold_in(jax.random.key(cfg.seed), state.step)
        loss, grads = jax.value_and_grad(loss_fn)(state.gen.params, state.base, batch["x0"], batch["cond"], rng)
        gen_state, finite, norm = guarded_update(state.gen, grads, loss, tx, cfg.ema_decay)
        last = dict(state.last, cfg_loss=loss, gen_loss=loss, gen_grad_norm=norm)
        new = _finish(state, finite, gen=gen_state, last=last)
        return new, dict(loss=loss, cfg_loss=loss, gen_grad_norm=norm, nan_count=new.nan_count,
                         nan_streak=new.nan_streak)

    return _under_lora(cfg, one_step)
