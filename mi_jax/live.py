"""Live generation: audio in as it is spoken, frames out as each window finishes.

    stream = pipe.live("portrait.png", microphone_chunks(), "a person talking")
    for part in stream:                 # LiveFrames: uint8 frames [n, H, W, 3], their audio, timing
        show(part.frames, part.audio)
    print(stream.report())              # frames, late frames, audio-to-frame latency p50 / p95, ...

`audio_chunks` is any iterator of mono float32 chunks at the config's sample rate (16 kHz), of
any size, or of `(samples, rate)` pairs; the stream ends when the iterator ends (the last
partial window padded with silence, as `Pipeline.generate` pads). Nothing is read ahead: window
k runs as soon as the audio of its frames plus `lookahead_s` has been read (the config's
`sample.stream_lookahead_s`, default `LOOKAHEAD_S` = 0.2 s), and never reads further.

The same windows as `generate` (window layout, noise per window `fold_in(seed, k)`, the same
jitted window step, text and reference conditions, the same streaming VAE decoder). What
differs is what the whole-track quantities become when the track is not known yet:
- audio features: `generate` runs Wav2Vec2 on 8 s chunks (+1 s context each side) normalised
  with the whole track's mean and variance (`Encoders.audio_frame_chunks`); here each window
  runs the same Wav2Vec2 on a fixed segment from 1 s before its first frame to `lookahead_s`
  after its last, normalised with the mean and variance of all the audio read so far.
- rest weights (a silent speaker's mouth rests, mi_jax/generation/controls.py): the voice-activity
  threshold is the 95th percentile of the frames read so far, not of the whole track.
Both are functions of the audio and the window index only, so the frames do not depend on how
the audio is cut into chunks (tests/test_live.py: bit-equal over random chunkings), and they
differ from `generate`'s frames only through those features (measured there).

Timing: with `pace` (default 1.0: the audio is spoken in real time) the clock starts when the
first audio was spoken (its chunk's arrival less its duration); frame f's audio ends at
`(f + 1) / fps / pace` on it, its latency is when it is yielded minus that, and it is late past
`max_latency_s` (`sample.stream_max_latency_s`, default 1.0 s). Late frames are counted per
part (`LiveFrames.late`) and in `report()`, and the first one in a stream raises a
`LateFramesWarning`: a stream that falls behind (a slow model, a slow consumer, a slow source)
is never silent about it.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterable, Iterator

import numpy as np

from mi_jax.data import audio_io
from mi_jax.data.inputs import InputError, prompt_notices
from mi_jax.diffusion.sampler import window_frames
from mi_jax.generation import controls
from mi_jax.parallel.mesh import with_rules
from mi_jax.pipeline import (COLOUR_ANCHOR_DEFAULT, ColourAnchor, _blend_text, _host, _put, mouth_pixels, read_inputs,
                             release_free_heap, sampler_config)

LOOKAHEAD_S = 0.2  # audio read past a window's last frame before it runs (config: sample.stream_lookahead_s)
MAX_LATENCY_S = 1.0  # a frame later than this after its audio is late (config: sample.stream_max_latency_s)
CONTEXT_S = 1.0  # audio before a window's first frame its Wav2Vec2 segment sees (generate's chunk margin)


class LateFramesWarning(UserWarning):
    """A live stream produced frames later than its latency budget."""


@dataclasses.dataclass
class LiveFrames:
    """One yielded part of a live stream."""

    frames: np.ndarray  # [n, H, W, 3] uint8
    audio: np.ndarray  # float32 [samples]: the audio of these frames (zero-padded past the stream's end)
    start: int  # index of the first frame in the video
    latency: np.ndarray  # float64 [n] seconds from each frame's audio end to its yield (nan without a pace)
    late: int  # frames of this part later than the latency budget


def _chunk_samples(chunk, index: int, sample_rate: int) -> np.ndarray:
    """One input chunk -> float32 mono samples; raises InputError naming the chunk and the fix."""
    rate = sample_rate
    if isinstance(chunk, tuple):
        if len(chunk) != 2 or not isinstance(chunk[1], (int, np.integer)):
            raise InputError(f"audio chunk {index}: pass a 1-D float32 array or a (samples, sample_rate) pair")
        chunk, rate = chunk
    if int(rate) != sample_rate:
        raise InputError(f"audio chunk {index}: sample rate {int(rate)} Hz; the model takes {sample_rate} Hz mono "
                         "(resample the source, e.g. mi_jax.data.audio_io.resample or soxr.ResampleStream)")
    x = np.asarray(chunk)
    if x.ndim != 1:
        raise InputError(f"audio chunk {index}: shape {x.shape}; pass mono samples [n] (mix the channels down)")
    if x.size and not np.issubdtype(x.dtype, np.floating):
        raise InputError(f"audio chunk {index}: dtype {x.dtype}; pass float samples in [-1, 1] "
                         "(integer PCM: divide by 32768)")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InputError(f"audio chunk {index}: non-finite samples (NaN or inf)")
    return x


class _Tape:
    """The audio read so far, holding only samples from `offset` on (dropped as windows pass)."""

    def __init__(self):
        self.parts: list[np.ndarray] = []
        self.offset = 0  # first sample held
        self.end = 0  # samples read

    def append(self, x: np.ndarray) -> None:
        if x.size:
            self.parts.append(x)
            self.end += x.size

    def read(self, a: int, b: int, limit: int) -> np.ndarray:
        """Samples `[a, b)`, zero outside `[0, limit)` (limit <= end); `a >= offset` where nonzero."""
        out = np.zeros(b - a, np.float32)
        lo, hi = max(a, 0), min(b, limit)
        if hi > lo:
            if lo < self.offset:
                raise AssertionError(f"tape: samples from {lo} were dropped (held from {self.offset})")
            if len(self.parts) > 1:
                self.parts = [np.concatenate(self.parts)]
            out[lo - a : hi - a] = self.parts[0][lo - self.offset : hi - self.offset]
        return out

    def drop_before(self, p: int) -> None:
        p = min(p, self.end)
        if p > self.offset:
            if len(self.parts) > 1:
                self.parts = [np.concatenate(self.parts)]
            self.parts = [self.parts[0][p - self.offset :].copy()] if self.parts else []
            self.offset = p


class LiveStream:
    """`Pipeline.live`'s iterator of `LiveFrames` (see the module docstring)."""

    def __init__(self, pipe, portrait, audio_chunks: Iterable, prompt="", *, masks=None, seed: int = 0,
                 steps=None, cfg_text=None, cfg_audio=None, size=None, rest=True, colour_anchor=None,
                 lookahead_s: float | None = None, pace: float | None = 1.0, max_latency_s: float | None = None):
        self.pipe, self.seed, self.rest = pipe, seed, rest
        config = pipe.config
        p, s = config.prepare, config.sample
        self.fps, self.sample_rate = float(p.fps), int(p.sample_rate)
        self.lookahead_s = float(s.get("stream_lookahead_s", LOOKAHEAD_S) if lookahead_s is None else lookahead_s)
        self.max_latency_s = float(s.get("stream_max_latency_s", MAX_LATENCY_S) if max_latency_s is None
                                   else max_latency_s)
        if self.lookahead_s < 0 or not math.isfinite(self.lookahead_s):
            raise InputError(f"lookahead_s={self.lookahead_s}: must be >= 0 seconds")
        if pace is not None and not pace > 0:
            raise InputError(f"pace={pace}: must be positive (1.0 = real time) or None")
        self.pace = pace
        self.scfg = sampler_config(config, steps=steps, cfg_text=cfg_text, cfg_audio=cfg_audio)
        # the portrait, prompt and masks, checked now (nothing is computed); a placeholder track
        # stands in for the audio, which is checked as it arrives
        placeholder = np.full(audio_io.samples_for_frames(2, self.fps, self.sample_rate), 0.1, np.float32)
        inp = read_inputs(config, portrait, placeholder, prompt, masks=masks, size=size)
        if len(inp.tracks) != 1 or inp.masks.shape[0] != 1:
            raise InputError("masks: a live stream has one speaker; pass one mask (or none)")
        self.image, self.mask_lat, self.mouths, self.schedule = inp.image, inp.masks, inp.mouths, inp.schedule
        vocabulary = getattr(pipe.enc.text, "vocabulary", ())
        self.notices = [n for n in inp.notices if not n.startswith("prompt: the schedule's change")]
        self.notices += [n for _, text in self.schedule for n in prompt_notices(text, vocabulary)]
        self.anchor_on = COLOUR_ANCHOR_DEFAULT if colour_anchor is None else colour_anchor
        self._source = iter(audio_chunks)
        self._chunks_read = 0
        self.tape = _Tape()
        self.ended = False
        self.frames_total: int | None = None  # known when the audio ends
        # timing and the report
        self.t0: float | None = None  # when the first audio was spoken
        self.emitted = 0
        self.late = 0
        self.late_after_warmup = 0
        self.warmup_frames = 0  # the first window's frames
        self.latencies: list[float] = []
        self.first_frame_s: float | None = None
        self.busy_s = 0.0  # time spent computing (not waiting for audio or the consumer)
        self.log: list[dict] = []  # per window: index, samples it needed, samples read when it ran
        self._warned = False
        self._wait_s = 0.0
        self._iter = self._run()

    # ------------------------------------------------------------------ audio

    def _pull(self) -> bool:
        """Reads one more chunk; False when the source has ended."""
        if self.ended:
            return False
        t = time.monotonic()
        try:
            chunk = next(self._source)
        except StopIteration:
            self.ended = True
            n = self.tape.end
            if n == 0:
                raise InputError("audio: the stream ended before any audio arrived") from None
            if n < audio_io.samples_for_frames(1, self.fps, self.sample_rate):
                raise InputError(f"audio: the stream ended after {n} samples, shorter than one video frame "
                                 f"({1000 / self.fps:.0f} ms)")
            # as read_inputs fits a track: round to whole frames (at least 2), silence after the end
            self.frames_total = max(2, round(n / self.sample_rate * self.fps))
            return False
        finally:
            self._wait_s += time.monotonic() - t
        x = _chunk_samples(chunk, self._chunks_read, self.sample_rate)
        self._chunks_read += 1
        if x.size and self.t0 is None:  # when the first audio was spoken: its chunk's start
            self.t0 = time.monotonic() - (x.size / self.sample_rate / self.pace if self.pace else 0.0)
        self.tape.append(x)
        return True

    def _limit(self) -> int:
        """Samples of the track (the audio read, cut to the fitted length once it ended)."""
        if not self.ended:
            return self.tape.end
        return min(self.tape.end, audio_io.samples_for_frames(self.frames_total, self.fps, self.sample_rate))

    def _need(self, k: int) -> int:
        """Samples window k reads: its frames plus the lookahead."""
        hi = window_frames(self.scfg, k)[1]
        return audio_io.samples_for_frames(hi + self._lookahead_frames, self.fps, self.sample_rate)

    # ------------------------------------------------------------------ the loop

    def _setup(self):
        pipe, scfg = self.pipe, self.scfg
        enc = pipe.enc
        text = enc.text.encode([t for _, t in self.schedule], np.repeat(self.image[None], len(self.schedule), 0))
        self.texts = [dict(text_embeds=np.asarray(text.prompt_embeds[i : i + 1], np.float32),
                           text_mask=np.asarray(text.prompt_attention_mask[i : i + 1], np.int32),
                           pooled=np.asarray(text.pooled[i : i + 1], np.float32)) for i in range(len(self.schedule))]
        self.ref = np.asarray(enc.encode_video(self.image[None])[None], np.float32)  # [1, 1, h, w, C]
        cond = dict(self.texts[0], ref_latent=self.ref)
        if pipe.model_config.audio_blocks:
            mask = np.asarray(self.mask_lat, np.float32)[None, :, None]  # [1, 1, 1, h, w]
            cond["speaker_masks"] = np.ascontiguousarray(np.broadcast_to(mask, (1, 1, scfg.window,
                                                                             *self.mask_lat.shape[1:])))
        self.cond = {k: _put(v, pipe._replicated) for k, v in cond.items()}
        self.anchor = None
        if self.anchor_on:
            self.anchor = ColourAnchor(self.image, self.fps, mouth_pixels(self.mouths, *self.image.shape[:2]))

    def _features(self, k: int, need: int) -> np.ndarray:
        """Window k's audio features `[1, 1, 1 + 4 (W - 1), n_layers, C]` (module docstring)."""
        enc = self.pipe.enc
        lo, hi = window_frames(self.scfg, k)
        per_frame = self.sample_rate / self.fps
        s0 = round(lo * per_frame) - self._margin
        limit = min(need, self._limit())
        # the running statistics of the audio read up to `need` (the track's prefix), advanced
        # once per window so they do not depend on how the audio was chunked
        if limit > self._stat_pos:
            x = self.tape.read(self._stat_pos, limit, limit).astype(np.float64)
            self._sum += float(np.sum(x))
            self._sumsq += float(np.dot(x, x))
            self._stat_pos = limit
        mean = self._sum / self._stat_pos
        std = math.sqrt(max(self._sumsq / self._stat_pos - mean * mean, 0.0))
        scale = 1.0 / math.sqrt(std * std + 1e-7)
        segment = self.tape.read(s0, s0 + self._segment, limit)
        valid = slice(max(0, -s0), max(0, min(self._segment, limit - s0)))
        segment[valid] = (segment[valid] - mean) * scale
        feats = np.asarray(enc._w2v(enc.w2v_params, segment[None])[0])  # [Nf, L, C]
        q = ((lo + np.arange(hi - lo)) * per_frame - s0) * (len(feats) / self._segment)
        i0 = np.clip(np.floor(q).astype(np.int64), 0, len(feats) - 1)
        i1 = np.minimum(i0 + 1, len(feats) - 1)
        w = (q - i0).clip(0.0, 1.0)[:, None, None].astype(np.float32)
        out = feats[i0] * (1.0 - w) + feats[i1] * w
        if self.ended:
            out[max(self.frames_total - lo, 0) :] = 0.0  # after the video's end, as generate pads
        return out[None, None]

    def _rest(self, k: int, need: int) -> np.ndarray:
        """Window k's rest weights `[1, W, h, w, 1]` from the voice activity of the audio read."""
        scfg = self.scfg
        frames = window_frames(scfg, k)[1] + self._lookahead_frames  # the frames whose audio was read
        if self.ended:
            frames = min(frames, self.frames_total)
        limit = self._limit()
        bounds = [audio_io.samples_for_frames(i, self.fps, self.sample_rate) for i in range(len(self._rms), frames + 1)]
        for i in range(len(bounds) - 1):  # each frame's RMS once, when its audio has been read
            x = self.tape.read(bounds[i], bounds[i + 1], limit).astype(np.float64)
            self._rms.append(math.sqrt(float(np.dot(x, x)) / max(len(x), 1)))
        rms = np.asarray(self._rms[:frames])
        floor = 10.0 ** (controls.SILENCE_DBFS / 20.0)
        loud = rms[rms > floor]
        voiced = np.zeros(frames, bool)
        if loud.size:
            voiced = (rms > floor) & (rms > np.percentile(loud, 95) * 10.0 ** (controls.RELATIVE_DB / 20.0))
        active = controls.dilate(voiced, round(controls.HANGOVER_S * self.fps))
        start = k * scfg.new_per_window
        # one latent past the window: its last latent's neighbour (frames past the audio read count as silent)
        weights = controls.rest_weights(active[None], start + scfg.window)[0]  # [1 + latents]
        if not self.rest:
            weights = np.zeros_like(weights)
        lat = np.clip(weights[start : start + scfg.window, None, None] * self.mouths[0], 0.0, 1.0)
        lat = lat.astype(np.float32)
        lat[0] = 0.0  # the reference position
        return lat[None, ..., None]

    def _windows(self) -> Iterator[np.ndarray]:
        """Each window's generated latents, run as soon as its audio is read."""
        pipe, scfg = self.pipe, self.scfg
        fn = pipe._window_fn(scfg)
        carry = pipe._initial_carry(scfg, self.ref.shape[2:], self.seed)
        trimmed = time.monotonic()
        k = 0
        while True:
            need = self._need(k)
            while self.tape.end < need and self._pull():
                pass
            if self.ended and k >= scfg.num_windows(self.frames_total):
                return
            self.log.append(dict(window=k, need=need, read=self.tape.end, ended=self.ended))
            audio = None
            if pipe.model_config.audio_blocks:
                audio = _put(self._features(k, need), pipe._replicated)
            cond = self.cond
            if len(self.texts) > 1:
                starts = [window_frames(scfg, j)[0] for j in (max(k - 1, 0), k)]
                a, b, wt = controls.window_prompts(self.schedule, starts, self.fps)[-1 if k else 0]
                cond = dict(cond, **{n: _put(v, pipe._replicated)
                                     for n, v in _blend_text(self.texts[a], self.texts[b], wt).items()})
            rest = _put(self._rest(k, need), pipe._replicated)
            with with_rules(pipe.mesh, pipe.rules):
                carry, (motion, new) = fn(pipe.params, cond, carry, audio, rest)
            new = _host(new)
            out = np.concatenate([_host(motion), new], axis=1) if k == 0 else new
            # audio no later window or unyielded frame needs
            lo_next = window_frames(scfg, k + 1)[0]
            keep = min(round(lo_next * self.sample_rate / self.fps) - self._margin,
                       audio_io.samples_for_frames(self.emitted, self.fps, self.sample_rate), self._stat_pos)
            self.tape.drop_before(max(keep, 0))
            if time.monotonic() - trimmed >= 2.0:
                release_free_heap()
                trimmed = time.monotonic()
            yield out
            k += 1

    def _run(self) -> Iterator[LiveFrames]:
        release_free_heap()
        self._lookahead_frames = math.ceil(self.lookahead_s * self.fps - 1e-9)
        self._margin = round(CONTEXT_S * self.sample_rate)
        span = window_frames(self.scfg, 0)[1]
        self._segment = self._margin + math.ceil((span + self._lookahead_frames) * self.sample_rate / self.fps)
        self._stat_pos, self._sum, self._sumsq = 0, 0.0, 0.0
        self._rms: list[float] = []
        # the audio of window 0 is read (and checked) before anything is computed
        need = self._need(0)
        while self.tape.end < need and self._pull():
            pass
        self._setup()
        decoder = self.pipe._decoder(self.ref.shape[2:])
        for chunk in decoder.frames(self.ref, self._windows()):
            if self.ended:
                chunk = chunk[: self.frames_total - self.emitted]
            if not len(chunk):
                continue
            if self.anchor is not None:
                chunk = self.anchor(chunk)
            start, n = self.emitted, len(chunk)
            b = [audio_io.samples_for_frames(f, self.fps, self.sample_rate) for f in (start, start + n)]
            audio = self.tape.read(b[0], b[1], self._limit())
            if not self.warmup_frames:
                self.warmup_frames = window_frames(self.scfg, 0)[1]
            self.emitted += n
            yield self._timed(chunk, audio, start)

    def _timed(self, chunk: np.ndarray, audio: np.ndarray, start: int) -> LiveFrames:
        n = len(chunk)
        now = time.monotonic()
        if self.first_frame_s is None and self.t0 is not None:
            self.first_frame_s = now - self.t0
        if self.pace is None or self.t0 is None:
            return LiveFrames(chunk, audio, start, np.full(n, np.nan), 0)
        ends = self.t0 + (start + 1 + np.arange(n)) / self.fps / self.pace  # each frame's audio end
        latency = now - ends
        over = latency > self.max_latency_s
        late = int(over.sum())
        self.latencies.extend(latency.tolist())
        self.late += late
        self.late_after_warmup += int(over[np.arange(start, start + n) >= self.warmup_frames].sum())
        if late and not self._warned:
            self._warned = True
            warnings.warn(LateFramesWarning(
                f"live stream: {late} frame(s) from frame {start} came {latency.max():.2f} s after their audio, over "
                f"the {self.max_latency_s:g} s budget: the stream is behind real time (a slow model or a slow "
                "consumer); stream.report() counts them"), stacklevel=4)
        return LiveFrames(chunk, audio, start, latency, late)

    # ------------------------------------------------------------------ iterator

    def __iter__(self):
        return self

    def __next__(self) -> LiveFrames:
        t, self._wait_s = time.monotonic(), 0.0
        try:
            return next(self._iter)
        finally:  # compute: the time in here not spent waiting for audio
            self.busy_s += time.monotonic() - t - self._wait_s

    def report(self) -> dict:
        """The stream so far: frames, seconds of video, late frames (all; after the first
        window), audio-to-frame latency p50 / p95 / max, first-frame latency, real-time factor
        (video seconds per second of compute) and the lookahead and budget used."""
        lat = np.asarray(self.latencies)
        q = (lambda p: round(float(np.percentile(lat, p)), 4)) if lat.size else (lambda p: None)
        seconds = self.emitted / self.fps
        return dict(frames=self.emitted, seconds=round(seconds, 3), windows=len(self.log), late=self.late,
                    late_after_warmup=self.late_after_warmup, latency_p50_s=q(50), latency_p95_s=q(95),
                    latency_max_s=round(float(lat.max()), 4) if lat.size else None,
                    first_frame_s=None if self.first_frame_s is None else round(self.first_frame_s, 4),
                    compute_s=round(self.busy_s, 3),
                    realtime_factor=round(seconds / self.busy_s, 3) if self.busy_s > 0 else None,
                    lookahead_s=self.lookahead_s, max_latency_s=self.max_latency_s, pace=self.pace)
