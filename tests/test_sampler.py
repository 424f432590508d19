"""Sliding-window sampling: generating L windows equals k windows then continuing from the
carry; guidance branches; window audio alignment."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mi_jax.diffusion.guidance import GuidanceSchedule, combine, stack_branches
from mi_jax.diffusion.sampler import (
    SamplerConfig,
    initial_carry,
    make_window_fn,
    pad_audio_states,
    window_audio,
)
from mi_jax.models import DiT, DiTConfig, example_inputs

CFG = DiTConfig(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=8, pooled_projection_dim=4,
                rope_axes_dim=(4, 6, 6), guidance_embeds=False, image_condition_type="token_replace", audio_blocks=1,
                audio_feature_layers=2, audio_feature_dim=8, audio_window=1, audio_hidden=8, audio_tokens=2,
                audio_token_dim=8)
SAMPLER = SamplerConfig(window=4, overlap=1, steps=2, shift=3.0, guidance=GuidanceSchedule(text=2.0, audio=3.0))


@pytest.fixture(scope="module")
def setup():
    model = DiT(CFG)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), **example_inputs(CFG, frames=2)))["params"]
    # a non-zero audio adapter, so the audio matters
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.1 if "audio_attn" in jax.tree_util.keystr(p) and "to_out" in jax.tree_util.keystr(p) else x,
        params)
    k = jax.random.split(jax.random.key(1), 4)
    cond = dict(text_embeds=jax.random.normal(k[0], (1, 5, 8)), text_mask=jnp.ones((1, 5), jnp.int32),
                pooled=jax.random.normal(k[1], (1, 4)), ref_latent=jax.random.normal(k[2], (1, 1, 4, 4, 4)))
    n_windows = 4
    audio = pad_audio_states(jax.random.normal(k[3], (1, 1, 30, 2, 8)), SAMPLER.audio_frames(n_windows))
    return params, cond, audio, n_windows


def _run(params, cond, audio, n, *, seed, carry=None):
    """Windows one after another as the pipeline runs them: `(latents after the reference, carry)`."""
    window_fn = jax.jit(make_window_fn(CFG, SAMPLER))
    fresh = carry is None
    carry = initial_carry(seed, 1, (4, 4, 4), SAMPLER) if fresh else carry
    start = int(carry["index"])
    windows = window_audio(audio, SAMPLER, start + n)[start:]
    out = []
    for k in range(n):
        carry, (motion, new) = window_fn(params, cond, carry, windows[k])
        out += [motion, new] if fresh and k == 0 else [new]
    return jnp.concatenate(out, 1), carry


def test_continuing_from_the_carry_equals_one_run(setup):
    params, cond, audio, n = setup
    whole, _ = _run(params, cond, audio, n, seed=5)
    assert whole.shape == (1, SAMPLER.generated_latents(n), 4, 4, 4)
    first, carry = _run(params, cond, audio, 2, seed=5)
    rest, _ = _run(params, cond, audio, n - 2, seed=5, carry=carry)
    np.testing.assert_allclose(np.asarray(jnp.concatenate([first, rest], 1)), np.asarray(whole), atol=1e-5)
    other_seed, _ = _run(params, cond, audio, n, seed=6)
    assert float(jnp.abs(other_seed - whole).max()) > 1e-2


def test_window_audio_alignment():
    cfg = SamplerConfig(window=5, overlap=2)
    frames = cfg.audio_frames(3)
    assert frames == 1 + 4 * (2 + 3 * 2)
    feats = jnp.arange(frames, dtype=jnp.float32).reshape(1, 1, frames, 1, 1)
    win = window_audio(feats, cfg, 3)
    assert win.shape == (3, 1, 1, 17, 1, 1)
    # window k starts at global latent 2k: video frame 8k sits at its reference position
    np.testing.assert_array_equal(np.asarray(win[:, 0, 0, 0, 0, 0]), [0, 8, 16])  # integer frame indices
    assert cfg.num_windows(frames) == 3
    with pytest.raises(ValueError, match="pad with silence"):
        window_audio(feats[:, :, :20], cfg, 3)
    with pytest.raises(ValueError, match="window"):
        SamplerConfig(window=3, overlap=2)


def test_multi_condition_cfg_combination():
    s = GuidanceSchedule(text=2.0, audio=3.0, reference=1.5, end_fraction=0.5)
    assert s.branches == ("full", "no_text", "no_audio", "uncond")
    full, no_text, no_audio, uncond = 1.0, 2.0, 4.0, 8.0
    v = jnp.array([full, no_text, no_audio, uncond])[:, None]
    out = combine(v, s.branches, s.scales(1.0))
    expected = uncond + 1.5 * (no_audio - uncond) + 3.0 * (no_text - no_audio) + 2.0 * (full - no_text)
    np.testing.assert_allclose(float(out[0, 0]), expected)
    # at t = 0 each scale is halfway back to 1
    out0 = combine(v, s.branches, s.scales(0.0))
    expected0 = uncond + 1.25 * (no_audio - uncond) + 2.0 * (no_text - no_audio) + 1.5 * (full - no_text)
    np.testing.assert_allclose(float(out0[0, 0]), expected0)
    cond = dict(text_embeds=jnp.ones((1, 3, 2)), text_mask=jnp.ones((1, 3), jnp.int32), pooled=jnp.ones((1, 2)),
                ref_latent=jnp.ones((1, 1, 2, 2, 1)), audio_states=jnp.ones((1, 1, 5, 1, 1)))
    st = stack_branches(cond, s.branches)
    assert st["text_embeds"].shape[0] == 4
    np.testing.assert_array_equal(np.asarray(st["text_mask"][1]), [1, 0, 0])  # empty prompt keeps one token
    assert float(st["audio_states"][2].sum()) == 0 and float(st["audio_states"][1].sum()) > 0
    assert float(st["ref_latent"][3].sum()) == 0 and float(st["ref_latent"][2].sum()) > 0
    assert GuidanceSchedule(1.0, 1.0, 1.0).branches == ("full",)
