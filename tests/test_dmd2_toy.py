"""DMD2 step distillation and CFG distillation (mi_jax/train/dmd2.py) on a 2-D toy.

Data: 8 Gaussians (std 0.1) on a circle of radius 2; the condition is the mode label, or
NULL = 8 (label dropout 0.2 for the teacher, so it has an unconditional score for CFG). The
teacher is a small MLP flow model (time, label and guidance embeddings) trained with the base
loss (`dmd2.flow_loss`, uniform t). DMD2 distils a K = 2 step generator: LoRA (rank 16) over
the one frozen base, backward simulation, TTUR 2, curriculum over the first 100 steps, EMA
0.99, real score = the teacher with CFG 1.5 attenuated 2x/3x, batches half unconditional.
The same-budget baseline trains the teacher further with the base loss alone for the same
number of steps and samples it with K Euler steps.

Measures, on 2000 unconditional (NULL-label) samples against 2000 teacher samples (64 Euler
steps): MMD^2, the biased V-statistic with the mean of RBF kernels of bandwidths 0.1, 0.5, 2.0
(teacher vs teacher with fresh noise: ~4e-4); mode coverage = fraction of the 8 modes holding
>= 4% of all samples (a third of the uniform 12.5%), a sample belonging to the nearest mode
within 5 std. Bounds: DMD2 MMD^2 <= 0.015 and <= 0.3x the baseline's, coverage 8/8; the
baseline's coverage < 8/8. Measured here (seeds 0-3): DMD2 MMD^2 0.003-0.005, coverage 8/8
(smallest mode 5.6-6.7%); baseline 0.042, 3/8.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from mi_jax.diffusion import flow
from mi_jax.train import dmd2 as D

MODES, RADIUS, STD, NULL = 8, 2.0, 0.1, 8
NEAR = 5 * STD  # a sample belongs to a mode within this distance (modes are 1.53 apart)
CENTRES = RADIUS * np.stack([np.cos(2 * np.pi * np.arange(MODES) / MODES),
                             np.sin(2 * np.pi * np.arange(MODES) / MODES)], 1).astype(np.float32)
TEACHER_STEPS, DMD_STEPS, K, BATCH, N_EVAL = 2000, 1000, 2, 128, 2000
DMD_CFG = D.DMD2Config(num_steps=K, time_shift=1.0, real_guidance=1.5, ttur=2, curriculum_steps=100,
                       base_t_kind="uniform", base_t_shift=1.0, lora_rank=16, lora_scale=1.0,
                       lora_targets=(r"kernel$",), ema_decay=0.99, seed=3)


# ------------------------------------------------------------------ toy model and data


def _embed(x, dim, scale):
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(dim // 2) / (dim // 2))
    a = (scale * x)[:, None] * freqs
    return jnp.concatenate([jnp.sin(a), jnp.cos(a)], -1)


class Toy(nn.Module):
    """Velocity MLP: x `[B, 2]`, t `[B]` in [0, 1], label `[B]` int (NULL = unconditional),
    g `[B]` guidance-embedding input (HunyuanVideo `guidance_embeds` in miniature)."""

    hidden: int = 64

    @nn.compact
    def __call__(self, x, t, label, g, features=False):
        emb = nn.Dense(self.hidden, name="time")(_embed(t, 32, 1000.0))
        emb = emb + nn.Embed(MODES + 1, self.hidden, name="label")(label)
        emb = nn.silu(emb + nn.Dense(self.hidden, name="guidance")(_embed(g, 32, 100.0)))
        h = nn.Dense(self.hidden, name="inp")(x)
        for i in range(3):
            h = h + nn.Dense(self.hidden, name=f"mlp{i}")(nn.silu(h + nn.Dense(self.hidden, name=f"emb{i}")(emb)))
        return h if features else nn.Dense(2, name="out")(nn.silu(h))


class Tiny(nn.Module):
    """One hidden layer: for the mechanics test, where compile time, not quality, matters."""

    @nn.compact
    def __call__(self, x, t, label, g, features=False):
        h = jnp.concatenate([x, t[:, None], g[:, None], jax.nn.one_hot(label, MODES + 1)], -1)
        h = nn.silu(nn.Dense(16, name="hidden")(h))
        return h if features else nn.Dense(2, name="out")(h)


def model_fns(model):
    """The callables the core takes, for a toy module: (student, velocity, features, real_score)."""

    def student(params, x, t, label, g):
        return model.apply({"params": params}, x, t, label, g)

    def velocity(params, x, t, label):  # teacher / generator / critic: guidance input 1, as trained
        return student(params, x, t, label, jnp.ones(x.shape[0]))

    def features(params, x, t, label):
        return model.apply({"params": params}, x, t, label, jnp.ones(x.shape[0]), features=True)

    def real_score(base, x, t, label, g):  # the frozen teacher with CFG; NULL is the unconditional pass
        return D.cfg_velocity(velocity, base, x, t, label, jnp.full_like(label, NULL), g)

    return student, velocity, features, real_score


MODEL = Toy()
student, velocity, features, real_score = model_fns(MODEL)


def sample_data(rng, b, drop):
    k_lab, k_x, k_drop = jax.random.split(rng, 3)
    label = jax.random.randint(k_lab, (b,), 0, MODES)
    x = jnp.asarray(CENTRES)[label] + STD * jax.random.normal(k_x, (b, 2))
    return x, jnp.where(jax.random.uniform(k_drop, (b,)) < drop, NULL, label)


@jax.jit
def batch_at(i):
    """The distillation batch of step i: label dropout 0.5, so half the batch is unconditional."""
    x, label = sample_data(jax.random.fold_in(jax.random.key(11), i), BATCH, 0.5)
    return {"x0": x, "cond": label}


# ------------------------------------------------------------------ training, sampling, measures

_ADAM = optax.scale_by_adam()


@jax.jit
def _flow_chunk(params, opt, start, total, lr0, drop):
    """250 base-loss Adam steps in one scan (cosine lr from lr0 over `total` steps); one
    compilation serves the teacher and the same-budget baseline."""

    def one(carry, i):
        p, o = carry
        k = jax.random.fold_in(jax.random.key(1), i)
        x, label = sample_data(k, 256, drop)
        loss, g = jax.value_and_grad(lambda q: D.flow_loss(velocity, q, x, label, jax.random.fold_in(k, 1),
                                                            "uniform", 1.0))(p)
        u, o = _ADAM.update(g, o)
        lr = lr0 * (0.05 + 0.95 * 0.5 * (1 + jnp.cos(jnp.pi * jnp.minimum(i / total, 1.0))))
        return (jax.tree.map(lambda a, b: a - lr * b, p, u), o), loss

    (params, opt), losses = jax.lax.scan(one, (params, opt), start + jnp.arange(250))
    return params, opt, losses


def train_flow(params, steps, lr, drop, offset=0):
    opt = _ADAM.init(params)
    for s in range(0, steps, 250):
        params, opt, losses = _flow_chunk(params, opt, offset + s, offset + steps, lr, drop)
    return params, float(losses[-1])


@jax.jit
def euler(params, noise, label, times):
    """Many-step (or K-step) Euler sampling of a velocity model on `times` `[N + 1]`."""

    def body(x, tt):
        t = jnp.full((x.shape[0],), tt[0])
        return flow.euler_step(x, velocity(params, x, t, label), tt[0], tt[1]), None

    x, _ = jax.lax.scan(body, noise, jnp.stack([times[:-1], times[1:]], 1))
    return x


def mmd(x, y, bandwidths=(0.1, 0.5, 2.0)) -> float:
    """Biased MMD^2 with the mean of RBF kernels (float64 on the host)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)

    def k(a, b):
        d = ((a[:, None] - b[None]) ** 2).sum(-1)
        return sum(np.exp(-d / (2 * s * s)) for s in bandwidths).mean() / len(bandwidths)

    return float(k(x, x) + k(y, y) - 2 * k(x, y))


