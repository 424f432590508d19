"""MagicInfinite's audio path in the DiT: projector windows, per-frame masked cross-attention,
several speakers, and a fresh adapter that leaves the pretrained backbone unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from conftest import max_abs
from mi_jax.convert import load_diffusers_transformer
from mi_jax.models import DiT, DiTConfig
from mi_jax.models.audio import (
    AudioCrossAttention,
    AudioProjector,
    num_latent_frames,
)

AUDIO = dict(audio_feature_layers=3, audio_feature_dim=8, audio_window=1, audio_hidden=16, audio_tokens=4,
             audio_token_dim=12)
TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
            num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, text_embed_dim=24, pooled_projection_dim=12,
            rope_axes_dim=(4, 6, 6), guidance_embeds=False, image_condition_type="token_replace")


def _randomise(params, rng, pred):
    """Replace the leaves where pred(path) holds with noise (a trained, non-zero adapter)."""
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(rng, len(flat))
    out = {p: (0.3 * jax.random.normal(k, v.shape, v.dtype) if pred(p) else v) for (p, v), k in zip(flat.items(), keys)}
    return traverse_util.unflatten_dict(out)


def _inputs(rng, b, t, h, w, f, speakers):
    ks = jax.random.split(rng, 5)
    return dict(
        hidden_states=jax.random.normal(ks[0], (b, t, h, w, 4)),
        timestep=jnp.full((b,), 700.0),
        encoder_hidden_states=jax.random.normal(ks[1], (b, 5, 24)),
        encoder_attention_mask=jnp.ones((b, 5), jnp.int32).at[0, 3:].set(0),
        pooled_projections=jax.random.normal(ks[2], (b, 12)),
        audio_states=jax.random.normal(ks[3], (b, speakers, f, AUDIO["audio_feature_layers"], AUDIO["audio_feature_dim"])),
    )


@pytest.fixture(scope="module")
def diffusers_tiny(tmp_path_factory, torch):
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(3)
    model = HunyuanVideoTransformer3DModel(**TINY).eval()
    path = str(tmp_path_factory.mktemp("tiny_audio"))
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("scan_layers", [True, False])
def test_fresh_adapter_leaves_backbone_output_unchanged(diffusers_tiny, torch, scan_layers):
    model, path = diffusers_tiny
    cfg_plain, p_plain = load_diffusers_transformer(path, scan_layers=scan_layers)
    cfg_audio, p_audio = load_diffusers_transformer(path, scan_layers=scan_layers, audio_blocks=1, **AUDIO)
    flat = traverse_util.flatten_dict(p_audio)
    assert any(p[0] == "audio_projector" for p in flat) and any("audio_attn" in p for p in flat)

    inputs = _inputs(jax.random.key(0), 2, 2, 4, 6, 5, 1)
    out_audio = jax.jit(DiT(cfg_audio).apply)({"params": p_audio}, **inputs)
    inputs.pop("audio_states")
    out_skipped = jax.jit(DiT(cfg_audio).apply)({"params": p_audio}, **inputs)
    # the zero-initialised output projection adds 0; the two programs (with and without the adapter
    # branch) may fuse the rest differently, so float32 round-off (1e-6 relative), not bit equality
    assert max_abs(out_audio, out_skipped) <= 1e-6 * float(jnp.abs(out_skipped).max())
    # the plain backbone scans all single blocks at once: same maths, other rounding order
    out_plain = jax.jit(DiT(cfg_plain).apply)({"params": p_plain}, **inputs)
    assert max_abs(out_audio, out_plain) <= 1e-6

    # and the backbone under the audio stack is still diffusers' (the last single block moved)
    with torch.no_grad():
        ref = model(
            hidden_states=torch.from_numpy(np.moveaxis(np.asarray(inputs["hidden_states"]), -1, 1).copy()),
            timestep=torch.from_numpy(np.array(inputs["timestep"])),
            encoder_hidden_states=torch.from_numpy(np.array(inputs["encoder_hidden_states"])),
            encoder_attention_mask=torch.from_numpy(np.array(inputs["encoder_attention_mask"])),
            pooled_projections=torch.from_numpy(np.array(inputs["pooled_projections"])),
        ).sample.numpy()
    assert max_abs(np.moveaxis(np.asarray(out_audio), -1, 1), ref) <= 1e-5


def _cross_attention(seed=0):
    cfg = DiTConfig(**TINY, audio_blocks=1, **AUDIO)
    b, s, tp, hw, ma = 1, 2, 3, 12, 4
    ks = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(ks[0], (b, tp * hw, cfg.hidden_size))
    audio = jax.random.normal(ks[1], (b, s, tp, ma, AUDIO["audio_token_dim"]))
    grid = np.zeros((tp, 3, 4))
    mask_a = np.zeros_like(grid)
    mask_a[:, :, :2] = 1  # speaker A: left columns
    mask_b = np.zeros_like(grid)
    mask_b[:, :2, 3] = 1  # speaker B: top of the right column; the rest is nobody's
    mask = jnp.asarray(np.stack([mask_a, mask_b]).reshape(1, s, tp * hw))
    module = AudioCrossAttention(cfg)
    params = nn.unbox(module.init(ks[2], x, audio, mask)["params"])
    assert not np.any(np.asarray(module.apply({"params": params}, x, audio, mask)))  # zero-initialised
    params = _randomise(params, ks[3], lambda p: p[0] == "to_out")
    fn = jax.jit(lambda a: module.apply({"params": params}, x, a, mask))
    return fn, audio, mask, (tp, hw)


def test_speaker_audio_reaches_only_its_mask():
    fn, audio, mask, (tp, hw) = _cross_attention()
    base = fn(audio)
    changed = fn(audio.at[:, 0].add(1.0))  # new audio for speaker A
    diff = np.abs(np.asarray(changed - base)).max(-1)[0]
    inside_a = np.asarray(mask[0, 0]) > 0
    assert diff[inside_a].min() > 1e-4
    assert np.all(diff[~inside_a] == 0.0)  # same program; A's audio is masked to an exact 0 there
    # nobody's region gets nothing at all
    nobody = np.asarray(mask[0].sum(0)) == 0
    assert np.all(np.asarray(base)[0][nobody] == 0.0)  # a 0 mask times anything finite is 0


def test_audio_of_one_latent_frame_changes_only_that_frame():
    fn, audio, mask, (tp, hw) = _cross_attention(seed=1)
    base = fn(audio)
    f = 1
    changed = fn(audio.at[:, :, f].multiply(-2.0))
    diff = np.abs(np.asarray(changed - base)).max(-1)[0].reshape(tp, hw)
    assert diff[f].max() > 1e-4
    assert np.all(np.delete(diff, f, axis=0) == 0.0)  # same program; other frames see the same inputs


def test_projector_groups_latent_frames_with_windows():
    cfg = DiTConfig(**TINY, audio_blocks=1, **AUDIO)
    f = 13  # 1 + 4 * 3 video frames -> 4 latent frames
    feats = jax.random.normal(jax.random.key(0), (1, 1, f, 3, 8))
    proj = AudioProjector(cfg)
    params = nn.unbox(proj.init(jax.random.key(1), feats)["params"])
    fn = jax.jit(lambda a: proj.apply({"params": params}, a))
    base = fn(feats)
    assert base.shape == (1, 1, num_latent_frames(f), AUDIO["audio_tokens"], AUDIO["audio_token_dim"])
    r = AUDIO["audio_window"]
    for j in range(f):
        diff = np.abs(np.asarray(fn(feats.at[:, :, j].add(1.0)) - base)).max(axis=(0, 1, 3, 4))
        touched = {k for k in range(4) if diff[k] > 0}
        expected = {0} if j <= r else set()
        expected |= {k for k in range(1, 4) if 4 * k - 3 - r <= j <= 4 * k + r}
        assert touched == expected, (j, touched, expected)


def test_full_model_speaker_change_acts_mostly_in_its_region():
    cfg = DiTConfig(**TINY, audio_blocks=1, **AUDIO)
    model = DiT(cfg)
    b, t, h, w = 1, 2, 8, 8
    inputs = _inputs(jax.random.key(5), b, t, h, w, 5, 2)
    mask = np.zeros((1, 2, t, h, w), np.float32)
    mask[:, 0, :, :, :4] = 1  # speaker A: left half
    mask[:, 1, :, :, 4:] = 1  # speaker B: right half
    inputs["audio_mask"] = jnp.asarray(mask)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), **inputs)["params"])
    params = _randomise(params, jax.random.key(9), lambda p: "audio_attn" in p and p[-2] == "to_out")
    fn = jax.jit(lambda a: model.apply({"params": params}, **{**inputs, "audio_states": a}))
    base = fn(inputs["audio_states"])
    diff = np.abs(np.asarray(fn(inputs["audio_states"].at[:, 0].add(2.0)) - base)).mean(axis=(0, 1, 4))  # [H, W]
    inside, outside = diff[:, :4].mean(), diff[:, 4:].mean()
    assert inside > 3 * outside, (inside, outside)


def test_audio_input_errors():
    cfg = DiTConfig(**TINY, audio_blocks=1, **AUDIO)
    model = DiT(cfg)
    inputs = _inputs(jax.random.key(0), 1, 2, 4, 4, 5, 1)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), **inputs))
    bad = [
        (dict(audio_states=inputs["audio_states"][:, :, :4]), "1 \\+ 4k frames"),
        (dict(audio_states=inputs["audio_states"][:, :, :1]), "latent frames"),
        (dict(audio_states=jnp.zeros((1, 2, 5, 3, 8))), "need audio_mask"),
        (dict(audio_states=jnp.zeros((1, 1, 5, 3, 7))), "audio_feature_dim"),
        (dict(audio_mask=jnp.ones((1, 1, 2, 3, 4))), "latent resolution"),
    ]
    for change, pattern in bad:
        with pytest.raises(ValueError, match=pattern):
            jax.eval_shape(lambda p, kw: model.apply(p, **kw), params, {**inputs, **change})
    with pytest.raises(ValueError, match="audio_blocks"):
        DiTConfig(**TINY, audio_blocks=3)
