"""`mi-jax prepare`: a folder of clips -> a sample store of fixed-length training windows.

Per clip: decode (PyAV, resampled to `fps`, centre-cropped and resized to H x W), read the
audio track (16 kHz, fitted to the frames), face boxes (the synthetic world's ground truth
when the clip folder has one, else the Haar detector), then per window of F = 1 + 4(T - 1)
video frames (stride F - 1, so windows share their boundary frame): VAE latents cut from one
`VAEStream` encode of the whole clip (the tiles generation decodes with, so training latents are
what the pipeline's decoder gets), the reference latent (the clip's first frame alone, i.e. the
portrait, encoded as generation encodes a portrait), Wav2Vec2 features aligned to video frames, text embeddings of the clip's prompt
with the portrait, face / mouth / speaker masks at latent resolution, and ground truth.

Accepted inputs: video files (mp4 / mov / webm / mkv; an optional `NAME.txt` beside holds the
prompt) and synthetic clip folders (`clip.mp4` + `meta.json` + `truth.npz`, from
`mi_jax.data.synthetic.Clip.save`). A clip that fails (corrupt, no audio, no face, shorter
than one window) is skipped and listed with its reason in `prepare_report.json`; re-running
skips clips already in the store. Decoding runs in a thread pool (PyAV and soxr release the
GIL) while the main thread runs the jitted encoders.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from PIL import Image
from tqdm import tqdm

from mi_jax import atomic
from mi_jax.convert.vae import load_diffusers_vae, read_vae_config
from mi_jax.convert.wav2vec2 import load_transformers_wav2vec2
from mi_jax.data import faces as faces_lib
from mi_jax.data import synthetic, video_io
from mi_jax.data.audio_io import mean_std
from mi_jax.data.store import StoreWriter, done_clips
from mi_jax.data.text_encoder import HunyuanTextEncoder, TinyTextEncoder
from mi_jax.models.dit_config import DiTConfig
from mi_jax.models.vae import HUNYUAN_VIDEO_VAE, CausalVAE, Tiling, VAEConfig, VAEStream
from mi_jax.models.wav2vec2 import Wav2Vec2, Wav2Vec2Config, example_inputs

VIDEO_SUFFIXES = (".mp4", ".mov", ".webm", ".mkv")


class ClipError(ValueError):
    """This clip cannot be prepared; the message says why."""


@dataclasses.dataclass
class RawClip:
    clip_id: str
    frames: np.ndarray  # [N, H, W, 3] uint8
    audio: np.ndarray  # [N / fps * sr] float32 mono (mixed)
    speaker_audio: np.ndarray | None  # [S, samples] when known (synthetic world)
    boxes: np.ndarray | None  # [N, S, 4] pixels, when known
    prompt: str
    truth: dict


# ----------------------------------------------------------------------------- inputs


def find_clips(folder: str) -> list[tuple[str, str]]:
    """`(clip_id, path)` for every video file and synthetic clip folder under `folder`."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--clips {folder}: no such folder")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        if "meta.json" in files and "clip.mp4" in files:
            found.append((os.path.relpath(root, folder), root))
            dirs[:] = []
            continue
        for name in sorted(files):
            if name.lower().endswith(VIDEO_SUFFIXES):
                path = os.path.join(root, name)
                found.append((os.path.relpath(path, folder), path))
    return found


def _fit(frames: np.ndarray, height: int, width: int) -> tuple[np.ndarray, float, float, float]:
    """Centre-crop to the target aspect ratio and resize (PIL, bilinear); returns the frames and
    the (scale, x offset, y offset) that maps source pixels to target pixels."""
    n, h, w, _ = frames.shape
    if (h, w) == (height, width):
        return frames, 1.0, 0.0, 0.0
    scale = max(height / h, width / w)
    ch, cw = round(height / scale), round(width / scale)
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    out = np.stack([np.asarray(Image.fromarray(f[y0 : y0 + ch, x0 : x0 + cw]).resize((width, height), Image.BILINEAR))
                    for f in frames])
    return out, scale, -x0 * scale, -y0 * scale


