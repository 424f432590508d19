"""Wav2Vec2 speech encoder: a Flax port of transformers' `Wav2Vec2Model` (eval mode).

raw audio [B, S] -> conv feature encoder -> feature projection -> positional conv embedding
-> transformer encoder (post-LN, or pre-LN when `do_stable_layer_norm`) -> [B, frames, hidden].

The parameter tree mirrors the PyTorch module tree (see `mi_jax/convert/wav2vec2.py`), except
that the encoder layers are one `nn.scan` stack (`encoder_layers`, leading "layers" axis) and
the encoder's own modules sit at the top (`pos_conv_embed`, `encoder_layer_norm`), since a
`NameMap` stacks only top-level modules. No dropout, SpecAugment masking or adapters: this
is the frozen audio feature extractor of MagicInfinite.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import struct

from mi_jax.nn.attention import attention
from mi_jax.nn.layers import Dense, Dtype, GroupNorm, LayerNorm, partitioned, torch_default_kernel_init

# transformers' ACT2FN names -> JAX. "gelu" is the exact (erf) GELU, as in torch.
ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "tanh": jnp.tanh,
}

# torch.nn.GroupNorm / LayerNorm default eps, used by the conv feature encoder (which ignores
# config.layer_norm_eps).
_CONV_NORM_EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    """The architecture fields of transformers' `Wav2Vec2Config`, same names and defaults."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = (512, 512, 512, 512, 512, 512, 512)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False

    def __post_init__(self):
        for name in ("conv_dim", "conv_stride", "conv_kernel"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if not len(self.conv_dim) == len(self.conv_stride) == len(self.conv_kernel) > 0:
            raise ValueError(
                f"Wav2Vec2Config: conv_dim {self.conv_dim}, conv_stride {self.conv_stride} and conv_kernel "
                f"{self.conv_kernel} must be non-empty and of the same length (one entry per conv layer)."
            )
        if self.feat_extract_norm not in ("group", "layer"):
            raise ValueError(
                f"Wav2Vec2Config: feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}."
            )
        for name in ("hidden_act", "feat_extract_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                raise ValueError(f"Wav2Vec2Config: {name}={getattr(self, name)!r} is not one of {sorted(ACTIVATIONS)}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"Wav2Vec2Config: hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                f"{self.num_attention_heads}."
            )
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            raise ValueError(
                f"Wav2Vec2Config: hidden_size {self.hidden_size} is not divisible by "
                f"num_conv_pos_embedding_groups {self.num_conv_pos_embedding_groups}."
            )

    @property
    def num_feat_extract_layers(self) -> int:
        return len(self.conv_dim)

    @classmethod
    def from_transformers(cls, d: Mapping) -> Wav2Vec2Config:
        """From a transformers `config.json` dict (missing fields take transformers' defaults)."""
        model_type = d.get("model_type", "wav2vec2")
        if model_type != "wav2vec2":
            raise ValueError(
                f"Wav2Vec2Config.from_transformers: model_type {model_type!r} is not 'wav2vec2' "
                "(HuBERT, WavLM and the Conformer variant have other architectures)."
            )
        if d.get("add_adapter") or d.get("adapter_attn_dim") is not None:
            raise ValueError(
                "Wav2Vec2Config.from_transformers: adapters (add_adapter / adapter_attn_dim) are not "
                "supported; use a checkpoint without them."
            )
        if "num_feat_extract_layers" in d and d["num_feat_extract_layers"] != len(d.get("conv_dim", cls.conv_dim)):
            raise ValueError(
                f"Wav2Vec2Config.from_transformers: num_feat_extract_layers={d['num_feat_extract_layers']} "
                f"but conv_dim has {len(d['conv_dim'])} entries."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# facebook/wav2vec2-base-960h (also wav2vec2-base): the numbers of its config.json on the
# Hugging Face Hub, which are transformers' Wav2Vec2Config() defaults. 94.4M parameters.
WAV2VEC2_BASE = Wav2Vec2Config(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    feat_extract_norm="group",
    feat_extract_activation="gelu",
    conv_dim=(512,) * 7,
    conv_stride=(5, 2, 2, 2, 2, 2, 2),
    conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_bias=False,
    num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16,
    do_stable_layer_norm=False,
)


def num_output_frames(config: Wav2Vec2Config, num_samples):
    """Encoder frames for `num_samples` audio samples (int or integer array): PyTorch's conv
    length `(L - k) // s + 1` per feature-encoder layer (20 ms hop at 16 kHz for the base model).
    An int below `min_samples(config)` raises; arrays give <= 0 there."""
    n = num_samples
    for k, s in zip(config.conv_kernel, config.conv_stride):
        n = (n - k) // s + 1
    if isinstance(n, int) and n < 1:
        raise ValueError(
            f"Wav2Vec2: {num_samples} samples give no frame; the feature encoder needs at least "
            f"{min_samples(config)} samples (its receptive field)."
        )
    return n


def min_samples(config: Wav2Vec2Config) -> int:
    """Fewest samples that give one frame: the feature encoder's receptive field (400 for base)."""
    n = 1
    for k, s in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        n = (n - 1) * s + k
    return n


@struct.dataclass
class Wav2Vec2Output:
    """last_hidden_state: [B, frames, hidden]; hidden_states: num_hidden_layers + 1 arrays of
    [B, frames, hidden] (the encoder input, then every layer's output, as transformers 5 gives
    them: with do_stable_layer_norm the last one is *before* the final layer norm);
    extract_features: [B, frames, conv_dim[-1]], the layer-normed conv features."""

    last_hidden_state: jax.Array
    hidden_states: tuple[jax.Array, ...]
    extract_features: jax.Array

    def __getitem__(self, key: str):
        return getattr(self, key)


class Conv1d(nn.Module):
    """PyTorch `Conv1d` (no padding) on channels-last `x: [B, T, C_in] -> [B, T', features]`."""

    features: int
    kernel_size: int
    stride: int = 1
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel_size, x.shape[-1], self.features)
        names = ("conv_kernel", "conv_in", "conv_out")
        kernel = self.param("kernel", partitioned(torch_default_kernel_init, names), shape, self.param_dtype)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (self.stride,), "VALID",
            dimension_numbers=("NWC", "WIO", "NWC"),
        )
        if self.use_bias:
            bias_init = partitioned(nn.initializers.zeros, ("conv_out",))
            bias = self.param("bias", bias_init, (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class FeatureEncoder(nn.Module):
    """Raw audio `[B, S]` -> conv features `[B, frames, conv_dim[-1]]` (`conv_layers_{i}`)."""

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_values: jax.Array) -> jax.Array:
        cfg = self.config
        x = input_values[..., None].astype(self.dtype)
        for i, (dim, k, s) in enumerate(zip(cfg.conv_dim, cfg.conv_kernel, cfg.conv_stride)):
            x = ConvLayer(
                dim, k, s, cfg.conv_bias, norm=self._norm(i), activation=cfg.feat_extract_activation,
                dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv_layers_{i}",
            )(x)
        return x

    def _norm(self, i: int) -> str:
        if self.config.feat_extract_norm == "layer":
            return "layer"
        return "group" if i == 0 else "none"


class ConvLayer(nn.Module):
    """One feature-encoder layer: conv, optional norm (`layer_norm`), activation."""

    features: int
    kernel_size: int
    stride: int
    use_bias: bool
    norm: str  # "group" (channel GroupNorm), "layer" (LayerNorm over channels) or "none"
    activation: str
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Conv1d(self.features, self.kernel_size, self.stride, self.use_bias, name="conv", **kw)(x)
        if self.norm == "group":
            # torch `GroupNorm(C, C)`: each channel normalised over time
            x = GroupNorm(x.shape[-1], _CONV_NORM_EPS, param_dtype=self.param_dtype, name="layer_norm")(x)
        elif self.norm == "layer":
            x = LayerNorm(_CONV_NORM_EPS, axis_name="conv_out", param_dtype=self.param_dtype, name="layer_norm")(x)
        return ACTIVATIONS[self.activation](x)


class FeatureProjection(nn.Module):
    """conv features `[B, T, C]` -> (`[B, T, hidden]`, the layer-normed features `[B, T, C]`)."""

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        norm = LayerNorm(cfg.layer_norm_eps, axis_name="conv_out", param_dtype=self.param_dtype, name="layer_norm")
        normed = norm(x)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(cfg.hidden_size, ("conv_out", "embed"), name="projection", **kw)(normed)
        return h, normed


class PositionalConvEmbedding(nn.Module):
    """Grouped conv over time with weight norm (dim=2), "same" padding, activation.
    x: [B, T, hidden] -> [B, T, hidden].

    Parameters keep PyTorch's layout so the checkpoint copies as is: `weight_v` [out, in/groups,
    k], `weight_g` [1, 1, k] (one norm per kernel tap), `bias` [out]; the weight is rebuilt as
    `g * v / ||v||` (norm over out and in) in float32 on every call.
    """

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        d, k, groups = cfg.hidden_size, cfg.num_conv_pos_embeddings, cfg.num_conv_pos_embedding_groups
        std = 2.0 * (1.0 / (k * d)) ** 0.5  # transformers' init of this conv
        v = self.param(
            "weight_v", partitioned(nn.initializers.normal(std), ("conv_out", "conv_in", "conv_kernel")),
            (d, d // groups, k), self.param_dtype,
        )
        g_init = partitioned(lambda *_: _norm_except_dim2(v).astype(self.param_dtype), (None, None, "conv_kernel"))
        g = self.param("weight_g", g_init, (1, 1, k), self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("conv_out",)), (d,), self.param_dtype)
        v32 = v.astype(jnp.float32)
        w = v32 * (g.astype(jnp.float32) / _norm_except_dim2(v32))
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), jnp.transpose(w, (2, 1, 0)).astype(self.dtype), (1,), [(k // 2, k // 2)],
            dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups,
        )
        y = y + bias.astype(self.dtype)
        if k % 2 == 0:
            y = y[:, :-1]  # symmetric padding of an even kernel yields one frame too many
        return ACTIVATIONS[cfg.feat_extract_activation](y)


def _norm_except_dim2(v: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=(0, 1), keepdims=True))