def coverage(x, frac=0.04):
    """(fraction of modes with >= frac of all samples, fraction of samples within NEAR of a mode)."""
    d = np.linalg.norm(np.asarray(x)[:, None] - CENTRES[None], axis=-1)
    near, nearest = d.min(1) < NEAR, d.argmin(1)
    counts = np.array([(near & (nearest == m)).sum() for m in range(MODES)]) / len(x)
    return float((counts >= frac).mean()), float(near.mean())


def null_noise(seed):
    return jax.random.normal(jax.random.key(seed), (N_EVAL, 2)), jnp.full((N_EVAL,), NULL)


def train_teacher():
    init = MODEL.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1), jnp.zeros(1, jnp.int32), jnp.ones(1))
    return train_flow(init["params"], TEACHER_STEPS, 2e-3, 0.2)[0]


def teacher_sampler(teacher, seed=6):
    return euler(teacher, *null_noise(seed), flow.sampling_times(64, 1.0))


def _optimiser(lr, steps):
    # Self-Forcing's Adam betas (0, 0.999) for the adversarial pair; cosine decay to settle the end
    return optax.adam(optax.cosine_decay_schedule(lr, steps, 0.05), b1=0.0, b2=0.99)


def distil(teacher, cfg=DMD_CFG, steps=DMD_STEPS):
    """DMD2 over the teacher for `steps` jitted steps (called as train/loop.py calls them)."""
    base_copy = jax.tree.map(np.array, teacher)  # host copy, compared bitwise afterwards
    gen_tx, critic_tx = _optimiser(1e-3, steps), _optimiser(1e-3, steps)
    step = jax.jit(D.make_dmd2_step(cfg, velocity, velocity, real_score, gen_tx, critic_tx))
    state = D.init_dmd2_state(teacher, jax.random.key(5), cfg, gen_tx, critic_tx)
    history, t0 = [], time.time()
    for i in range(steps):
        state, metrics = step(state, batch_at(i))
        if i < 4 or i % 50 == 49:
            history.append((i, jax.device_get(metrics)))
    return dict(state=state, base_copy=base_copy, history=history, seconds=time.time() - t0)