def load_clip(clip_id: str, path: str, cfg) -> RawClip:
    """Decodes one clip (video file or synthetic folder) at the prepare fps and size."""
    folder = path if os.path.isdir(path) else None
    video_path = os.path.join(folder, "clip.mp4") if folder else path
    try:
        video, audio = video_io.read_clip(video_path, fps=cfg.fps, sample_rate=cfg.sample_rate)
    except video_io.VideoError as e:
        raise ClipError(str(e)) from None
    frames, scale, dx, dy = _fit(video.frames, cfg.height, cfg.width)
    boxes = speaker_audio = None
    truth: dict = {}
    if folder:
        meta, arrays = synthetic.load_truth(folder)
        prompt = meta.get("prompt", "")
        if abs(float(meta.get("fps", cfg.fps)) - cfg.fps) > 1e-6:
            raise ClipError(f"synthetic clip rendered at {meta.get('fps')} fps; prepare runs at {cfg.fps}")
        n = len(frames)
        b = np.transpose(arrays["face_boxes"], (1, 0, 2))[:n].astype(np.float64)  # [N, S, 4]
        boxes = b * scale + np.array([dx, dy, dx, dy])
        speaker_audio = arrays.get("speaker_audio")
        truth = {"mouth_open": arrays["mouth_open"][:, :n].tolist(), "actions": meta.get("actions", []),
                 "seed": meta.get("seed"), "split": meta.get("split")}
    else:
        sidecar = os.path.splitext(path)[0] + ".txt"
        prompt = open(sidecar).read().strip() if os.path.exists(sidecar) else cfg.default_prompt
    return RawClip(clip_id, frames, audio, speaker_audio, boxes, prompt, truth)


# ----------------------------------------------------------------------------- encoders


def vae_config(prepare_cfg) -> VAEConfig:
    """The config of the VAE `prepare` encodes with and generation decodes with (`prepare.vae`),
    without building it: `random:SEED` -> `prepare.vae_random`; a diffusers folder -> its
    config.json; "" (no VAE named yet, as the full configs) -> the released HunyuanVideo VAE's.
    Its `spatial_factor` (pixels per latent cell side) and `temporal_factor` (frames per latent)
    set the latent grid everything else is built on: masks, latent shapes, the portrait's grid."""
    spec = prepare_cfg.vae
    if spec.startswith("random"):
        return VAEConfig(**prepare_cfg.vae_random.to_dict())
    return read_vae_config(spec) if spec else HUNYUAN_VIDEO_VAE


def patch_grid(config) -> int:
    """Pixels per side of one DiT token: the VAE's spatial factor x the model's patch size (16 for
    the released 8x VAE and patch 2; 8 for a 4x VAE). Frame sizes must be multiples of it."""
    return vae_config(config.prepare).spatial_factor * DiTConfig.coerce(config.model).patch_size


def audio_window(chunk_seconds: float, fps: float, sample_rate: int) -> tuple[int, int, int]:
    """(chunk_frames, margin, window): each Wav2Vec2 call of `Encoders.audio_frame_chunks` reads
    `chunk_frames` video frames' audio plus `margin` samples (1 s) of context on each side, in a
    window of `window` samples."""
    chunk_frames = max(1, round(chunk_seconds * fps))
    margin = int(sample_rate)
    return chunk_frames, margin, math.ceil(chunk_frames * sample_rate / fps) + 2 * margin


