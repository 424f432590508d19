"""MagicInfinite's audio additions in PyTorch, and the whole audio-conditioned transformer.

`export` writes `out/audio/` (config.json + safetensors) beside a diffusers `out/transformer/`.
Here `MagicInfiniteAudio` rebuilds the audio projector and the per-block audio cross-attention
with the maths of mi_jax/models/audio.py, and `MagicInfiniteTransformer` runs diffusers'
`HunyuanVideoTransformer3DModel` with the cross-attention after each of the last
`audio_blocks` single-stream blocks, PyTorch layout throughout:

    hidden_states [B, C, T, H, W]; audio_states [B, S, F, n_layers, C_a] (F = 1 + 4(T - 1)
    video frames); audio_mask [B, S, T, H, W] (latent resolution) -> [B, C_out, T, H, W]

    transformer = MagicInfiniteTransformer.from_pretrained("out")   # + out/lora when present
    video = transformer(latents, t, text, text_mask, pooled, guidance, audio_states, audio_mask)

Norm statistics run in float32 and attention is per latent (token) frame, as in JAX, so the
two agree to float rounding. State-dict keys equal the exported keys
(`audio_projector.proj_frame.weight`, `single_transformer_blocks.{i}.audio_attn.to_q.weight`).
The code here uses only torch, safetensors and (for the transformer) diffusers; being in the
mi_jax.convert package, importing it also imports jax.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

CLASS_NAME = "MagicInfiniteAudio"
WEIGHTS_NAME = "diffusion_pytorch_model"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
VIDEO_FRAMES_PER_LATENT = 4  # mi_jax.models.vae.TEMPORAL_FACTOR; this file runs with torch alone
EPS = 1e-6


def load_safetensors_folder(path: str, weights_name: str = WEIGHTS_NAME, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of `<weights_name>.safetensors` or its sharded form (index json)."""
    index = os.path.join(path, f"{weights_name}.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = [f"{weights_name}.safetensors"]
    missing = [n for n in files if not os.path.exists(os.path.join(path, n))]
    if missing:
        raise FileNotFoundError(f"{path}: missing weight file(s) {missing}; re-run the export.")
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(os.path.join(path, name), device=str(device)))
    return out


def frame_windows(num_frames: int, radius: int) -> torch.Tensor:
    """`[F, 2r + 1]` indices of each frame's neighbours, clamped at the ends."""
    idx = torch.arange(num_frames)[:, None] + torch.arange(-radius, radius + 1)[None]
    return idx.clamp(0, num_frames - 1)


def num_latent_frames(num_video_frames: int) -> int:
    if num_video_frames < 1 or (num_video_frames - 1) % VIDEO_FRAMES_PER_LATENT:
        raise ValueError(f"{num_video_frames} video frames: the causal VAE needs 1 + 4k frames (1, 5, 9, ...)")
    return 1 + (num_video_frames - 1) // VIDEO_FRAMES_PER_LATENT


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm without affine, statistics in float32 (mi_jax.nn.layers.layer_norm)."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=EPS).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned `weight`, statistics in float32."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + EPS)
        return (y * self.weight.float()).to(x.dtype)


