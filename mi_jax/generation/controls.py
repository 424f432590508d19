"""Long-video controls, read from user input before anything is compiled: the prompt schedule,
voice activity per audio track, the speaker timeline, and what they mean per sampler window.

- Prompt schedule: `["0:a person talking", "12.5:a person talking, nodding"]` (or
  `[(0.0, "..."), (12.5, "...")]`). Window k takes the prompt in force at its first video
  frame; the first window under a new prompt is conditioned on the mean of the two prompts'
  conditions, so the change spreads over one window beside the motion latents the windows
  already share (mi_jax/diffusion/sampler.py).
- Voice activity: a video frame is voiced when its RMS is above both -60 dBFS and 1/10 (-20 dB)
  of the track's loud level (95th percentile of voiced-candidate frames); voiced frames are
  widened by `hangover_s` either side, so gaps between syllables and short pauses stay speech
  (the model animates those itself) and only real silences count as rest.
- Speaker timeline: lines `START END SPEAKER` (seconds; SPEAKER a 1-based track number or the
  audio file's name without extension); '#' starts a comment. With a timeline a speaker talks
  only inside their lines: elsewhere their track is muted (short fades), as a listener's track
  is silent in training (mi_jax/data/synthetic.py `speaking_turns`).
- Rest: where a speaker is silent, generation pins their mouth region's latents to the
  portrait's (RePaint-style replacement, Lugmayr et al. 2022, the same step the sampler uses
  for the carried motion latents), so the mouth rests as in the portrait and the face stays
  the reference's. `rest_weights` gives the weight per latent frame, ramped over one latent at
  each edge.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

from mi_jax.data.audio_io import samples_for_frames
from mi_jax.data.inputs import InputError
from mi_jax.models.vae import TEMPORAL_FACTOR

_TIMED = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*:(.*)$", re.S)
SILENCE_DBFS = -60.0
RELATIVE_DB = -20.0
HANGOVER_S = 0.3
FADE_S = 0.02


# ----------------------------------------------------------------------------- prompt schedule


def prompt_schedule(prompt) -> list[tuple[float, str]]:
    """A prompt or a schedule -> `[(start seconds, text), ...]` from 0, times increasing.

    prompt: a plain string (one prompt throughout; a single "SECONDS:TEXT" string is a
    schedule of one), or a sequence of "SECONDS:TEXT" strings / `(seconds, text)` pairs.
    Raises InputError for anything else, naming the entry and the fix."""
    if isinstance(prompt, str):
        m = _TIMED.match(prompt)
        return [(0.0, prompt)] if m is None else prompt_schedule([prompt])
    try:
        entries = list(prompt)
    except TypeError:
        raise InputError(f"prompt: {prompt!r} is not text; pass a string or a list of 'SECONDS:TEXT'") from None
    if not entries:
        raise InputError("prompt: the schedule is empty; give at least one 'SECONDS:TEXT' (e.g. '0:a person talking')")
    out: list[tuple[float, str]] = []
    for i, e in enumerate(entries):
        if isinstance(e, str):
            m = _TIMED.match(e)
            if m is None:
                raise InputError(f"prompt {i + 1} {e!r}: in a schedule every prompt is 'SECONDS:TEXT' with SECONDS a "
                                 "number, e.g. '12.5:a person talking, nodding'")
            t, text = float(m.group(1)), m.group(2).strip()
        elif isinstance(e, tuple) and len(e) == 2 and isinstance(e[1], str):
            try:
                t, text = float(e[0]), e[1].strip()
            except (TypeError, ValueError):
                raise InputError(f"prompt {i + 1} {e!r}: the time must be a number of seconds") from None
        else:
            raise InputError(f"prompt {i + 1} {e!r}: pass 'SECONDS:TEXT' strings or (seconds, text) pairs")
        if not math.isfinite(t) or t < 0:
            raise InputError(f"prompt {i + 1} {e!r}: time {t} s must be a finite number >= 0")
        if out and t <= out[-1][0]:
            raise InputError(f"prompt {i + 1} {e!r}: times must increase ({t} s comes after {out[-1][0]} s); "
                             "list the prompts in time order")
        out.append((t, text))
    if out[0][0] != 0.0:
        raise InputError(f"prompt schedule starts at {out[0][0]} s: the first prompt must start at 0 "
                         f"(e.g. '0:{out[0][1]}')")
    return out


def window_prompts(schedule: list[tuple[float, str]], window_starts: list[int], fps: float) -> list[tuple[int, int, float]]:
    """Per window, `(a, b, w)`: its text condition is `(1 - w) cond[a] + w cond[b]` with indices
    into `schedule`. Window k takes the prompt in force at its first frame `window_starts[k]`;
    the first window under a new prompt takes half of the previous one (`w = 0.5`)."""
    times = np.array([t for t, _ in schedule])
    current = [int(np.searchsorted(times, f / fps, side="right")) - 1 for f in window_starts]
    out = []
    for k, c in enumerate(current):
        prev = current[k - 1] if k else c
        out.append((prev, c, 0.5) if c != prev else (c, c, 0.0))
    return out


# ----------------------------------------------------------------------------- voice activity


def frame_rms(audio: np.ndarray, num_frames: int, fps: float, sample_rate: int) -> np.ndarray:
    """float64 [num_frames]: RMS of each video frame's samples (0 past the audio's end)."""

    bounds = np.minimum([samples_for_frames(i, fps, sample_rate) for i in range(num_frames + 1)], len(audio))
    energy = np.concatenate([[0.0], np.cumsum(np.square(np.asarray(audio, np.float64)))])
    return np.sqrt((energy[bounds[1:]] - energy[bounds[:-1]]) / np.maximum(np.diff(bounds), 1))


def voice_activity(audio: np.ndarray, num_frames: int, fps: float, sample_rate: int, *,
                   hangover_s: float = HANGOVER_S) -> np.ndarray:
    """bool [num_frames]: video frames in which the track speaks (module docstring)."""
    rms = frame_rms(audio, num_frames, fps, sample_rate)
    floor = 10.0 ** (SILENCE_DBFS / 20.0)
    loud = rms[rms > floor]
    if not loud.size:
        return np.zeros(num_frames, bool)
    voiced = (rms > floor) & (rms > np.percentile(loud, 95) * 10.0 ** (RELATIVE_DB / 20.0))
    return dilate(voiced, round(hangover_s * fps))


def dilate(active: np.ndarray, radius: int) -> np.ndarray:
    """bool [..., T]: True within `radius` frames of a True (along the last axis)."""
    if radius <= 0:
        return active.copy()
    c = np.concatenate([np.zeros(active.shape[:-1] + (1,)), np.cumsum(active, axis=-1)], axis=-1)
    t = active.shape[-1]
    idx = np.arange(t)
    hi, lo = np.minimum(idx + radius + 1, t), np.maximum(idx - radius, 0)
    return (c[..., hi] - c[..., lo]) > 0


# ----------------------------------------------------------------------------- timeline


def read_timeline(source, speakers: int, names: list[str] | None = None) -> list[tuple[float, float, int]]:
    """A timeline file (path) or its lines -> `[(start s, end s, speaker index), ...]`.

    names: per track, the names a line may use besides its 1-based number (the audio files'
    names without extension). Raises InputError naming the line and the fix."""
    if isinstance(source, os.PathLike) or (isinstance(source, str) and "\n" not in source):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise InputError(f"timeline: {path} does not exist (or is not a file); check the path")
        with open(path, encoding="utf-8") as f:
            lines, where = f.read().splitlines(), path
    else:
        lines = source.splitlines() if isinstance(source, str) else list(source)
        where = "timeline"
    names = [n.lower() for n in (names or [])]
    out = []
    for n, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        fix = "write 'START END SPEAKER' with times in seconds, e.g. '0 4.5 1'"
        if len(parts) != 3:
            raise InputError(f"{where} line {n} {raw.strip()!r}: {fix}")
        try:
            start, end = float(parts[0]), float(parts[1])
        except ValueError:
            raise InputError(f"{where} line {n} {raw.strip()!r}: START and END must be numbers; {fix}") from None
        if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end <= start:
            raise InputError(f"{where} line {n} {raw.strip()!r}: need 0 <= START < END")
        who = parts[2]
        if who.isdigit() and 1 <= int(who) <= speakers:
            s = int(who) - 1
        elif who.lower() in names:
            s = names.index(who.lower())
        else:
            known = ", ".join([str(i + 1) for i in range(speakers)] + [f'"{x}"' for x in names])
            raise InputError(f"{where} line {n}: speaker {who!r} does not exist; there are {speakers} audio "
                             f"track(s), name one of {known}")
        out.append((start, end, s))
    if not out:
        raise InputError(f"{where}: no 'START END SPEAKER' lines; give at least one or leave the timeline out")
    return out


def timeline_activity(timeline: list[tuple[float, float, int]], speakers: int, num_frames: int,
                      fps: float) -> np.ndarray:
    """bool [S, num_frames]: speaker s speaks in frame f when a line of theirs covers its time."""
    t = np.arange(num_frames) / fps
    out = np.zeros((speakers, num_frames), bool)
    for start, end, s in timeline:
        out[s] |= (t >= start) & (t < end)
    return out


def mute_outside(audio: np.ndarray, active: np.ndarray, fps: float, sample_rate: int) -> np.ndarray:
    """`audio` with the samples of inactive frames (`active` bool [frames]) faded to silence
    over `FADE_S` (no click)."""

    gain = np.zeros(len(audio), np.float32)
    bounds = np.minimum([samples_for_frames(i, fps, sample_rate) for i in range(len(active) + 1)], len(audio))
    for f in np.flatnonzero(active):
        gain[bounds[f] : bounds[f + 1]] = 1.0
    n = max(1, round(FADE_S * sample_rate))
    gain = np.convolve(gain, np.full(n, 1.0 / n, np.float32), mode="same")
    return (audio * gain).astype(np.float32)


# ----------------------------------------------------------------------------- rest


def rest_weights(active: np.ndarray, latents: int, frames_per_latent: int = TEMPORAL_FACTOR) -> np.ndarray:
    """float32 [S, 1 + latents]: per latent g (0 the reference, weight 0; g >= 1 covers video
    frames 4g - 3 .. 4g, 4 = `frames_per_latent`, the VAE's temporal factor), 1 where speaker s
    is silent over its frames and both neighbours', 0.5 where it is silent but a neighbour
    speaks, 0 where it speaks. active: bool [S, frames]; frames past the end count as silent."""
    s, frames = active.shape
    k = frames_per_latent
    pad = np.zeros((s, k * latents + 1), bool)
    pad[:, : min(frames, pad.shape[1])] = active[:, : pad.shape[1]]
    speaks = pad[:, 1:].reshape(s, latents, k).any(-1)  # latent g = frames 4g-3..4g (g from 1)
    silent = ~speaks
    edge = np.pad(speaks, ((0, 0), (1, 1)), constant_values=False)
    near = edge[:, :-2] | edge[:, 2:]
    weights = np.where(silent, np.where(near, 0.5, 1.0), 0.0).astype(np.float32)
    return np.concatenate([np.zeros((s, 1), np.float32), weights], axis=1)
