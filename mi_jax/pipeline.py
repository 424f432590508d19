"""The notebook / CLI API: load a trained checkpoint, then `generate(portrait, audio, prompt)`.

    pipe = Pipeline.from_checkpoint("runs/demo_stage2")
    video = pipe.generate("portrait.png", "speech.wav", "a person talking, nodding")
    video.save("out.mp4")                       # H.264 + the input audio, written atomically
    for frames in pipe.stream(...): ...         # constant memory, any length
    pipe.write("out.mp4", pipe.stream(...))     # streamed to disk (process 0 of a job writes)

Every input is checked before anything is compiled (mi_jax.data.inputs, mi_jax.data.audio_io).

Constant cost per second of video: everything a window touches has one shape whatever the
length, so after the first call nothing compiles again. Per call, fixed work only: the text
encoder, the portrait's VAE latent, the speaker masks. Per window, inside the loop: its audio
features, sliced from Wav2Vec2 run on fixed 8 s chunks as the windows reach them
(`Encoders.audio_frame_chunks`), the jitted window step, and the VAE's streaming decoder,
whose every shape (first tile, chunk, each possible end) is compiled once per latent size.
Frames leave as they are decoded; nothing is kept per window, and freed heap is handed back to
the OS at every call and every 2 s (`release_free_heap`), so memory stays flat however long
the video.

Devices: the window step runs on a mesh (`data, fsdp, context, tensor`, mi_jax/parallel/mesh.py)
with the DiT's parameters placed by the logical rules table (FSDP by default) and the inputs
replicated; the DiT's activation constraints then split the CFG branches over `data x fsdp`
(padded when they do not divide), as `mi-jax plan`'s generate step assumes. Default mesh: one
device in a single process; every device of a multi-process job (launch/local.py, SLURM),
where every process runs every window (each holds part of the mesh) and process 0 alone
decodes the replicated latents and writes the mp4 (`stream`, `write`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import math
import os
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mi_jax.convert.checkpoint import load_dit
from mi_jax.convert.hunyuan import abstract_dit_params
from mi_jax.data import audio_io
from mi_jax.data.inputs import InputError, load_portrait, prompt_notices, speaker_regions
from mi_jax.data.prepare import Encoders, vae_config
from mi_jax.data.video_io import write_video
from mi_jax.diffusion.guidance import GuidanceSchedule
from mi_jax.diffusion.sampler import SamplerConfig, initial_carry, make_window_fn, window_frames
from mi_jax.generation import controls
from mi_jax.generation.colour_anchor import ColourAnchor, mouth_pixels
from mi_jax.models.dit_config import DiTConfig
from mi_jax.parallel.mesh import DEFAULT_RULES, logical_shardings, make_mesh, with_rules

COLOUR_ANCHOR_DEFAULT = False  # off: on demo/model it raised the face colour shift (README "Long-video controls")


@dataclasses.dataclass
class Generation:
    """A whole generated video in memory (`Pipeline.generate`).

    Attributes:
      frames: uint8 `[N, H, W, 3]`.
      audio: float32 mono `[samples]` (the speakers mixed).
      fps: frames per second.
      sample_rate: the audio's rate (default 16000).
      notices: what the input checks had to say (words the model never saw, silences, ...).
    """

    frames: np.ndarray  # [N, H, W, 3] uint8
    audio: np.ndarray  # [samples] float32 mono (the speakers mixed)
    fps: float
    sample_rate: int = 16000
    notices: list[str] = dataclasses.field(default_factory=list)

    @property
    def seconds(self) -> float:
        """The video's length in seconds."""
        return len(self.frames) / self.fps

    def save(self, path: str) -> str:
        """Writes an H.264 + AAC mp4 with the audio at `path`, atomically; returns `path`.

        Raises:
          VideoError: the file cannot be written (mi_jax/data/video_io.py).
        """
        write_video(path, self.frames, self.fps, audio=self.audio, sample_rate=self.sample_rate)
        return path


def sampler_config(config, **overrides) -> SamplerConfig:
    """The sampler of a run's config (`config.sample`).

    Args:
      config: the run's config.
      **overrides: `SamplerConfig` fields to replace (`steps`, `cfg_text`, `cfg_audio`, ...);
        None keeps the config's value.

    Returns:
      `SamplerConfig`.
    """
    s = config.sample
    guidance = GuidanceSchedule(text=overrides.pop("cfg_text", None) or s.cfg_text,
                                audio=overrides.pop("cfg_audio", None) or s.cfg_audio,
                                reference=s.cfg_reference, end_fraction=s.cfg_end_fraction)
    kw = dict(window=s.window, overlap=s.overlap, steps=s.steps, shift=s.shift, kind=s.kind,
              embedded_guidance=s.embedded_guidance, guidance=guidance)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return SamplerConfig(**kw)