class AudioProjector(nn.Module):
    """`[B, S, F, n_layers, C]` Wav2Vec2 features per video frame -> `[B, S, K, M, Da]` audio
    tokens per latent frame (windows of +-audio_window frames, groups of 4 video frames)."""

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = cfg
        window = 2 * cfg["audio_window"] + 1
        hidden = cfg["audio_hidden"]
        self.proj_frame = nn.Linear(window * cfg["audio_feature_layers"] * cfg["audio_feature_dim"], hidden)
        self.proj_group = nn.Linear(VIDEO_FRAMES_PER_LATENT * hidden, hidden)
        self.proj_tokens = nn.Linear(hidden, cfg["audio_tokens"] * cfg["audio_token_dim"])
        self.norm = nn.LayerNorm(cfg["audio_token_dim"], eps=EPS)

    def forward(self, audio_states: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, s, f, nl, c = audio_states.shape
        if (nl, c) != (cfg["audio_feature_layers"], cfg["audio_feature_dim"]):
            raise ValueError(
                f"audio_states has {nl} layers x {c} channels; the model expects "
                f"{cfg['audio_feature_layers']} x {cfg['audio_feature_dim']}"
            )
        k = num_latent_frames(f)
        dtype = self.proj_frame.weight.dtype
        win = audio_states.to(dtype)[:, :, frame_windows(f, cfg["audio_window"]).to(audio_states.device)]
        h = F.silu(self.proj_frame(win.reshape(b, s, f, -1)))
        # latent frame 0 holds video frame 0 alone: repeat it to make a full group of 4
        h = torch.cat([h[:, :, :1].expand(b, s, VIDEO_FRAMES_PER_LATENT - 1, -1), h], dim=2)
        h = F.silu(self.proj_group(h.reshape(b, s, k, -1)))
        tokens = self.proj_tokens(h).reshape(b, s, k, cfg["audio_tokens"], cfg["audio_token_dim"])
        y = _layer_norm(tokens)
        return y * self.norm.weight.to(y.dtype) + self.norm.bias.to(y.dtype)


class AudioCrossAttention(nn.Module):
    """Masked cross-attention from video tokens to the audio tokens of their own token frame.

    x: `[B, Lv, D]` video tokens ((t, h, w) order); audio: `[B, S, Tp, Ma, Da]`; mask:
    `[B, S, Lv]` in [0, 1]. Returns the update `[B, Lv, D]` (zero outside every mask).
    `zero_init` zeroes the output projection (a fresh adapter changes nothing).
    """

    def __init__(self, cfg: dict, zero_init: bool = False):
        super().__init__()
        d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        self.heads, self.head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
        self.to_q = nn.Linear(d, d)
        self.norm_q = RMSNorm(self.head_dim)
        self.to_k = nn.Linear(cfg["audio_token_dim"], d)
        self.norm_k = RMSNorm(self.head_dim)
        self.to_v = nn.Linear(cfg["audio_token_dim"], d)
        self.to_out = nn.Linear(d, d)
        if zero_init:
            nn.init.zeros_(self.to_out.weight)
            nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, lv, d = x.shape
        _, s, tp, ma, _ = audio.shape
        h, dh = self.heads, self.head_dim
        if lv % tp:
            raise ValueError(f"{lv} video tokens do not split into {tp} token frames")
        n = lv // tp
        q = self.norm_q(self.to_q(_layer_norm(x)).view(b, 1, tp, n, h, dh)).expand(b, s, tp, n, h, dh)
        audio = audio.to(x.dtype)
        k = self.norm_k(self.to_k(audio).view(b, s, tp, ma, h, dh))
        v = self.to_v(audio).view(b, s, tp, ma, h, dh)
        # one attention per (sample, speaker, token frame): [N, H, L, dh]
        q, k, v = (t.reshape(b * s * tp, -1, h, dh).transpose(1, 2) for t in (q, k, v))
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, lv, d)
        o = self.to_out(o)
        return torch.einsum("bsld,bsl->bld", o, mask.to(o.dtype))


class _AudioBlock(nn.Module):
    """Holds one block's `audio_attn`, so keys read `single_transformer_blocks.{i}.audio_attn...`."""

    def __init__(self, cfg: dict, zero_init: bool):
        super().__init__()
        self.audio_attn = AudioCrossAttention(cfg, zero_init)


