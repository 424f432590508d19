"""HunyuanVideo's causal 3D VAE (diffusers' `AutoencoderKLHunyuanVideo`) in Flax linen.

Video is channels-last `[B, T, H, W, C]` in [-1, 1]. `T = 1 + 4k` frames map to `1 + k` latent
frames (the first frame is coded alone, then groups of 4) and `H, W` shrink 8x. Latents are
*unscaled*, as diffusers' `latent_dist.mean`: the diffusion model works on
`latents * config.scaling_factor` and `decode` must be given `latents / config.scaling_factor`.

Two ways to run it, both equal to diffusers within float32 round-off:

- `CausalVAE.encode / decode` (`vae.apply({"params": p}, x, method="encode")`): one pass over
  the whole clip, i.e. diffusers with `use_framewise_encoding = use_framewise_decoding = False`
  and no tiling. Memory grows with the clip (attention even quadratically).
- `VAEStream`: diffusers' *default* `vae.encode / vae.decode`, which cut clips longer than 16
  frames (4 latents) into overlapping temporal tiles decoded independently and blended, and
  optionally into spatial tiles (`Tiling(use_tiling=True)`, diffusers' `enable_tiling()`).
  Constant memory: a `lax.scan` over tiles for whole clips, or jitted `*_start / *_chunk /
  *_end` steps for unbounded streams.

Why tiles and not a causal-conv cache: the network is causal in its convolutions only. Every
GroupNorm takes its statistics over all frames, so the first output frame of the single pass
depends on the last input frame (see `test_full_pass_is_not_causal`), and no bounded cache can
reproduce that pass. diffusers (and the original HunyuanVideo code) stream by tiling; that is
what `VAEStream` reproduces exactly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mi_jax.nn import cpu_conv_forms, cpu_kernels
from mi_jax.nn.attention import attention
from mi_jax.nn.layers import Dense, GroupNorm, edge_pad, partitioned, torch_default_kernel_init

Dtype = jnp.dtype
DOWN_BLOCK = "HunyuanVideoDownBlock3D"
UP_BLOCK = "HunyuanVideoUpBlock3D"
# Distinct names for the window axes: flax rejects a logical name repeated within one array.
CONV_AXES = ("conv_kernel_t", "conv_kernel_h", "conv_kernel_w", "conv_in", "conv_out")

# diffusers' `get_activation` names this model accepts.
ACTIVATIONS: dict[str, Callable] = {
    "silu": nn.silu,
    "swish": nn.silu,
    "relu": nn.relu,
    "gelu": lambda x: nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """`AutoencoderKLHunyuanVideo.__init__` arguments: same names and defaults as diffusers."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    down_block_types: tuple[str, ...] = (DOWN_BLOCK,) * 4
    up_block_types: tuple[str, ...] = (UP_BLOCK,) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for name in ("down_block_types", "up_block_types", "block_out_channels"):
            object.__setattr__(self, name, tuple(getattr(self, name)))  # JSON lists -> hashable
        n = len(self.block_out_channels)
        if self.down_block_types != (DOWN_BLOCK,) * n or self.up_block_types != (UP_BLOCK,) * n:
            raise ValueError(
                f"VAEConfig: down/up_block_types must be {n} x {DOWN_BLOCK!r} / {UP_BLOCK!r} (one "
                f"per block_out_channels entry), got {self.down_block_types} / {self.up_block_types}."
            )
        if self.temporal_compression_ratio != 4:
            raise ValueError(
                f"VAEConfig: temporal_compression_ratio={self.temporal_compression_ratio}; diffusers' "
                "HunyuanVideo decoder only supports 4."
            )
        if self.act_fn not in ACTIVATIONS:
            raise ValueError(f"VAEConfig: act_fn={self.act_fn!r}; choose one of {sorted(ACTIVATIONS)}.")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: block_out_channels {bad} are not divisible by "
                f"norm_num_groups={self.norm_num_groups}."
            )
        ratios = (self.spatial_compression_ratio, self.temporal_compression_ratio)
        if (self.spatial_factor, self.temporal_factor) != ratios:
            need = max(3, int(math.log2(ratios[0])))
            raise ValueError(
                f"VAEConfig: {n} blocks downsample {self.spatial_factor}x in space and "
                f"{self.temporal_factor}x in time, not the configured {ratios[0]}x / {ratios[1]}x; "
                f"use at least {need} block_out_channels entries."
            )

    @property
    def resample_factors(self) -> tuple[tuple[int, int], ...]:
        """(time, space) factor of each down block's downsampler and each up block's upsampler
        (1, 1: none). diffusers' rule: space in the first log2(ratio) blocks, time in the two
        blocks before the last."""
        n, log_s = len(self.block_out_channels), int(math.log2(self.spatial_compression_ratio))
        return tuple((2 if n - 3 <= i < n - 1 else 1, 2 if i < log_s else 1) for i in range(n))

    @property
    def spatial_factor(self) -> int:
        return math.prod(s for _, s in self.resample_factors)

    @property
    def temporal_factor(self) -> int:
        return math.prod(t for t, _ in self.resample_factors)

    @classmethod
    def from_diffusers(cls, cfg: Mapping) -> VAEConfig:
        """From a diffusers config.json dict; `_class_name` and other keys diffusers does not
        pass to `__init__` are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in names})

    def to_diffusers(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update({k: list(d[k]) for k in ("down_block_types", "up_block_types", "block_out_channels")})
        return {"_class_name": "AutoencoderKLHunyuanVideo", **d}


# The released HunyuanVideo VAE = diffusers' `AutoencoderKLHunyuanVideo()` defaults (the same
# numbers as hunyuanvideo-community/HunyuanVideo vae/config.json): RGB in/out, 16 latent
# channels, 4x temporal / 8x spatial compression, block_out_channels (128, 256, 512, 512),
# layers_per_block 2, 32 norm groups, silu, mid-block attention, scaling_factor 0.476986.
HUNYUAN_VIDEO_VAE = VAEConfig(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    norm_num_groups=32,
    scaling_factor=0.476986,
    spatial_compression_ratio=8,
    temporal_compression_ratio=4,
    mid_block_add_attention=True,
)
# The compression the DiT's audio path, the data (face masks, stored windows) and the sampler are
# built around: HunyuanVideo's VAE, 1 + 4k video frames -> 1 + k latents, 8x8 pixels -> 1 cell.
TEMPORAL_FACTOR = HUNYUAN_VIDEO_VAE.temporal_factor
SPATIAL_FACTOR = HUNYUAN_VIDEO_VAE.spatial_factor


def _uniform(bound: float):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)


class Conv3d(nn.Module):
    """Conv `[B, T, H, W, Cin] -> [B, T', H', W', features]`: torch `Conv3d` (padding 0) of the input
    replicate-padded by `pads`."""

    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)
    strides: tuple[int, int, int] = (1, 1, 1)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    pads: tuple[int, int, int] = (0, 0, 0)  # replicate padding: frames in front, rows / columns each side

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cin = x.shape[-1]
        shape = (*self.kernel_size, cin, self.features)
        kernel_init = partitioned(torch_default_kernel_init, CONV_AXES)
        kernel = self.param("kernel", kernel_init, shape, self.param_dtype)
        bias_init = partitioned(_uniform(1.0 / math.sqrt(cin * math.prod(self.kernel_size))), ("conv_out",))
        bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
        y = conv3d(x.astype(self.dtype), kernel.astype(self.dtype), self.strides, self.pads)
        return y + bias.astype(self.dtype)


def conv3d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int, int],
           pads: tuple[int, int, int] = (0, 0, 0)) -> jax.Array:
    """VALID 3-D convolution `[B, T, H, W, Ci] x [kt, kh, kw, Ci, Co]` of x replicate-padded by
    `pads = (pt, ph, pw)`: pt copies of the first frame in front, ph / pw edge rows / columns on
    each side. On GPU / TPU the pad then one `conv_general_dilated` (cuDNN). On CPU in float32 the
    native kernels (`mi_jax.nn.cpu_kernels`: the padding read through clamped indices, never
    written out); without them `mi_jax.nn.cpu_conv_forms.conv3d`, the same maths in the forms
    XLA:CPU runs fastest.

    A single frame with causal padding (`T == 1`, `pt == kt - 1`) is the same frame `kt` times:
    its one output is a 2-D convolution with the kernel summed over time, ~kt x less work for
    images (portraits, the image stage of VAE training)."""
    if x.shape[1] == 1 and kernel.shape[0] > 1 and pads[0] == kernel.shape[0] - 1:
        kernel, pads = kernel.sum(0, keepdims=True), (0, *pads[1:])
    cpu = jax.default_backend() == "cpu" and kernel.shape[:3] != (1, 1, 1)
    if cpu and x.dtype == kernel.dtype == jnp.float32 and cpu_kernels.available():
        return cpu_kernels.conv3d(x, kernel, tuple(strides), tuple(pads))
    if any(pads):
        x = edge_pad(x, cpu_kernels.edge_widths(pads))
    if not cpu:
        return jax.lax.conv_general_dilated(x, kernel, strides, "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    return cpu_conv_forms.conv3d(x, kernel, tuple(strides))


class CausalConv3d(nn.Module):
    """diffusers' `HunyuanVideoCausalConv3d`: replicate-pads `k - 1` copies of the first frame in
    front (so no output sees a later frame) and `k // 2` edge pixels on each side, then convolves.
    Its weights sit one level down, in `conv`, as in diffusers."""

    features: int
    kernel: int = 3
    strides: tuple[int, int, int] = (1, 1, 1)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k, s = self.kernel - 1, self.kernel // 2
        kernel = (self.kernel,) * 3
        return Conv3d(self.features, kernel, self.strides, self.dtype, self.param_dtype, (k, s, s), name="conv")(x)


class ResnetBlock(nn.Module):
    """`[B, T, H, W, Cin] -> [B, T, H, W, features]`: diffusers' `HunyuanVideoResnetBlockCausal3D`."""

    features: int
    groups: int
    act_fn: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act, kw = ACTIVATIONS[self.act_fn], dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = act(GroupNorm(self.groups, param_dtype=self.param_dtype, name="norm1")(x))
        h = CausalConv3d(self.features, name="conv1", **kw)(h)
        h = act(GroupNorm(self.groups, param_dtype=self.param_dtype, name="norm2")(h))
        h = CausalConv3d(self.features, name="conv2", **kw)(h)
        if x.shape[-1] != self.features:
            x = CausalConv3d(self.features, kernel=1, name="conv_shortcut", **kw)(x)
        return h + x