@dataclasses.dataclass
class Inputs:
    """Checked user inputs (`read_inputs`)."""

    image: np.ndarray  # [H, W, 3] uint8, the portrait
    tracks: list  # per speaker, float32 audio at 16 kHz fitted to the video (timeline-muted)
    masks: np.ndarray  # [S, h, w] speaker regions at latent resolution
    mouths: np.ndarray  # [S, h, w] their mouth regions (0 / 1)
    frames: int  # video frames
    notices: list
    schedule: list  # [(start s, prompt)] (mi_jax/generation/controls.py)
    active: np.ndarray  # [S, frames] bool: who speaks when (voice activity or the timeline)


def read_inputs(config, portrait, audio, prompt="", *, seconds=None, masks=None, size=None, allow_silence=True,
                timeline=None, vae=None) -> Inputs:
    """Reads and checks every user input; nothing is compiled.

    Args:
      config: the run's config (`prepare` gives the frame size, fps and sample rate).
      portrait: an image path or a uint8 `[H, W, 3]` array; resized and cropped to `size`.
      audio: one track or a list, one per speaker: a file path or a mono float32 array at 16 kHz.
      prompt: a string, or a schedule `["0:TEXT", "12.5:TEXT"]` / `[(seconds, text)]` (default "").
      seconds: the video's length (default None: the first track's).
      masks: one mask per speaker (image paths or arrays, white = that speaker), or None to find
        the faces in the portrait.
      size: `(height, width)` (default None: `config.prepare`'s).
      allow_silence: whether a silent or partly silent track is valid (default True: the mouth
        rests there).
      timeline: a file of `START END SPEAKER` lines, or its text / lines, saying who speaks when
        instead of each track's voice activity (default None; mi_jax/generation/controls.py).
      vae: the VAE's `VAEConfig` (default None: the one `config.prepare` names); its spatial
        factor sets the masks' latent grid and, times the DiT's patch size, the multiple the
        frame size is rounded to.

    Returns:
      `Inputs`: the portrait `[H, W, 3]`, the tracks fitted to the video (muted outside the
      timeline), speaker masks and mouths `[S, h, w]` at latent resolution, the frame count,
      notices, the prompt schedule and who speaks when `[S, frames]`.

    Raises:
      InputError: a missing, unreadable or unusable input, or a malformed schedule / timeline;
        the message names the input, the problem and the fix.
      AudioError: an audio file that cannot be read, or a silent track with `allow_silence=False`.
    """
    schedule = controls.prompt_schedule(prompt)  # a malformed schedule fails before any file is read
    p = config.prepare
    sf = (vae or vae_config(p)).spatial_factor
    size = size or (p.height, p.width)
    image, notices = load_portrait(portrait, size, grid=sf * DiTConfig.coerce(config.model).patch_size)
    h, w = image.shape[:2]
    tracks = [audio] if isinstance(audio, (str, np.ndarray)) or hasattr(audio, "__fspath__") else list(audio)
    if not tracks:
        raise InputError("audio: give at least one audio track")
    loaded, names = [], []
    for i, a in enumerate(tracks):
        if isinstance(a, np.ndarray):
            a = np.asarray(a, np.float32)
            if a.ndim != 1 or a.size == 0 or not np.isfinite(a).all():
                raise InputError(f"audio {i}: pass a finite mono float32 array at 16 kHz")
            loaded.append(a)
            names.append(str(i + 1))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", audio_io.SilentAudioWarning)  # said below, per track
                loaded.append(audio_io.load_audio(a, p.sample_rate, allow_silence=allow_silence, fps=p.fps))
            names.append(os.path.splitext(os.path.basename(os.fspath(a)))[0])
    line = None if timeline is None else controls.read_timeline(timeline, len(loaded), names)
    mask_lat, mouths, more = speaker_regions(masks, len(loaded), h, w, image, spatial=sf)
    notices += more
    n = max(len(a) for a in loaded)
    if seconds is not None:
        if seconds <= 0:
            raise InputError(f"seconds={seconds}: must be positive")
        n = int(round(seconds * p.sample_rate))
    loaded = [audio_io.fit_to_frames(a, max(2, round(n / p.sample_rate * p.fps)), p.fps, p.sample_rate)
              for a in loaded]
    frames = audio_io.frames_for_audio(loaded[0], p.fps, p.sample_rate)
    fps, sr = float(p.fps), int(p.sample_rate)
    if line is None:
        active = np.stack([controls.voice_activity(a, frames, fps, sr) for a in loaded])
    else:
        active = controls.timeline_activity(line, len(loaded), frames, fps)
        loaded = [controls.mute_outside(a, active[s], fps, sr) for s, a in enumerate(loaded)]
    for s in range(len(loaded)):
        quiet = 1.0 - active[s].mean()
        if quiet > 0.05:
            who = f"audio {s + 1}" if len(loaded) > 1 else "audio"
            notices.append(f"{who}: silent for {quiet * frames / fps:.1f} s of {frames / fps:.1f} s; the mouth rests "
                           "there" + ("" if mouths[s].any() else " (no mouth region found: pass --mask)"))
    late = [t for t, _ in schedule if t >= frames / fps]
    if late:
        notices.append(f"prompt: the schedule's change(s) at {', '.join(f'{t:g}' for t in late)} s come after the "
                       f"video's end ({frames / fps:.2f} s) and have no effect")
    return Inputs(image, loaded, mask_lat, mouths, frames, notices, schedule, active)


