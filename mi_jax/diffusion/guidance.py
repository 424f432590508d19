"""Multi-condition classifier-free guidance for talking heads, batched into one forward pass.

Branches (conditions kept on / dropped), as MultiTalk / InfiniteTalk's three passes plus a
reference-free branch (../shared/references/ section 3.2):

    full      = (text, audio, reference)
    no_text   = (-, audio, reference)
    no_audio  = (-, -, reference)
    uncond    = (-, -, -)            only when the reference scale is not 1

    v = v_no_audio + s_audio (v_no_text - v_no_audio) + s_text (v_full - v_no_text)
        [+ s_ref (v_no_audio - v_uncond) with v_uncond as the base]

Dropping a condition means what training's condition dropout means (train/pretrain.py:
empty prompt, zero audio features, zero reference latent), so the unconditional branches are
the ones the model learnt. Scales may depend on t (CFG attenuation / annealing, as
HunyuanVideo-Avatar and OmniHuman do): `GuidanceSchedule` decays them linearly from their
value at t = 1 to `end_fraction` of it at t = 0.

A CFG-distilled model (guidance embedding, HunyuanVideo's `guidance_embeds`) runs one branch
and takes the scale through `guidance` instead.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class GuidanceSchedule:
    text: float = 5.0
    audio: float = 4.0
    reference: float = 1.0
    end_fraction: float = 1.0  # scale at t = 0 relative to t = 1 (1: constant)

    def scales(self, t) -> tuple[jax.Array, jax.Array, jax.Array]:
        f = self.end_fraction + (1.0 - self.end_fraction) * t
        ramp = lambda s: 1.0 + (s - 1.0) * f  # noqa: E731  (a scale of 1 stays 1: no guidance)
        return ramp(self.text), ramp(self.audio), ramp(self.reference)

    @property
    def branches(self) -> tuple[str, ...]:
        if self.text == 1.0 and self.audio == 1.0 and self.reference == 1.0:
            return ("full",)
        out = ("full", "no_text", "no_audio")
        return out + ("uncond",) if self.reference != 1.0 else out


def drop_for_branch(cond: dict, branch: str) -> dict:
    """The conditions of one branch (see module docstring); `cond` holds batch-first arrays
    `text_embeds, text_mask, pooled, ref_latent[, audio_states]`."""
    out = dict(cond)
    if branch in ("no_text", "no_audio", "uncond"):
        out["text_embeds"] = jnp.zeros_like(cond["text_embeds"])
        out["text_mask"] = jnp.zeros_like(cond["text_mask"]).at[:, 0].set(1)
        out["pooled"] = jnp.zeros_like(cond["pooled"])
    if branch in ("no_audio", "uncond") and "audio_states" in cond:
        out["audio_states"] = jnp.zeros_like(cond["audio_states"])
    if branch == "uncond":
        out["ref_latent"] = jnp.zeros_like(cond["ref_latent"])
    return out


def stack_branches(cond: dict, branches: tuple[str, ...]) -> dict:
    """All branches' conditions concatenated on the batch axis (one forward pass)."""
    parts = [drop_for_branch(cond, b) for b in branches]
    return {k: jnp.concatenate([p[k] for p in parts], axis=0) for k in cond}


def combine(v: jax.Array, branches: tuple[str, ...], schedule: GuidanceSchedule, t) -> jax.Array:
    """`v`: `[len(branches) * B, ...]` velocities in branch order -> guided `[B, ...]`."""
    parts = dict(zip(branches, jnp.split(v, len(branches), axis=0)))
    if branches == ("full",):
        return parts["full"]
    s_text, s_audio, s_ref = schedule.scales(t)
    base = parts["no_audio"]
    if "uncond" in parts:
        base = parts["uncond"] + s_ref * (parts["no_audio"] - parts["uncond"])
    return base + s_audio * (parts["no_text"] - parts["no_audio"]) + s_text * (parts["full"] - parts["no_text"])