def evaluate(teacher, teacher_samples, state, cfg=DMD_CFG, steps=DMD_STEPS) -> dict:
    """The measures of the module docstring for the DMD2 generator (its EMA, as Self-Forcing
    samples) and for the same-budget base-loss student (K Euler steps)."""
    k = cfg.num_steps
    times = D.generator_times(k, cfg.time_shift)
    noise, null = null_noise(8)
    gen = D.merged(teacher, state.gen.ema, cfg)
    sample = jax.jit(lambda p, labels: D.generate(velocity, p, noise, labels, times, jax.random.key(9)))
    x_dmd = sample(gen, null)
    base_only, _ = train_flow(teacher, steps, 1e-3, 0.5, offset=TEACHER_STEPS)
    x_base = euler(base_only, noise, null, flow.sampling_times(k, cfg.time_shift))
    # conditional samples (CFG real score): the fraction nearest their own mode, and their radius
    # (CFG in the real score tilts DMD's target outwards, the over-saturation MagicInfinite
    # attenuates: it is a sharper class, not the teacher's CFG sampler distribution)
    labels = jnp.arange(N_EVAL) % MODES
    x_lab = np.asarray(sample(gen, labels))
    own = float((np.linalg.norm(x_lab[:, None] - CENTRES[None], axis=-1).argmin(1) == np.asarray(labels)).mean())
    return dict(mmd_dmd=mmd(x_dmd, teacher_samples), mmd_base=mmd(x_base, teacher_samples),
                cov_dmd=coverage(x_dmd), cov_base=coverage(x_base), cov_teacher=coverage(teacher_samples),
                own_mode=own, radius=float(np.linalg.norm(x_lab, axis=-1).mean()),
                floor=mmd(teacher_samples, teacher_sampler(teacher, 7)))


# ------------------------------------------------------------------ fixtures (module scope: shared)


@pytest.fixture(scope="module")
def teacher():
    return train_teacher()


@pytest.fixture(scope="module")
def distilled(teacher):
    return distil(teacher)


# ------------------------------------------------------------------ unit tests (no training)


def test_curriculum_weight():
    w = [float(D.curriculum_weight(s, 100)) for s in (0, 25, 50, 100, 400)]
    np.testing.assert_allclose(w, [0.0, 0.25, 0.5, 1.0, 1.0])
    assert float(D.curriculum_weight(0, 0)) == 1.0  # no curriculum: DM loss from step 0
    assert float(jax.jit(D.curriculum_weight, static_argnums=1)(jnp.asarray(30), 60)) == 0.5