class FrameCausalAttention(nn.Module):
    """diffusers' mid-block `Attention` on `[B, T, H, W, C]`: GroupNorm, one head of width C over
    all T*H*W positions where each frame sees itself and earlier frames, residual."""

    groups: int
    implementation: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        kw = dict(axes=("conv_in", "conv_out"), dtype=self.dtype, param_dtype=self.param_dtype)
        y = GroupNorm(self.groups, param_dtype=self.param_dtype, name="group_norm")(x)
        y = y.reshape(b, t * h * w, c)
        q, k, v = (Dense(c, name=n, **kw)(y)[:, :, None] for n in ("to_q", "to_k", "to_v"))
        frame = jnp.repeat(jnp.arange(t), h * w)
        mask = (frame[:, None] >= frame[None, :])[None, None]
        o = attention(q, k, v, implementation=self.implementation, mask=mask)[:, :, 0]
        return Dense(c, name="to_out_0", **kw)(o).reshape(x.shape) + x


class MidBlock(nn.Module):
    """resnet, (attention), resnet at constant width: diffusers' `HunyuanVideoMidBlock3D`."""

    groups: int
    act_fn: str
    add_attention: bool
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock(c, self.groups, self.act_fn, name="resnets_0", **kw)(x)
        if self.add_attention:
            x = FrameCausalAttention(self.groups, self.attention, name="attentions_0", **kw)(x)
        return ResnetBlock(c, self.groups, self.act_fn, name="resnets_1", **kw)(x)


