"""Small building blocks shared by every model: dense layers with logical axes, norms,
timestep embeddings, MLPs and adaLN modulation.

Norm statistics are always computed in float32 and cast back to the compute dtype, which is
what the PyTorch references do for bf16 (diffusers' RMSNorm, FP32LayerNorm) and keeps bf16
training stable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = jnp.dtype

# PyTorch's default Linear/Conv init (kaiming_uniform(a=sqrt(5))) is uniform(+-1/sqrt(fan_in)):
# keeping it makes freshly built JAX and PyTorch models statistically alike.
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def partitioned(init, names: Sequence[str | None]):
    return nn.with_logical_partitioning(init, tuple(names))


class Dense(nn.Module):
    """`y = x @ kernel + bias` with logical axis names `axes = (in_axis, out_axis)`."""

    features: int
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = torch_default_kernel_init
    bias_init: nn.initializers.Initializer | None = None  # None: PyTorch's uniform(+-1/sqrt(fan_in))

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", partitioned(self.kernel_init, self.axes), (x.shape[-1], self.features), self.param_dtype
        )
        y = jnp.dot(x.astype(self.dtype), kernel.astype(self.dtype))
        if self.use_bias:
            bound = 1.0 / math.sqrt(x.shape[-1])
            init = self.bias_init or (lambda k, s, d: jax.random.uniform(k, s, d, -bound, bound))
            bias = self.param("bias", partitioned(init, (self.axes[1],)), (self.features,), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _ln_stats(xf: jax.Array, eps: float):
    """Mean and 1 / std over the last axis (LayerNorm's statistics), two passes."""
    mean = xf.mean(-1, keepdims=True)
    return mean, jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)


def layer_norm(x: jax.Array, eps: float) -> jax.Array:
    """LayerNorm without affine parameters, statistics in float32."""
    xf = x.astype(jnp.float32)
    mean, rstd = _ln_stats(xf, eps)
    return ((xf - mean) * rstd).astype(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm with optional elementwise affine (`scale`, `bias`) over axis `axis_name`."""

    eps: float = 1e-6
    affine: bool = True
    axis_name: str = "embed"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = layer_norm(x, self.eps)
        if not self.affine:
            return y
        d = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (d,), self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, (self.axis_name,)), (d,), self.param_dtype)
        return y * scale.astype(y.dtype) + bias.astype(y.dtype)


def _cascade_mean(v: jax.Array) -> jax.Array:
    """Mean of `v [B, *axes, G, Cg]` over `*axes` and `Cg`, keepdims, summed per channel one axis at
    a time from the innermost, then over the group's channels: torch's order (per channel over the
    contiguous frames, then the group), not one flat float32 reduction, which XLA:CPU runs with
    a larger round-off than torch's; a VAE decoder's GroupNorms amplify that. The barriers stop
    XLA from merging the partial sums back into one reduction. Reducing an axis with the channels
    innermost is also the form XLA:CPU runs fastest."""
    b, g, cg = v.shape[0], v.shape[-2], v.shape[-1]
    s = v.reshape(*v.shape[:-2], g * cg)
    for i, axis in enumerate(range(s.ndim - 2, 0, -1)):
        s = (jax.lax.optimization_barrier(s) if i else s).sum(axis)
    s = s.reshape(b, *(1,) * (v.ndim - 3), g, cg).sum(-1, keepdims=True)
    return s / (v.size // (b * g))


class GroupNorm(nn.Module):
    """torch `GroupNorm` on `[B, ..., C]`: per sample and group, statistics over every other
    axis (time included), computed in float32 or wider (two passes, cascaded sums: see
    `_cascade_mean`)."""

    groups: int
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, ("conv_out",)), (c,), self.param_dtype)
        bias = self.param("bias", partitioned(nn.initializers.zeros, ("conv_out",)), (c,), self.param_dtype)
        f = jnp.promote_types(x.dtype, jnp.float32)  # float64 stays float64 (exactness checks)
        xf = x.astype(f).reshape(*x.shape[:-1], self.groups, c // self.groups)
        y = _group_normalize(xf, self.eps).reshape(x.shape)
        return (y * scale.astype(f) + bias.astype(f)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _group_normalize(xf: jax.Array, eps: float) -> jax.Array:
    """`(x - mean) / sqrt(var + eps)` per sample and group of `xf [B, *axes, G, Cg]`."""
    return _group_normalize_fwd(xf, eps)[0]


def _group_normalize_fwd(xf, eps):
    mean = _cascade_mean(xf)
    rstd = jax.lax.rsqrt(_cascade_mean(jnp.square(xf - mean)) + eps)
    y = (xf - mean) * rstd
    return y, (y, rstd)


def _group_normalize_bwd(eps, res, dy):
    """The normalisation's gradient in two passes (one two-output reduction, one elementwise),
    as torch's fused GroupNorm backward: dx = rstd (dy - mean(dy) - y mean(dy y)). Autodiff of
    the forward's cascaded sums takes many more passes, a large cost of the VAE step on CPU."""
    y, rstd = res
    m1 = _cascade_mean(dy)
    m2 = _cascade_mean(dy * y)
    return (rstd * (dy - m1 - y * m2),)


_group_normalize.defvjp(_group_normalize_fwd, _group_normalize_bwd)


class RMSNorm(nn.Module):
    """RMSNorm with a learned scale, statistics in float32 (diffusers' `RMSNorm`)."""

    eps: float = 1e-6
    axis_name: str = "kv"
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", partitioned(nn.initializers.ones, (self.axis_name,)), (d,), self.param_dtype)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return (y * scale.astype(jnp.float32)).astype(x.dtype)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding `[cos, sin]` of `t: [B]` -> `[B, dim]` (diffusers' `Timesteps` with
    flip_sin_to_cos=True, downscale_freq_shift=0), in float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class MLPEmbedder(nn.Module):
    """`linear_2(act(linear_1(x)))`: diffusers' `TimestepEmbedding` and
    `PixArtAlphaTextProjection` (both silu here)."""

    features: int
    in_axis: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = Dense(self.features, (self.in_axis, "embed"), name="linear_1", **kw)(x)
        x = nn.silu(x)
        return Dense(self.features, ("mlp", "embed"), name="linear_2", **kw)(x)