def test_time_grid_and_attenuated_guidance():
    # DMD2's 4-step list [999, 749, 499, 249] / 1000 is the unshifted grid
    np.testing.assert_allclose(D.generator_times(4, 1.0), [1.0, 0.75, 0.5, 0.25], atol=1e-6)
    np.testing.assert_allclose(D.generator_times(4, 5.0) * 1000, [1000, 937.5, 833.3, 625.0], atol=0.1)  # Self-Forcing
    cfg = D.DMD2Config(real_guidance=7.0)
    np.testing.assert_allclose(D.attenuated_guidance(jnp.array([0.9, 0.75, 0.5]), cfg), [4.0, 4.0, 3.0])
    with pytest.raises(ValueError):
        D.DMD2Config(num_steps=9)


def test_dm_gradient_matches_dmd2_formula():
    ks = jax.random.split(jax.random.key(0), 3)
    x, x0_real, x0_fake = (jax.random.normal(k, (3, 4, 5)) for k in ks)
    # DMD2 sd_guidance.py: p_real = x - x0_real, p_fake = x - x0_fake, grad = (p_real - p_fake) / mean|p_real|
    p_real, p_fake = x - x0_real, x - x0_fake
    expected = (p_real - p_fake) / jnp.abs(p_real).mean(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(D.dm_gradient(x, x0_real, x0_fake), expected, rtol=1e-5)
    # loss = 0.5 mse(x, sg(x - grad)): value 0.5 mean(grad^2), gradient grad / N, nothing into the scores
    grad_fn = jax.jit(jax.value_and_grad(D.distribution_matching_loss, argnums=(0, 1, 2), has_aux=True))
    (loss, _), grads = grad_fn(x, x0_real, x0_fake)
    np.testing.assert_allclose(loss, 0.5 * jnp.mean(expected**2), rtol=1e-5)
    np.testing.assert_allclose(grads[0], expected / x.size, rtol=1e-5, atol=1e-9)
    assert not np.any(grads[1]) and not np.any(grads[2])


def test_backward_simulation_noise_level():
    """A generator whose x0 prediction is a constant c: the input it is given at step k must be
    (1 - t_k) c + t_k eps with fresh eps, i.e. mean (1 - t_k) c and std t_k; k = 0 is the noise."""
    c = jnp.array([1.5, -0.5])
    gen = lambda p, x, t, cond: (x - c) / t[:, None]  # noqa: E731  (x0 = x - t v = c)
    times = D.generator_times(4, 3.0)
    noise = jax.random.normal(jax.random.key(1), (20000, 2))
    sim = jax.jit(lambda k: D.backward_simulate(gen, None, noise, None, times, k, jax.random.key(2)))
    np.testing.assert_array_equal(sim(0), noise)  # step 0 returns the noise itself, no arithmetic
    for k in range(1, 4):
        x = np.asarray(sim(k))
        t = float(times[k])
        np.testing.assert_allclose(x.mean(0), (1 - t) * np.asarray(c), atol=0.03)
        np.testing.assert_allclose(x.std(0), [t, t], rtol=0.03)
        assert abs(np.corrcoef(x[:, 0], np.asarray(noise[:, 0]))[0, 1]) < 0.03  # re-noised, not the start noise
    # generator_input draws k and returns the matching t_k
    cfg = D.DMD2Config(num_steps=4, time_shift=3.0)
    draw = jax.jit(lambda rng: D.generator_input(gen, None, jnp.zeros((20000, 2)), None, times, rng, cfg))
    for seed in range(6):
        x, t_k = draw(jax.random.key(seed))
        np.testing.assert_allclose(np.asarray(x).std(0), [float(t_k[0])] * 2, rtol=0.03)
    # the K-step sampler returns the last x0 prediction
    out = jax.jit(lambda z: D.generate(gen, None, z, None, times, jax.random.key(0)))(noise[:8])
    np.testing.assert_allclose(out, jnp.broadcast_to(c, (8, 2)), atol=1e-5)


# ------------------------------------------------------------------ DMD2 on the toy


def test_dmd2_student_matches_teacher_and_beats_base_loss(teacher, distilled):
    r = evaluate(teacher, teacher_sampler(teacher), distilled["state"])
    print(f"\nDMD2 K={K}: MMD^2 {r['mmd_dmd']:.4f}, coverage {r['cov_dmd']} | base loss, K={K} Euler: MMD^2 "
          f"{r['mmd_base']:.4f}, coverage {r['cov_base']} | teacher (64 steps): coverage {r['cov_teacher']}, MMD^2 "
          f"floor {r['floor']:.5f} | conditional samples nearest their mode {r['own_mode']:.3f} (mean radius "
          f"{r['radius']:.2f}) | {DMD_STEPS} DMD2 "
          f"steps in {distilled['seconds']:.1f} s")
    assert r["mmd_dmd"] <= 0.015 and r["mmd_dmd"] <= 0.3 * r["mmd_base"], r
    assert r["cov_dmd"][0] == 1.0, r
    assert r["cov_base"][0] < 1.0, r  # the baseline's K-step samples fall between the modes
    assert r["own_mode"] >= 0.95, r


def test_dmd2_step_jits_with_finite_metrics_and_ttur(distilled):
    history, state = distilled["history"], distilled["state"]
    for i, m in history:
        assert all(np.isfinite(v) for v in m.values()), (i, m)
        assert int(m["gen_updated"]) == int(i % DMD_CFG.ttur == 0)
        np.testing.assert_allclose(m["curriculum_w"], min(i / DMD_CFG.curriculum_steps, 1.0), rtol=1e-6)
    assert {"loss", "nan_count", "nan_streak", "dm_loss", "base_loss", "critic_loss"} <= set(history[0][1])
    assert int(state.step) == DMD_STEPS and int(state.nan_count) == 0
    assert int(state.gen.step) == DMD_STEPS // DMD_CFG.ttur and int(state.critic.step) == DMD_STEPS
    assert float(history[0][1]["base_loss"]) > 0 and float(history[-1][1]["base_loss"]) == 0.0  # skipped once w = 1


def test_lora_leaves_shared_base_bitwise_unchanged(distilled):
    state, before = distilled["state"], distilled["base_copy"]
    for a, b in zip(jax.tree.leaves(state.base), jax.tree.leaves(before), strict=True):
        assert np.asarray(a).tobytes() == b.tobytes()  # never written: the same bytes
    # only LoRA factors are trained: no copy of the base in the generator or the critic
    flat = jax.tree_util.tree_flatten_with_path(state.gen.params)[0]
    assert flat and all(str(getattr(p[-1], "key", p[-1])) in ("a", "b") for p, _ in flat)
    assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(state.critic.params["score"]))