class Resample(nn.Module):
    """diffusers' `HunyuanVideoDownsampleCausal3D` (strided causal conv) or
    `HunyuanVideoUpsampleCausal3D` (nearest upsampling, then causal conv), by `factors = (time,
    space)`. The first frame is resampled in space only: that is how 1 + 4k frames become
    1 + k latents and back."""

    features: int
    factors: tuple[int, int]
    up: bool
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ft, fs = self.factors
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, name="conv")
        if not self.up:
            return CausalConv3d(self.features, strides=(ft, fs, fs), **kw)(x)
        x = jnp.repeat(jnp.repeat(x, fs, axis=2), fs, axis=3)
        x = jnp.concatenate([x[:, :1], jnp.repeat(x[:, 1:], ft, axis=1)], axis=1)
        return CausalConv3d(self.features, **kw)(x)


class Block(nn.Module):
    """`layers` resnets then an optional resampler: `HunyuanVideoDownBlock3D` / `UpBlock3D`."""

    features: int
    layers: int
    factors: tuple[int, int]
    up: bool
    groups: int
    act_fn: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.layers):
            x = ResnetBlock(self.features, self.groups, self.act_fn, name=f"resnets_{j}", **kw)(x)
        if self.factors != (1, 1):
            name = "upsamplers_0" if self.up else "downsamplers_0"
            x = Resample(self.features, self.factors, self.up, name=name, **kw)(x)
        return x


