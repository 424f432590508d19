"""A procedural talking-head world with known ground truth, for training and measuring quality
where no real data or weights exist.

A clip is one or two faces (ellipses with hair, eyes and a mouth) on a background, rendered with
numpy, plus speech-like audio at 16 kHz. Everything the evaluation needs is known exactly:

* mouth_open [S, T] in [0, 1]: the RMS of the speaker's own audio over each frame's audio window
  (`audio_io.samples_for_frames` boundaries), smoothed with a [1, 2, 1] / 4 kernel over frames and
  divided by its maximum (all zeros for a speaker who never talks). The rendered mouth's inner
  height is linear in it.
* face_boxes / mouth_boxes / eye_boxes [S, T, 4]: (x0, y0, x1, y1) in continuous pixel coordinates, pixel
  (i, j) covering [j, j + 1) x [i, i + 1); face_masks [S, T, H, W]: the face ellipse (skin,
  eyes and mouth; not the hair).
* eye_open [S, T] in [0, 1] (blinks), actions, the identities.

Audio: voiced syllables (a pitch contour with declination across the phrase; harmonics weighted
by three vowel formants) separated by short gaps, phrases separated by pauses. With two speakers
the speakers take turns (one talks while the other is silent); the mixed audio is their sum.

Prompt actions (keywords, case-insensitive; a neutral prompt gives none): "nodding" (vertical
head oscillation), "shaking head" (horizontal oscillation, features turning further than the
outline), "smiling" (mouth corners up, mouth 25 % wider), "looking left" / "looking right" (head
and pupils shifted towards image-left / image-right). Actions ease in over 0.4 s and last the clip.

Determinism: a seed gives bit-identical output. Identity, voice, audio and blinks come from
separate random streams, so the same seed with another prompt or style changes only that.

Splits: seeds 0 .. 999_999 are "train", seeds >= HELDOUT_SEED_START (1_000_000) are "heldout"
(`split(seed)`), so held-out identities and utterances are never trained on.

espeak-ng speech (`render_clip(..., voice="espeak")`, needs `pip install -e .[speech]`, GPL-3:
mi_jax/data/speech.py): instead of the synthetic voice, each speaker says seeded sentences
(`speech.sentence`) in an espeak-ng voice (`speech.TRAIN_VOICES` for train seeds,
`speech.HELDOUT_VOICES` for held-out ones: voices, variants and sentence words never trained
on), at a drawn rate and pitch, inside their turns. The mouth opening follows the speech
envelope as above, and its shape follows the phonemes: per frame the viseme of the phoneme
overlapping it most (`speech.frame_visemes`), whose (width, height) factors
(`speech.VISEME_SHAPES`: open /a/, wide /i/ /e/, round /o/ /u/, closed /m/ /b/ /p/), smoothed
like the envelope, scale the rendered mouth. Truth adds visemes [S, T] (index into
`speech.VISEMES`), mouth_width [S, T] (the inner width over the identity's closed width,
smile included) and mouth_height [S, T] in [0, 1] (the opening the mouth is rendered with: the
envelope times the height factor); meta.json adds each speaker's voice, sentences and phonemes.
The default synthetic voice's clips are unchanged, bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from mi_jax.data.audio_io import FPS, SAMPLE_RATE, samples_for_frames
from mi_jax.data.video_io import write_video

HELDOUT_SEED_START = 1_000_000
STYLES = ("cartoon", "realistic")
ACTIONS = ("nodding", "shaking head", "smiling", "looking left", "looking right")
_ACTION_PATTERNS = {
    "nodding": r"\bnod(s|ding|ded)?\b",
    "shaking head": r"\bshak(e|es|ing)\b[\w\s]*\bhead\b|\bhead[\s-]?shak",
    "smiling": r"\bsmil(e|es|ing)\b",
    "looking left": r"\blook(s|ing)?\s+(to\s+(the\s+)?)?left\b",
    "looking right": r"\blook(s|ing)?\s+(to\s+(the\s+)?)?right\b",
}

SKIN_TONES = np.array(
    [(255, 224, 196), (241, 194, 160), (224, 172, 130), (198, 134, 90), (160, 105, 70), (120, 80, 55)]
)
HAIR_COLOURS = np.array([(20, 15, 12), (60, 40, 25), (110, 75, 40), (200, 170, 110), (150, 60, 30), (140, 140, 140)])
EYE_COLOURS = np.array([(25, 20, 20), (70, 45, 25), (40, 80, 140), (50, 100, 60)])
SCLERA = np.array([245, 245, 240])
MOUTH_INTERIOR = np.array([30, 8, 12])  # darker than any skin tone's shadow: what measure_mouth_open counts
OUTLINE = np.array([35, 25, 25])
SMILE_LIFT = 0.08  # how far a full smile lifts the mouth corners, in face half-heights
# (F1, F2, F3) in Hz of adult vowels (Peterson & Barney): /a/ /i/ /u/ /e/ /o/ /ae/ /er/
VOWEL_FORMANTS = np.array(
    [
        (730, 1090, 2440),
        (270, 2290, 3010),
        (300, 870, 2240),
        (530, 1840, 2480),
        (570, 840, 2410),
        (660, 1720, 2410),
        (490, 1350, 1690),
    ]
)


# How a user phrases a prompt for this world (the demo, the eval, the README and the training
# clips all use these words, so the tiny text encoder, which hashes each word to its own random
# vector, has seen every word of them in training).
NEUTRAL_PROMPT = "a person talking"


def prompt_for(action: str = "") -> str:
    """The user's phrasing of one action: "a person talking" or "a person talking, nodding"."""
    if action and action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}; choose one of {ACTIONS} or '' (neutral)")
    return NEUTRAL_PROMPT + (f", {action}" if action else "")


