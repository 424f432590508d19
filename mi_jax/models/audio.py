"""The audio path of MagicInfinite: Wav2Vec2 features -> audio tokens per latent frame ->
masked audio cross-attention in the DiT's final blocks.

Shapes (S = speakers, F = video frames = 1 + 4(K - 1), K = latent frames):

    audio_states [B, S, F, n_layers, C]     Wav2Vec2 hidden states of the chosen layers,
                                            at video frames (`data.prepare.Encoders.audio_at_frames`)
    AudioProjector -> tokens [B, S, K, M, audio_token_dim]
    AudioCrossAttention: video token at latent frame k attends to the M tokens of frame k of
    each speaker; speaker s's result is kept only inside its mask, then summed.

Why this shape: the window of +-`audio_window` neighbouring audio frames around each video frame
gives co-articulation context (Hallo3, EchoMimic, MultiTalk use 5-frame windows); grouping the
4 video frames of a latent frame matches the causal VAE's 4x time compression (the first
latent frame holds one video frame, so its group repeats frame 0); attention restricted to
the own latent frame keeps lip motion local in time, and the face / speaker mask keeps audio
out of the rest of the picture. The output projection starts at zero, so a freshly added
adapter leaves a pretrained backbone's output unchanged (ControlNet's zero-init argument).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mi_jax.models.dit_config import DiTConfig
from mi_jax.nn.attention import attention
from mi_jax.models.vae import TEMPORAL_FACTOR
from mi_jax.nn.layers import Dense, LayerNorm, RMSNorm, layer_norm


def num_latent_frames(num_video_frames: int) -> int:
    if num_video_frames < 1 or (num_video_frames - 1) % TEMPORAL_FACTOR:
        raise ValueError(
            f"{num_video_frames} video frames: the causal VAE needs 1 + {TEMPORAL_FACTOR}k frames "
            f"(1, {1 + TEMPORAL_FACTOR}, {1 + 2 * TEMPORAL_FACTOR}, ...); "
            "cut or pad the audio/video to such a length"
        )
    return 1 + (num_video_frames - 1) // TEMPORAL_FACTOR


def frame_windows(num_frames: int, radius: int) -> np.ndarray:
    """`[F, 2r + 1]` indices of each frame's neighbours, clamped at the ends."""
    idx = np.arange(num_frames)[:, None] + np.arange(-radius, radius + 1)[None]
    return np.clip(idx, 0, num_frames - 1)


