"""Flow-matching loss with MagicInfinite's region-adaptive weighting.

MagicInfinite (Yi et al., 2025, arXiv 2503.05978, abstract): "region-specific masks with
adaptive loss functions to balance global textual control and local audio guidance". The
full text is not public, so the formula is ours, in the spirit of Hallo's hierarchical
lip / expression / pose masks (Xu et al., 2024):

    e       = (v_pred - (noise - x0))^2                          per latent element
    L_all   = mean(e)                                            global: text, motion, scene
    L_face  = sum(M_face * e) / sum(M_face)                      local: identity, expression
    L_mouth = sum(M_mouth * e) / sum(M_mouth)                    local: lip sync
    L       = w_global * L_all + w_face * L_face + w_mouth * L_mouth

"Adaptive": each region term is an area-normalised mean, so a small face in a wide shot weighs
as much as a close-up, and a sample without a face (empty mask) contributes only L_all. The
weights are config fields per stage (stage 1 favours the mouth, stage 2 the global term).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LossWeights:
    global_: float = 1.0
    face: float = 0.0
    mouth: float = 0.0


def _region_mean(err: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Per-sample area-normalised mean of err `[B, ...]` over mask `[B, T, H, W]`, and whether
    the mask is non-empty."""
    if mask is None:
        return jnp.zeros(err.shape[0]), jnp.zeros(err.shape[0], bool)
    m = mask.astype(jnp.float32)[..., None]  # broadcast over channels
    area = m.sum(axis=tuple(range(1, m.ndim))) * err.shape[-1]
    total = (err * m).sum(axis=tuple(range(1, err.ndim)))
    return total / jnp.maximum(area, 1.0), area > 0


def flow_matching_loss(
    v_pred: jax.Array,
    target: jax.Array,
    *,
    face_mask: jax.Array | None = None,
    mouth_mask: jax.Array | None = None,
    weights: LossWeights = LossWeights(),
    sample_weight: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Scalar loss and its parts. v_pred, target: `[B, T, H, W, C]`; masks `[B, T, H, W]` at
    latent resolution (union over speakers); sample_weight: `[B]` (0 drops a sample)."""
    err = jnp.square(v_pred.astype(jnp.float32) - target.astype(jnp.float32))
    per_all = err.mean(axis=tuple(range(1, err.ndim)))
    per_face, has_face = _region_mean(err, face_mask)
    per_mouth, has_mouth = _region_mean(err, mouth_mask)
    per_sample = (
        weights.global_ * per_all
        + weights.face * jnp.where(has_face, per_face, 0.0)
        + weights.mouth * jnp.where(has_mouth, per_mouth, 0.0)
    )
    w = jnp.ones_like(per_all) if sample_weight is None else sample_weight.astype(jnp.float32)
    denom = jnp.maximum(w.sum(), 1e-6)
    parts = {
        "loss_all": (w * per_all).sum() / denom,
        "loss_face": (w * per_face).sum() / jnp.maximum((w * has_face).sum(), 1e-6),
        "loss_mouth": (w * per_mouth).sum() / jnp.maximum((w * has_mouth).sum(), 1e-6),
    }
    return (w * per_sample).sum() / denom, parts