class FeedForward(nn.Module):
    """diffusers' `FeedForward`: `net.0.proj` (+ activation) then `net.2`.

    activation: "gelu-approximate" (GELU, tanh approximation) or "linear-silu".
    """

    mult: float = 4.0
    activation: str = "gelu-approximate"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = Dense(int(d * self.mult), ("embed", "mlp"), name="net_0", **kw)(x)
        if self.activation == "gelu-approximate":
            h = nn.gelu(h, approximate=True)
        elif self.activation == "linear-silu":
            h = nn.silu(h)
        else:
            raise ValueError(f"FeedForward: unknown activation {self.activation!r}")
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense(d, ("mlp", "embed"), name="net_2", **kw)(h)


class Modulation(nn.Module):
    """adaLN modulation: `chunks` vectors of width D from `linear(silu(emb))`, emb: [B, D]."""

    chunks: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb: jax.Array) -> list[jax.Array]:
        d = emb.shape[-1]
        out = Dense(
            self.chunks * d, ("embed", "modulation"), name="linear", dtype=self.dtype, param_dtype=self.param_dtype
        )(nn.silu(emb))
        # Gather the (tensor-sharded) feature axis before splitting: it is small ([B, chunks*D]),
        # and splitting a sharded axis miscomputes on XLA CPU (jax 0.10.2) when the batch is
        # split over two mesh axes (tests/test_dit_sharding.py).
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_embed"))
        return jnp.split(out, self.chunks, axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """`x * (1 + scale) + shift`; shift/scale are [B, D] or per-token [B, L, D]."""
    if shift.ndim == 2:
        shift, scale = shift[:, None], scale[:, None]
    return x * (1 + scale) + shift


def modulated_layer_norm(x: jax.Array, shift: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """`modulate(layer_norm(x, eps), shift, scale)` (adaLN) in one op with a hand-written
    backward; shift/scale are [B, D] or per-token [B, L, D]. Same values as the two calls (the
    product in float32, then cast to x's dtype)."""
    if shift.ndim == 2:
        shift, scale = shift[:, None], scale[:, None]
    return _modulated_layer_norm(x, shift, scale, eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _modulated_layer_norm(x, shift, scale, eps):
    return _modulated_layer_norm_fwd(x, shift, scale, eps)[0]


def _modulated_layer_norm_fwd(x, shift, scale, eps):
    xf = x.astype(jnp.float32)
    mean, rstd = _ln_stats(xf, eps)
    y = (xf - mean) * rstd * (1 + scale.astype(jnp.float32)) + shift.astype(jnp.float32)
    return y.astype(x.dtype), (x, mean, rstd, shift, scale)


def _modulated_layer_norm_bwd(eps, res, g):
    """The adaLN gradient as its textbook formulas: d_shift = sum g, d_scale = sum g * xhat over
    the broadcast axes; dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)) with
    dxhat = g (1 + scale). XLA:CPU's autodiff of the two calls fuses each block's norm gradients
    into few very wide fusions that recompute the chain per output (benchmarks/cpu_vs_torch.py
    measures the DiT's backward with this)."""
    x, mean, rstd, shift, scale = res
    gf = g.astype(jnp.float32)
    xhat = (x.astype(jnp.float32) - mean) * rstd
    per_token = shift.shape[1] != 1  # [B, L, D] (token replace) or [B, 1, D]

    def dot_sum(a, b, out: str):  # sum of a * b over the axes not in `out` ("bd" or "bl")
        if jax.default_backend() == "cpu":  # as a contraction: faster than a reduce on XLA:CPU
            return jnp.einsum(f"bld,bld->{out}", a, b)
        return (a * b).sum(1 if out == "bd" else 2)  # a reduction fusion (no operand transposes)

    def d_mod(t):  # sum over the tokens when the modulation is per sample
        return t if per_token else dot_sum(t, jnp.ones_like(t), "bd")[:, None]

    dxhat = gf * (1 + scale.astype(jnp.float32))
    d = x.shape[-1]
    m1 = dot_sum(dxhat, jnp.ones_like(dxhat), "bl")[..., None] / d
    m2 = dot_sum(dxhat, xhat, "bl")[..., None] / d
    dx = rstd * (dxhat - m1 - xhat * m2)
    return dx.astype(x.dtype), d_mod(gf).astype(shift.dtype), d_mod(gf * xhat).astype(scale.dtype)


_modulated_layer_norm.defvjp(_modulated_layer_norm_fwd, _modulated_layer_norm_bwd)


def gate(x: jax.Array, g: jax.Array) -> jax.Array:
    return x * (g[:, None] if g.ndim == 2 else g)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def edge_pad(x: jax.Array, pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """`jnp.pad(x, pads, mode="edge")` (torch's replicate padding), as a gather of each axis'
    clamped indices with its transpose written out (interior slice + the edge slices' sums).
    XLA:CPU runs jnp's concatenations of edge copies and their autodiff slower on the VAE's
    frames. `pads`: (before, after) per axis."""
    for axis, (lo, hi) in enumerate(pads):
        if lo or hi:
            n = x.shape[axis]
            x = jnp.take(x, np.clip(np.arange(-lo, n + hi), 0, n - 1), axis=axis, mode="clip", indices_are_sorted=True)
    return x


def _edge_pad_fwd(x, pads):
    return edge_pad(x, pads), None


def edge_pad_transpose(g: jax.Array, pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """The transpose of `edge_pad`: `g` of the padded shape folded back onto the input (each edge
    gathers the padding it was copied into)."""
    for axis, (lo, hi) in reversed(list(enumerate(pads))):
        if not (lo or hi):
            continue
        n = g.shape[axis] - lo - hi
        inner = jax.lax.slice_in_dim(g, lo, lo + n, axis=axis)
        widths, zero = [(0, 0, 0)] * g.ndim, jnp.zeros((), g.dtype)
        if lo:  # the padding before the first entry, summed onto it
            widths[axis] = (0, n - 1, 0)
            head = jax.lax.slice_in_dim(g, 0, lo, axis=axis).sum(axis, keepdims=True)
            inner = inner + jax.lax.pad(head, zero, widths)
        if hi:  # and after the last
            widths[axis] = (n - 1, 0, 0)
            tail = jax.lax.slice_in_dim(g, lo + n, lo + n + hi, axis=axis).sum(axis, keepdims=True)
            inner = inner + jax.lax.pad(tail, zero, widths)
        g = inner
    return g


def _edge_pad_bwd(pads, _, g):
    return (edge_pad_transpose(g, pads),)


edge_pad.defvjp(_edge_pad_fwd, _edge_pad_bwd)