class SelfAttention(nn.Module):
    """Bidirectional multi-head self-attention, x: [B, T, hidden]; keys at positions >=
    `kv_lengths[b]` are ignored."""

    config: Wav2Vec2Config
    implementation: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths: jax.Array | None) -> jax.Array:
        cfg = self.config
        b, t, d = x.shape
        h = cfg.num_attention_heads
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        q, k, v = (
            Dense(d, ("embed", "heads"), name=f"{n}_proj", **kw)(x).reshape(b, t, h, d // h) for n in "qkv"
        )
        o = attention(q, k, v, implementation=self.implementation, kv_lengths=kv_lengths)
        return Dense(d, ("heads", "embed"), name="out_proj", **kw)(o.reshape(b, t, d))


class FeedForward(nn.Module):
    """`output_dense(act(intermediate_dense(x)))`, x: [B, T, hidden]."""

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        y = Dense(cfg.intermediate_size, ("embed", "mlp"), name="intermediate_dense", **kw)(x)
        y = ACTIVATIONS[cfg.hidden_act](y)
        return Dense(cfg.hidden_size, ("mlp", "embed"), name="output_dense", **kw)(y)


class EncoderLayer(nn.Module):
    """One transformer layer (post-LN, or pre-LN when `do_stable_layer_norm`); scan-shaped:
    `(x, kv_lengths) -> (x, x)` so the stack also returns every layer's output."""

    config: Wav2Vec2Config
    attention_impl: str = "xla"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, kv_lengths: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = SelfAttention(cfg, self.attention_impl, name="attention", **kw)
        ff = FeedForward(cfg, name="feed_forward", **kw)
        norm = LayerNorm(cfg.layer_norm_eps, param_dtype=self.param_dtype, name="layer_norm")
        final_norm = LayerNorm(cfg.layer_norm_eps, param_dtype=self.param_dtype, name="final_layer_norm")
        if cfg.do_stable_layer_norm:
            x = x + attn(norm(x), kv_lengths)
            x = x + ff(final_norm(x))
        else:
            x = norm(x + attn(x, kv_lengths))
            x = final_norm(x + ff(x))
        return x, x


class Wav2Vec2(nn.Module):
    """transformers' `Wav2Vec2Model` in eval mode.

    input_values: [B, S] float audio (16 kHz, zero-mean unit-variance per utterance for
      checkpoints whose feature extractor has do_normalize=True, e.g. base-960h).
    attention_mask: optional [B, S] (1 = real sample, 0 = right padding). As in transformers,
      only models trained with it (feat_extract_norm="layer") should get one; padded frames
      are zeroed before the encoder and ignored as attention keys.
    Returns `Wav2Vec2Output` (frames = `num_output_frames(config, S)`).
    """

    config: Wav2Vec2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, input_values: jax.Array, attention_mask: jax.Array | None = None) -> Wav2Vec2Output:
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if input_values.ndim != 2 or input_values.shape[1] < min_samples(cfg):
            raise ValueError(
                f"Wav2Vec2: input_values must be [batch, samples] with samples >= {min_samples(cfg)}, "
                f"got shape {input_values.shape}."
            )
        features = FeatureEncoder(cfg, name="feature_extractor", **kw)(input_values)
        hidden, extract_features = FeatureProjection(cfg, name="feature_projection", **kw)(features)

        kv_lengths = None
        if attention_mask is not None:
            # right padding assumed, as transformers does (it counts the ones)
            lengths = num_output_frames(cfg, attention_mask.astype(jnp.int32).sum(-1))
            kv_lengths = jnp.clip(lengths, 1, hidden.shape[1]).astype(jnp.int32)
            valid = jnp.arange(hidden.shape[1])[None, :] < kv_lengths[:, None]
            hidden = jnp.where(valid[..., None], hidden, 0).astype(hidden.dtype)

        hidden = hidden + PositionalConvEmbedding(cfg, name="pos_conv_embed", **kw)(hidden)
        encoder_norm = LayerNorm(cfg.layer_norm_eps, param_dtype=self.param_dtype, name="encoder_layer_norm")
        if not cfg.do_stable_layer_norm:
            hidden = encoder_norm(hidden)
        hidden = hidden.astype(self.dtype)

        stack = nn.scan(
            EncoderLayer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,
            length=cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        last, per_layer = stack(cfg, self.attention, name="encoder_layers", **kw)(hidden, kv_lengths)
        hidden_states = (hidden, *(per_layer[i] for i in range(cfg.num_hidden_layers)))
        if cfg.do_stable_layer_norm:
            last = encoder_norm(last)
        return Wav2Vec2Output(last_hidden_state=last, hidden_states=hidden_states, extract_features=extract_features)


def example_inputs(config: Wav2Vec2Config, batch: int = 1) -> dict:
    """Smallest valid inputs, for `init` / `jax.eval_shape`."""
    return {"input_values": jnp.zeros((batch, min_samples(config)), jnp.float32)}


def abstract_params(config: Wav2Vec2Config, **model_kwargs):
    """Parameter shapes (boxed with logical axis names) without allocating anything."""
    model = Wav2Vec2(config, **model_kwargs)
    return jax.eval_shape(lambda: model.init(jax.random.key(0), **example_inputs(config)))["params"]


def count_params(params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(nn.unbox(params))))
