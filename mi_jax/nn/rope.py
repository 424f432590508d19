"""3D rotary position embedding over (time, height, width) latent-token grids.

Matches diffusers' `HunyuanVideoRotaryPosEmbed` + `apply_rotary_emb(use_real=True,
use_real_unbind_dim=-1)`: the head dimension is split into `axes_dim` = (t, h, w) parts, each
part rotates consecutive channel pairs (2i, 2i+1) by `pos * theta^(-2i/d)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def rope_frequencies(
    grid: Sequence[int], axes_dim: Sequence[int], theta: float, offsets: Sequence[int] = (0, 0, 0)
) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape `[prod(grid), sum(axes_dim)]` (float32), tokens in (t, h, w) order.

    offsets: start position per axis (a sliding window continues the time axis of the last one).
    """
    if len(grid) != len(axes_dim):
        raise ValueError(f"rope: grid {tuple(grid)} and axes_dim {tuple(axes_dim)} differ in length")
    coords = jnp.meshgrid(
        *[jnp.arange(n, dtype=jnp.float32) + o for n, o in zip(grid, offsets)], indexing="ij"
    )
    cos, sin = [], []
    for pos, d in zip(coords, axes_dim):
        if d % 2:
            raise ValueError(f"rope: every entry of axes_dim must be even, got {tuple(axes_dim)}")
        inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
        ang = pos.reshape(-1)[:, None] * inv[None]
        cos.append(jnp.repeat(jnp.cos(ang), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(ang), 2, axis=-1))
    return jnp.concatenate(cos, -1), jnp.concatenate(sin, -1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x: `[B, L, H, D]`; cos, sin: `[L, D]`. Computed in float32, returned in x.dtype."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
