"""The notebook / CLI API: load a trained checkpoint, then `generate(portrait, audio, prompt)`.

    pipe = Pipeline.from_checkpoint("runs/demo_stage2")
    video = pipe.generate("portrait.png", "speech.wav", "a person talking, nodding")
    video.save("out.mp4")                       # H.264 + the input audio, written atomically
    for frames in pipe.stream(...): ...         # constant memory, any length

Every input is checked before anything is compiled (mi_jax.data.inputs, mi_jax.data.audio_io).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mi_jax.diffusion.guidance import GuidanceSchedule
from mi_jax.diffusion.sampler import SamplerConfig, initial_carry, make_window_fn, pad_audio_states, window_audio
from mi_jax.models.dit_config import DiTConfig


@dataclasses.dataclass
class Generation:
    frames: np.ndarray  # [N, H, W, 3] uint8
    audio: np.ndarray  # [samples] float32 mono (the speakers mixed)
    fps: float
    sample_rate: int = 16000
    notices: list[str] = dataclasses.field(default_factory=list)

    @property
    def seconds(self) -> float:
        return len(self.frames) / self.fps

    def save(self, path: str) -> str:
        from mi_jax.data.video_io import write_video

        write_video(path, self.frames, self.fps, audio=self.audio, sample_rate=self.sample_rate)
        return path


def sampler_config(config, **overrides) -> SamplerConfig:
    s = config.sample
    guidance = GuidanceSchedule(text=overrides.pop("cfg_text", None) or s.cfg_text,
                                audio=overrides.pop("cfg_audio", None) or s.cfg_audio,
                                reference=s.cfg_reference, end_fraction=s.cfg_end_fraction)
    kw = dict(window=s.window, overlap=s.overlap, steps=s.steps, shift=s.shift, kind=s.kind,
              embedded_guidance=s.embedded_guidance, guidance=guidance)
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return SamplerConfig(**kw)


def check_inputs(config, portrait, audio, *, seconds=None, masks=None, size=None, allow_silence=False):
    """Reads and checks every user input (nothing is compiled): returns the portrait
    `[H, W, 3]` uint8, the audio tracks (16 kHz, fitted to the video), the speaker masks at
    latent resolution `[S, h, w]`, the number of video frames and the notices. Raises
    `InputError` / `AudioError` naming the input, the problem and the fix."""
    from mi_jax.data import audio_io
    from mi_jax.data.inputs import InputError, load_portrait, speaker_masks

    p = config.prepare
    size = size or (p.height, p.width)
    image, notices = load_portrait(portrait, size)
    h, w = image.shape[:2]
    tracks = [audio] if isinstance(audio, (str, np.ndarray)) or hasattr(audio, "__fspath__") else list(audio)
    if not tracks:
        raise InputError("audio: give at least one audio track")
    loaded = []
    for i, a in enumerate(tracks):
        if isinstance(a, np.ndarray):
            a = np.asarray(a, np.float32)
            if a.ndim != 1 or a.size == 0 or not np.isfinite(a).all():
                raise InputError(f"audio {i}: pass a finite mono float32 array at 16 kHz")
            loaded.append(a)
        else:
            loaded.append(audio_io.load_audio(a, p.sample_rate, allow_silence=allow_silence, fps=p.fps))
    mask_lat, more = speaker_masks(masks, len(loaded), h, w, image)
    notices += more
    n = max(len(a) for a in loaded)
    if seconds is not None:
        if seconds <= 0:
            raise InputError(f"seconds={seconds}: must be positive")
        n = int(round(seconds * p.sample_rate))
    loaded = [audio_io.fit_to_frames(a, max(2, round(n / p.sample_rate * p.fps)), p.fps, p.sample_rate)
              for a in loaded]
    frames = audio_io.frames_for_audio(loaded[0], p.fps, p.sample_rate)
    return image, loaded, mask_lat, frames, notices


class Pipeline:
    def __init__(self, config, params, encoders=None):
        from mi_jax.data.prepare import Encoders

        self.config = config
        self.model_config = DiTConfig.coerce(config.model)
        self.params = params
        self.enc = encoders or Encoders(config)
        from mi_jax.models.vae import CausalVAE, VAEStream

        self.vae_stream = VAEStream(CausalVAE(self.enc.vae_config))
        self._window_fns: dict = {}  # SamplerConfig -> jitted window step (compiled once per setting)

    @classmethod
    def from_checkpoint(cls, run_dir: str, *, which: str = "ema") -> Pipeline:
        """A training / distillation run folder (its latest checkpoint; `which`: "ema" or
        "params")."""
        from flax import linen as nn

        from mi_jax.convert.hunyuan import abstract_dit_params
        from mi_jax.nn.lora import lora_init
        from mi_jax.train.checkpoints import load_run_config, load_run_params
        from mi_jax.train.pretrain import model_params
        from mi_jax.train.state import TRAIN, trainable_labels

        if which not in ("ema", "params"):
            raise ValueError(f"which={which!r}: use 'ema' or 'params'")
        config = load_run_config(run_dir)
        if "distill" in config:  # a DMD2 run: the generator (base + LoRA), K-step sampling
            from mi_jax.train.distill import load_student

            return cls(config, load_student(run_dir, config))
        mcfg = DiTConfig.coerce(config.model)
        abstract = nn.unbox(abstract_dit_params(mcfg))
        patterns = list(config.stage.trainable)
        if config.init.lora_rank:
            lora = jax.eval_shape(lambda p: lora_init(p, jax.random.key(0), config.init.lora_rank), abstract)
            abstract = {"base": abstract, "lora": lora}
            patterns = [r"^lora/"] + [r"^base/" + p.lstrip("^") for p in patterns if "audio" in p]
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, abstract)
        params = load_run_params(run_dir, abstract, shardings, which="params")
        if which == "ema":
            labels = trainable_labels(abstract, patterns)
            ema_abstract = jax.tree.map(lambda a, lab: a if lab == TRAIN else None, abstract, labels)
            ema_sh = jax.tree.map(lambda a, lab: device if lab == TRAIN else None, abstract, labels)
            ema = load_run_params(run_dir, ema_abstract, ema_sh, which="ema")
            params = jax.tree.map(lambda p, e: p if e is None else e, params, ema, is_leaf=lambda x: x is None)
        return cls(config, model_params(params))

    # ------------------------------------------------------------------ inputs

    def _conditions(self, image, tracks, mask_lat, prompt, scfg, frames):
        from mi_jax.models.audio import align_to_video_frames

        text = self.enc.text.encode([prompt], image[None])
        ref = self.enc.encode_video(image[None])[None]  # [1, 1, h, w, C]
        cond = dict(text_embeds=jnp.asarray(text.prompt_embeds, jnp.float32),
                    text_mask=jnp.asarray(text.prompt_attention_mask, jnp.int32),
                    pooled=jnp.asarray(text.pooled, jnp.float32), ref_latent=jnp.asarray(ref))
        num_windows = scfg.num_windows(frames)
        audio = None
        if self.model_config.audio_blocks:
            feats = np.stack([align_to_video_frames(self.enc.audio_features(a), frames) for a in tracks])[None]
            audio = pad_audio_states(jnp.asarray(feats), scfg.audio_frames(num_windows))
            cond["audio_mask"] = jnp.broadcast_to(jnp.asarray(mask_lat)[None, :, None],
                                                  (1, len(tracks), scfg.window, *mask_lat.shape[1:]))
        return cond, audio, num_windows

    # ------------------------------------------------------------------ generation

    def stream(self, portrait, audio, prompt: str = "", *, seconds=None, masks: Sequence | None = None,
               seed: int = 0, steps=None, cfg_text=None, cfg_audio=None, size=None, allow_silence=False,
               progress=None) -> Iterator[np.ndarray]:
        """Yields uint8 frame chunks `[n, H, W, 3]` window by window (constant memory)."""
        scfg = sampler_config(self.config, steps=steps, cfg_text=cfg_text, cfg_audio=cfg_audio)
        image, tracks, mask_lat, frames, notices = check_inputs(
            self.config, portrait, audio, seconds=seconds, masks=masks, size=size, allow_silence=allow_silence)
        self.notices = notices
        self.last_audio = np.sum(tracks, axis=0).astype(np.float32)  # the speakers mixed, for the mp4
        cond, audio_states, num_windows = self._conditions(image, tracks, mask_lat, prompt, scfg, frames)
        windows = window_audio(audio_states, scfg, num_windows) if audio_states is not None else [None] * num_windows
        if scfg not in self._window_fns:
            self._window_fns[scfg] = jax.jit(make_window_fn(self.model_config, scfg))
        window_fn = self._window_fns[scfg]
        carry = initial_carry(seed, 1, cond["ref_latent"].shape[2:], scfg)
        decoder = _StreamDecoder(self.vae_stream, self.enc.vae_params, self.enc.vae_config.scaling_factor,
                                 cond["ref_latent"])
        emitted = 0
        for k in range(num_windows):
            carry, (motion, new) = window_fn(self.params, cond, carry, windows[k])
            latents = jnp.concatenate([motion, new], 1) if k == 0 else new
            for chunk in decoder.push(latents, final=k == num_windows - 1):
                chunk = chunk[: frames - emitted]
                emitted += len(chunk)
                if len(chunk):
                    yield chunk
            if progress is not None:
                progress(k + 1, num_windows)

    def generate(self, portrait, audio, prompt: str = "", **kw) -> Generation:
        """The whole video in memory (see `stream` for the arguments)."""
        chunks = list(self.stream(portrait, audio, prompt, **kw))
        return Generation(np.concatenate(chunks), self.last_audio, float(self.config.prepare.fps),
                          int(self.config.prepare.sample_rate), list(self.notices))


class _StreamDecoder:
    """Feeds generated latents (after the reference) to the VAE's streaming decoder in the chunk
    sizes it takes; yields uint8 frames."""

    def __init__(self, stream, params, scaling, ref):
        self.stream, self.params, self.scaling = stream, params, scaling
        self.buffer = ref / scaling
        self.state = None

    @staticmethod
    def _to_uint8(video):
        return np.asarray(jnp.clip((video[0] + 1.0) * 127.5, 0, 255).round().astype(jnp.uint8))

    def push(self, latents, final: bool):
        self.buffer = jnp.concatenate([self.buffer, latents / self.scaling], axis=1)
        s = self.stream
        if self.state is None:
            if self.buffer.shape[1] < s.latents_first:
                if final:
                    yield self._to_uint8(s.decode(self.params, self.buffer))
                return
            frames, self.state = s.decode_start(self.params, self.buffer[:, : s.latents_first])
            self.buffer = self.buffer[:, s.latents_first :]
            yield self._to_uint8(frames)
        while self.buffer.shape[1] >= s.latents_per_chunk:
            frames, self.state = s.decode_chunk(self.params, self.state, self.buffer[:, : s.latents_per_chunk])
            self.buffer = self.buffer[:, s.latents_per_chunk :]
            yield self._to_uint8(frames)
        if final:
            rest = self.buffer if self.buffer.shape[1] else None
            yield self._to_uint8(s.decode_end(self.params, self.state, rest))
