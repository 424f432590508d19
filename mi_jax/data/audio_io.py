"""Loading the driving audio: decode, mono, 16 kHz, loudness normalisation, video-length fitting.

Decoding is libsndfile (via `soundfile`, whose wheels bundle it with MP3 / Vorbis / Opus
support): wav, flac, mp3, ogg and the other formats libsndfile reads. Resampling is libsoxr
(`soxr`, "HQ" quality), a band-limited resampler, so e.g. a 44.1 kHz recording keeps its
spectrum below 8 kHz and gains no aliasing.

Loudness: `normalize="rms"` (default) scales the audio to an RMS level of `target_dbfs`
(default -20 dBFS), lowering the gain if needed so that no sample exceeds full scale (no
clipping); `normalize="peak"` scales the largest |sample| to `target_dbfs` (default -1 dBFS);
`None` keeps the file's level. dBFS here is relative to a full-scale *square* wave (1.0),
i.e. `20 * log10(rms)`.

Length: a video of N frames at `fps` covers `ceil(N * sample_rate / fps)` samples;
`frames_for_audio` is the inverse (frames fully covered, rounding down), so
`frames_for_audio(fit_to_frames(a, N)) == N`.
"""

from __future__ import annotations

import math
import os
import warnings
from fractions import Fraction

import numpy as np
import soundfile as sf
import soxr

SAMPLE_RATE = 16000
FPS = 25.0
DEFAULT_TARGET_DBFS = {"rms": -20.0, "peak": -1.0}
SILENCE_DBFS = -60.0


class AudioError(ValueError):
    """The audio cannot be used as asked; the message names the file, the problem and the fix."""


class SilentAudioWarning(UserWarning):
    """All-silent audio loaded with `allow_silence=True`."""


def _sum_squares(audio: np.ndarray) -> float:
    # float64 accumulation without a float64 copy of the whole signal (long recordings)
    return float(np.einsum("i,i->", audio.ravel(), audio.ravel(), dtype=np.float64))


def mean_std(audio: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of `audio`, accumulated in float64, holding no copy of it."""
    n = audio.size
    if not n:
        return 0.0, 0.0
    mean = float(np.sum(audio, dtype=np.float64)) / n
    return mean, math.sqrt(max(_sum_squares(audio) / n - mean * mean, 0.0))


def dbfs(audio: np.ndarray) -> float:
    """RMS level in dB relative to full scale (-inf for digital silence)."""
    rms = math.sqrt(_sum_squares(audio) / audio.size) if audio.size else 0.0
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def _fps(fps: float) -> Fraction:
    # exact rational fps, so 30000/1001 (29.97) and 25 give exact frame <-> sample arithmetic
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}.")
    return Fraction(fps).limit_denominator(10_000)


def samples_for_frames(num_frames: int, fps: float = FPS, sample_rate: int = SAMPLE_RATE) -> int:
    """Samples that `num_frames` video frames span: `ceil(num_frames * sample_rate / fps)`."""
    return math.ceil(Fraction(num_frames * sample_rate) / _fps(fps))


def frames_for_audio(audio: np.ndarray | int, fps: float = FPS, sample_rate: int = SAMPLE_RATE) -> int:
    """Video frames the audio (array or sample count) fully covers: `floor(len * fps / sample_rate)`.

    Raises AudioError when that is zero (audio shorter than one frame)."""
    n = int(audio) if np.ndim(audio) == 0 else len(audio)
    frames = math.floor(Fraction(n) * _fps(fps) / sample_rate)
    if frames < 1:
        raise AudioError(
            f"audio of {n} samples ({n / sample_rate * 1000:.1f} ms at {sample_rate} Hz) is shorter than one "
            f"video frame at {fps} fps ({1000 / fps:.1f} ms); use a longer recording."
        )
    return frames


def fit_to_frames(audio: np.ndarray, num_frames: int, fps: float = FPS, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Cuts `audio: [samples]` to, or pads it with trailing silence (zeros) to, exactly
    `samples_for_frames(num_frames, fps, sample_rate)` samples."""
    if audio.ndim != 1:
        raise ValueError(f"fit_to_frames expects mono audio [samples], got shape {audio.shape}.")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}.")
    n = samples_for_frames(num_frames, fps, sample_rate)
    if len(audio) >= n:
        return audio[:n]
    return np.pad(audio, (0, n - len(audio)))


