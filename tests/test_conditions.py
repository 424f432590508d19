"""One path from conditions to the DiT: pretraining, distillation (its generator and its CFG
real score) and the sampler hand the DiT identical arguments for the same conditions, and a
condition dropped in training is dropped as the sampler's CFG branches drop it."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import CONFIGS
from mi_jax.config_utils import load_config
from mi_jax.convert.hunyuan import abstract_dit_params
from mi_jax.diffusion.guidance import GuidanceSchedule
from mi_jax.diffusion.sampler import SamplerConfig, initial_carry, make_window_fn
from mi_jax.models.dit import DiT
from mi_jax.models.dit_config import DiTConfig
from mi_jax.train import distill, pretrain

W, S = 3, 2  # latent frames per window, speakers


def _config(*overrides):
    return load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,distill"),
                       ["stage.dropout.text=0.0", "stage.dropout.audio=0.0", "stage.dropout.reference=0.0",
                        *overrides])


@pytest.fixture(scope="module")
def setup():
    config = _config()
    mcfg = DiTConfig.coerce(config.model)
    # random weights on the parameter shapes (compiling the DiT's init would take longer)
    shapes = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_dit_params(mcfg)))
    keys = jax.random.split(jax.random.key(0), len(shapes[0]))
    params = jax.tree_util.tree_unflatten(shapes[1], [
        0.05 * jax.random.normal(k, s.shape, s.dtype) for k, (_, s) in zip(keys, shapes[0])])
    k = jax.random.split(jax.random.key(1), 5)
    h = w = 4
    f = 1 + 4 * (W - 1)
    masks = np.zeros((1, S, W, h, w), np.float32)
    masks[:, 0, :, :, :2], masks[:, 1, :, :, 2:] = 1, 1
    cond = dict(text_embeds=jax.random.normal(k[0], (1, 6, mcfg.text_embed_dim)),
                text_mask=jnp.array([[1, 1, 1, 1, 0, 0]], jnp.int32),
                pooled=jax.random.normal(k[1], (1, mcfg.pooled_projection_dim)),
                ref_latent=jax.random.normal(k[2], (1, 1, h, w, mcfg.in_channels)),
                audio_states=jax.random.normal(k[3], (1, S, f, mcfg.audio_feature_layers, mcfg.audio_feature_dim)),
                speaker_masks=jnp.asarray(masks))
    batch = dict(cond, latents=jax.random.normal(k[4], (1, W, h, w, mcfg.in_channels)))
    return config, mcfg, params, cond, batch


def _dit_calls(fn, *args):
    """The keyword arguments of every DiT call `fn(*args)` makes (jitted; numpy arrays)."""
    seen = []

    def interceptor(next_fun, a, kw, context):
        if isinstance(context.module, DiT) and context.method_name == "__call__":
            jax.debug.callback(lambda kw: seen.append(jax.tree.map(np.asarray, kw)), kw)
        return next_fun(*a, **kw)

    def run(*args):
        with nn.intercept_methods(interceptor):
            return fn(*args)

    jax.block_until_ready(jax.jit(run)(*args))
    return seen


def _same(a: dict, b: dict, *, skip=()):
    assert sorted(a) == sorted(b)
    for name in a:
        if name in skip:
            continue
        assert a[name].shape == b[name].shape and a[name].dtype == b[name].dtype, name
        if np.issubdtype(a[name].dtype, np.floating):  # different programs: float32 round-off of what they compute
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-6 * float(np.abs(b[name]).max()),
                                       err_msg=name)
        else:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)  # integers and booleans


def _conditioned(kw: dict) -> dict:
    """Everything but the noisy latents: token_replace puts the reference at frame 0."""
    return dict(kw, hidden_states=kw["hidden_states"][:, :1])


def _sampler_calls(mcfg, params, cond, guidance: GuidanceSchedule):
    scfg = SamplerConfig(window=W, overlap=1, steps=1, shift=1.0, guidance=guidance)
    window_fn = make_window_fn(mcfg, scfg)
    carry = initial_carry(0, 1, cond["ref_latent"].shape[2:], scfg)
    sampler_cond = {k: v for k, v in cond.items() if k != "audio_states"}
    return _dit_calls(lambda p, c, a: window_fn(p, c, carry, a), params, sampler_cond, cond["audio_states"])


def test_pretraining_distillation_and_sampler_give_the_dit_the_same_arguments(setup, monkeypatch):
    config, mcfg, params, cond, batch = setup
    assert mcfg.guidance_embeds and mcfg.audio_blocks and mcfg.image_condition_type == "token_replace"
    # the sampler's first step is at t = 1; pretraining's time draw is pinned there too
    monkeypatch.setattr(pretrain, "sample_time", lambda key, n, **kw: jnp.ones((n,), jnp.float32))
    train = _dit_calls(lambda p, b: pretrain.make_loss_fn(config)(p, b, jax.random.key(0)), params, batch)
    gen_apply, _, real_score, _ = distill.make_adapters(config)
    dmd2_batch = distill.to_dmd2_batch(batch)
    t1 = jnp.ones((1,), jnp.float32)
    gen = _dit_calls(lambda p, b: gen_apply(p, b["x0"], t1, b["cond"]), params, dmd2_batch)
    sample = _sampler_calls(mcfg, params, cond, GuidanceSchedule(1.0, 1.0, 1.0))
    assert len(train) == len(gen) == len(sample) == 1
    assert "audio_mask" in sample[0] and sample[0]["audio_states"].shape[1] == S
    _same(_conditioned(train[0]), _conditioned(sample[0]))
    _same(_conditioned(gen[0]), _conditioned(sample[0]))

    # the teacher's CFG passes in distillation are the sampler's CFG passes
    guided = GuidanceSchedule(text=config.distill.teacher_cfg_text, audio=config.distill.teacher_cfg_audio)
    assert guided.branches == distill.REAL_BRANCHES
    real = _dit_calls(lambda p, b: real_score(p, b["x0"], t1, b["cond"], jnp.full((1,), 2.0)), params, dmd2_batch)
    sample = _sampler_calls(mcfg, params, cond, guided)
    assert len(real) == len(sample) == 1 and real[0]["hidden_states"].shape[0] == 3
    _same(_conditioned(real[0]), _conditioned(sample[0]))


@pytest.mark.parametrize("dropped, branch", [("text", 1), ("audio", 2)])
def test_training_dropout_is_the_samplers_branch(setup, monkeypatch, dropped, branch):
    """Dropping text (audio too) in training gives the DiT what the sampler's no_text (no_audio)
    branch gives it."""
    _, mcfg, params, cond, batch = setup
    drops = ["stage.dropout.text=1.0"] + (["stage.dropout.audio=1.0"] if dropped == "audio" else [])
    config = _config(*drops)
    monkeypatch.setattr(pretrain, "sample_time", lambda key, n, **kw: jnp.ones((n,), jnp.float32))
    train = _dit_calls(lambda p, b: pretrain.make_loss_fn(config)(p, b, jax.random.key(0)), params, batch)
    sample = _sampler_calls(mcfg, params, cond, GuidanceSchedule(text=2.0, audio=3.0))
    one = jax.tree.map(lambda x: x[branch : branch + 1], sample[0])
    _same(_conditioned(train[0]), _conditioned(one))
    assert np.abs(train[0]["encoder_hidden_states"]).max() == 0