def check_inputs(config, portrait, audio, *, seconds=None, masks=None, size=None, allow_silence=True,
                 prompt="", timeline=None):
    """`read_inputs` as a tuple (the CLI's and the app's checks).

    Args:
      config: the run's config.
      portrait: an image path or a uint8 `[H, W, 3]` array.
      audio: one track or a list, one per speaker (paths or mono float32 arrays at 16 kHz).
      seconds: the video's length (default None: the first track's).
      masks: one mask per speaker, or None to find the faces.
      size: `(height, width)` (default None: `config.prepare`'s).
      allow_silence: whether a silent track is valid (default True).
      prompt: a prompt or a schedule (default "").
      timeline: who speaks when (default None).

    Returns:
      `(image, tracks, masks, frames, notices)`: the portrait uint8 `[H, W, 3]`, the audio tracks
      (16 kHz, fitted to the video), the speaker masks at latent resolution `[S, h, w]`, the
      number of video frames and the notices.

    Raises:
      InputError: as `read_inputs`.
      AudioError: as `read_inputs`.
    """
    r = read_inputs(config, portrait, audio, prompt, seconds=seconds, masks=masks, size=size,
                    allow_silence=allow_silence, timeline=timeline)
    return r.image, r.tracks, r.masks, r.frames, r.notices


def spoken(config, say: str, voice: str | None = None):
    """`say` spoken with espeak-ng (mi_jax/data/speech.py) as an audio file would be read: at the
    config's sample rate, loudness-normalised as `audio_io.load_audio` does.

    Returns:
      `speech.Speech` (audio, phonemes, words).

    Raises:
      SpeechError (an InputError): empty or unspeakable text, an unknown voice, text past the
        length limit, or espeak-ng missing (`pip install -e .[speech]`).
    """
    from mi_jax.data import speech

    said = speech.speak(say, voice or speech.DEFAULT_VOICE, sample_rate=int(config.prepare.sample_rate))
    return dataclasses.replace(said, audio=audio_io.normalize_loudness(said.audio, "rms"))


def spoken_audio(config, audio=None, say: str | None = None, voice: str | None = None):
    """The audio to animate: `audio` as given, or the text `say` spoken with espeak-ng.

    Args:
      config: the run's config (`prepare.sample_rate`).
      audio: a track or list of tracks (`read_inputs`), or None with `say`.
      say: text to speak instead of an audio track (needs `pip install -e .[speech]`;
        mi_jax/data/speech.py).
      voice: the espeak-ng voice for `say` (default None: "en-us"; e.g. "en-us+f3").

    Returns:
      `audio`, or the spoken mono float32 track at the config's sample rate (`spoken`).

    Raises:
      InputError: neither or both of `audio` and `say`, `voice` without `say`; `SpeechError`
        (an InputError) for empty or unspeakable text, an unknown voice, text past the length
        limit, or espeak-ng missing.
    """
    if say is None:
        if voice is not None:
            raise InputError("voice: a voice goes with text to say (say=... / --say); an audio track has its own")
        if audio is None:
            raise InputError("audio: give an audio track, or text to speak (say=... / --say TEXT)")
        return audio
    if audio is not None:
        raise InputError("say: give an audio track or text to say, not both")
    return spoken(config, say, voice).audio


def generation_mesh(spec: str | None = None) -> jax.sharding.Mesh:
    """The devices generation runs on.

    Args:
      spec: mesh axis sizes, e.g. "fsdp=4" or "data=2,fsdp=2" (one axis may be -1: fills), over
        the first devices it names. None (default): the first device in a single process, every
        device of the job over `fsdp` in a multi-process one.

    Returns:
      A `jax.sharding.Mesh` with axes `data, fsdp, context, tensor`.

    Raises:
      ValueError: the spec names more devices than there are, or, in a multi-process job, not
        every device (each process takes part in every window).
    """
    if spec is None:
        spec = "fsdp=-1" if jax.process_count() > 1 else "fsdp=1"
    sizes = [int(p.partition("=")[2]) for p in spec.split(",") if p.strip()]
    n = jax.device_count() if -1 in sizes else math.prod(sizes)
    if jax.process_count() > 1 and n != jax.device_count():
        raise ValueError(f"mesh {spec!r} names {n} devices; a job of {jax.process_count()} processes generates on "
                         f"all its {jax.device_count()} devices (use -1 to fill, e.g. 'fsdp=-1')")
    if n > jax.device_count():
        raise ValueError(f"mesh {spec!r} needs {n} devices, {jax.device_count()} present")
    return make_mesh(spec, jax.devices()[:n])