def resample(audio: np.ndarray, orig_rate: int, rate: int) -> np.ndarray:
    """Band-limited resampling (libsoxr HQ) of `audio: [samples]` or `[samples, channels]`."""
    if orig_rate == rate:
        return audio

    return soxr.resample(audio, orig_rate, rate, quality="HQ")


def normalize_loudness(audio: np.ndarray, mode: str | None = "rms", target_dbfs: float | None = None) -> np.ndarray:
    """Scales `audio` to `target_dbfs` (see the module docstring); silent audio is returned as is."""
    if mode is None:
        return audio
    if mode not in DEFAULT_TARGET_DBFS:
        raise ValueError(f"normalize must be 'rms', 'peak' or None, got {mode!r}.")
    target = 10.0 ** ((DEFAULT_TARGET_DBFS[mode] if target_dbfs is None else target_dbfs) / 20.0)
    peak = max(float(audio.max()), -float(audio.min())) if audio.size else 0.0
    if peak == 0.0:
        return audio
    if mode == "peak":
        gain = target / peak
    else:
        gain = min(target / 10.0 ** (dbfs(audio) / 20.0), 1.0 / peak)
    return np.multiply(audio, gain, dtype=np.float32)


def zero_mean_unit_var(audio: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """Per-utterance `(x - mean) / sqrt(var + eps)`: the input normalisation of transformers'
    `Wav2Vec2FeatureExtractor(do_normalize=True)` (wav2vec2-base-960h expects it)."""
    audio = np.asarray(audio, np.float32)
    return ((audio - audio.mean()) / np.sqrt(audio.var() + eps)).astype(np.float32)


def load_audio(
    path: str | os.PathLike,
    sample_rate: int = SAMPLE_RATE,
    *,
    normalize: str | None = "rms",
    target_dbfs: float | None = None,
    allow_silence: bool = False,
    silence_dbfs: float = SILENCE_DBFS,
    fps: float = FPS,
) -> np.ndarray:
    """Reads an audio file as mono float32 `[samples]` at `sample_rate`, loudness-normalised.

    Channels are averaged. Audio whose RMS level is below `silence_dbfs` counts as silent:
    an AudioError, or with `allow_silence=True` a SilentAudioWarning and the audio returned
    un-normalised. Raises AudioError for a missing / undecodable file, no samples, NaN or Inf
    samples, and audio shorter than one video frame at `fps`.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise AudioError(f"{path}: {what}. Pass the path of an audio file (wav, flac, mp3 or ogg).")

    try:
        audio, orig_rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, sf.SoundFileError, RuntimeError) as e:
        raise AudioError(
            f"{path}: cannot be decoded as audio ({e}). Supported are wav, flac, mp3 and ogg; convert "
            "other formats first, e.g. `ffmpeg -i input.m4a output.wav`."
        ) from None
    if audio.shape[0] == 0:
        raise AudioError(f"{path}: contains no samples (zero length). Re-export or record the audio again.")
    bad = audio.size - int(np.count_nonzero(np.isfinite(audio)))
    if bad:
        raise AudioError(
            f"{path}: {bad} of {audio.size} samples are NaN or Inf (a broken float encoding). Re-export "
            "the audio, e.g. as 16-bit PCM wav."
        )
    mono = audio[:, 0] if audio.shape[1] == 1 else audio.mean(axis=1)
    audio = np.asarray(resample(mono, orig_rate, sample_rate), np.float32)
    if len(audio) < samples_for_frames(1, fps, sample_rate):
        raise AudioError(
            f"{path}: {len(audio) / sample_rate * 1000:.1f} ms of audio is shorter than one video frame at "
            f"{fps} fps ({1000 / fps:.1f} ms); use a longer recording."
        )
    level = dbfs(audio)
    if level < silence_dbfs:
        msg = (
            f"{path}: the audio is silent (RMS {level:.1f} dBFS, below the {silence_dbfs} dBFS threshold), "
            "so it cannot drive lip motion."
        )
        if not allow_silence:
            raise AudioError(msg + " Check the recording, or pass allow_silence=True for an intentionally silent clip.")
        msg += " Loaded as is (allow_silence=True), without loudness normalisation."
        warnings.warn(msg, SilentAudioWarning, stacklevel=2)
        return np.ascontiguousarray(audio)
    return np.ascontiguousarray(normalize_loudness(audio, normalize, target_dbfs), dtype=np.float32)