class Encoder(nn.Module):
    """`[B, 1 + 4k, H, W, in] -> [B, 1 + k, H/8, W/8, 2 * latent]` (before `quant_conv`)."""

    config: VAEConfig
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(groups=cfg.norm_num_groups, act_fn=cfg.act_fn)
        mid = dict(add_attention=cfg.mid_block_add_attention, attention=self.attention, name="mid_block")
        x = CausalConv3d(cfg.block_out_channels[0], name="conv_in", **kw)(x)
        for i, (c, f) in enumerate(zip(cfg.block_out_channels, cfg.resample_factors)):
            x = Block(c, cfg.layers_per_block, f, False, name=f"down_blocks_{i}", **norm, **kw)(x)
        x = MidBlock(**mid, **norm, **kw)(x)
        x = GroupNorm(cfg.norm_num_groups, param_dtype=self.param_dtype, name="conv_norm_out")(x)
        return CausalConv3d(2 * cfg.latent_channels, name="conv_out", **kw)(ACTIVATIONS[cfg.act_fn](x))


class Decoder(nn.Module):
    """`[B, 1 + k, h, w, latent] -> [B, 1 + 4k, 8h, 8w, out]` (after `post_quant_conv`). Its
    opening mirrors `Encoder`'s as diffusers' `HunyuanVideoDecoder3D` mirrors its encoder (kept
    apart, like theirs, so the parameter trees map one to one)."""

    config: VAEConfig
    attention: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        norm = dict(groups=cfg.norm_num_groups, act_fn=cfg.act_fn)
        mid = dict(add_attention=cfg.mid_block_add_attention, attention=self.attention, name="mid_block")
        x = CausalConv3d(cfg.block_out_channels[-1], name="conv_in", **kw)(x)
        x = MidBlock(**mid, **norm, **kw)(x)
        for i, (c, f) in enumerate(zip(reversed(cfg.block_out_channels), cfg.resample_factors)):
            x = Block(c, cfg.layers_per_block + 1, f, True, name=f"up_blocks_{i}", **norm, **kw)(x)
        x = GroupNorm(cfg.norm_num_groups, param_dtype=self.param_dtype, name="conv_norm_out")(x)
        return CausalConv3d(cfg.out_channels, name="conv_out", **kw)(ACTIVATIONS[cfg.act_fn](x))


