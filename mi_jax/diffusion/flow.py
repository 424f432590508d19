"""Rectified flow, as HunyuanVideo(-I2V) trains and samples it.

Source: Tencent-Hunyuan/HunyuanVideo-I2V hyvideo/diffusion/flow/transport.py and path.py with
`--flow-reverse`:

    x_t = (1 - t) * x0 + t * noise,       t in [0, 1], t = 1 is pure noise
    target velocity u = noise - x0        (the model predicts u; loss = mean (v - u)^2)
    model timestep input = 1000 * t
    training t: logit-normal (t = sigmoid(u), u ~ N(m, s)) or uniform, then the SD3 shift
    shift(t) = s * t / (1 + (s - 1) * t)  (s = 7 for training and inference by default)
    sampling: t_i = shift(linspace(1, 0, N + 1)), Euler x <- x + (t_{i+1} - t_i) * v

Used by training (train/) and sampling (diffusion/sampler.py) alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

TIMESTEP_SCALE = 1000.0


def shift_time(t: jax.Array, shift: float) -> jax.Array:
    """SD3 / HunyuanVideo time shift; shift > 1 spends more steps at high noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """`x_t = (1 - t) x0 + t noise`; t: `[B]` broadcast over the remaining axes."""
    t = t.reshape(t.shape + (1,) * (x0.ndim - t.ndim)).astype(x0.dtype)
    return (1.0 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    return noise - x0


def sample_time(rng, batch: int, *, kind: str = "logit_normal", shift: float = 7.0, mean: float = 0.0,
                std: float = 1.0) -> jax.Array:
    """Training times `[B]` in (0, 1): logit-normal (HunyuanVideo's "lognorm") or uniform,
    then shifted."""
    if kind == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(rng, (batch,)))
    elif kind == "uniform":
        t = jax.random.uniform(rng, (batch,), minval=1e-5, maxval=1.0)
    else:
        raise ValueError(f"unknown timestep sampling {kind!r}; use 'logit_normal' or 'uniform'")
    return shift_time(t, shift)


def sampling_times(steps: int, shift: float = 7.0) -> jax.Array:
    """`[steps + 1]` decreasing times from 1 to 0 (diffusers' FlowMatchEulerDiscreteScheduler
    with `shift`: sigmas = shift(linspace(1, 0, N + 1)[:-1]), then a final 0)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_time(jnp.linspace(1.0, 0.0, steps + 1), shift)


def euler_step(x: jax.Array, v: jax.Array, t: jax.Array, t_next: jax.Array) -> jax.Array:
    """One Euler step of dx/dt = v from t to t_next (t_next < t when denoising)."""
    return (x.astype(jnp.float32) + (t_next - t) * v.astype(jnp.float32)).astype(x.dtype)


def predict_x0(x_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
    """The clean sample implied by a velocity: x0 = x_t - t v."""
    t = jnp.asarray(t).reshape(jnp.shape(t) + (1,) * (x_t.ndim - jnp.ndim(t)))
    return x_t - t * v