class MagicInfiniteAudio(nn.Module):
    """The audio projector and the cross-attention of single-stream blocks
    `first_audio_block .. num_single_layers - 1` (config: out/audio/config.json)."""

    def __init__(self, config: dict, zero_init: bool = False):
        super().__init__()
        self.config = dict(config)
        first, n = config["first_audio_block"], config["num_single_layers"]
        self.audio_projector = AudioProjector(self.config)
        blocks = {str(i): _AudioBlock(self.config, zero_init) for i in range(first, n)}
        self.single_transformer_blocks = nn.ModuleDict(blocks)

    @classmethod
    def from_pretrained(cls, path: str, torch_dtype: torch.dtype | None = None, device="cpu") -> MagicInfiniteAudio:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        if config.get("_class_name") != CLASS_NAME:
            raise ValueError(f"{path}: config.json describes a {config.get('_class_name')!r}, not {CLASS_NAME}")
        model = cls(config)
        model.load_state_dict(load_safetensors_folder(path, device=device), strict=True)
        return model.to(device=device, dtype=torch_dtype) if torch_dtype else model.to(device)

    def has_block(self, index: int) -> bool:
        return str(index) in self.single_transformer_blocks

    def prepare(self, audio_states, audio_mask, grid: tuple[int, int, int]):
        """Audio tokens per token frame `[B, S, Tp, pt * M, Da]` and per-token speaker masks
        `[B, S, Lv]` for video tokens on `grid` = (Tp, Hp, Wp)."""
        cfg = self.config
        pt, p = cfg["patch_size_t"], cfg["patch_size"]
        if audio_states.ndim == 4:  # one speaker
            audio_states = audio_states[:, None]
        b, s = audio_states.shape[:2]
        tokens = self.audio_projector(audio_states)
        k = tokens.shape[2]
        if k != grid[0] * pt:
            raise ValueError(
                f"audio_states cover {audio_states.shape[2]} video frames = {k} latent frames, but the latents "
                f"have {grid[0] * pt}; align the audio to 1 + 4(T-1) video frames"
            )
        tokens = tokens.reshape(b, s, k // pt, pt * cfg["audio_tokens"], cfg["audio_token_dim"])
        if audio_mask is None:
            if s > 1:
                raise ValueError(f"{s} speakers need audio_mask [B, S, T, H, W] saying where each one is")
            return tokens, torch.ones(b, 1, grid[0] * grid[1] * grid[2], device=tokens.device)
        tp, hp, wp = grid
        want = (b, s, tp * pt, hp * p, wp * p)
        if tuple(audio_mask.shape) != want:
            got = tuple(audio_mask.shape)
            raise ValueError(f"audio_mask must be [B, S, T, H, W]={want} (latent resolution), got {got}")
        # mean over each patch: a token half inside a face gets 0.5
        m = audio_mask.float().reshape(b, s, tp, pt, hp, p, wp, p).mean(dim=(3, 5, 7))
        return tokens, m.reshape(b, s, tp * hp * wp)

    def block_update(self, index: int, x: torch.Tensor, tokens: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The audio update of single-stream block `index` for video tokens `x` [B, Lv, D]."""
        return self.single_transformer_blocks[str(index)].audio_attn(x, tokens, masks)


def apply_lora(model: nn.Module, path: str, scale: float | None = None) -> list[str]:
    """Merges an export's `out/lora` factors into `model` (a MagicInfiniteTransformer):
    `weight += scale * lora_B @ lora_A` (in float32) for every adapted Linear, the maths of
    mi_jax.nn.lora.lora_apply. scale: default the exported one. Returns the adapted modules."""
    with open(os.path.join(path, "config.json")) as f:
        scale = json.load(f)["scale"] if scale is None else scale
    factors = load_file(os.path.join(path, LORA_WEIGHTS))
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in factors})
    for name in modules:
        owner, _, sub = name.partition(".")
        if owner not in ("transformer", "audio") or getattr(model, owner, None) is None:
            raise ValueError(f"{path}: LoRA factors for {name!r}, which the model does not have")
        linear = getattr(model, owner).get_submodule(sub)
        a, b = factors[f"{name}.lora_A.weight"].float(), factors[f"{name}.lora_B.weight"].float()
        if (b.shape[0], a.shape[1]) != tuple(linear.weight.shape):
            raise ValueError(f"{path}: LoRA factors of {name} are {tuple(b.shape)} @ {tuple(a.shape)}, "
                             f"the weight is {tuple(linear.weight.shape)}")
        with torch.no_grad():
            w = linear.weight
            w.copy_((w.float() + scale * (b @ a).to(w.device)).to(w.dtype))
    return modules


class MagicInfiniteTransformer(nn.Module):
    """diffusers' `HunyuanVideoTransformer3DModel` + MagicInfinite's audio cross-attention.

    forward(hidden_states [B, C, T, H, W], timestep [B], encoder_hidden_states [B, Lt, E],
    encoder_attention_mask [B, Lt], pooled_projections [B, P], guidance [B] | None,
    audio_states [B, S, F, n_layers, C_a] | None, audio_mask [B, S, T, H, W] | None)
    -> [B, out_channels, T, H, W]. Without audio_states it computes what diffusers computes.
    """

    def __init__(self, transformer: nn.Module, audio: MagicInfiniteAudio | None = None):
        super().__init__()
        self.transformer = transformer
        self.audio = audio
        if audio is not None and audio.config["num_single_layers"] != len(transformer.single_transformer_blocks):
            raise ValueError(
                f"the audio modules expect {audio.config['num_single_layers']} single-stream blocks, the "
                f"transformer has {len(transformer.single_transformer_blocks)}"
            )

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype = torch.float32, device="cpu",
                        lora: bool = True, lora_scale: float | None = None) -> MagicInfiniteTransformer:
        """Loads an export folder: `transformer/`, `audio/` (when present) and, with `lora`,
        merges `lora/` (when present) at `lora_scale` (default: the exported scale)."""
        from diffusers import HunyuanVideoTransformer3DModel  # local: diffusers takes seconds to import

        transformer = HunyuanVideoTransformer3DModel.from_pretrained(
            os.path.join(path, "transformer"), torch_dtype=torch_dtype
        )
        audio_dir = os.path.join(path, "audio")
        audio = MagicInfiniteAudio.from_pretrained(audio_dir, torch_dtype, device) if os.path.isdir(audio_dir) else None
        model = cls(transformer.to(device), audio).eval()
        if lora and os.path.isdir(os.path.join(path, "lora")):
            apply_lora(model, os.path.join(path, "lora"), lora_scale)
        return model

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, pooled_projections,
                guidance=None, audio_states=None, audio_mask=None) -> torch.Tensor:
        # diffusers' HunyuanVideoTransformer3DModel.forward (0.42), with the audio update after
        # the audio blocks; kept step for step so the backbone stays diffusers' own maths
        tf = self.transformer
        batch, _, frames, height, width = hidden_states.shape
        p, p_t = tf.config.patch_size, tf.config.patch_size_t
        grid = (frames // p_t, height // p, width // p)
        first_frame_num_tokens = grid[1] * grid[2]

        image_rotary_emb = tf.rope(hidden_states)
        temb, token_replace_emb = tf.time_text_embed(timestep, pooled_projections, guidance)
        hidden_states = tf.x_embedder(hidden_states)
        encoder_hidden_states = tf.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)

        # text padding sits at the end: mask keys past the valid length
        n_video, n_text = hidden_states.shape[1], encoder_hidden_states.shape[1]
        valid = n_video + encoder_attention_mask.sum(dim=1, dtype=torch.int)
        indices = torch.arange(n_video + n_text, device=hidden_states.device)[None]
        attention_mask = (indices < valid[:, None])[:, None, None]  # [B, 1, 1, N]

        args = (temb, attention_mask, image_rotary_emb, token_replace_emb, first_frame_num_tokens)
        for block in tf.transformer_blocks:
            hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states, *args)

        audio = None
        if audio_states is not None:
            if self.audio is None:
                raise ValueError("audio_states given, but this model has no audio modules (no out/audio folder)")
            audio = self.audio.prepare(audio_states, audio_mask, grid)
        elif audio_mask is not None:
            raise ValueError("audio_mask given without audio_states")
        for i, block in enumerate(tf.single_transformer_blocks):
            hidden_states, encoder_hidden_states = block(hidden_states, encoder_hidden_states, *args)
            if audio is not None and self.audio.has_block(i):
                hidden_states = hidden_states + self.audio.block_update(i, hidden_states, *audio)

        hidden_states = tf.proj_out(tf.norm_out(hidden_states, temb))
        hidden_states = hidden_states.reshape(batch, *grid, -1, p_t, p, p)
        hidden_states = hidden_states.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