def check_video(config: VAEConfig, shape: tuple[int, ...], *, whole_clip: bool = True) -> None:
    """ValueError unless `shape` is a channels-last video the encoder takes (`whole_clip`: its
    frame count must be 1 + 4k)."""
    c_in, sf, tf = config.in_channels, config.spatial_factor, config.temporal_factor
    if len(shape) != 5 or shape[-1] != c_in:
        raise ValueError(
            f"video must be channels-last [B, T, H, W, {c_in}], got shape {tuple(shape)}. A PyTorch "
            "[B, C, T, H, W] tensor becomes channels-last with x.transpose(0, 2, 3, 4, 1)."
        )
    _, t, h, w, _ = shape
    if whole_clip and (t < 1 or (t - 1) % tf):
        k = max(t - 1, 0) // tf
        raise ValueError(
            f"video has {t} frames; the causal VAE encodes 1 + {tf}k frames (the first frame alone, "
            f"then groups of {tf}). Trim to {1 + tf * k} or pad to {1 + tf * (k + 1)} frames."
        )
    if h % sf or w % sf:
        raise ValueError(
            f"video frames are {h}x{w}; height and width must be divisible by {sf}. Crop or resize "
            f"to e.g. {h - h % sf}x{w - w % sf}."
        )


def check_latents(config: VAEConfig, shape: tuple[int, ...], *, whole_clip: bool = True) -> None:
    """ValueError unless `shape` is channels-last latents (`whole_clip`: at least one frame)."""
    c = config.latent_channels
    if len(shape) != 5 or shape[-1] != c or (whole_clip and shape[1] < 1):
        raise ValueError(
            f"latents must be channels-last [B, T, h, w, {c}] with T >= 1, got shape {tuple(shape)}. "
            "A PyTorch [B, C, T, h, w] tensor becomes channels-last with z.transpose(0, 2, 3, 4, 1)."
        )


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`quant_conv` output -> `(mean, logvar)`, logvar clamped to [-30, 20] as diffusers'
    `DiagonalGaussianDistribution`."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)