# the training clips' prompts: neutral, then each action in turn
TRAINING_PROMPTS = (prompt_for(""),) + tuple(prompt_for(a) for a in ACTIONS)


def split(seed: int) -> str:
    """"train" for seeds 0 .. HELDOUT_SEED_START - 1, "heldout" from HELDOUT_SEED_START on."""
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return "heldout" if seed >= HELDOUT_SEED_START else "train"


def parse_actions(prompt: str) -> list[str]:
    """Actions named in `prompt`, in ACTIONS order (see the module docstring)."""
    text = prompt.lower()
    return [name for name in ACTIONS if re.search(_ACTION_PATTERNS[name], text)]


@dataclass(frozen=True)
class Identity:
    """One synthetic person. Geometry is relative: face axes are fractions of the panel's shorter
    side (a panel is the frame, or its half with two speakers); eye and mouth positions and sizes
    are fractions of the face half-width (x) and half-height (y). Colours are RGB 0..255."""

    style: str
    face_half_width: float
    face_aspect: float  # half-height / half-width
    skin: tuple[int, int, int]
    hair: tuple[int, int, int]
    background: tuple[int, int, int]
    eye_colour: tuple[int, int, int]
    hair_volume: float  # hair ellipse size relative to the face
    eye_spacing: float  # eye centre x offset / face half-width
    eye_height: float  # eye centre height above the face centre / face half-height
    eye_size: float  # eye half-width / face half-width
    mouth_y: float  # mouth centre below the face centre / face half-height
    mouth_width: float  # closed mouth half-width / face half-width
    mouth_open_height: float  # fully open inner half-height / face half-height
    voice_hz: float  # mean pitch

    @classmethod
    def sample(cls, rng: np.random.Generator, style: str | None = None, background=None) -> Identity:
        """Draws an identity; `background` (RGB) is kept when given (a shared two-person scene)."""
        # every value is drawn whether or not it is overridden, so an override changes nothing else
        drawn_style = STYLES[rng.integers(len(STYLES))]
        style = drawn_style if style is None else _check_style(style)
        given = background
        for _ in range(100):  # the face must stand out from the background
            i = rng.integers(len(SKIN_TONES) - 1)
            skin = SKIN_TONES[i] + rng.uniform() * (SKIN_TONES[i + 1] - SKIN_TONES[i]) + rng.uniform(-8, 8, 3)
            background = rng.uniform(20, 235, 3)
            if given is not None:
                background = np.asarray(given, np.float64)
            if np.linalg.norm(background - skin) > 90:
                break
        hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] + rng.uniform(-10, 10, 3)
        return cls(
            style=style,
            face_half_width=float(rng.uniform(0.22, 0.28)),
            face_aspect=float(rng.uniform(1.15, 1.3)),
            skin=_rgb(skin),
            hair=_rgb(hair),
            background=_rgb(background),
            eye_colour=_rgb(EYE_COLOURS[rng.integers(len(EYE_COLOURS))]),
            hair_volume=float(rng.uniform(1.05, 1.2)),
            eye_spacing=float(rng.uniform(0.36, 0.46)),
            eye_height=float(rng.uniform(0.2, 0.3)),
            eye_size=float(rng.uniform(0.14, 0.19)),
            mouth_y=float(rng.uniform(0.38, 0.48)),
            mouth_width=float(rng.uniform(0.3, 0.38)),
            mouth_open_height=float(rng.uniform(0.13, 0.18)),
            voice_hz=float(rng.uniform(95, 230)),
        )


def _rgb(colour) -> tuple[int, int, int]:
    return tuple(int(c) for c in np.clip(np.round(colour), 0, 255))


def _check_style(style: str) -> str:
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES} or None, got {style!r}.")
    return style


# ----------------------------------------------------------------------------- audio


def speaking_turns(rng: np.random.Generator, seconds: float, speakers: int) -> list[list[tuple[float, float]]]:
    """Per speaker, the (start, end) seconds in which they may talk: one speaker talks throughout;
    two alternate turns of 1.2-3 s separated by 0.15-0.5 s, starting with a random one."""
    if speakers == 1:
        return [[(0.0, seconds)]]
    turns = [[] for _ in range(speakers)]
    t, who = rng.uniform(0.1, 0.4), int(rng.integers(speakers))
    while t < seconds:
        length = rng.uniform(1.2, 3.0)
        turns[who].append((t, min(t + length, seconds)))
        t += length + rng.uniform(0.15, 0.5)
        who = (who + 1) % speakers
    return turns


