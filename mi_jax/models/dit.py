"""HunyuanVideo(-I2V) diffusion transformer in Flax linen.

Computes what diffusers' `HunyuanVideoTransformer3DModel` computes (parity tests in
tests/test_dit_parity.py), with channels-last video:

    hidden_states [B, T, H, W, C] --patchify--> video tokens [B, Lv, D]   (Lv = T/pt * H/p * W/p)
    encoder_hidden_states [B, Lt, text_embed_dim] --token refiner--> text tokens [B, Lt, D]
    timestep, pooled_projections (+ guidance) --> conditioning vector temb [B, D]
    num_layers dual-stream blocks (own weights per stream, joint attention, 3D RoPE on video)
    num_single_layers single-stream blocks over [video; text]
    adaLN final norm, linear, unpatchify --> [B, T, H, W, out_channels]

Text padding: diffusers counts the valid text tokens (`encoder_attention_mask.sum()`) and masks
key positions past `Lv + count` in the main blocks, so padding is assumed to sit at the end;
the token refiner uses the mask itself. Both are reproduced exactly.

Image conditions (diffusers' `image_condition_type`):
- `latent_concat`: the caller concatenates [noisy latents, image latents, mask] on channels
  (see `image_condition_input`); the model only sees more input channels.
- `token_replace`: the first latent frame holds the clean image latent, and its tokens are
  modulated with the t = 0 embedding (`token_replace_emb`) instead of the current timestep's.

One Flax module per diffusers module, under diffusers' names, so conversion is a name map
(mi_jax/convert/hunyuan.py); the blocks' alike headers are that mirror, not logic to share.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from mi_jax.models.audio import AudioCrossAttention, AudioProjector, token_masks, tokens_per_token_frame
from mi_jax.models.dit_config import DiTConfig
from mi_jax.models.vae import TEMPORAL_FACTOR
from mi_jax.nn.attention import attention
from mi_jax.nn.layers import (
    Dense,
    FeedForward,
    LayerNorm,
    MLPEmbedder,
    Modulation,
    RMSNorm,
    gate,
    modulated_layer_norm,
    partitioned,
    timestep_embedding,
    torch_default_kernel_init,
)
from mi_jax.nn.rope import apply_rope, rope_frequencies

TOKENS = ("activation_batch", "activation_length", "activation_embed")
HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
VECTOR = ("activation_batch", "activation_embed")
EPS = 1e-6

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload_dots": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def _dtypes(cfg: DiTConfig) -> dict[str, Any]:
    return dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def _pick(normal: list[jax.Array], replaced: list[jax.Array] | None, first: jax.Array | None):
    """Per-token modulation: `replaced[i]` on tokens where `first` is True, else `normal[i]`."""
    if replaced is None:
        return normal
    sel = first[None, :, None]
    return [jnp.where(sel, r[:, None], n[:, None]) for n, r in zip(normal, replaced)]


class Attention(nn.Module):
    """diffusers' `Attention` as HunyuanVideo uses it.

    qk_norm: RMSNorm on q and k per head. added_kv: a second stream (`context`) with its own
    projections joins the attention (dual-stream blocks). out_proj: `to_out.0` (absent in
    single-stream blocks, whose output projection is the block's `proj_out`).
    rope: (cos, sin) for the first `len(cos)` tokens of `x` (the video tokens).
    """

    config: DiTConfig
    qk_norm: bool = True
    added_kv: bool = False
    out_proj: bool = True

    def _project(self, name, norm_name, h):
        cfg = self.config
        b, n, _ = h.shape
        y = Dense(cfg.hidden_size, ("embed", "heads"), name=name, **_dtypes(cfg))(h)
        y = nn.with_logical_constraint(y.reshape(b, n, cfg.num_attention_heads, -1), HEADS)
        if norm_name is not None and self.qk_norm:
            y = RMSNorm(EPS, param_dtype=jnp.dtype(cfg.param_dtype), name=norm_name)(y)
        return y

    @nn.compact
    def __call__(self, x, context=None, rope=None, mask=None, kv_lengths=None):
        cfg = self.config
        q = self._project("to_q", "norm_q", x)
        k = self._project("to_k", "norm_k", x)
        v = self._project("to_v", None, x)
        if rope is not None:
            n = rope[0].shape[0]
            q = jnp.concatenate([apply_rope(q[:, :n], *rope), q[:, n:]], axis=1)
            k = jnp.concatenate([apply_rope(k[:, :n], *rope), k[:, n:]], axis=1)
        if self.added_kv:
            q = jnp.concatenate([q, self._project("add_q_proj", "norm_added_q", context)], axis=1)
            k = jnp.concatenate([k, self._project("add_k_proj", "norm_added_k", context)], axis=1)
            v = jnp.concatenate([v, self._project("add_v_proj", None, context)], axis=1)
        out = attention(q, k, v, implementation=cfg.attention, mask=mask, kv_lengths=kv_lengths)
        out = out.reshape(*out.shape[:2], -1)
        dense = lambda name: Dense(cfg.hidden_size, ("heads", "embed"), name=name, **_dtypes(cfg))  # noqa: E731
        if self.added_kv:
            n = x.shape[1]
            return dense("to_out_0")(out[:, :n]), dense("to_add_out")(out[:, n:])
        return dense("to_out_0")(out) if self.out_proj else out


class DualStreamBlock(nn.Module):
    """`HunyuanVideoTransformerBlock` (and its token-replace variant when `tr_emb` is given).

    carry: (video [B, Lv, D], text [B, Lt, D]); temb, tr_emb: [B, D]; first: [Lv] bool.
    """

    config: DiTConfig

    @nn.compact
    def __call__(self, carry, temb, tr_emb, first, rope, kv_lengths):
        cfg = self.config
        x, c = (nn.with_logical_constraint(t, TOKENS) for t in carry)
        norm1 = Modulation(6, name="norm1", **_dtypes(cfg))
        mods = _pick(norm1(temb), None if tr_emb is None else norm1(tr_emb), first)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = Modulation(
            6, name="norm1_context", **_dtypes(cfg)
        )(temb)

        attn_x, attn_c = Attention(cfg, added_kv=True, name="attn")(
            modulated_layer_norm(x, shift_msa, scale_msa, EPS),
            modulated_layer_norm(c, c_shift_msa, c_scale_msa, EPS),
            rope=rope,
            kv_lengths=kv_lengths,
        )
        x = x + gate(attn_x, gate_msa)
        c = c + gate(attn_c, c_gate_msa)

        ff = FeedForward(cfg.mlp_ratio, "gelu-approximate", name="ff", **_dtypes(cfg))
        ff_c = FeedForward(cfg.mlp_ratio, "gelu-approximate", name="ff_context", **_dtypes(cfg))
        x = x + gate(ff(modulated_layer_norm(x, shift_mlp, scale_mlp, EPS)), gate_mlp)
        c = c + gate(ff_c(modulated_layer_norm(c, c_shift_mlp, c_scale_mlp, EPS)), c_gate_mlp)
        return (nn.with_logical_constraint(x, TOKENS), nn.with_logical_constraint(c, TOKENS)), None


class SingleStreamBlock(nn.Module):
    """`HunyuanVideoSingleTransformerBlock` (token-replace variant when `tr_emb` is given).

    carry: [B, Lv + Lt, D] (video first); first: [Lv + Lt] bool.
    with_audio: MagicInfinite's audio cross-attention follows the block (`audio`: tokens
    [B, S, Tp, Ma, Da], `audio_mask`: [B, S, Lv]); skipped when `audio` is None.
    """

    config: DiTConfig
    with_audio: bool = False

    @nn.compact
    def __call__(self, x, temb, tr_emb, first, rope, kv_lengths, audio=None, audio_mask=None):
        cfg = self.config
        x = nn.with_logical_constraint(x, TOKENS)
        norm = Modulation(3, name="norm", **_dtypes(cfg))
        shift, scale, g = _pick(norm(temb), None if tr_emb is None else norm(tr_emb), first)
        h = modulated_layer_norm(x, shift, scale, EPS)
        mlp = Dense(int(cfg.hidden_size * cfg.mlp_ratio), ("embed", "mlp"), name="proj_mlp", **_dtypes(cfg))(h)
        mlp = nn.gelu(mlp, approximate=True)
        attn = Attention(cfg, out_proj=False, name="attn")(h, rope=rope, kv_lengths=kv_lengths)
        out = Dense(cfg.hidden_size, ("mlp", "embed"), name="proj_out", **_dtypes(cfg))(
            jnp.concatenate([attn, mlp], axis=-1)
        )
        x = x + gate(out, g)
        if self.with_audio and audio is not None:
            n = audio_mask.shape[-1]
            update = AudioCrossAttention(cfg, name="audio_attn")(x[:, :n], audio, audio_mask)
            x = jnp.concatenate([x[:, :n] + update, x[:, n:]], axis=1)
        return nn.with_logical_constraint(x, TOKENS), None


class RefinerBlock(nn.Module):
    """`HunyuanVideoIndividualTokenRefinerBlock`: x [B, Lt, D], temb [B, D], mask [B, 1, Lt, Lt]."""

    config: DiTConfig

    @nn.compact
    def __call__(self, x, temb, mask):
        cfg = self.config
        pdt = jnp.dtype(cfg.param_dtype)
        gate_msa, gate_mlp = Modulation(2, name="norm_out", **_dtypes(cfg))(temb)
        h = LayerNorm(EPS, param_dtype=pdt, name="norm1")(x)
        x = x + gate(Attention(cfg, qk_norm=False, name="attn")(h, mask=mask), gate_msa)
        h = LayerNorm(EPS, param_dtype=pdt, name="norm2")(x)
        # diffusers builds the refiner with its default mlp_ratio=4.0, whatever config.mlp_ratio says
        return x + gate(FeedForward(4.0, "linear-silu", name="ff", **_dtypes(cfg))(h), gate_mlp)


class TokenRefinerStack(nn.Module):
    config: DiTConfig

    @nn.compact
    def __call__(self, x, temb, mask):
        for i in range(self.config.num_refiner_layers):
            x = RefinerBlock(self.config, name=f"refiner_blocks_{i}")(x, temb, mask)
        return x


class TokenRefiner(nn.Module):
    """`HunyuanVideoTokenRefiner`: text states [B, Lt, E] + timestep -> refined tokens [B, Lt, D]."""

    config: DiTConfig

    @nn.compact
    def __call__(self, text, timestep, mask):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        text = text.astype(dt)
        m = mask.astype(jnp.float32)[..., None]
        pooled = ((text.astype(jnp.float32) * m).sum(1) / m.sum(1)).astype(dt)
        temb = MLPEmbedder(cfg.hidden_size, name="timestep_embedder", **_dtypes(cfg))(
            timestep_embedding(timestep).astype(dt)
        )
        # diffusers nests these two under `context_embedder.time_text_embed` (the name map says so)
        temb = temb + MLPEmbedder(cfg.hidden_size, "text_embed", name="text_embedder", **_dtypes(cfg))(pooled)
        x = Dense(cfg.hidden_size, ("text_embed", "embed"), name="proj_in", **_dtypes(cfg))(text)
        valid = jnp.asarray(mask).astype(bool)
        attn_mask = valid[:, None, None, :] & valid[:, None, :, None]
        attn_mask = attn_mask.at[..., 0].set(True)  # fully padded rows still attend somewhere
        return TokenRefinerStack(cfg, name="token_refiner")(x, temb, attn_mask)


class ConditionEmbedding(nn.Module):
    """`HunyuanVideoConditionEmbedding`: temb = t_emb + pooled_emb (+ guidance_emb), and for
    token_replace the t = 0 embedding `tr_emb = t0_emb + pooled_emb`."""

    config: DiTConfig

    @nn.compact
    def __call__(self, timestep, pooled, guidance):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        t_embedder = MLPEmbedder(cfg.hidden_size, name="timestep_embedder", **_dtypes(cfg))
        pooled_emb = MLPEmbedder(cfg.hidden_size, name="text_embedder", **_dtypes(cfg))(pooled.astype(dt))
        temb = t_embedder(timestep_embedding(timestep).astype(dt))
        tr_emb = None
        if cfg.image_condition_type == "token_replace":
            tr_emb = t_embedder(timestep_embedding(jnp.zeros_like(timestep)).astype(dt)) + pooled_emb
        if cfg.guidance_embeds:
            g = MLPEmbedder(cfg.hidden_size, name="guidance_embedder", **_dtypes(cfg))
            temb = temb + g(timestep_embedding(guidance).astype(dt))
        return temb + pooled_emb, tr_emb


class DiT(nn.Module):
    """The MagicInfinite backbone (HunyuanVideo-compatible). `config`: a `DiTConfig`, a dict
    or an ml_collections ConfigDict (e.g. `get_config("tiny").model`).

    `apply({"params": params}, hidden_states, timestep, encoder_hidden_states,
    encoder_attention_mask, pooled_projections, guidance=None)` -> `[B, T, H, W, out_channels]`:

    hidden_states: `[B, T, H, W, in_channels]` latents (channels last);
    timestep: `[B]` or scalar, in diffusers' scale (t * 1000 for flow matching);
    encoder_hidden_states: `[B, Lt, text_embed_dim]`; encoder_attention_mask: `[B, Lt]` (1 = token,
    padding at the end; None = no padding); pooled_projections: `[B, pooled_projection_dim]`;
    guidance: `[B]` embedded-guidance scale x 1000, required iff `config.guidance_embeds`;
    audio_states: `[B, S, F, n_layers, C]` Wav2Vec2 features per video frame (F = 1 + 4(T - 1)),
    used by the final `config.audio_blocks` blocks; audio_mask: `[B, S, T, H, W]` where each
    speaker may act (latent resolution; optional for one speaker). See mi_jax/models/audio.py.
    """

    config: Any

    def __post_init__(self):
        object.__setattr__(self, "config", DiTConfig.coerce(self.config))
        super().__post_init__()

    def _check(self, x, text, mask, pooled, guidance):
        cfg = self.config
        if x.ndim != 5:
            raise ValueError(f"hidden_states must be [B, T, H, W, C] (channels last), got shape {x.shape}")
        b, t, h, w, ch = x.shape
        if ch != cfg.in_channels:
            hint = " (latent_concat: concatenate [latents, image latents, mask], see image_condition_input)"
            raise ValueError(
                f"hidden_states has {ch} channels, the config expects in_channels={cfg.in_channels}"
                + (hint if cfg.image_condition_type == "latent_concat" else "")
                + "; is the video channels-last [B, T, H, W, C]?"
            )
        if t % cfg.patch_size_t or h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(
                f"latent size T,H,W=({t},{h},{w}) must be divisible by the patch "
                f"({cfg.patch_size_t},{cfg.patch_size},{cfg.patch_size}); crop or pad the latents"
            )
        if text.ndim != 3 or text.shape[0] != b or text.shape[-1] != cfg.text_embed_dim:
            raise ValueError(
                f"encoder_hidden_states must be [B={b}, Lt, text_embed_dim={cfg.text_embed_dim}], got {text.shape}"
            )
        if mask is not None and mask.shape != text.shape[:2]:
            raise ValueError(f"encoder_attention_mask must be [B, Lt]={text.shape[:2]}, got {mask.shape}")
        if pooled.shape != (b, cfg.pooled_projection_dim):
            raise ValueError(
                f"pooled_projections must be [B={b}, {cfg.pooled_projection_dim}], got {pooled.shape}"
            )
        if cfg.guidance_embeds and guidance is None:
            raise ValueError(
                "config.guidance_embeds=True: pass `guidance` (the embedded CFG scale x 1000, shape [B])"
            )

    def _blocks(self, block_cls, n: int, name: str, carry, *args, **block_kw):
        """`n` blocks under `name`: one `nn.scan` over stacked weights (`scan_layers`), unrolled
        as `scan_unroll` says, or a python loop over per-block weights."""
        cfg = self.config
        cls = block_cls
        if cfg.remat_policy != "none":
            cls = nn.remat(block_cls, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
        if n == 0:
            return carry
        if cfg.scan_layers:
            stack = nn.scan(
                cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast,) * len(args),
                length=n,
                unroll=scan_unroll(cfg.scan_unroll, n),
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            carry, _ = stack(cfg, name=name, **block_kw)(carry, *args)
            return carry
        for i in range(n):
            carry, _ = cls(cfg, name=f"{name}_{i}", **block_kw)(carry, *args)
        return carry

    def _audio(self, audio_states, audio_mask, grid, b):
        """Audio tokens per token frame and per-token speaker masks, or (None, None)."""
        cfg = self.config
        if audio_states is None:
            if audio_mask is not None:
                raise ValueError("audio_mask given without audio_states")
            return None, None
        if audio_states.ndim == 4:  # one speaker
            audio_states = audio_states[:, None]
        if audio_states.ndim != 5 or audio_states.shape[0] != b:
            raise ValueError(
                f"audio_states must be [B={b}, S, F, n_layers, C] (or [B, F, n_layers, C] for one speaker), "
                f"got {audio_states.shape}"
            )
        speakers = audio_states.shape[1]
        tokens = AudioProjector(cfg, name="audio_projector")(audio_states)
        if tokens.shape[2] != grid[0] * cfg.patch_size_t:
            raise ValueError(
                f"audio_states cover {audio_states.shape[2]} video frames = {tokens.shape[2]} latent frames, "
                f"but the latents have {grid[0] * cfg.patch_size_t}; align the audio to 1 + {TEMPORAL_FACTOR}(T-1) video frames"
            )
        tokens = tokens_per_token_frame(tokens, cfg.patch_size_t)
        if audio_mask is None:
            if speakers > 1:
                raise ValueError(f"{speakers} speakers need audio_mask [B, S, T, H, W] saying where each one is")
            masks = jnp.ones((b, 1, grid[0] * grid[1] * grid[2]), jnp.float32)
        else:
            if audio_mask.ndim != 5 or audio_mask.shape[:2] != (b, speakers):
                raise ValueError(
                    f"audio_mask must be [B={b}, S={speakers}, T, H, W] at latent resolution, got {audio_mask.shape}"
                )
            masks = token_masks(audio_mask, grid, (cfg.patch_size_t, cfg.patch_size, cfg.patch_size))
        return tokens, masks

    @nn.compact
    def __call__(
        self,
        hidden_states,
        timestep,
        encoder_hidden_states,
        encoder_attention_mask=None,
        pooled_projections=None,
        guidance=None,
        audio_states=None,
        audio_mask=None,
    ):
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        b = hidden_states.shape[0]
        if pooled_projections is None:
            raise ValueError("pooled_projections is required ([B, pooled_projection_dim], e.g. CLIP's pooled output)")
        self._check(hidden_states, encoder_hidden_states, encoder_attention_mask, pooled_projections, guidance)
        if encoder_attention_mask is None:
            encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (b,))
        if guidance is not None:
            guidance = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (b,))

        _, t, h, w, _ = hidden_states.shape
        pt, p = cfg.patch_size_t, cfg.patch_size
        grid = (t // pt, h // p, w // p)
        rope = rope_frequencies(grid, cfg.rope_axes_dim, cfg.rope_theta)

        temb, tr_emb = ConditionEmbedding(cfg, name="time_text_embed")(timestep, pooled_projections, guidance)
        temb = nn.with_logical_constraint(temb, VECTOR)
        tr_emb = None if tr_emb is None else nn.with_logical_constraint(tr_emb, VECTOR)
        proj = nn.Conv(
            cfg.hidden_size,
            (pt, p, p),
            strides=(pt, p, p),
            padding="VALID",
            kernel_init=partitioned(torch_default_kernel_init, ("conv_kernel_t", "conv_kernel_h", "conv_kernel_w", "conv_in", "embed")),
            bias_init=partitioned(nn.initializers.zeros, ("embed",)),
            name="x_embedder",
            **_dtypes(cfg),
        )
        x = proj(hidden_states.astype(dt)).reshape(b, -1, cfg.hidden_size)
        x = nn.with_logical_constraint(x, TOKENS)
        c = TokenRefiner(cfg, name="context_embedder")(encoder_hidden_states, timestep, encoder_attention_mask)
        n_video = x.shape[1]
        kv_lengths = (n_video + encoder_attention_mask.astype(jnp.int32).sum(1)).astype(jnp.int32)

        first = jnp.arange(n_video) < grid[1] * grid[2] if tr_emb is not None else None
        x, c = self._blocks(DualStreamBlock, cfg.num_layers, "transformer_blocks", (x, c), temb, tr_emb, first, rope, kv_lengths)
        first_all = None if first is None else jnp.concatenate([first, jnp.zeros(c.shape[1], bool)])
        single_args = (temb, tr_emb, first_all, rope, kv_lengths)
        xc = self._blocks(
            SingleStreamBlock, cfg.num_single_layers - cfg.audio_blocks, "single_transformer_blocks",
            jnp.concatenate([x, c], axis=1), *single_args,
        )
        if cfg.audio_blocks:
            audio = self._audio(audio_states, audio_mask, grid, b)
            xc = self._blocks(
                SingleStreamBlock, cfg.audio_blocks, "audio_single_blocks", xc, *single_args, *audio, with_audio=True
            )
        x = xc[:, :n_video]

        scale, shift = Modulation(2, name="norm_out", **_dtypes(cfg))(temb)
        x = modulated_layer_norm(x, shift, scale, EPS)
        x = Dense(pt * p * p * cfg.out_channels, ("embed", "patch_out"), name="proj_out", **_dtypes(cfg))(x)
        # diffusers' token layout is (C, pt, p, p) per token; move to channels-last video
        x = x.reshape(b, *grid, cfg.out_channels, pt, p, p)
        x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, t, h, w, cfg.out_channels)


def scan_unroll(setting: str | int, n: int) -> int:
    """Blocks per iteration of the scanned loop. "auto": every block on CPU (XLA:CPU copies the
    loop's stacked residuals and zero-fills their buffers; unrolled, the DiT's train step is
    faster there, benchmarks/cpu_vs_torch.py), one elsewhere (one compiled block: compile time
    and memory stay flat in depth). The weights stay stacked either way."""
    if setting == "auto":
        return n if jax.default_backend() == "cpu" else 1
    return max(1, min(int(setting), n))


def example_inputs(config, batch: int = 1, frames: int | None = None, height: int | None = None, width: int | None = None,
                   text_len: int = 8) -> dict[str, jax.Array]:
    """Zero inputs of the right shapes (for `init` and `jax.eval_shape`)."""
    cfg = DiTConfig.coerce(config)
    frames = frames or cfg.patch_size_t
    height = height or 2 * cfg.patch_size
    width = width or 2 * cfg.patch_size
    inputs = dict(
        hidden_states=jnp.zeros((batch, frames, height, width, cfg.in_channels), jnp.float32),
        timestep=jnp.zeros((batch,), jnp.float32),
        encoder_hidden_states=jnp.zeros((batch, text_len, cfg.text_embed_dim), jnp.float32),
        encoder_attention_mask=jnp.ones((batch, text_len), jnp.int32),
        pooled_projections=jnp.zeros((batch, cfg.pooled_projection_dim), jnp.float32),
    )
    if cfg.guidance_embeds:
        inputs["guidance"] = jnp.zeros((batch,), jnp.float32)
    if cfg.audio_blocks:
        video_frames = 1 + TEMPORAL_FACTOR * (frames - 1)
        inputs["audio_states"] = jnp.zeros(
            (batch, 1, video_frames, cfg.audio_feature_layers, cfg.audio_feature_dim), jnp.float32
        )
    return inputs


def image_condition_input(latents, image_latents, image_condition_type: str | None):
    """The model input for an image-conditioned step, as diffusers' I2V pipeline builds it.

    latents: `[B, T, H, W, C]` noisy latents; image_latents: `[B, 1, H, W, C]` (the encoded,
    scaled portrait). latent_concat -> `[latents, image on frame 0 else 0, mask]` on channels
    (2C + 1); token_replace -> frame 0 replaced by the clean image latent; None -> latents.
    """
    if image_condition_type is None:
        return latents
    if image_latents.shape[1] != 1:
        raise ValueError(f"image_latents must hold one latent frame [B, 1, H, W, C], got {image_latents.shape}")
    if image_condition_type == "token_replace":
        return jnp.concatenate([image_latents.astype(latents.dtype), latents[:, 1:]], axis=1)
    if image_condition_type == "latent_concat":
        cond = jnp.zeros_like(latents).at[:, :1].set(image_latents.astype(latents.dtype))
        mask = jnp.zeros(latents.shape[:-1] + (1,), latents.dtype).at[:, :1].set(1)
        return jnp.concatenate([latents, cond, mask], axis=-1)
    raise ValueError(f"unknown image_condition_type {image_condition_type!r}")