class CausalVAE(nn.Module):
    """diffusers' `AutoencoderKLHunyuanVideo`, single pass (see the module docstring).

    Methods (call through `apply(..., method=name)`):
      encode(video [B, 1+4k, H, W, 3]) -> (mean, logvar), each [B, 1+k, H/8, W/8, 16]
      decode(latents [B, n, h, w, 16]) -> video [B, 1+4(n-1), 8h, 8w, 3]
      moments(video) -> [B, 1+k, H/8, W/8, 32]: `quant_conv` output, before the split
      __call__(video) -> decode(encode(video).mean) (used to create the parameters)
    """

    config: VAEConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"  # mi_jax.nn.attention implementation of the mid-block attention

    def setup(self):
        cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(cfg, self.attention, **kw)
        self.decoder = Decoder(cfg, self.attention, **kw)
        self.quant_conv = Conv3d(2 * cfg.latent_channels, (1, 1, 1), **kw)
        self.post_quant_conv = Conv3d(cfg.latent_channels, (1, 1, 1), **kw)

    def moments(self, video: jax.Array) -> jax.Array:
        check_video(self.config, video.shape)
        return self.quant_conv(self.encoder(video.astype(self.dtype)))

    def encode(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        return split_moments(self.moments(video))

    def decode(self, latents: jax.Array) -> jax.Array:
        check_latents(self.config, latents.shape)
        return self.decoder(self.post_quant_conv(latents.astype(self.dtype)))

    def __call__(self, video: jax.Array) -> jax.Array:
        return self.decode(self.encode(video)[0])


def abstract_vae_params(config: VAEConfig, param_dtype: Dtype = jnp.float32):
    """Parameter shapes (boxed with logical axis names) without allocating anything."""
    vae = CausalVAE(config, param_dtype=param_dtype)
    sf = config.spatial_factor
    video = jax.ShapeDtypeStruct((1, 1, sf, sf, config.in_channels), jnp.float32)
    return jax.eval_shape(vae.init, jax.random.key(0), video)["params"]


# ----------------------------------------------------------------------------------------------
# Tiled / streaming encode and decode: diffusers' default behaviour in constant memory.


@dataclasses.dataclass(frozen=True)
class Tiling:
    """diffusers' tiling attributes of `AutoencoderKLHunyuanVideo` (same names and defaults).

    Temporal tiles (diffusers' framewise encoding/decoding, on by default there) are always used
    by `VAEStream`; spatial tiles only with `use_tiling=True` (diffusers' `enable_tiling()`).
    """

    use_tiling: bool = False
    tile_sample_min_height: int = 256
    tile_sample_min_width: int = 256
    tile_sample_min_num_frames: int = 16
    tile_sample_stride_height: int = 192
    tile_sample_stride_width: int = 192
    tile_sample_stride_num_frames: int = 12

    def check(self, config: VAEConfig) -> None:
        sf, tf = config.spatial_factor, config.temporal_factor
        for name, unit in (("height", sf), ("width", sf), ("num_frames", tf)):
            size = getattr(self, f"tile_sample_min_{name}")
            stride = getattr(self, f"tile_sample_stride_{name}")
            if size % unit or stride % unit or not 0 < stride <= size:
                raise ValueError(
                    f"Tiling: tile_sample_min_{name}={size} and tile_sample_stride_{name}={stride} "
                    f"must be multiples of {unit} with 0 < stride <= min."
                )


def _blend(a: jax.Array, b: jax.Array, extent: int, axis: int) -> jax.Array:
    """diffusers' `blend_t/v/h`: the first `e` entries of `b` along `axis` fade in linearly from
    the last `e` entries of `a`."""
    e = min(a.shape[axis], b.shape[axis], extent)
    if e == 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = e
    w = np.arange(e).reshape(shape) / e
    head = jax.lax.slice_in_dim(a, a.shape[axis] - e, a.shape[axis], axis=axis) * (1 - w).astype(a.dtype)
    head = head + jax.lax.slice_in_dim(b, 0, e, axis=axis) * w.astype(b.dtype)
    return jnp.concatenate([head, jax.lax.slice_in_dim(b, e, b.shape[axis], axis=axis)], axis)


def _spatial_tiles(fn, x, tile, stride, out_stride, blend, out_hw):
    """diffusers' `tiled_encode/decode` on `x [B, T, H, W, C]`: `fn` on overlapping windows of
    `tile = (height, width)` every `stride`; each output is blended into the finished one above and
    to its left (`blend` entries), cut to `out_stride` and the pieces joined and cut to `out_hw`."""
    tile_h, tile_w = tile
    rows = []
    for i in range(0, x.shape[2], stride[0]):
        row = []
        for j in range(0, x.shape[3], stride[1]):
            y = fn(x[:, :, i : i + tile_h, j : j + tile_w])
            if rows:
                y = _blend(rows[-1][len(row)], y, blend[0], axis=2)
            if row:
                y = _blend(row[-1], y, blend[1], axis=3)
            row.append(y)
        rows.append(row)
    out = [jnp.concatenate([y[:, :, : out_stride[0], : out_stride[1]] for y in row], 3) for row in rows]
    return jnp.concatenate(out, 2)[:, :, : out_hw[0], : out_hw[1]]


class TileState(NamedTuple):
    """What a temporal tile hands to the next one.

    inputs: [B, overlap, ...] the input frames the next tile shares with this one.
    tail: [B, blend, ...] this tile's last outputs, faded into the start of the next tile.
    """

    inputs: jax.Array
    tail: jax.Array


@dataclasses.dataclass(frozen=True)
class _Framewise:
    """diffusers' `_temporal_tiled_encode/decode` as a stream. Tiles of `window` input frames start
    every `stride` frames and are coded independently by `fn`. Every tile but the first drops its
    first output (the previous tile made it) and fades its first `blend` outputs in from the
    previous tile's end; each tile then contributes `out_stride` outputs (the first one more).
    Shapes are checked while tracing, so a bad input raises before anything runs."""

    name: str  # "decode" or "encode", for messages
    fn: Callable  # (params, x [B, n, ...]) -> [B, out_len(n), ...]
    check: Callable  # (shape, whole_clip: bool) -> None, raises ValueError
    window: int
    stride: int
    out_stride: int
    blend: int
    align: int  # a clip's frame count is 1 + align * k
    out_len: Callable[[int], int]

    def _expect(self, x, method: str, ok: Callable[[int], bool], want: str):
        if not ok(x.shape[1]):
            unit = "latent frames" if self.name == "decode" else "frames"
            raise ValueError(
                f"VAEStream.{self.name}{method} takes {want} {unit} along axis 1, got shape {tuple(x.shape)}."
            )

    def _tail(self, y):
        return y[:, y.shape[1] - min(self.blend, y.shape[1]) :]

    def start(self, params, x):
        self.check(x.shape, True)
        self._expect(x, "_start", lambda n: n == self.window, f"the first {self.window}")
        y = self.fn(params, x)
        return y[:, : self.out_stride + 1], TileState(x[:, self.stride :], self._tail(y))

    def chunk(self, params, state: TileState, new):
        self.check(new.shape, False)
        self._expect(new, "_chunk", lambda n: n == self.stride, f"exactly {self.stride}")
        x = jnp.concatenate([state.inputs, new], axis=1)
        y = _blend(state.tail, self.fn(params, x)[:, 1:], self.blend, axis=1)
        return y[:, : self.out_stride], TileState(x[:, self.stride :], self._tail(y))

    def end(self, params, state: TileState, rest=None):
        rest = state.inputs[:, :0] if rest is None else rest
        self.check(rest.shape, False)
        ok = lambda n: n < self.stride and n % self.align == 0  # noqa: E731
        want = f"the remaining (fewer than {self.stride}, a multiple of {self.align})"
        self._expect(rest, "_end", ok, want)
        x = jnp.concatenate([state.inputs, rest], axis=1)
        outs, tail = [state.tail[:, :0]], state.tail
        for i in range(0, x.shape[1], self.stride):
            window = x[:, i : i + self.window]
            if window.shape[1] == 1:  # would yield one output, the dropped one
                break
            y = _blend(tail, self.fn(params, window)[:, 1:], self.blend, axis=1)
            outs.append(y[:, : self.out_stride])
            tail = self._tail(y)
        return jnp.concatenate(outs, axis=1)[:, : self.out_len(x.shape[1]) - 1]

    def run(self, params, x):
        """The whole clip: `start`, a `lax.scan` of `chunk` over the full tiles, `end`. Tiles are
        written in place into the output, so working memory does not grow with the clip."""
        self.check(x.shape, True)
        n = x.shape[1]
        if n < self.window:  # diffusers codes short clips in one go
            return self.fn(params, x)
        first, state = self.start(params, x[:, : self.window])
        out = jnp.zeros((x.shape[0], self.out_len(n), *first.shape[2:]), first.dtype)
        out = jax.lax.dynamic_update_slice_in_dim(out, first, 0, axis=1)
        k = (n - self.window) // self.stride
        if k:
            chunks = x[:, self.window : self.window + k * self.stride]
            chunks = jnp.moveaxis(chunks.reshape(x.shape[0], k, self.stride, *x.shape[2:]), 1, 0)

            def body(carry, chunk_and_index):
                (state, out), (chunk, i) = carry, chunk_and_index
                y, state = self.chunk(params, state, chunk)
                start = first.shape[1] + i * self.out_stride
                return (state, jax.lax.dynamic_update_slice_in_dim(out, y, start, axis=1)), None

            (state, out), _ = jax.lax.scan(body, (state, out), (chunks, jnp.arange(k)))
        last = self.end(params, state, x[:, self.window + k * self.stride :])
        return jax.lax.dynamic_update_slice_in_dim(out, last, out.shape[1] - last.shape[1], axis=1)


class VAEStream:
    """diffusers' default `vae.encode / vae.decode` (temporal tiles, optional spatial tiles) in
    constant memory, for whole clips or unbounded streams. Equal to diffusers' outputs within
    float32 round-off; *not* equal to the single pass `CausalVAE.decode` (see module docstring).
    Every method is jitted; `params` is the VAE's parameter tree (no "params" wrapper).

    Whole clips (one `lax.scan` over the temporal tiles):
      decode(params, latents [B, n, h, w, 16]) -> video [B, 1 + 4(n-1), 8h, 8w, 3]
      encode(params, video [B, 1+4k, H, W, 3]) -> (mean, logvar), each [B, 1+k, H/8, W/8, 16]

    Unbounded streams (constant memory; the outputs concatenated along time equal `decode` /
    `encode` of the inputs concatenated):
      frames, state = decode_start(params, latents[:, :latents_first])     # 5 latents -> 13 frames
      frames, state = decode_chunk(params, state, next latents_per_chunk)  # 3 latents -> 12 frames
      frames = decode_end(params, state, the last < latents_per_chunk latents, or None)
      (mean, logvar), state = encode_start(params, video[:, :frames_first])  # 17 frames -> 4 latents
      (mean, logvar), state = encode_chunk(params, state, next frames_per_chunk)  # 12 -> 3
      mean, logvar = encode_end(params, state, the last frames (fewer than 12, 4k of them) or None)
    Counts are for the default `Tiling`. A clip shorter than `latents_first` latents
    (`frames_first` frames) is a single tile: use `decode` / `encode`.
    """

    def __init__(self, vae: CausalVAE, tiling: Tiling = Tiling()):
        cfg = vae.config
        tiling.check(cfg)
        self.vae, self.tiling, self.config = vae, tiling, cfg
        sf, tf = cfg.spatial_factor, cfg.temporal_factor
        m, s = tiling.tile_sample_min_num_frames, tiling.tile_sample_stride_num_frames
        # Decode: 1 + m/4 latents per tile, every s/4; encode: 1 + m frames per tile, every s.
        dec = _Framewise(
            "decode", self._coder("decode", sf, 1), lambda sh, whole: check_latents(cfg, sh, whole_clip=whole),
            window=m // tf + 1, stride=s // tf, out_stride=s, blend=m - s, align=1,
            out_len=lambda n: tf * (n - 1) + 1,
        )
        enc = _Framewise(
            "encode", self._coder("moments", 1, sf), lambda sh, whole: check_video(cfg, sh, whole_clip=whole),
            window=m + 1, stride=s, out_stride=s // tf, blend=(m - s) // tf, align=tf,
            out_len=lambda n: (n - 1) // tf + 1,
        )
        self.latents_first, self.latents_per_chunk = dec.window, dec.stride
        self.frames_first, self.frames_per_chunk = enc.window, enc.stride
        self.decode, self.decode_start = jax.jit(dec.run), jax.jit(dec.start)
        self.decode_chunk, self.decode_end = jax.jit(dec.chunk), jax.jit(dec.end)
        self.encode = jax.jit(lambda *a: split_moments(enc.run(*a)))
        self.encode_start = jax.jit(lambda *a: _split_first(enc.start(*a)))
        self.encode_chunk = jax.jit(lambda *a: _split_first(enc.chunk(*a)))
        self.encode_end = jax.jit(lambda *a: split_moments(enc.end(*a)))

    def _coder(self, method: str, scale_in: int, scale_out: int) -> Callable:
        """`(params, x) -> y`: `method` on all of x, or on diffusers' spatial tiles when tiling is
        on and a frame exceeds a tile. Tiling sizes are in pixels; x's are pixels / scale_in and
        y's pixels / scale_out."""
        t = self.tiling
        tile = (t.tile_sample_min_height, t.tile_sample_min_width)
        stride = (t.tile_sample_stride_height, t.tile_sample_stride_width)
        tile_in, stride_in = [tuple(v // scale_in for v in p) for p in (tile, stride)]
        tile_out, stride_out = [tuple(v // scale_out for v in p) for p in (tile, stride)]
        blend = (tile_out[0] - stride_out[0], tile_out[1] - stride_out[1])

        def fn(params, x):
            plain = lambda x: self.vae.apply({"params": params}, x, method=method)  # noqa: E731
            if not t.use_tiling or (x.shape[2] <= tile_in[0] and x.shape[3] <= tile_in[1]):
                return plain(x)
            out_hw = (x.shape[2] * scale_in // scale_out, x.shape[3] * scale_in // scale_out)
            return _spatial_tiles(plain, x, tile_in, stride_in, stride_out, blend, out_hw)

        return fn


def _split_first(out):
    moments, state = out
    return split_moments(moments), state