def _syllables(rng: np.random.Generator, start: float, end: float) -> list[tuple[float, float, float, float]]:
    """(onset s, duration s, position in phrase / phrase length, loudness) of each syllable."""
    out, t = [], start + rng.uniform(0.05, 0.25)
    while True:
        phrase = int(rng.integers(2, 8))
        for k in range(phrase):
            duration = rng.uniform(0.1, 0.3)
            if t + duration > end - 0.02:
                return out
            out.append((t, duration, k / phrase, rng.uniform(0.45, 1.0)))
            t += duration + rng.uniform(0.02, 0.1)
        t += rng.uniform(0.25, 0.8)


def speech_audio(
    rng: np.random.Generator,
    num_samples: int,
    voice_hz: float,
    turns: list[tuple[float, float]],
    sample_rate: int = SAMPLE_RATE,
    peak: float = 0.35,
) -> np.ndarray:
    """Speech-like float32 [num_samples]: syllables inside `turns` (seconds), peak-normalised to `peak`."""
    audio = np.zeros(num_samples, np.float32)
    harmonics = np.arange(1, 25, dtype=np.float32)[:, None]  # [K, 1]
    bandwidths = np.array([90.0, 110.0, 170.0])[:, None, None]
    gains = np.array([1.0, 0.6, 0.3])[:, None, None]
    for start, end in turns:
        for onset, duration, position, loudness in _syllables(rng, start, end):
            n0 = round(onset * sample_rate)
            n = min(round(duration * sample_rate), num_samples - n0)
            if n <= 0:
                continue
            u = np.arange(n, dtype=np.float32) / n
            # declination over the phrase, a rise or fall within the syllable, slight vibrato
            f0 = voice_hz * (1.1 - 0.2 * position) * (1 + rng.uniform(-0.15, 0.15) * (u - 0.5))
            f0 = f0 * (1 + 0.02 * np.sin(2 * np.pi * 5.5 * (onset + u * duration)))
            phase = 2 * np.pi * np.cumsum(f0) / sample_rate + rng.uniform(0, 2 * np.pi)
            formants = VOWEL_FORMANTS[rng.integers(len(VOWEL_FORMANTS))][:, None, None]
            freqs = harmonics * f0[None]  # [K, n]
            weight = (gains * np.exp(-0.5 * ((freqs[None] - formants) / bandwidths) ** 2)).sum(0) + 0.1 / harmonics
            weight = np.where(freqs < 0.45 * sample_rate, weight, 0.0)  # nothing above Nyquist
            voiced = (weight * np.sin(harmonics * phase[None])).sum(0) / weight.sum(0)
            audio[n0 : n0 + n] += loudness * np.sin(np.pi * u) ** 0.6 * voiced
    top = float(np.max(np.abs(audio)))
    return audio * (peak / top) if top > 0 else audio


VOICES = ("synthetic", "espeak")


def espeak_audio(rng: np.random.Generator, num_samples: int, turns: list[tuple[float, float]], voices,
                 split_name: str = "train", sample_rate: int = SAMPLE_RATE, peak: float = 0.35):
    """espeak-ng speech float32 [num_samples] inside `turns` (seconds), peak-normalised to `peak`:
    one voice drawn from `voices`, a rate (130-210 words per minute) and pitch (35-65), then
    `speech.sentence(rng, split_name)` after sentence, 0.2-0.6 s apart, each cut at its turn's
    end. Returns (audio, phonemes with clip times, {voice, rate, pitch, sentences, phonemes})."""
    from mi_jax.data import speech

    voice = voices[int(rng.integers(len(voices)))]
    rate, pitch = int(rng.integers(130, 211)), int(rng.integers(35, 66))
    audio = np.zeros(num_samples, np.float32)
    phonemes, sentences = [], []
    for start, end in turns:
        t = start + rng.uniform(0.05, 0.25)
        while t < end - 0.3:
            text = speech.sentence(rng, split_name)
            said = speech.speak(text, voice, sample_rate=sample_rate, rate=rate, pitch=pitch)
            n0 = round(t * sample_rate)
            n = max(0, min(len(said.audio), round(end * sample_rate) - n0, num_samples - n0))
            audio[n0 : n0 + n] += said.audio[:n]
            stop = t + n / sample_rate
            phonemes += [speech.Phoneme(round(t + p.start, 4), round(min(t + p.end, stop), 4), p.ipa, p.viseme)
                         for p in said.phonemes if t + p.start < stop]
            sentences.append([round(t, 4), text])
            t = stop + rng.uniform(0.2, 0.6)
    top = float(np.max(np.abs(audio)))
    audio = audio * (peak / top) if top > 0 else audio
    info = {"voice": voice, "rate": rate, "pitch": pitch, "sentences": sentences,
            "phonemes": [[p.start, p.end, p.ipa] for p in phonemes]}
    return audio.astype(np.float32), phonemes, info


def viseme_shape(phonemes, num_frames: int, fps: float = FPS):
    """Per frame: the viseme index [T] int8 (`speech.frame_visemes`) and its (width, height)
    factors [T] float32 each (`speech.VISEME_SHAPES`), smoothed with the envelope's [1, 2, 1] / 4."""
    from mi_jax.data import speech

    visemes = speech.frame_visemes(phonemes, num_frames, fps)
    table = np.array([speech.VISEME_SHAPES[v] for v in speech.VISEMES], np.float64)  # [V, 2]
    padded = np.pad(table[visemes], ((1, 1), (0, 0)), mode="edge")
    smooth = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    return visemes, smooth[:, 0].astype(np.float32), smooth[:, 1].astype(np.float32)