# ------------------------------------------------------------------ CFG distillation


def test_cfg_distillation_matches_cfg_teacher(teacher):
    cfg = D.DMD2Config(cfg_g_min=1.0, cfg_g_max=5.0, base_t_kind="uniform", base_t_shift=1.0, lora_rank=16,
                       lora_targets=(r"kernel$",), seed=4)
    tx = optax.adam(optax.cosine_decay_schedule(2e-3, 600, 0.05))
    step = jax.jit(D.make_cfg_distill_step(cfg, student, real_score, tx))
    state = D.init_dmd2_state(teacher, jax.random.key(6), cfg, tx)
    for i in range(600):
        state, metrics = step(state, batch_at(i))
    assert np.isfinite(float(metrics["loss"])) and int(metrics["nan_count"]) == 0
    # fresh conditional x_t; guidance 3: one student pass vs the two-pass CFG teacher
    x0, label = sample_data(jax.random.key(99), 4000, 0.0)
    t = jax.random.uniform(jax.random.key(98), (4000,), minval=0.02, maxval=0.98)
    x_t = flow.interpolate(x0, jax.random.normal(jax.random.key(97), x0.shape), t)
    g = jnp.full((4000,), 3.0)
    target = real_score(teacher, x_t, t, label, g)
    err_student = float(jnp.mean((student(D.merged(teacher, state.gen.params, cfg), x_t, t, label, g) - target) ** 2))
    err_base = float(jnp.mean((student(teacher, x_t, t, label, g) - target) ** 2))
    print(f"\nCFG distillation at g=3: student mse {err_student:.4f}, undistilled base mse {err_base:.4f}")
    assert err_student < 0.2 * err_base, (err_student, err_base)


# ------------------------------------------------------------------ full copies, GAN head, CFG term


