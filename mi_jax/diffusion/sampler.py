"""Sliding-window sampling for videos of any length.

Window layout (W latent frames; RoPE positions 0..W-1 in every window, as in training):

    [ reference | O motion latents from the previous window | W - 1 - O new latents ]

- The reference (the portrait's latent) sits at frame 0 of every window: with
  `token_replace` it is the clean first frame HunyuanVideo-I2V was trained to continue, and
  repeating it in every window anchors identity (HunyuanVideo-Avatar, Wan-I2V do the same).
- Motion latents: the last O latents of the previous window. At every denoising step they are
  replaced by themselves noised to the current time, and restored clean at the end
  (MultiTalk's SDEdit-style replacement, InfiniteTalk's clean overwrite: MeiGen-AI/MultiTalk and
  MeiGen-AI/InfiniteTalk, wan/multitalk.py). Chosen over latent blending because it needs no training change (a noised
  known frame is exactly what the model sees in training) and carries motion, not just
  appearance, across the seam; O is a config field (MultiTalk 7, InfiniteTalk 3).
- Each window's audio is the audio of its own frames: window k starts at global latent
  `k (W - 1 - O)`, whose first video frame the reference position takes, as training windows.

The output latent sequence is [reference, new latents...]: decoded by the causal VAE its first
frame is the portrait and every later latent gives 4 frames (1 + 4 N video frames).

`window_fn` is one window; generation (mi_jax/pipeline.py) jits it and calls it in a Python
loop (unbounded length, constant memory). Window k's noise comes from `fold_in(seed, k)`, so
any split into calls continues exactly.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from mi_jax.diffusion.conditions import dit_inputs
from mi_jax.diffusion.flow import euler_step, interpolate, predict_x0, sampling_times
from mi_jax.diffusion.guidance import GuidanceSchedule, guided_velocity
from mi_jax.models.dit import DiT
from mi_jax.models.dit_config import DiTConfig
from mi_jax.models.vae import TEMPORAL_FACTOR

@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    window: int = 9  # W latent frames per window, reference included
    overlap: int = 2  # O motion latents carried between windows
    steps: int = 30
    shift: float = 7.0
    kind: str = "euler"  # "euler": flow ODE; "x0": predict x0 and re-noise (few-step distilled)
    guidance: GuidanceSchedule = GuidanceSchedule()
    embedded_guidance: float = 1.0  # for guidance-embedding models (x 1000 inside)

    def __post_init__(self):
        if self.window < 3 or not 0 <= self.overlap <= self.window - 2:
            raise ValueError(f"window={self.window}, overlap={self.overlap}: need window >= 3 and "
                             "0 <= overlap <= window - 2 (a reference and at least one new latent)")
        if self.kind not in ("euler", "x0"):
            raise ValueError(f"sampler kind {self.kind!r}; use 'euler' or 'x0'")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")

    @property
    def new_per_window(self) -> int:
        return self.window - 1 - self.overlap

    def num_windows(self, video_frames: int) -> int:
        """Windows needed for `video_frames` frames (the first is the portrait)."""
        latents = max(1, math.ceil((video_frames - 1) / TEMPORAL_FACTOR))  # after the reference
        return max(1, math.ceil(max(latents - self.overlap, 1) / self.new_per_window))

    def generated_latents(self, num_windows: int) -> int:
        return self.overlap + num_windows * self.new_per_window

    def audio_frames(self, num_windows: int) -> int:
        """Video frames of audio the windows read (1 + 4 x all latents after the reference)."""
        return 1 + TEMPORAL_FACTOR * self.generated_latents(num_windows)


def window_frames(cfg: SamplerConfig, k: int) -> tuple[int, int]:
    """Video frames `[start, stop)` whose audio window k reads: `1 + 4 (W - 1)` frames from
    `4 k (W - 1 - O)` (the module docstring's layout)."""
    start = TEMPORAL_FACTOR * cfg.new_per_window * k
    return start, start + 1 + TEMPORAL_FACTOR * (cfg.window - 1)


def window_audio(audio_states: jax.Array, cfg: SamplerConfig, num_windows: int) -> jax.Array:
    """`[B, S, F, L, C]` per-video-frame features (F >= cfg.audio_frames) -> per window
    `[num_windows, B, S, 1 + 4 (W - 1), L, C]` (the whole clip at once; generation builds each
    window's slice as it goes, mi_jax/pipeline.py)."""
    starts = np.array([window_frames(cfg, k)[0] for k in range(num_windows)])
    span = window_frames(cfg, 0)[1]
    idx = starts[:, None] + np.arange(span)[None]
    if idx.max() >= audio_states.shape[2]:
        raise ValueError(f"audio_states cover {audio_states.shape[2]} frames; {num_windows} windows read "
                         f"{idx.max() + 1} (pad with silence: pad_audio_states)")
    return jnp.moveaxis(audio_states[:, :, idx], 2, 0)


def pad_audio_states(audio_states: jax.Array, frames: int) -> jax.Array:
    """Zero (silence) features after the end of the audio, up to `frames` video frames."""
    extra = frames - audio_states.shape[2]
    if extra <= 0:
        return audio_states[:, :, :frames]
    return jnp.pad(audio_states, ((0, 0), (0, 0), (0, extra), (0, 0), (0, 0)))


def make_window_fn(model_config: DiTConfig, cfg: SamplerConfig):
    """`window_fn(params, cond, carry, audio, rest=None) -> (carry, (first_motion, new))`.

    cond: a condition dict (mi_jax/diffusion/conditions.py) without its audio features: batch-first
    `text_embeds, text_mask, pooled, ref_latent [B, 1, h, w, C]`, optional
    `speaker_masks [B, S, W, h, w]`; carry: `{"motion": [B, O, h, w, C], "index": int32, "key"}`;
    audio: `[B, S, 1 + 4 (W - 1), L, C]` or None. rest: `[B, W, h, w, 1]` weights in [0, 1] or
    None: where > 0 the latents are pulled to the reference latent by that weight, at every
    step to the reference noised to the current time and at the end to the clean reference
    (the replacement the motion latents get, RePaint-style: Lugmayr et al. 2022); generation
    puts a silent speaker's mouth region there (mi_jax/generation/controls.py). Zero weights leave
    the window exactly as without. first_motion: window 0's latents at the motion positions
    (later windows' are the carried ones); new: `[B, W - 1 - O, h, w, C]`.
    """
    model = DiT(model_config)
    mcfg = model.config
    times = sampling_times(cfg.steps, cfg.shift)
    branches = cfg.guidance.branches
    w, o = cfg.window, cfg.overlap

    def velocity(params, x, t, cond):
        def apply(x, t, cond):
            return model.apply({"params": params}, **dit_inputs(mcfg, x, t, cond, cfg.embedded_guidance))

        return guided_velocity(apply, x, t, cond, branches, cfg.guidance.scales(t))

    def window_fn(params, cond, carry, audio, rest=None):
        k = carry["index"]
        key = jax.random.fold_in(carry["key"], k)
        k_x, k_known, k_steps = jax.random.split(key, 3)
        shape = carry["motion"].shape[:1] + (w,) + carry["motion"].shape[2:]
        x = jax.random.normal(k_x, shape, jnp.float32)
        known = jnp.zeros(shape, jnp.float32).at[:, 1 : 1 + o].set(carry["motion"])
        pos = jnp.arange(w)
        known_mask = ((pos >= 1) & (pos < 1 + o) & (k > 0))[None, :, None, None, None]
        known_noise = jax.random.normal(k_known, shape, jnp.float32)
        cond = dict(cond) if audio is None else dict(cond, audio_states=audio)

        ref = jnp.broadcast_to(cond["ref_latent"].astype(jnp.float32), shape)
        if rest is not None:  # the carried motion latents stay as they were made
            rest = jnp.where(known_mask, 0.0, rest.astype(jnp.float32))

        def pin(x, t):
            x = jnp.where(known_mask, interpolate(known, known_noise, jnp.full(shape[:1], t)), x)
            if rest is None:
                return x
            return x + rest * (interpolate(ref, known_noise, jnp.full(shape[:1], t)) - x)

        def step(x, inputs):
            i, t, t_next = inputs
            x = pin(x, t)
            v = velocity(params, x, t, cond)
            if cfg.kind == "euler":
                return euler_step(x, v, t, t_next), None
            fresh = jax.random.normal(jax.random.fold_in(k_steps, i), shape, jnp.float32)
            return interpolate(predict_x0(x, v, t), fresh, jnp.full(shape[:1], t_next)), None

        x, _ = jax.lax.scan(step, x, (jnp.arange(cfg.steps), times[:-1], times[1:]))
        x = jnp.where(known_mask, known, x)
        if rest is not None:
            x = x + rest * (ref - x)
        new_carry = {"motion": x[:, w - o :] if o else carry["motion"], "index": k + 1, "key": carry["key"]}
        return new_carry, (x[:, 1 : 1 + o], x[:, 1 + o :])

    return window_fn


def initial_carry(seed: int, batch: int, latent_shape: tuple[int, int, int], cfg: SamplerConfig) -> dict:
    h, w, c = latent_shape
    return {"motion": jnp.zeros((batch, cfg.overlap, h, w, c), jnp.float32), "index": jnp.int32(0),
            "key": jax.random.key(seed)}
