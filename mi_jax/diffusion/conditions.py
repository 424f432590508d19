"""The conditions of a DiT step, one name each, and the one place they become DiT arguments.

A condition dict holds batch-first arrays under the names the store and the loader use
(mi_jax/data/store.py), in training and in generation alike:

    text_embeds [B, L, D]   text_mask [B, L]   pooled [B, P]   ref_latent [B, 1, h, w, C]
    audio_states [B, (S,) F, n_layers, A]   speaker_masks [B, S, T, h, w]   (both optional)

`dit_inputs` turns one into the DiT's keyword arguments; pretraining (train/pretrain.py),
distillation (train/distill.py) and the sampler (diffusion/sampler.py) all call it, so they
cannot feed the DiT differently (tests/test_conditions.py). `drop` is the one condition
dropout: training's random per-sample dropout for CFG and the sampler's unconditional branches
(diffusion/guidance.py) both call it, so the model is guided by the branches it learnt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mi_jax.diffusion.flow import TIMESTEP_SCALE
from mi_jax.models.dit import image_condition_input
from mi_jax.models.dit_config import DiTConfig

COND_KEYS = ("text_embeds", "text_mask", "pooled", "ref_latent", "audio_states", "speaker_masks")
AUDIO_KEYS = ("audio_states", "speaker_masks")


def conditions(batch: dict, *, use_audio: bool = True) -> dict:
    """The condition dict of a batch (or any dict holding more): its `COND_KEYS`, without the
    audio ones when `use_audio` is False."""
    keys = COND_KEYS if use_audio else tuple(k for k in COND_KEYS if k not in AUDIO_KEYS)
    return {k: batch[k] for k in keys if k in batch}


def _where(mask, x, fill):
    """`fill` where `mask` (a Python bool, or `[B]` bools), else `x`."""
    fill = jnp.broadcast_to(jnp.asarray(fill, x.dtype), x.shape)
    if isinstance(mask, bool):
        return fill if mask else x
    return jnp.where(jnp.reshape(mask, (-1,) + (1,) * (x.ndim - 1)), fill, x)


def drop(cond: dict, *, text=None, audio=None, reference=None) -> dict:
    """`cond` with conditions dropped: text -> the empty prompt (zero states, one valid token so
    pooling stays finite), audio -> silence (zero features), reference -> a zero latent. Each
    of `text`, `audio`, `reference` is None / False (kept), True (dropped) or `[B]` bools (per
    sample)."""
    out = dict(cond)
    if text is not None:
        out["text_embeds"] = _where(text, cond["text_embeds"], 0)
        out["text_mask"] = _where(text, cond["text_mask"], jnp.zeros_like(cond["text_mask"]).at[:, 0].set(1))
        out["pooled"] = _where(text, cond["pooled"], 0)
    if audio is not None and "audio_states" in cond:
        out["audio_states"] = _where(audio, cond["audio_states"], 0)
    if reference is not None:
        out["ref_latent"] = _where(reference, cond["ref_latent"], 0)
    return out


def random_drop(cond: dict, keys: jax.Array, probs) -> dict:
    """Training's condition dropout (for CFG): each sample drops text / audio / reference with
    probability `probs.text / .audio / .reference`. keys: `[B]` per-sample keys."""
    draws = {}
    for i, name in enumerate(("text", "audio", "reference")):
        p = getattr(probs, name)
        if p > 0:
            k = jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys)
            draws[name] = jax.vmap(jax.random.uniform)(k) < p
    return drop(cond, **draws)


def dit_inputs(config: DiTConfig, x_t: jax.Array, t, cond: dict, guidance=1.0) -> dict:
    """The DiT's keyword arguments for noisy latents `x_t [B, T, h, w, C]` at flow time `t`
    (scalar or `[B]`, in [0, 1]) under the conditions `cond`; `guidance` is the embedded
    guidance scale (used by guidance-embedding models only). Audio goes in when the model has
    audio blocks and `cond` holds `audio_states`; one speaker's `[B, F, L, A]` becomes
    `[B, 1, F, L, A]`."""
    b = x_t.shape[0]
    kw = dict(hidden_states=image_condition_input(x_t, cond["ref_latent"], config.image_condition_type),
              timestep=jnp.broadcast_to(jnp.asarray(t, jnp.float32) * TIMESTEP_SCALE, (b,)),
              encoder_hidden_states=cond["text_embeds"], encoder_attention_mask=cond["text_mask"],
              pooled_projections=cond["pooled"])
    if config.guidance_embeds:
        kw["guidance"] = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32) * TIMESTEP_SCALE, (b,))
    if config.audio_blocks and "audio_states" in cond:
        audio = cond["audio_states"]
        kw["audio_states"] = audio if audio.ndim == 5 else audio[:, None]
        if "speaker_masks" in cond:
            kw["audio_mask"] = cond["speaker_masks"]
    return kw