def test_full_copy_step_with_gan_head_and_cfg_term():
    """Two jitted steps (generator + critic, then critic only) with every option on: full
    copies, the GAN head on critic features (DMD2 cls_pred_branch, here a linear layer), the
    CFG-distillation term, the curriculum, EMA. A one-layer model keeps compilation short."""
    model = Tiny()
    student_t, velocity_t, features_t, real_score_t = model_fns(model)
    teacher = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1), jnp.zeros(1, jnp.int32),
                         jnp.ones(1))["params"]
    cfg = D.DMD2Config(num_steps=3, time_shift=1.0, ttur=2, curriculum_steps=4, base_t_kind="uniform",
                       base_t_shift=1.0, real_guidance=2.0, gan_g_weight=5e-3, cfg_distill_weight=0.5, ema_decay=0.9)
    head = {"w": jnp.zeros((16, 1)), "b": jnp.zeros((1,))}
    head_apply = lambda h, f: (f @ h["w"] + h["b"])[:, 0]  # noqa: E731
    tx = optax.adam(1e-3)
    step = jax.jit(D.make_dmd2_step(cfg, velocity_t, velocity_t, real_score_t, tx, tx, student_apply=student_t,
                                    critic_features=features_t, head_apply=head_apply))
    state0 = D.init_dmd2_state(teacher, jax.random.key(0), cfg, tx, tx, head_params=head)
    assert jax.tree.leaves(state0.gen.params)[0] is not jax.tree.leaves(state0.base)[0]  # a copy, not an alias
    batch = {k: v[:32] for k, v in batch_at(0).items()}
    state, m0 = step(state0, batch)  # generator + critic
    state, m1 = step(state, batch)  # critic only (TTUR)
    for m in (m0, m1):
        assert all(np.isfinite(np.asarray(v)) for v in m.values()), m
    assert int(m0["gen_updated"]) == 1 and int(m1["gen_updated"]) == 0
    assert float(m0["gan_g_loss"]) > 0 and float(m0["cfg_loss"]) > 0 and float(m1["gan_d_loss"]) > 0
    assert float(m0["base_loss"]) > 0 and float(m0["curriculum_w"]) == 0.0
    assert float(m1["gen_loss"]) == float(m0["gen_loss"])  # held over the critic-only step

    def changed(a, b):
        return any(np.any(np.asarray(x) != np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

    assert changed(state.gen.params, teacher) and changed(state.critic.params["head"], head)
    assert changed(state.gen.ema, teacher) and int(state.gen.step) == 1 and int(state.critic.step) == 2
    assert not changed(state.base, teacher)


def test_lora_on_activations_takes_the_same_steps_as_merged():
    """`lora_activations` (LoRA as x W + (x a) b inside the step, nn/lora.py `activation_lora`;
    here through flax.linen.Dense) takes the same DMD2 steps as merged kernels W + a b: three
    steps (generator + critic, critic only, generator + critic) of the one-layer model give the
    same metrics and factors up to float rounding, with factors that have moved off b = 0."""
    model = Tiny()
    _, velocity_t, _, real_score_t = model_fns(model)
    teacher = model.init(jax.random.key(0), jnp.zeros((1, 2)), jnp.zeros(1), jnp.zeros(1, jnp.int32),
                         jnp.ones(1))["params"]
    batch = {k: v[:32] for k, v in batch_at(0).items()}
    runs = []
    for activations in (False, True):
        cfg = D.DMD2Config(num_steps=2, time_shift=1.0, ttur=2, curriculum_steps=2, base_t_kind="uniform",
                           base_t_shift=1.0, real_guidance=2.0, lora_rank=4, lora_targets=(r"kernel$",),
                           lora_activations=activations)
        tx = optax.adam(1e-2)
        step = jax.jit(D.make_dmd2_step(cfg, velocity_t, velocity_t, real_score_t, tx, tx))
        state = D.init_dmd2_state(teacher, jax.random.key(1), cfg, tx, tx)
        history = []
        for _ in range(3):
            state, metrics = step(state, batch)
            history.append(jax.device_get(metrics))
        runs.append((state, history))
    (merged, h_merged), (act, h_act) = runs
    for m, a in zip(h_merged, h_act):
        for k in ("gen_loss", "dm_loss", "base_loss", "critic_loss"):
            np.testing.assert_allclose(a[k], m[k], rtol=1e-4, atol=1e-7, err_msg=k)
    for a, m in zip(jax.tree.leaves((act.gen.params, act.critic.params)),
                    jax.tree.leaves((merged.gen.params, merged.critic.params)), strict=True):
        np.testing.assert_allclose(a, m, rtol=1e-4, atol=1e-6)
    assert float(jnp.abs(act.gen.params["out"]["kernel"]["b"]).max()) > 0
