"""`DiTConfig`: the backbone's shape, with diffusers' field names, plus how to run it."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp

IMAGE_CONDITION_TYPES = (None, "latent_concat", "token_replace")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "offload_dots")

# diffusers `HunyuanVideoTransformer3DModel.__init__` arguments (config.json keys).
DIFFUSERS_FIELDS = (
    "in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "num_layers",
    "num_single_layers", "num_refiner_layers", "mlp_ratio", "patch_size", "patch_size_t", "qk_norm",
    "guidance_embeds", "text_embed_dim", "pooled_projection_dim", "rope_theta", "rope_axes_dim",
    "image_condition_type",
)


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    # --- architecture: same names and defaults as diffusers' HunyuanVideoTransformer3DModel ---
    in_channels: int = 16
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # dual-stream blocks
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True
    text_embed_dim: int = 4096
    pooled_projection_dim: int = 768
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, ...] = (16, 56, 56)
    image_condition_type: str | None = None
    # --- MagicInfinite audio path (absent from HunyuanVideo; audio_blocks=0 turns it off) ---
    audio_blocks: int = 0  # the final N single-stream blocks get audio cross-attention
    audio_feature_layers: int = 12  # Wav2Vec2 layers stacked in `audio_states`
    audio_feature_dim: int = 768  # Wav2Vec2 hidden size
    audio_window: int = 2  # neighbouring audio frames on each side of a video frame
    audio_hidden: int = 512  # projector width
    audio_tokens: int = 32  # M audio tokens per latent frame
    audio_token_dim: int = 768
    # --- how to run it (not part of the PyTorch checkpoint) ---
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention: str = "auto"  # auto | xla | dense | cudnn | blockwise | ulysses | ring (mi_jax.nn.attention)
    scan_layers: bool = True  # nn.scan over blocks (False: a python loop, for debugging)
    scan_unroll: str | int = "auto"  # blocks per scanned iteration: auto (all on CPU, 1 elsewhere) or N
    remat_policy: str = "none"  # see REMAT_POLICIES

    def __post_init__(self):
        object.__setattr__(self, "rope_axes_dim", tuple(int(d) for d in self.rope_axes_dim))
        if self.image_condition_type not in IMAGE_CONDITION_TYPES:
            raise ValueError(
                f"image_condition_type={self.image_condition_type!r}; choose one of {IMAGE_CONDITION_TYPES}"
            )
        if self.qk_norm != "rms_norm":
            raise ValueError(f"qk_norm={self.qk_norm!r}: only 'rms_norm' (HunyuanVideo's) is implemented")
        if sum(self.rope_axes_dim) != self.attention_head_dim:
            raise ValueError(
                f"rope_axes_dim {self.rope_axes_dim} must sum to attention_head_dim={self.attention_head_dim}"
            )
        if isinstance(self.scan_unroll, str) and self.scan_unroll.isdigit():  # "--config.model.scan_unroll=2"
            object.__setattr__(self, "scan_unroll", int(self.scan_unroll))
        if self.scan_unroll != "auto" and not (isinstance(self.scan_unroll, int) and self.scan_unroll >= 1):
            raise ValueError(f"scan_unroll={self.scan_unroll!r}; 'auto' or a positive int (blocks per iteration)")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; choose one of {REMAT_POLICIES}")
        if self.image_condition_type == "latent_concat" and self.in_channels != 2 * self.out_channels + 1:
            raise ValueError(
                "image_condition_type='latent_concat' feeds [noisy latents, image latents, mask] so "
                f"in_channels must be 2*out_channels+1={2 * self.out_channels + 1}, got {self.in_channels}"
            )
        if not 0 <= self.audio_blocks <= self.num_single_layers:
            raise ValueError(
                f"audio_blocks={self.audio_blocks} must be between 0 and num_single_layers={self.num_single_layers}"
            )
        for name in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, name))  # fails early on a typo

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        """Channels of the noisy latent (the sampler's state), whatever the image condition."""
        return self.out_channels

    @classmethod
    def from_diffusers(cls, cfg: Mapping, **overrides) -> DiTConfig:
        kwargs = {k: cfg[k] for k in DIFFUSERS_FIELDS if k in cfg}
        return cls(**{**kwargs, **overrides})

    def to_diffusers(self) -> dict:
        d = {k: getattr(self, k) for k in DIFFUSERS_FIELDS}
        d["rope_axes_dim"] = list(d["rope_axes_dim"])
        return d

    @classmethod
    def coerce(cls, cfg) -> DiTConfig:
        """Accepts a DiTConfig, a dict or an ml_collections ConfigDict (e.g. `config.model`)."""
        if isinstance(cfg, cls):
            return cfg
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(cfg) - fields
        if unknown:
            raise ValueError(f"DiTConfig: unknown field(s) {sorted(unknown)}")
        return cls(**dict(cfg))

    def replace(self, **kw) -> DiTConfig:
        return dataclasses.replace(self, **kw)