class AudioProjector(nn.Module):
    """`[B, S, F, n_layers, C]` -> `[B, S, K, M, audio_token_dim]`."""

    config: DiTConfig

    @nn.compact
    def __call__(self, audio_states: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        b, s, f, nl, c = audio_states.shape
        if (nl, c) != (cfg.audio_feature_layers, cfg.audio_feature_dim):
            raise ValueError(
                f"audio_states has {nl} layers x {c} channels; the config expects "
                f"audio_feature_layers={cfg.audio_feature_layers} x audio_feature_dim={cfg.audio_feature_dim}"
            )
        k = num_latent_frames(f)
        win = audio_states.astype(kw["dtype"])[:, :, frame_windows(f, cfg.audio_window)]  # [B,S,F,W,nl,C]
        h = Dense(cfg.audio_hidden, ("audio_in", "audio_hidden"), name="proj_frame", **kw)(win.reshape(b, s, f, -1))
        h = nn.silu(h)
        # latent frame 0 holds video frame 0 alone: repeat it to make a full group of 4
        h = jnp.concatenate([jnp.repeat(h[:, :, :1], TEMPORAL_FACTOR - 1, axis=2), h], axis=2)
        h = h.reshape(b, s, k, TEMPORAL_FACTOR * cfg.audio_hidden)
        h = Dense(cfg.audio_hidden, ("audio_in", "audio_hidden"), name="proj_group", **kw)(h)
        h = nn.silu(h)
        tokens = Dense(cfg.audio_tokens * cfg.audio_token_dim, ("audio_hidden", "audio_embed"), name="proj_tokens", **kw)(h)
        tokens = tokens.reshape(b, s, k, cfg.audio_tokens, cfg.audio_token_dim)
        return LayerNorm(1e-6, axis_name="audio_embed", param_dtype=kw["param_dtype"], name="norm")(tokens)


class AudioCrossAttention(nn.Module):
    """Masked, per-latent-frame cross-attention from video tokens to audio tokens.

    x: `[B, Lv, D]` video tokens in (t, h, w) order (Tp token frames of equal size);
    audio: `[B, S, Tp, Ma, Da]` audio tokens per token frame; mask: `[B, S, Lv]` in [0, 1].
    Returns the update `[B, Lv, D]` (to be added to x): zero outside every speaker's mask.
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, x, audio, mask):
        cfg = self.config
        kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        b, lv, d = x.shape
        _, s, tp, ma, _ = audio.shape
        heads, dh = cfg.num_attention_heads, cfg.attention_head_dim
        q = Dense(d, ("embed", "heads"), name="to_q", **kw)(layer_norm(x, 1e-6))
        q = RMSNorm(1e-6, param_dtype=kw["param_dtype"], name="norm_q")(q.reshape(b, 1, tp, lv // tp, heads, dh))
        kv_in = audio.astype(kw["dtype"])
        k = Dense(d, ("audio_embed", "heads"), name="to_k", **kw)(kv_in).reshape(b, s, tp, ma, heads, dh)
        k = RMSNorm(1e-6, param_dtype=kw["param_dtype"], name="norm_k")(k)
        v = Dense(d, ("audio_embed", "heads"), name="to_v", **kw)(kv_in).reshape(b, s, tp, ma, heads, dh)
        q = jnp.broadcast_to(q, (b, s, tp, lv // tp, heads, dh))
        o = attention(
            q.reshape(b * s * tp, lv // tp, heads, dh),
            k.reshape(b * s * tp, ma, heads, dh),
            v.reshape(b * s * tp, ma, heads, dh),
            implementation=cfg.attention,
        )
        zero = nn.initializers.zeros
        o = Dense(d, ("heads", "embed"), name="to_out", kernel_init=zero, bias_init=zero, **kw)(o.reshape(b, s, lv, d))
        return jnp.einsum("bsld,bsl->bld", o, mask.astype(o.dtype))


def token_masks(mask: jax.Array, grid: tuple[int, int, int], patch: tuple[int, int, int]) -> jax.Array:
    """Speaker masks at latent resolution `[B, S, K, Hl, Wl]` -> per-token masks `[B, S, Lv]`
    (mean over each patch, so a token half inside a face gets 0.5)."""
    b, s, k, hl, wl = mask.shape
    pt, ph, pw = patch
    tp, hp, wp = grid
    if (k, hl, wl) != (tp * pt, hp * ph, wp * pw):
        raise ValueError(
            f"audio_mask has latent shape (K, H, W)=({k}, {hl}, {wl}); the latents are "
            f"({tp * pt}, {hp * ph}, {wp * pw}): make masks at latent resolution (faces.py does)"
        )
    m = mask.astype(jnp.float32).reshape(b, s, tp, pt, hp, ph, wp, pw).mean(axis=(3, 5, 7))
    return m.reshape(b, s, tp * hp * wp)


def tokens_per_token_frame(tokens: jax.Array, patch_t: int) -> jax.Array:
    """`[B, S, K, M, Da]` -> `[B, S, K / pt, pt * M, Da]`: a token frame covering `pt` latent
    frames sees the audio tokens of all of them."""
    b, s, k, m, da = tokens.shape
    if k % patch_t:
        raise ValueError(f"{k} latent frames are not divisible by patch_size_t={patch_t}")
    return tokens.reshape(b, s, k // patch_t, patch_t * m, da)
