"""Rectified flow (against diffusers' scheduler), the region-adaptive loss, and LoRA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mi_jax.diffusion import flow
from mi_jax.nn.lora import lora_apply, lora_init
from mi_jax.train.losses import LossWeights, flow_matching_loss


@pytest.mark.parametrize("steps,shift", [(50, 7.0), (4, 1.0), (8, 17.0)])
def test_sampling_times_match_diffusers_scheduler(steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    np.testing.assert_allclose(np.asarray(flow.sampling_times(steps, shift)), sched.sigmas.numpy(), atol=1e-6)


def test_linear_path_and_euler():
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (2, 3, 4, 4, 2))
    noise = jax.random.normal(k2, x0.shape)
    t = jnp.array([0.0, 1.0])
    xt = flow.interpolate(x0, noise, t)
    np.testing.assert_allclose(xt[0], x0[0])
    np.testing.assert_allclose(xt[1], noise[1])
    v = flow.velocity_target(x0, noise)
    # the path is straight: one Euler step with the true velocity lands on x0
    x1 = flow.interpolate(x0, noise, jnp.ones(2))
    np.testing.assert_allclose(flow.euler_step(x1, v, 1.0, 0.0), x0, atol=1e-6)
    np.testing.assert_allclose(flow.predict_x0(xt, v, t), x0, atol=1e-6)


def test_time_sampling_and_shift():
    t = flow.sample_time(jax.random.key(1), 10_000, kind="logit_normal", shift=1.0)
    assert 0 < float(t.min()) and float(t.max()) < 1 and abs(float(jnp.median(t)) - 0.5) < 0.02
    shifted = flow.sample_time(jax.random.key(1), 10_000, kind="logit_normal", shift=7.0)
    assert float(jnp.median(shifted)) > 0.8  # shift spends time at high noise
    u = flow.sample_time(jax.random.key(2), 10_000, kind="uniform", shift=1.0)
    assert abs(float(u.mean()) - 0.5) < 0.02
    with pytest.raises(ValueError, match="timestep sampling"):
        flow.sample_time(jax.random.key(0), 2, kind="beta")


def test_region_terms_are_area_normalised():
    b, t, h, w, c = 2, 1, 8, 8, 2
    target = jnp.zeros((b, t, h, w, c))
    pred = jnp.zeros_like(target).at[:, :, :2, :2].set(1.0)  # error only in a 2x2 corner
    small = jnp.zeros((b, t, h, w)).at[:, :, :2, :2].set(1)
    big = jnp.zeros((b, t, h, w)).at[:, :, :4, :4].set(1)
    w_face = LossWeights(global_=0.0, face=1.0)
    l_small, _ = flow_matching_loss(pred, target, face_mask=small, weights=w_face)
    l_big, _ = flow_matching_loss(pred, target, face_mask=big, weights=w_face)
    np.testing.assert_allclose(float(l_small), 1.0, rtol=1e-6)  # all of the small face is wrong
    np.testing.assert_allclose(float(l_big), 0.25, rtol=1e-6)
    empty = jnp.zeros((b, t, h, w))
    l_empty, _ = flow_matching_loss(pred, target, face_mask=empty, weights=LossWeights(1.0, 5.0, 5.0),
                                    mouth_mask=empty)
    np.testing.assert_allclose(float(l_empty), 4 / 64, rtol=1e-6)  # only the global term
    l_dropped, _ = flow_matching_loss(pred.at[1].set(100.0), target, sample_weight=jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(float(l_dropped), 4 / 64, rtol=1e-6)


def test_lora_starts_at_the_base_and_merges():
    params = {"blocks": {"attn": {"to_q": {"kernel": jnp.ones((3, 8, 6)), "bias": jnp.zeros(6)}}},
              "proj_mlp": {"kernel": jnp.ones((8, 4))}}
    lora = lora_init(params, jax.random.key(0), rank=2)
    assert lora["blocks"]["attn"]["to_q"]["kernel"]["a"].shape == (3, 8, 2)
    assert lora["proj_mlp"]["kernel"]["b"].shape == (2, 4)
    merged = lora_apply(params, lora)
    # b = 0, so a @ b is an exact 0 and w + 0 == w: bit equal on any machine
    assert all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(params)))
    lora["proj_mlp"]["kernel"]["b"] = jnp.ones((2, 4))
    merged = lora_apply(params, lora, scale=0.5)
    expected = 1.0 + 0.5 * lora["proj_mlp"]["kernel"]["a"] @ jnp.ones((2, 4))
    np.testing.assert_allclose(merged["proj_mlp"]["kernel"], expected, rtol=1e-6)
    with pytest.raises(ValueError, match="no kernel matches"):
        lora_init(params, jax.random.key(0), 2, targets=[r"nothing"])
