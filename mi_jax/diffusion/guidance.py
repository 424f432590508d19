"""Multi-condition classifier-free guidance for talking heads, batched into one forward pass.

Branches (conditions kept on / dropped), as MultiTalk / InfiniteTalk's three passes
(MeiGen-AI/MultiTalk wan/multitalk.py: text + audio, audio only, neither) plus a reference-free
branch:

    full      = (text, audio, reference)
    no_text   = (-, audio, reference)
    no_audio  = (-, -, reference)
    uncond    = (-, -, -)            only when the reference scale is not 1

    v = v_no_audio + s_audio (v_no_text - v_no_audio) + s_text (v_full - v_no_text)
        [+ s_ref (v_no_audio - v_uncond) with v_uncond as the base]

Dropping a condition is training's condition dropout (`conditions.drop`: empty prompt, zero
audio features, zero reference latent), so the unconditional branches are the ones the model
learnt. Scales may depend on t (CFG attenuation / annealing, as
HunyuanVideo-Avatar and OmniHuman do): `GuidanceSchedule` decays them linearly from their
value at t = 1 to `end_fraction` of it at t = 0.

A CFG-distilled model (guidance embedding, HunyuanVideo's `guidance_embeds`) runs one branch
and takes the scale through `guidance` instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mi_jax.diffusion.conditions import drop


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
    """The conditions of one branch (see module docstring): `conditions.drop`, as training drops them."""
    return drop(cond, text=branch in ("no_text", "no_audio", "uncond"), audio=branch in ("no_audio", "uncond"),
                reference=branch == "uncond")


def stack_branches(cond: dict, branches: tuple[str, ...]) -> dict:
    """All branches' conditions concatenated on the batch axis (one forward pass)."""
    parts = [drop_for_branch(cond, b) for b in branches]
    return {k: jnp.concatenate([p[k] for p in parts], axis=0) for k in cond}


def combine(v: jax.Array, branches: tuple[str, ...], scales) -> jax.Array:
    """`v`: `[len(branches) * B, ...]` velocities in branch order -> guided `[B, ...]`.
    scales: `(s_text, s_audio, s_ref)`, scalars or arrays broadcasting against `[B, ...]`
    (`GuidanceSchedule.scales(t)`; distillation's real score passes per-sample ones)."""
    parts = dict(zip(branches, jnp.split(v, len(branches), axis=0)))
    if branches == ("full",):
        return parts["full"]
    s_text, s_audio, s_ref = scales
    base = parts["no_audio"]
    if "uncond" in parts:
        base = parts["uncond"] + s_ref * (parts["no_audio"] - parts["uncond"])
    return base + s_audio * (parts["no_text"] - parts["no_audio"]) + s_text * (parts["full"] - parts["no_text"])


def guided_velocity(apply: Callable, x: jax.Array, t, cond: dict, branches: tuple[str, ...], scales) -> jax.Array:
    """Multi-condition CFG in one batched pass: `apply(x [nB, ...], t [nB], cond) -> v` runs on
    every branch's conditions stacked (`stack_branches`), then `combine`. t: scalar or `[B]`."""
    n = len(branches)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), x.shape[:1])
    v = apply(jnp.concatenate([x] * n, 0), jnp.concatenate([t] * n, 0), stack_branches(cond, branches))
    return combine(v.astype(jnp.float32), branches, scales)