def mouth_envelope(audio: np.ndarray, num_frames: int, fps: float = FPS, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mouth opening float32 [num_frames] in [0, 1] from `audio: [samples]` (module docstring);
    all zeros for silent audio."""
    bounds = np.array([samples_for_frames(i, fps, sample_rate) for i in range(num_frames + 1)])
    bounds = np.minimum(bounds, len(audio))
    energy = np.concatenate([[0.0], np.cumsum(np.square(audio, dtype=np.float64))])
    rms = np.sqrt((energy[bounds[1:]] - energy[bounds[:-1]]) / np.maximum(bounds[1:] - bounds[:-1], 1))
    padded = np.pad(rms, 1, mode="edge")
    smooth = 0.25 * padded[:-2] + 0.5 * padded[1:-1] + 0.25 * padded[2:]
    top = smooth.max()
    return (smooth / top if top > 0 else smooth).astype(np.float32)


# ----------------------------------------------------------------------------- motion


def blinks(rng: np.random.Generator, times: np.ndarray) -> np.ndarray:
    """Eye openness float32 [T] in [0, 1]: blinks every 2-6 s, each closing and reopening in ~0.2 s."""
    openness = np.ones(len(times), np.float32)
    t = rng.uniform(0.3, 3.0)
    while t < times[-1] + 1:
        half = rng.uniform(0.07, 0.1)
        openness = np.minimum(openness, np.clip(np.abs(times - t) / half, 0, 1))
        t += rng.uniform(2.0, 6.0)
    return openness


def head_motion(rng: np.random.Generator, times: np.ndarray, actions: list[str], unit: float) -> dict[str, np.ndarray]:
    """Per-frame float32 [T] head offsets in pixels (dx, dy), extra feature offset for head turns
    (feature_dx), pupil gaze in [-1, 1] (negative = image-left) and smile in [0, 1]. `unit` is
    the panel's shorter side in pixels."""
    sway = []
    for _ in range(2):  # a slow idle drift: two incommensurate sinusoids per axis
        f, p = rng.uniform(0.1, 0.35, 2), rng.uniform(0, 2 * np.pi, 2)
        wave = 0.6 * np.sin(2 * np.pi * f[0] * times + p[0]) + 0.4 * np.sin(2 * np.pi * f[1] * times + p[1])
        sway.append(0.012 * unit * wave)
    dx, dy = sway
    zero = np.zeros_like(times)
    ease = np.clip(times / 0.4, 0, 1)
    nod = 0.07 * unit * np.sin(2 * np.pi * 1.4 * times) * ease if "nodding" in actions else zero
    shake = 0.07 * unit * np.sin(2 * np.pi * 1.2 * times) * ease if "shaking head" in actions else zero
    look = (("looking right" in actions) - ("looking left" in actions)) * ease
    out = {
        "dx": dx + shake + 0.05 * unit * look,
        "dy": dy + nod,
        "feature_dx": 0.35 * shake + 0.03 * unit * look,
        "gaze": look,
        "smile": ease if "smiling" in actions else zero,
    }
    return {k: v.astype(np.float32) for k, v in out.items()}


# ----------------------------------------------------------------------------- rendering


def _ellipse(x, y, cx, cy, a, b, curve=0.0):
    """Anti-aliased coverage in [0, 1] of an axis-aligned ellipse, via its approximate signed
    distance (exact area fractions keep pixel measurements continuous). x: [1, 1, W],
    y: [1, H, 1]; the rest scalars or [t, 1, 1]. `curve` lifts the ends by curve * (dx / a)^2."""
    dx = (x - cx) / a
    dy = (y - cy + curve * dx * dx) / b
    r = np.sqrt(dx * dx + dy * dy)
    grad = np.sqrt((dx / a) ** 2 + (dy / b) ** 2) / np.maximum(r, 1e-6)
    grad = np.maximum(grad, 1.0 / np.maximum(a, b))
    return np.clip(0.5 - (r - 1.0) / grad, 0.0, 1.0)


def _paint(canvas, coverage, colour):
    """Alpha-composites `colour` (RGB, or per-pixel [..., 3]) over canvas [t, H, W, 3] in place."""
    canvas += coverage[..., None] * (np.asarray(colour, np.float32) - canvas)


@dataclass
class _Speaker:
    """One face's per-frame geometry in pixels: arrays [T] (centres, sizes, openings)."""

    identity: Identity
    cx: np.ndarray
    cy: np.ndarray
    ax: float
    ay: float
    feature_dx: np.ndarray
    gaze: np.ndarray
    smile: np.ndarray
    eye_open: np.ndarray
    mouth_open: np.ndarray
    # espeak-ng clips: per-frame viseme width / height factors of the mouth (None: 1, as before)
    mouth_width_scale: np.ndarray | None = None
    mouth_height_scale: np.ndarray | None = None

    def mouth_geometry(self):
        """Mouth centre x, y, inner half-width, inner half-height, corner lift: each [T]."""
        ident = self.identity
        a = ident.mouth_width * self.ax * (1 + 0.25 * self.smile)
        if self.mouth_width_scale is not None:
            a = a * self.mouth_width_scale
        closed = 0.03 * self.ay
        opening = self.mouth_open if self.mouth_height_scale is None else self.mouth_open * self.mouth_height_scale
        b = closed + opening * (ident.mouth_open_height * self.ay - closed)
        return self.cx + self.feature_dx, self.cy + ident.mouth_y * self.ay, a, b, SMILE_LIFT * self.ay * self.smile

    def mouth_boxes(self) -> np.ndarray:
        """[T, 4] box holding the mouth at any opening and smile (fixed size, follows the mouth)."""
        mx, my, _, _, _ = self.mouth_geometry()
        half_w = 1.1 * self.identity.mouth_width * self.ax * 1.25 + 1.0
        if self.mouth_width_scale is not None:  # a viseme can widen the mouth past a smile's width
            half_w = 1.1 * self.identity.mouth_width * self.ax * 1.25 * max(1.0, float(self.mouth_width_scale.max())) + 1.0
        half_h = 1.1 * self.identity.mouth_open_height * self.ay + SMILE_LIFT * self.ay + 1.0
        return np.stack([mx - half_w, my - half_h, mx + half_w, my + half_h], axis=-1)

    def eye_boxes(self) -> np.ndarray:
        """[T, 4] box holding both eyes (open, at any gaze), 1 px margin: the eye band."""
        ident = self.identity
        ex, ey = self.cx + self.feature_dx, self.cy - ident.eye_height * self.ay
        half_w = ident.eye_spacing * self.ax + ident.eye_size * self.ax + 1.0
        half_h = 0.8 * ident.eye_size * self.ax + 1.0
        return np.stack([ex - half_w, ey - half_h, ex + half_w, ey + half_h], axis=-1)

    def face_boxes(self) -> np.ndarray:
        return np.stack([self.cx - self.ax, self.cy - self.ay, self.cx + self.ax, self.cy + self.ay], axis=-1)


class _Window:
    """The canvas rows / columns that a shape can touch in any frame of a chunk (its extent plus
    2 px for anti-aliasing), so each layer is computed on a small window, not the whole frame."""

    def __init__(self, canvas, x, y, cx, cy, rx, ry):
        self.cols = self._span(x[0, 0], np.min(cx - rx), np.max(cx + rx))
        self.rows = self._span(y[0, :, 0], np.min(cy - ry), np.max(cy + ry))
        self.canvas, self.x, self.y = canvas[:, self.rows, self.cols], x[..., self.cols], y[:, self.rows]

    @staticmethod
    def _span(coords, lo, hi) -> slice:
        inside = np.flatnonzero((coords >= lo - 2) & (coords <= hi + 2))
        return slice(inside[0], inside[-1] + 1) if inside.size else slice(0, 0)

    def crop(self, colour):
        """A per-pixel colour [t, h, w, 3] of the parent window cut to this one; plain RGB as is."""
        return colour[:, self.rows, self.cols] if np.ndim(colour) == 4 else colour


def _render_speaker(canvas, x, y, sp: _Speaker, frames: slice) -> np.ndarray:
    """Paints one face over canvas [t, H, Wp, 3] for frames `frames`; returns face coverage [t, H, Wp]."""
    ident = sp.identity
    col = lambda v: v[frames, None, None]  # noqa: E731  (per-frame scalars broadcast over pixels)
    cx, cy, fdx, ax, ay = col(sp.cx), col(sp.cy), col(sp.feature_dx), sp.ax, sp.ay
    v = ident.hair_volume
    head = _Window(canvas, x, y, cx, cy - 0.06 * ay, max(v * ax, ax + 1), max(v, 1.0) * ay + 0.12 * ay + 1)
    hx, hy = head.x, head.y
    skin, hair = np.array(ident.skin, np.float32), np.array(ident.hair, np.float32)
    realistic = ident.style == "realistic"
    if realistic:
        # light from the upper left: darker towards the lower right rim
        q = ((hx - cx + 0.25 * ax) / (1.2 * ax)) ** 2 + ((hy - cy + 0.3 * ay) / (1.2 * ay)) ** 2
        shade = (1.0 - 0.25 * np.clip(q, 0, 1.2))[..., None]
        skin, hair = skin * shade, hair * shade
    hair_cov = _ellipse(hx, hy, cx, cy - 0.12 * ay, v * ax, v * ay) * np.clip(cy + 0.1 * ay - hy + 0.5, 0, 1)
    _paint(head.canvas, hair_cov, hair)
    if not realistic:
        _paint(head.canvas, _ellipse(hx, hy, cx, cy, ax + 1.0, ay + 1.0), OUTLINE)
    face = np.zeros(canvas.shape[:3], np.float32)
    face[:, head.rows, head.cols] = _ellipse(hx, hy, cx, cy, ax, ay)
    _paint(head.canvas, face[:, head.rows, head.cols], skin)

    eye_a = ident.eye_size * ax
    eye_b = eye_a * 0.8 * np.maximum(col(sp.eye_open), 0.08)
    for side in (-1, 1):
        ex, ey = cx + fdx + side * ident.eye_spacing * ax, cy - ident.eye_height * ay
        win = _Window(head.canvas, hx, hy, ex, ey, eye_a, 0.8 * eye_a)
        eye = _ellipse(win.x, win.y, ex, ey, eye_a, eye_b)
        _paint(win.canvas, eye, SCLERA)
        pupil = _ellipse(win.x, win.y, ex + 0.45 * eye_a * col(sp.gaze), ey, 0.5 * eye_a, 0.5 * eye_a)
        _paint(win.canvas, eye * pupil, ident.eye_colour)

    mx, my, ma, mb, lift = (col(v) for v in sp.mouth_geometry())
    lip = max(0.6, 0.04 * ay)
    win = _Window(head.canvas, hx, hy, mx, my, ma + lip, mb + lip + lift)
    lips = win.crop(skin) * np.array([0.9, 0.68, 0.68], np.float32)
    _paint(win.canvas, _ellipse(win.x, win.y, mx, my, ma + lip, mb + lip, lift), lips)
    _paint(win.canvas, _ellipse(win.x, win.y, mx, my, ma, mb, lift), MOUTH_INTERIOR)
    return face


def _render(speakers: list[_Speaker], size: tuple[int, int], num_frames: int):
    """frames uint8 [T, H, W, 3] and face masks bool [S, T, H, W]."""
    height, width = size
    panel = width / len(speakers)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    masks = np.zeros((len(speakers), num_frames, height, width), bool)
    y = (np.arange(height, dtype=np.float32) + 0.5)[None, :, None]
    background = np.array(speakers[0].identity.background, np.float32)
    if speakers[0].identity.style == "realistic":
        background = background * (1.1 - 0.25 * y[..., None] / height)  # a soft vertical gradient
    chunk = max(1, 2**21 // (height * width))  # bounds the float32 temporaries to ~8 MB each
    for start in range(0, num_frames, chunk):
        frames_slice = slice(start, min(start + chunk, num_frames))
        canvas = np.empty((frames_slice.stop - start, height, width, 3), np.float32)
        canvas[:] = background
        for s, sp in enumerate(speakers):
            # each face only touches its own panel, so render just those columns
            x0, x1 = round(s * panel), round((s + 1) * panel)
            x = (np.arange(x0, x1, dtype=np.float32) + 0.5)[None, None, :]
            masks[s, frames_slice, :, x0:x1] = _render_speaker(canvas[:, :, x0:x1], x, y, sp, frames_slice) >= 0.5
        frames[frames_slice] = np.clip(np.round(canvas), 0, 255)
    return frames, masks


# ----------------------------------------------------------------------------- clips


@dataclass
class Clip:
    """A rendered clip and its ground truth (S speakers, T frames, N audio samples)."""

    frames: np.ndarray  # uint8 [T, H, W, 3] RGB
    audio: np.ndarray  # float32 [N], the speakers' sum, at sample_rate
    speaker_audio: np.ndarray  # float32 [S, N]
    mouth_open: np.ndarray  # float32 [S, T] in [0, 1]
    eye_open: np.ndarray  # float32 [S, T] in [0, 1]
    face_boxes: np.ndarray  # float32 [S, T, 4] (x0, y0, x1, y1)
    mouth_boxes: np.ndarray  # float32 [S, T, 4]
    eye_boxes: np.ndarray  # float32 [S, T, 4]: both eyes (the eye band)
    face_masks: np.ndarray  # bool [S, T, H, W]
    actions: list[str]
    prompt: str
    identities: list[Identity]
    seed: int
    fps: float = FPS
    sample_rate: int = SAMPLE_RATE
    # espeak-ng clips only (None otherwise; module docstring)
    visemes: np.ndarray | None = None  # int8 [S, T]: index into speech.VISEMES
    mouth_width: np.ndarray | None = None  # float32 [S, T]: inner width / the identity's closed width
    mouth_height: np.ndarray | None = None  # float32 [S, T] in [0, 1]: the rendered opening
    speech: list[dict] | None = None  # per speaker: voice, rate, pitch, sentences, phonemes

    @property
    def split(self) -> str:
        return split(self.seed)

    def metadata(self) -> dict:
        """Everything but the arrays, JSON-serialisable."""
        t, h, w, _ = self.frames.shape
        return {
            "seed": self.seed,
            "split": self.split,
            "prompt": self.prompt,
            "actions": list(self.actions),
            "speakers": len(self.identities),
            "num_frames": t,
            "height": h,
            "width": w,
            "fps": self.fps,
            "sample_rate": self.sample_rate,
            "identities": [dataclasses.asdict(i) for i in self.identities],
        } | ({} if self.speech is None else {"voice": "espeak", "speech": self.speech})

    def save(self, folder: str | os.PathLike) -> dict[str, str]:
        """Writes clip.mp4 (H.264 + the mixed audio as AAC), audio.wav (the mixed audio, 16-bit PCM),
        truth.npz (every array but the frames) and meta.json into `folder`; returns their paths.
        meta.json is written last, so its presence marks a complete folder."""
        os.makedirs(folder, exist_ok=True)
        paths = {name: os.path.join(folder, name) for name in ("clip.mp4", "audio.wav", "truth.npz", "meta.json")}
        write_video(paths["clip.mp4"], self.frames, self.fps, self.audio, self.sample_rate)
        sf.write(paths["audio.wav"], self.audio, self.sample_rate, subtype="PCM_16")
        arrays = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        arrays = {k: v for k, v in arrays.items() if isinstance(v, np.ndarray) and k != "frames"}
        np.savez_compressed(paths["truth.npz"], **arrays)
        with open(paths["meta.json"], "w") as f:
            json.dump(self.metadata(), f, indent=1)
        return paths


def load_truth(folder: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta.json contents, truth.npz arrays) of a folder written by `Clip.save`."""
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    with np.load(os.path.join(folder, "truth.npz")) as data:
        return meta, {k: data[k] for k in data.files}


def render_clip(
    seed: int,
    seconds: float,
    fps: float = FPS,
    size: tuple[int, int] = (64, 64),
    prompt: str = "",
    speakers: int = 1,
    style: str | None = None,
    sample_rate: int = SAMPLE_RATE,
    voice: str = "synthetic",
) -> Clip:
    """Renders `round(seconds * fps)` frames of size (H, W) with matching audio; see the module
    docstring. style None draws it from the seed; with two speakers both share the first's style
    and background, each in its own half of the frame. voice: "synthetic" (default) or "espeak"
    (espeak-ng sentences with a viseme truth; module docstring)."""
    split(seed)
    if voice not in VOICES:
        raise ValueError(f"voice must be one of {VOICES}, got {voice!r}.")
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}.")
    if speakers not in (1, 2):
        raise ValueError(f"speakers must be 1 or 2, got {speakers}.")
    if style is not None:
        _check_style(style)
    height, width = size
    if min(height, width // speakers) < 16:
        raise ValueError(f"size {size} is too small: each face needs a panel of at least 16x16 pixels.")
    num_frames = max(1, round(seconds * fps))
    num_samples = samples_for_frames(num_frames, fps, sample_rate)
    times = (np.arange(num_frames) / fps).astype(np.float32)
    actions = parse_actions(prompt)
    turns = speaking_turns(np.random.default_rng([seed, 2]), num_frames / fps, speakers)
    panel = width / speakers
    unit = min(panel, height)

    identities, streams, people, said = [], [], [], []
    for s in range(speakers):
        # a second speaker shares the first one's scene: style and background
        shared_style = style or (identities[0].style if identities else None)
        background = identities[0].background if identities else None
        ident = Identity.sample(np.random.default_rng([seed, 0, s]), shared_style, background)
        shape = {}
        if voice == "espeak":
            from mi_jax.data import speech

            voices = speech.TRAIN_VOICES if split(seed) == "train" else speech.HELDOUT_VOICES
            audio, phonemes, info = espeak_audio(np.random.default_rng([seed, 5, s]), num_samples, turns[s], voices,
                                                 split(seed), sample_rate)
            visemes, width_scale, height_scale = viseme_shape(phonemes, num_frames, fps)
            shape = dict(mouth_width_scale=width_scale, mouth_height_scale=height_scale)
            said.append((visemes, info))
        else:
            audio = speech_audio(np.random.default_rng([seed, 1, s]), num_samples, ident.voice_hz, turns[s],
                                 sample_rate)
        motion_rng = np.random.default_rng([seed, 3, s])
        eye_open = blinks(motion_rng, times)
        motion = head_motion(motion_rng, times, actions, unit)
        jitter = np.random.default_rng([seed, 4, s]).uniform(-0.03, 0.03, 2) * unit
        ax = ident.face_half_width * unit
        people.append(
            _Speaker(
                identity=ident,
                cx=((s + 0.5) * panel + jitter[0] + motion["dx"]).astype(np.float32),
                cy=(0.53 * height + jitter[1] + motion["dy"]).astype(np.float32),
                ax=ax,
                ay=ax * ident.face_aspect,
                feature_dx=motion["feature_dx"],
                gaze=motion["gaze"],
                smile=motion["smile"],
                eye_open=eye_open,
                mouth_open=mouth_envelope(audio, num_frames, fps, sample_rate),
                **shape,
            )
        )
        identities.append(ident)
        streams.append(audio)

    frames, masks = _render(people, (height, width), num_frames)
    clip_box = np.array([width, height, width, height], np.float32)
    speaker_audio = np.stack(streams).astype(np.float32)
    espeak = {}
    if said:
        espeak = dict(
            visemes=np.stack([v for v, _ in said]).astype(np.int8),
            mouth_width=np.stack([p.mouth_width_scale * (1 + 0.25 * p.smile) for p in people]).astype(np.float32),
            mouth_height=np.stack([p.mouth_open * p.mouth_height_scale for p in people]).astype(np.float32),
            speech=[info for _, info in said],
        )
    return Clip(
        frames=frames,
        audio=speaker_audio.sum(0),
        speaker_audio=speaker_audio,
        mouth_open=np.stack([p.mouth_open for p in people]),
        eye_open=np.stack([p.eye_open for p in people]),
        face_boxes=np.clip(np.stack([p.face_boxes() for p in people]), 0, clip_box).astype(np.float32),
        mouth_boxes=np.clip(np.stack([p.mouth_boxes() for p in people]), 0, clip_box).astype(np.float32),
        eye_boxes=np.clip(np.stack([p.eye_boxes() for p in people]), 0, clip_box).astype(np.float32),
        face_masks=masks,
        actions=actions,
        prompt=prompt,
        identities=identities,
        seed=int(seed),
        fps=float(fps),
        sample_rate=sample_rate,
        **espeak,
    )


def write_clips(out: str, clips: int, seconds: float, *, seed_start: int = 0, size: tuple[int, int] = (64, 64),
                speakers: int = 1, voice: str = "synthetic") -> list[str]:
    """Renders `clips` clips of seeds `seed_start...` into `out/clip_<seed>` folders (`mi-jax
    synth`); each seed's prompt is one of `TRAINING_PROMPTS` (the words
    `prepare.text_vocabulary` lists); `voice` as `render_clip`'s, or "mixed": the synthetic voice
    and espeak-ng speech in turn, every `len(TRAINING_PROMPTS)` seeds (so every prompt is
    spoken in both). Returns the folders."""
    if voice not in VOICES + ("mixed",):
        raise ValueError(f"voice must be one of {VOICES + ('mixed',)}, got {voice!r}.")
    os.makedirs(out, exist_ok=True)
    folders = []
    for seed in range(seed_start, seed_start + clips):
        clip = render_clip(seed, seconds, size=size, prompt=TRAINING_PROMPTS[seed % len(TRAINING_PROMPTS)],
                           speakers=speakers,
                           voice=voice if voice != "mixed" else VOICES[(seed // len(TRAINING_PROMPTS)) % 2])
        folders.append(os.path.join(out, f"clip_{seed:07d}"))
        clip.save(folders[-1])
    return folders


# ----------------------------------------------------------------------------- measurement

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # BT.601 luma weights of RGB


def box_pixels(frame: np.ndarray, box) -> np.ndarray:
    """The pixels of `frame [H, W, ...]` that `box` (x0, y0, x1, y1) overlaps (pixel j counts when
    it overlaps [x0, x1)), clipped to the frame; empty when the box is outside it."""
    height, width = frame.shape[:2]
    x0, y0, x1, y1 = box
    clip = lambda v, n: min(max(v, 0), n)  # noqa: E731  (a negative stop would count from the end)
    return frame[clip(math.floor(y0), height):clip(math.ceil(y1), height),
                 clip(math.floor(x0), width):clip(math.ceil(x1), width)]


def measure_mouth_open(frames: np.ndarray, mouth_boxes: np.ndarray) -> np.ndarray:
    """Mouth opening measured from pixels: float32 [T], the fraction of each box's area covered by
    dark mouth interior. frames: uint8 [T, H, W, 3]; mouth_boxes: [T, 4] (x0, y0, x1, y1).

    A pixel counts fully when its luma is at most 0.25x the box's skin luma (the box's 90th
    percentile), not at all above 0.55x, linearly between: relative to the skin, so it works for
    every skin tone and shading, and partial (anti-aliased or compressed) edge pixels count partly.
    The value is monotone in the opening, not calibrated to [0, 1]: compare by correlation."""
    out = np.zeros(len(frames), np.float32)
    for t, dark in _mouth_darkness(frames, mouth_boxes):
        out[t] = dark.mean()
    return out


def _mouth_darkness(frames, mouth_boxes):
    """(t, dark) per frame with a non-empty box: how dark each pixel of the box is against the
    face's skin, in [0, 1]. Raises ValueError on shapes other than [T, H, W, 3] and [T, 4]."""
    frames = np.asarray(frames)
    boxes = np.asarray(mouth_boxes, np.float64)
    if frames.ndim != 4 or boxes.shape != (len(frames), 4):
        raise ValueError(f"expected frames [T, H, W, 3] and boxes [T, 4], got {frames.shape} and {boxes.shape}.")
    for t, box in enumerate(boxes):
        pixels = box_pixels(frames[t], box)
        if pixels.size == 0:
            continue
        luma = pixels.astype(np.float32) @ (LUMA / 255)
        skin = max(float(np.percentile(luma, 90)), 1e-3)
        yield t, np.clip((0.55 * skin - luma) / (0.3 * skin), 0, 1)


def measure_mouth_shape(frames: np.ndarray, mouth_boxes: np.ndarray) -> np.ndarray:
    """Mouth width and height measured from pixels: float32 [T, 2] in pixels, the widest row and the
    tallest column of dark mouth interior in each box (pixels weighted as in `measure_mouth_open`).
    frames: uint8 [T, H, W, 3]; mouth_boxes: [T, 4]. Compare with the truth's mouth_width /
    mouth_height (espeak-ng clips) by correlation."""
    out = np.zeros((len(np.asarray(frames)), 2), np.float32)
    for t, dark in _mouth_darkness(frames, mouth_boxes):
        out[t] = dark.sum(1).max(), dark.sum(0).max()
    return out