def _put(x, sharding: jax.sharding.Sharding):
    """`x` (numpy, or an array holding the same value in every process) placed as `sharding`,
    which may span other processes' devices."""
    if isinstance(x, jax.Array):
        if x.sharding.is_equivalent_to(sharding, x.ndim):
            return x
        if not x.is_fully_addressable or sharding.is_fully_addressable:
            return jax.device_put(x, sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


@functools.cache
def _malloc_trim():
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:  # pragma: no cover - no C library to load
        return None


def release_free_heap() -> None:
    """Hands freed heap memory back to the OS (glibc's `malloc_trim`; nothing elsewhere). XLA's
    worker threads allocate from per-thread malloc arenas that keep what they free, so without
    this a long generation's RSS creeps up by fragments although its live memory is flat."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _host(x: jax.Array) -> np.ndarray:
    """A replicated (possibly multi-process) array's value in this process."""
    return np.asarray(x.addressable_data(0))


@dataclasses.dataclass
class _Request:
    """One call's checked inputs and fixed-shape conditions."""

    scfg: SamplerConfig
    frames: int  # video frames to emit
    num_windows: int
    cond: dict  # replicated on the mesh
    ref: np.ndarray  # [1, 1, h, w, C] the portrait's latent (scaled)
    audio: _AudioWindows | None
    texts: list | None = None  # per window, its text conditions when a prompt schedule changes them
    rest: np.ndarray | None = None  # [1 + latents, h, w] rest weights (mi_jax/generation/controls.py)
    anchor: object = None  # a ColourAnchor for the decoded frames, or None

    def window_rest(self, k: int) -> np.ndarray:
        """`[1, W, h, w, 1]`: window k's rest weights (zero at the reference position)."""
        w, start = self.scfg.window, k * self.scfg.new_per_window
        out = self.rest[start : start + w].copy()
        out[0] = 0.0
        return out[None, ..., None]


class Pipeline:
    """A trained model ready to generate: portrait + voice + prompt -> frames.

    Most users call `Pipeline.from_checkpoint(run_dir)`. Generation compiles once per setting
    (sampler, latent size) and then runs at constant cost per window.

    Args:
      config: the run's config (model, prepare, sample).
      params: the DiT's parameters (a pytree as `mi_jax.models.dit.DiT` has them).
      encoders: the frozen encoders (`mi_jax.data.prepare.Encoders`; default None: built from
        `config.prepare`).
      mesh: the devices to run on (default None: `generation_mesh()`).
      rules: the logical-axis rules that place the parameters (default `DEFAULT_RULES`: FSDP).

    Attributes:
      notices: what the last call's input checks had to say.
      last_audio: the last call's audio (mono float32, the speakers mixed), which `write` muxes.
    """

    def __init__(self, config, params, encoders=None, *, mesh: jax.sharding.Mesh | None = None,
                 rules=DEFAULT_RULES):
        self.config = config
        self.model_config = DiTConfig.coerce(config.model)
        self.mesh = mesh if mesh is not None else generation_mesh()
        self.rules = tuple(rules)
        shardings = logical_shardings(abstract_dit_params(self.model_config), self.mesh, self.rules)
        self.params = jax.tree.map(_put, params, shardings)
        self._replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.enc = encoders or Encoders(config)
        self.vae_stream = self.enc.vae_stream  # the tiles `prepare` encoded the training latents with
        self._window_fns: dict = {}  # SamplerConfig -> jitted window step (compiled once per setting)
        self._carry_fns: dict = {}
        self._decoders: dict = {}  # latent shape -> _FrameDecoder (compiled once per size)
        self.notices: list[str] = []
        self.last_audio: np.ndarray | None = None

    @classmethod
    def from_checkpoint(cls, run_dir: str, *, which: str = "ema", mesh: str | jax.sharding.Mesh | None = None,
                        rules=DEFAULT_RULES) -> Pipeline:
        """Loads a training or distillation run's latest checkpoint.

        The parameters are restored straight into their shards (mi_jax/convert/checkpoint.py).

        Args:
          run_dir: the run folder (its `checkpoints/` and saved config).
          which: "ema" (default: the EMA weights) or "params".
          mesh: a `Mesh`, or a spec for `generation_mesh` (default None: see there).
          rules: the logical-axis rules (default `DEFAULT_RULES`).

        Returns:
          `Pipeline`.

        Raises:
          ValueError: `which` is neither "ema" nor "params", or a bad mesh spec.
          CheckpointError: `run_dir` holds no finished checkpoint, or no EMA weights with
            `which="ema"`.
        """
        if which not in ("ema", "params"):
            raise ValueError(f"which={which!r}: use 'ema' or 'params'")
        mesh = mesh if isinstance(mesh, jax.sharding.Mesh) else generation_mesh(mesh)
        config, params = load_dit(run_dir, mesh, rules, which=which)
        return cls(config, params, mesh=mesh, rules=rules)

    # ------------------------------------------------------------------ inputs

    def _request(self, portrait, audio, prompt, *, seconds, masks, steps, cfg_text, cfg_audio, size,
                 allow_silence, timeline=None, rest=True, colour_anchor=None) -> _Request:
        self.last_audio = None  # the previous call's audio goes before this call's is read
        release_free_heap()  # what earlier calls (and compilation) freed
        p = self.config.prepare
        scfg = sampler_config(self.config, steps=steps, cfg_text=cfg_text, cfg_audio=cfg_audio)
        inp = read_inputs(self.config, portrait, audio, prompt, seconds=seconds, masks=masks, size=size,
                          allow_silence=allow_silence, timeline=timeline, vae=self.enc.vae_config)
        image, tracks, mask_lat, frames = inp.image, inp.tracks, inp.masks, inp.frames
        # words the text encoder never saw in training (its vocabulary; none: no check)
        vocabulary = getattr(self.enc.text, "vocabulary", ())
        self.notices = inp.notices + [n for _, text in inp.schedule for n in prompt_notices(text, vocabulary)]
        self.last_audio = tracks[0] if len(tracks) == 1 else np.sum(tracks, axis=0, dtype=np.float32)
        text = self.enc.text.encode([t for _, t in inp.schedule], np.repeat(image[None], len(inp.schedule), 0))
        texts = [dict(text_embeds=np.asarray(text.prompt_embeds[i : i + 1], np.float32),
                      text_mask=np.asarray(text.prompt_attention_mask[i : i + 1], np.int32),
                      pooled=np.asarray(text.pooled[i : i + 1], np.float32)) for i in range(len(inp.schedule))]
        ref = np.asarray(self.enc.encode_video(image[None])[None], np.float32)  # [1, 1, h, w, C]
        cond = dict(texts[0], ref_latent=ref)
        num_windows = scfg.num_windows(frames)
        per_window = None
        if len(texts) > 1:
            starts = [window_frames(scfg, k)[0] for k in range(num_windows)]
            per_window = [_blend_text(texts[a], texts[b], wt)
                          for a, b, wt in controls.window_prompts(inp.schedule, starts, float(p.fps))]
        windows = None
        if self.model_config.audio_blocks:
            mask = np.asarray(mask_lat, np.float32)[None, :, None]  # [1, S, 1, h, w]
            cond["speaker_masks"] = np.ascontiguousarray(np.broadcast_to(mask, (1, len(tracks), scfg.window,
                                                                             *mask_lat.shape[1:])))
            windows = _AudioWindows(self.enc, tracks, scfg, frames, float(p.fps))
        weights = controls.rest_weights(inp.active, scfg.generated_latents(num_windows),  # [S, 1 + L]
                                        self.enc.vae_config.temporal_factor)
        if not rest:
            weights = np.zeros_like(weights)
        rest_lat = np.clip(np.einsum("sg,shw->ghw", weights, inp.mouths), 0.0, 1.0).astype(np.float32)
        anchor = None
        if COLOUR_ANCHOR_DEFAULT if colour_anchor is None else colour_anchor:
            anchor = ColourAnchor(image, float(p.fps), mouth_pixels(inp.mouths, *image.shape[:2]))
        cond = jax.tree.map(lambda x: _put(x, self._replicated), cond)
        return _Request(scfg, frames, num_windows, cond, ref, windows, per_window, rest_lat, anchor)

    # ------------------------------------------------------------------ generation

    def _window_fn(self, scfg: SamplerConfig):
        if scfg not in self._window_fns:
            self._window_fns[scfg] = jax.jit(make_window_fn(self.model_config, scfg),
                                             out_shardings=self._replicated)
        return self._window_fns[scfg]

    def _initial_carry(self, scfg: SamplerConfig, latent_shape, seed: int) -> dict:
        key = (scfg, tuple(latent_shape))
        if key not in self._carry_fns:
            self._carry_fns[key] = jax.jit(lambda s: initial_carry(s, 1, latent_shape, scfg),
                                           out_shardings=self._replicated)
        if not -(2**31) <= seed < 2**31:
            raise ValueError(f"seed={seed}: use a 32-bit integer")
        return self._carry_fns[key](np.int32(seed))

    def _windows(self, req: _Request, seed: int, progress=None) -> Iterator[np.ndarray]:
        """Each window's generated latents `[1, n, h, w, C]` in this process (window 0's start
        with its motion positions)."""
        fn = self._window_fn(req.scfg)
        carry = self._initial_carry(req.scfg, req.ref.shape[2:], seed)
        trimmed = time.monotonic()  # the heap is trimmed every 2 s, not every window: after every
        # window of a fast model the page faults of re-growing it would cost more than it saves
        for k in range(req.num_windows):
            audio = None if req.audio is None else _put(req.audio.window(k), self._replicated)
            cond = req.cond
            if req.texts is not None:
                cond = dict(cond, **{n: _put(v, self._replicated) for n, v in req.texts[k].items()})
            rest = _put(req.window_rest(k), self._replicated)
            with with_rules(self.mesh, self.rules):  # per call: a generator must not hold the mesh across yields
                carry, (motion, new) = fn(self.params, cond, carry, audio, rest)
            new = _host(new)
            if time.monotonic() - trimmed >= 2.0:
                release_free_heap()
                trimmed = time.monotonic()
            yield np.concatenate([_host(motion), new], axis=1) if k == 0 else new
            if progress is not None:
                progress(k + 1, req.num_windows)

    def latents(self, portrait, audio=None, prompt="", *, seconds=None, masks: Sequence | None = None,
                seed: int = 0, steps=None, cfg_text=None, cfg_audio=None, size=None, allow_silence=True,
                timeline=None, rest=True, progress=None, say=None, voice=None) -> Iterator[np.ndarray]:
        """The generated latents, window by window, before decoding.

        Takes `stream`'s arguments but `colour_anchor` (it acts on pixels).

        Args:
          portrait: an image path or a uint8 `[H, W, 3]` array.
          audio: one track or a list, one per speaker.
          prompt: a prompt or a schedule (default "").
          seconds: the video's length (default None: the first track's).
          masks: one mask per speaker, or None to find the faces.
          seed: the noise seed (default 0).
          steps: sampler steps (default None: the config's).
          cfg_text: text CFG scale (default None: the config's).
          cfg_audio: audio CFG scale (default None: the config's).
          size: `(height, width)` (default None: the config's).
          allow_silence: False rejects a silent track (default True).
          timeline: who speaks when (default None).
          rest: mouths rest in silence (default True).
          progress: `progress(done, total)` after every window (default None).
          say: text to speak instead of `audio` (default None; as `stream`).
          voice: the espeak-ng voice for `say` (default None: "en-us").

        Returns:
          An iterator of float32 `[1, n, h, w, C]` latents (after the reference, scaled as the DiT
          sees them); window 0's include its motion positions. Inputs are checked here, before
          the iterator is returned.

        Raises:
          InputError: as `read_inputs`.
          AudioError: as `read_inputs`.
          ValueError: a seed outside int32 (on the first `next()`).
        """
        audio = spoken_audio(self.config, audio, say, voice)
        req = self._request(portrait, audio, prompt, seconds=seconds, masks=masks, steps=steps, cfg_text=cfg_text,
                            cfg_audio=cfg_audio, size=size, allow_silence=allow_silence, timeline=timeline,
                            rest=rest, colour_anchor=False)
        return self._windows(req, seed, progress)

    def stream(self, portrait, audio=None, prompt="", *, seconds=None, masks: Sequence | None = None,
               seed: int = 0, steps=None, cfg_text=None, cfg_audio=None, size=None, allow_silence=True,
               timeline=None, rest=True, colour_anchor=None, progress=None, say: str | None = None,
               voice: str | None = None) -> Iterator[np.ndarray]:
        """Generates the video as frame chunks, window by window, in constant memory.

        In a multi-process job only process 0 decodes (it writes the video); the others run
        their part of every window and yield one empty chunk `[0, H, W, 3]` per window.

        Args:
          portrait: an image path or a uint8 `[H, W, 3]` array.
          audio: one track or a list, one per speaker: a file path or a mono float32 array at 16 kHz.
          prompt: a string, or a schedule `["0:a person talking", "30:a person talking, nodding"]`
            (or `(seconds, text)` pairs): each window takes the prompt in force at its first
            frame, the first window after a change half of each (default "").
          seconds: the video's length (default None: the first track's).
          masks: one mask per speaker (image paths or arrays), or None to find the faces.
          seed: the noise seed, an int32 (default 0).
          steps: sampler steps (default None: `config.sample.steps`).
          cfg_text: the text CFG scale (default None: `config.sample.cfg_text`).
          cfg_audio: the audio CFG scale (default None: `config.sample.cfg_audio`).
          size: `(height, width)` (default None: `config.prepare`'s).
          allow_silence: False rejects a silent track (default True).
          timeline: a file of `START END SPEAKER` lines saying who speaks when (default None: each
            track's voice activity; mi_jax/generation/controls.py).
          rest: where a speaker is silent their mouth rests as in the portrait (default True).
          colour_anchor: hold the frames' colour on the portrait's (default None:
            `COLOUR_ANCHOR_DEFAULT`; mi_jax/generation/colour_anchor.py).
          progress: called as `progress(done, total)` after every window (default None).
          say: text to speak instead of `audio` (espeak-ng, `pip install -e .[speech]`; the
            spoken track is animated and is the audio `write` muxes) (default None).
          voice: the espeak-ng voice for `say` (default None: "en-us"; mi_jax/data/speech.py).

        Yields:
          uint8 `[n, H, W, 3]` frame chunks, the portrait's frame first.

        Raises:
          InputError: as `read_inputs`, on the first `next()`; for `say`, as `spoken_audio`.
          AudioError: as `read_inputs`, on the first `next()`.
          ValueError: a seed outside int32.
        """
        audio = spoken_audio(self.config, audio, say, voice)
        req = self._request(portrait, audio, prompt, seconds=seconds, masks=masks, steps=steps, cfg_text=cfg_text,
                            cfg_audio=cfg_audio, size=size, allow_silence=allow_silence, timeline=timeline,
                            rest=rest, colour_anchor=colour_anchor)
        if jax.process_index() != 0:
            f = self.enc.vae_config.spatial_factor
            for _ in self._windows(req, seed, progress):
                yield np.zeros((0, f * req.ref.shape[2], f * req.ref.shape[3], 3), np.uint8)
            return
        decoder = self._decoder(req.ref.shape[2:])
        emitted = 0
        for chunk in decoder.frames(req.ref, self._windows(req, seed, progress)):
            chunk = chunk[: req.frames - emitted]
            emitted += len(chunk)
            if len(chunk):
                yield chunk if req.anchor is None else req.anchor(chunk)

    def generate(self, portrait, audio=None, prompt: str = "", **kw) -> Generation:
        """The whole video in memory.

            pipe.generate("portrait.png", say="Hello, this is a test.", voice="en-us+f3").save("x.mp4")

        Args:
          portrait: as `stream`.
          audio: as `stream` (None with `say=`).
          prompt: as `stream` (default "").
          **kw: `stream`'s keyword arguments (`say=`, `voice=`: text spoken with espeak-ng as
            the audio track).

        Returns:
          `Generation` (frames, mixed audio, fps, notices); `.save(path)` writes the mp4.

        Raises:
          InputError: as `stream`.
          AudioError: as `stream`.
          ValueError: as `stream`.
        """
        chunks = list(self.stream(portrait, audio, prompt, **kw))
        return Generation(np.concatenate(chunks), self.last_audio, float(self.config.prepare.fps),
                          int(self.config.prepare.sample_rate), list(self.notices))

    def live(self, portrait, audio_chunks, prompt="", **kw):
        """Audio in as it arrives (an iterator of mono float32 chunks of any size, or
        `(samples, rate)` pairs), frames out as each window finishes: a `LiveStream` of
        `LiveFrames` (frames, their audio, latency) with a `report()`. Each window reads its
        frames' audio plus `lookahead_s` (config `sample.stream_lookahead_s`), no more; frames
        later than `max_latency_s` after their audio are counted and warned about. Arguments as
        `stream`'s, plus `lookahead_s`, `pace`, `max_latency_s`: see mi_jax/live.py."""
        from mi_jax.live import LiveStream

        return LiveStream(self, portrait, audio_chunks, prompt, **kw)

    def write(self, path: str, frames: Iterable[np.ndarray]) -> str | None:
        """Encodes streamed frames with the last call's audio into an mp4, holding no frames.

        In a multi-process job only process 0 writes; the others consume the frames (they run
        their part of every window) and return None.

        Args:
          path: the mp4 to write (H.264 + AAC, atomically: a stopped write leaves nothing).
          frames: `stream`'s chunks, or single uint8 `[H, W, 3]` frames.

        Returns:
          `path`, or None in processes other than 0.

        Raises:
          InputError: from `stream`, as the frames are drawn.
          AudioError: from `stream`, as the frames are drawn.
          ValueError: from `stream`, as the frames are drawn.
          VideoError: the file cannot be written.
        """
        def single(items):
            for x in items:
                if np.ndim(x) == 4:
                    yield from x
                else:
                    yield x

        if jax.process_index() != 0:
            for _ in frames:
                pass
            return None
        p = self.config.prepare
        write_video(path, single(frames), float(p.fps), audio=self.last_audio, sample_rate=int(p.sample_rate))
        return path

    def _decoder(self, latent_shape) -> _FrameDecoder:
        key = tuple(latent_shape)
        if key not in self._decoders:
            self._decoders[key] = _FrameDecoder(self.vae_stream, self.enc.vae_params,
                                                self.enc.vae_config.scaling_factor, key)
        return self._decoders[key]


def _blend_text(a: dict, b: dict, weight: float) -> dict:
    """Text conditions `(1 - weight) a + weight b`; the token mask is the union of both, and
    each side's padding counts as zero, so a token only one prompt has enters at its weight."""
    if weight == 0.0:
        return a
    ea, eb = (c["text_embeds"] * c["text_mask"][..., None] for c in (a, b))
    return dict(text_embeds=((1 - weight) * ea + weight * eb).astype(np.float32),
                text_mask=np.maximum(a["text_mask"], b["text_mask"]),
                pooled=((1 - weight) * a["pooled"] + weight * b["pooled"]).astype(np.float32))


class _AudioWindows:
    """Each window's audio features `[1, S, 1 + 4 (W - 1), n_layers, C]`, sliced as the windows
    advance from the Wav2Vec2 chunks they reach (holding only the chunks the current window
    spans). Frames after the video's end are zero, as `sampler.pad_audio_states` pads."""

    def __init__(self, enc, tracks, scfg: SamplerConfig, frames: int, fps: float):
        self.chunks = [enc.audio_frame_chunks(a, fps) for a in tracks]
        self.scfg, self.frames = scfg, frames
        self.buffer: np.ndarray | None = None  # [S, n, L, C] features of video frames start..start + n - 1
        self.start = 0
        self.silence: np.ndarray | None = None

    def _more(self) -> np.ndarray:
        parts = [next(c, None) for c in self.chunks]
        if parts[0] is None:  # after the audio (zeroed in `window`)
            return self.silence
        chunk = np.stack(parts)
        if self.silence is None:
            self.silence = np.zeros_like(chunk)
        return chunk

    def window(self, k: int) -> np.ndarray:
        lo, hi = window_frames(self.scfg, k)
        if self.buffer is None:
            self.buffer = self._more()
        while self.start + self.buffer.shape[1] < hi:
            self.buffer = np.concatenate([self.buffer, self._more()], axis=1)
        drop = lo - self.start
        self.buffer, self.start = self.buffer[:, drop:], lo
        out = self.buffer[:, : hi - lo].copy()
        out[:, max(self.frames - lo, 0) :] = 0.0
        return out[None]


def _to_uint8(video):
    return jnp.clip((video[0] + 1.0) * 127.5, 0, 255).round().astype(jnp.uint8)


class _FrameDecoder:
    """Generated latents -> uint8 frames `[n, H, W, 3]` through the VAE's streaming decoder
    (`VAEStream`: a first tile of `latents_first` latents, chunks of `latents_per_chunk`, then
    the rest), on this process's default device (the latents are replicated).

    Every shape a stream can meet is compiled ahead of time per latent size: the first tile,
    a chunk and each of the `latents_per_chunk` possible ends, so no video length compiles
    anything later. Only clips shorter than the first tile (under `latents_first` latents,
    a fraction of a second) decode in one call, compiled per length on first use."""

    def __init__(self, stream, params, scaling: float, latent_shape):
        h, w, c = latent_shape
        self.stream, self.params = stream, params
        spec = lambda n: jax.ShapeDtypeStruct((1, n, h, w, c), jnp.float32)  # noqa: E731
        first = spec(stream.latents_first)

        def start(p, x):
            frames, state = stream.decode_start(p, x / scaling)
            return _to_uint8(frames), state

        def chunk(p, state, x):
            frames, state = stream.decode_chunk(p, state, x / scaling)
            return _to_uint8(frames), state

        def end(p, state, x):
            return _to_uint8(stream.decode_end(p, state, x / scaling if x.shape[1] else None))

        state = jax.eval_shape(stream.decode_start, params, first)[1]
        self._start = jax.jit(start).lower(params, first).compile()
        self._chunk = jax.jit(chunk).lower(params, state, spec(stream.latents_per_chunk)).compile()
        self._ends = [jax.jit(end).lower(params, state, spec(r)).compile() for r in range(stream.latents_per_chunk)]
        self._whole = jax.jit(lambda p, x: _to_uint8(stream.decode(p, x / scaling)))

    def frames(self, ref: np.ndarray, latents: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """`ref [1, 1, h, w, C]` then every window's latents -> frame chunks (portrait first)."""
        s = self.stream
        buffer, state = ref, None
        for new in latents:
            buffer = np.concatenate([buffer, new], axis=1)
            if state is None:
                if buffer.shape[1] < s.latents_first:
                    continue
                frames, state = self._start(self.params, buffer[:, : s.latents_first])
                buffer = buffer[:, s.latents_first :]
                yield np.asarray(frames)
            while buffer.shape[1] >= s.latents_per_chunk:
                frames, state = self._chunk(self.params, state, buffer[:, : s.latents_per_chunk])
                buffer = buffer[:, s.latents_per_chunk :]
                yield np.asarray(frames)
        if state is None:
            yield np.asarray(self._whole(self.params, buffer))
        else:
            yield np.asarray(self._ends[buffer.shape[1]](self.params, state, buffer))


def vae_round_trip(encoders, frames: np.ndarray) -> np.ndarray:
    """uint8 `[1 + 4k, H, W, 3]` -> the same frames through the VAE exactly as training and
    generation see them: the clip encoded as `prepare` encodes it, its first latent replaced by
    the first frame encoded alone (the portrait's latent, as in generation), decoded by the
    pipeline's streaming decoder. What a perfect DiT could show at best (benchmarks/vae_regime.py)."""
    enc = encoders
    ref = enc.encode_video(frames[:1])[None]
    latents = enc.encode_video(frames)[None]
    f = enc.vae_config.spatial_factor
    decoder = _FrameDecoder(enc.vae_stream, enc.vae_params, enc.vae_config.scaling_factor,
                            (frames.shape[1] // f, frames.shape[2] // f, enc.vae_config.latent_channels))
    return np.concatenate(list(decoder.frames(ref, [latents[:, 1:]])))