def frame_positions(first_frame: int, num_frames: int, fps: float, sample_rate: int, first_sample: int,
                    window: int, num_features: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, w), each [num_frames]: video frame f (from `first_frame`) takes the Wav2Vec2 feature
    `feats[i0] * (1 - w) + feats[i1] * w` of a window of `window` samples starting at sample
    `first_sample` with `num_features` features (feature j sits at sample j x window / num_features)."""
    q = ((first_frame + np.arange(num_frames)) * (sample_rate / fps) - first_sample) * (num_features / window)
    i0 = np.clip(np.floor(q).astype(np.int64), 0, num_features - 1)
    i1 = np.minimum(i0 + 1, num_features - 1)
    return i0, i1, (q - i0).clip(0.0, 1.0).astype(np.float32)


class Encoders:
    """The frozen encoders of prepare, built from `config.prepare` (folders or seeded random
    tiny models for tests and the synthetic world) and jitted once."""

    def __init__(self, config):
        self.cfg = config.prepare
        self.model = DiTConfig.coerce(config.model)
        self._vae()
        self._wav2vec2()
        self._text()

    def _vae(self):
        spec = self.cfg.vae
        if spec.startswith("random"):
            vcfg = vae_config(self.cfg)
            model = CausalVAE(vcfg)
            dummy = jnp.zeros((1, 1, vcfg.spatial_factor, vcfg.spatial_factor, 3))
            seed = int(spec.partition(":")[2] or 0)
            params = nn.unbox(jax.jit(lambda k: model.init(k, dummy))(jax.random.key(seed)))["params"]  # encoder + decoder
        else:
            vcfg, params = load_diffusers_vae(spec)
            model = CausalVAE(vcfg)
        if vcfg.latent_channels != self.model.out_channels:
            raise ValueError(f"prepare.vae has {vcfg.latent_channels} latent channels, the model expects "
                             f"{self.model.out_channels}")
        self.vae_config, self.vae_params = vcfg, params
        # the one VAE regime: prepare encodes and generation decodes through the same `VAEStream`
        # (diffusers' temporal tiles, `prepare.vae_tiling`), the one `mi-jax train-vae` trains through
        self.vae_stream = VAEStream(model, Tiling(**dict(self.cfg.get("vae_tiling") or {})))

    def encode_video(self, frames: np.ndarray) -> np.ndarray:
        """uint8 `[1 + 4k, H, W, 3]` -> scaled latent means `[1 + k, h, w, C]`: the whole clip
        through `VAEStream` (a first tile, chunks, the end: equal to `VAEStream.encode` of the
        clip, compiled for a few shapes whatever the clip length; one frame: the portrait)."""
        s, p = self.vae_stream, self.vae_params
        video = jnp.asarray(frames, jnp.float32)[None] / 127.5 - 1.0
        if video.shape[1] < s.frames_first:
            means = [s.encode(p, video)[0]]
        else:
            (mean, _), state = s.encode_start(p, video[:, : s.frames_first])
            means, i = [mean], s.frames_first
            while video.shape[1] - i >= s.frames_per_chunk:
                (mean, _), state = s.encode_chunk(p, state, video[:, i : i + s.frames_per_chunk])
                means.append(mean)
                i += s.frames_per_chunk
            means.append(s.encode_end(p, state, video[:, i:] if i < video.shape[1] else None)[0])
        return np.concatenate([np.asarray(m[0]) for m in means]) * self.vae_config.scaling_factor

    def _wav2vec2(self):
        spec = self.cfg.wav2vec2
        if spec.startswith("random"):
            wcfg = Wav2Vec2Config(**self.cfg.wav2vec2_random.to_dict())
            model = Wav2Vec2(wcfg)
            seed = int(spec.partition(":")[2] or 0)
            params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), **example_inputs(wcfg)))["params"]
        else:
            wcfg, params = load_transformers_wav2vec2(spec)
            model = Wav2Vec2(wcfg)
        layers = list(self.cfg.audio_layers)
        if len(layers) != self.model.audio_feature_layers or wcfg.hidden_size != self.model.audio_feature_dim:
            raise ValueError(
                f"prepare.audio_layers picks {len(layers)} layers of {wcfg.hidden_size}; the model expects "
                f"audio_feature_layers={self.model.audio_feature_layers} x audio_feature_dim={self.model.audio_feature_dim}")
        if max(layers) > wcfg.num_hidden_layers:
            raise ValueError(f"prepare.audio_layers {layers}: the Wav2Vec2 has {wcfg.num_hidden_layers} layers")
        fn = jax.jit(lambda p, x: jnp.stack([model.apply({"params": p}, x).hidden_states[i] for i in layers], -2))
        self.w2v_params = params
        self._w2v = fn

    def audio_frame_chunks(self, audio: np.ndarray, fps: float) -> Iterator[np.ndarray]:
        """Wav2Vec2 features at video-frame times, streamed: `[samples]` (16 kHz mono) -> chunk
        after chunk of `[chunk_frames, n_layers, C]` (`chunk_frames = round(audio_chunk_seconds
        x fps)` video frames; ceil(frames / chunk_frames) chunks, where frames = the video frames
        the audio covers; past the audio's end the window reads zeros).

        The one audio path: generation reads it chunk by chunk (pipeline._AudioWindows) and
        prepare stores it (`audio_at_frames`), so a model trains on the features generation
        gives it. Every chunk is one Wav2Vec2 call on the same fixed window (`chunk` + 1 s of
        context on each side, normalised with the whole track's mean and variance, as
        `zero_mean_unit_var`), so one compilation serves every audio length and only the chunk
        being read is held. Feature j of a window sits at sample `j x window / Nf`; video
        frame f (time f / fps) takes the linear interpolation at its sample position.
        """
        sr = int(self.cfg.sample_rate)
        chunk_frames, margin, win = audio_window(self.cfg.audio_chunk_seconds, fps, sr)
        per_frame = sr / fps
        audio = np.asarray(audio, np.float32)
        n = len(audio)
        mean, std = mean_std(audio)  # zero_mean_unit_var's statistics, without a copy of the track
        scale = 1.0 / math.sqrt(std * std + 1e-7)
        frames = math.floor(n / per_frame + 1e-9)
        for c in range(max(1, math.ceil(frames / chunk_frames))):
            f0 = c * chunk_frames
            s0 = round(f0 * per_frame) - margin  # the window's first sample (may be < 0)
            segment = np.zeros(win, np.float32)
            lo, hi = max(s0, 0), min(s0 + win, n)
            if hi > lo:
                segment[lo - s0 : hi - s0] = (audio[lo:hi] - mean) * scale
            feats = np.asarray(self._w2v(self.w2v_params, segment[None])[0])  # [Nf, L, C]
            i0, i1, w = frame_positions(f0, chunk_frames, fps, sr, s0, win, len(feats))
            w = w[:, None, None]
            yield feats[i0] * (1.0 - w) + feats[i1] * w

    def audio_at_frames(self, audio: np.ndarray, fps: float, frames: int) -> np.ndarray:
        """`[frames, n_layers, C]`: `audio_frame_chunks` for the first `frames` video frames,
        zero after the audio's end (as generation pads)."""
        feats = np.concatenate(list(self.audio_frame_chunks(audio, fps)))[:frames]
        return np.pad(feats, ((0, frames - len(feats)), (0, 0), (0, 0)))

    def _text(self):
        spec = self.cfg.text_encoder
        if spec == "tiny":
            # runs saved before `text_vocabulary` existed lack it: no vocabulary, no unknown-word check
            enc = TinyTextEncoder(self.model.text_embed_dim, self.model.pooled_projection_dim, self.cfg.text_len,
                                  vocabulary=tuple(self.cfg.get("text_vocabulary", ())))
        else:
            enc = HunyuanTextEncoder.from_diffusers_folder(spec)
        if (enc.dim, enc.pooled_dim) != (self.model.text_embed_dim, self.model.pooled_projection_dim):
            raise ValueError(f"prepare.text_encoder gives {enc.dim}/{enc.pooled_dim}-dim states; the model expects "
                             f"text_embed_dim={self.model.text_embed_dim}, pooled={self.model.pooled_projection_dim}")
        self.text = enc


# ----------------------------------------------------------------------------- windows


def windows(clip: RawClip, enc: Encoders, cfg) -> Iterator[dict]:
    """The training windows of one decoded clip."""
    n = len(clip.frames)
    t, tf = cfg.latent_frames, enc.vae_config.temporal_factor  # frames per latent (4)
    f = 1 + tf * (t - 1)
    count = (n - 1) // (f - 1)
    if count < 1:
        raise ClipError(f"{n} frames at {cfg.fps} fps is shorter than one window of {f} frames "
                        f"({f / cfg.fps:.2f} s); use longer clips or a smaller prepare.latent_frames")
    s_max = cfg.speakers
    if clip.boxes is None:
        try:
            track = faces_lib.detect_faces(clip.frames, num_speakers=1)
        except ValueError as e:
            raise ClipError(f"no face: {e}") from None
        boxes = track
    else:
        boxes = clip.boxes
    speakers = boxes.shape[1]
    if speakers > s_max:
        raise ClipError(f"{speakers} speakers but prepare.speakers={s_max}")
    tracks = (clip.speaker_audio if clip.speaker_audio is not None and speakers > 1 else clip.audio[None])
    tracks = tracks[:, : len(clip.audio)]
    feats = [enc.audio_at_frames(a, cfg.fps, n) for a in tracks]  # S x [N, L, C], as generation reads them
    text = enc.text.encode([clip.prompt], clip.frames[:1])
    ref = enc.encode_video(clip.frames[:1])
    # one encode of the whole clip, windows cut from it: window k's latents are the clip's latents
    # k (T - 1) .. k (T - 1) + T - 1, what generation's stream of latents holds at those frames
    # (latent j > 0 codes frames 4j - 3 .. 4j; latent 0 of a window is replaced by the portrait)
    clip_latents = enc.encode_video(clip.frames[: 1 + tf * ((t - 1) * count)])
    sf = enc.vae_config.spatial_factor  # pixels per latent cell side (4 or 8)
    h, w = cfg.height // sf, cfg.width // sf
    for k in range(count):
        s0 = k * (f - 1)
        masks = faces_lib.masks_from_boxes(boxes[s0 : s0 + f], f, cfg.height, cfg.width, margin=cfg.face_margin,
                                           spatial=sf)
        speaker = np.zeros((s_max, t, h, w), np.uint8)
        speaker[:speakers] = masks.face
        audio = np.zeros((s_max, f) + feats[0].shape[1:], np.float16)
        for i, fe in enumerate(feats):
            audio[i] = fe[s0 : s0 + f]
        truth = dict(clip.truth)
        if "mouth_open" in truth:
            truth["mouth_open"] = [m[s0 : s0 + f] for m in clip.truth["mouth_open"]]
        yield dict(
            latents=clip_latents[k * (t - 1) : k * (t - 1) + t],
            ref_latent=ref,
            audio_states=audio if s_max > 1 else audio[0],
            text_embeds=text.prompt_embeds[0].astype(np.float16),
            text_mask=text.prompt_attention_mask[0].astype(np.int32),
            pooled=text.pooled[0].astype(np.float32),
            face_mask=masks.face.any(0).astype(np.uint8),
            mouth_mask=masks.mouth.any(0).astype(np.uint8),
            speaker_masks=speaker,
            clip_id=clip.clip_id,
            window=k,
            fps=float(cfg.fps),
            truth=dict(truth, prompt=clip.prompt, start_frame=s0),
        )


# ----------------------------------------------------------------------------- driver


def prepare(config, clips_dir: str, out_dir: str, *, progress: bool = True) -> dict:
    """Prepares every clip under `clips_dir` not yet in the store `out_dir`; returns the report
    (also written to `out_dir/prepare_report.json`)."""
    cfg = config.prepare
    grid = patch_grid(config)
    if cfg.height % grid or cfg.width % grid:
        sf = vae_config(cfg).spatial_factor
        raise ValueError(f"prepare size {cfg.height}x{cfg.width}: use multiples of {grid} (VAE {sf}x, "
                         f"patch {grid // sf})")
    clips = find_clips(clips_dir)
    os.makedirs(out_dir, exist_ok=True)
    done = done_clips(out_dir) if os.path.exists(os.path.join(out_dir, "manifest.json")) else set()
    todo = [(cid, p) for cid, p in clips if cid not in done]
    report = {"clips": len(clips), "already_done": len(clips) - len(todo), "prepared": [], "skipped": {},
              "windows": 0}
    if not todo:
        _write_report(out_dir, report)
        return report
    enc = Encoders(config)
    t0 = time.time()
    bar = tqdm(total=len(todo), unit="clip", disable=not progress, dynamic_ncols=True)
    with StoreWriter(out_dir, shard_size=cfg.shard_size) as writer, cf.ThreadPoolExecutor(cfg.workers) as pool:
        futures = [(cid, pool.submit(load_clip, cid, p, cfg)) for cid, p in todo]
        for cid, fut in futures:
            try:
                clip = fut.result()
                samples = list(windows(clip, enc, cfg))
                report["windows"] += writer.write_clip(cid, samples)
                report["prepared"].append(cid)
            except Exception as e:  # noqa: BLE001 - a bad clip never stops the run
                report["skipped"][cid] = f"{type(e).__name__}: {e}"
            bar.update(1)
            bar.set_postfix(ok=len(report["prepared"]), skipped=len(report["skipped"]),
                            clips_per_s=f"{bar.n / max(time.time() - t0, 1e-9):.2f}")
    bar.close()
    report["seconds"] = round(time.time() - t0, 1)
    _write_report(out_dir, report)
    return report


def _write_report(out_dir: str, report: dict) -> None:
    atomic.write_file(os.path.join(out_dir, "prepare_report.json"), json.dumps(report, indent=1).encode())
