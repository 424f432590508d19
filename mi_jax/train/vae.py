"""Training a small causal VAE on the synthetic world (no pretrained VAE can be downloaded
here, and a random one cannot decode a face): `mi-jax train-vae --out DIR`.

One regime with generation. HunyuanVideo's VAE normalises with GroupNorm statistics over the
whole clip (T x H x W), so what it does to a frame depends on the clip length it is given, and
`VAEStream`'s decode tiles begin with a 4-frame latent decoded as if it were a lone first frame:
what a VAE learns on one clip length does not hold on another. So every clip is encoded
and decoded through the `VAEStream` of `prepare.vae_tiling` (`round_trip`), the one `prepare`
and generation use, at the lengths of `vae_train.lengths` (default `vae_regime_lengths`):

* mostly 1 + `tile_sample_min_num_frames` frames (17 at diffusers' default), or clips of several
  tiles when the tiles are shorter (the demo's 5-frame tiles on 17-frame clips);
* the shorter 1 + 4k frame counts (a clip's last tile, clips shorter than a tile);
* the portrait: generation encodes the portrait alone (one frame) and decodes it as latent 0 of
  the first tile, followed by latents of a whole-clip encode; with probability
  `portrait_fraction` a clip's latent 0 comes from encoding its first frame alone, as there.

Start: `vae_train.init` (a VAE to fine-tune, widened if needed: `start_from`), then optionally
`vae_train.temporal_init` (`temporal_init`: causal kernels that make each latent from its own
frames, so the mouth is not drawn a latent late).

Curriculum: `vae_train.image_steps` steps on single frames at `image_batch` first (spatial
detail, cheap: a lone frame costs a 2-D convolution), then `steps` steps on clips through the
stream (time): the image-then-video order of video VAEs. Between the two, `temporal_init` again
(when set): the image stage moves every temporal tap alike, so that latents would read earlier
latents' frames. In the clip stage the rate is
`clip_learning_rate` (0: the same) and every `image_every`-th batch is images (0: none).

Loss: L1 weighted up on the regions the eval and a viewer look at (ground truth of the synthetic
world): 1 + face x (face mask) + mouth x (mouth box) + eyes x (eye band), plus `grad_weight` x
the same weighted L1 on the frames' x / y differences (edges: the eyes), plus a small KL term
(beta); AdamW with warm-up, then a constant rate or cosine decay (`schedule`). The weights keep
the small VAE's capacity on the face rather than the background.

Resumable and deterministic: batch i and the noise of step i are functions of (seed, i) only,
and the state is checkpointed every `checkpoint_every` steps (atomically) in `work_dir`, so a
run killed and started again ends with the same weights as one that was never stopped.

The result is written as a diffusers `AutoencoderKLHunyuanVideo` folder (config.json +
safetensors, through the export name map), so `prepare`, `generate` and PyTorch all load it like
the real HunyuanVideo VAE. The scaling factor is set from the data (1 / std of the latent means
of whole-clip `VAEStream` encodes, as `prepare` stores them).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import serialization

from mi_jax import atomic
from mi_jax.convert.export import write_model
from mi_jax.convert.vae import VAE_NAME_MAP, load_diffusers_vae
from mi_jax.data import synthetic
from mi_jax.models.vae import CausalVAE, Tiling, VAEConfig, VAEStream, split_moments


def vae_regime_lengths(config: VAEConfig, tiling: Tiling = Tiling()) -> tuple[int, ...]:
    """Clip lengths (frames) `VAEStream` runs the VAE at: its tile, then the shorter 1 + 4k."""
    tile = tiling.tile_sample_min_num_frames + 1
    return tuple(range(tile, 0, -config.temporal_factor))


class ClipPool:
    """A fixed pool of synthetic training clips (seeded, train split) and deterministic batches.

    `batch(i)` -> (video [B, T, H, W, 3] in [-1, 1], weight [B, T, H, W, 1], portrait [B] bool):
    a function of (seed, i) alone. T is drawn per step from `lengths` (the first, the tile, with
    probability `tile_fraction`, the others evenly)."""

    def __init__(self, seed: int, size: tuple[int, int], *, clips: int = 384, seconds: float = 2.0,
                 lengths: tuple[int, ...] = (17, 13, 9, 5, 1), tile_fraction: float = 0.7,
                 weights: tuple[float, float, float] = (2.0, 10.0, 10.0), portrait_fraction: float = 0.5):
        rng = np.random.default_rng([seed, 7])
        seeds = rng.choice(synthetic.HELDOUT_SEED_START, clips, replace=False)
        prompts = synthetic.TRAINING_PROMPTS
        self.clips = [synthetic.render_clip(int(s), seconds, size=size, prompt=prompts[j % len(prompts)],
                                            speakers=1 + int(j % 10 == 9)) for j, s in enumerate(seeds)]
        self.seed, self.lengths, self.tile_fraction = seed, tuple(lengths), tile_fraction
        self.weights, self.portrait_fraction = weights, portrait_fraction

    def length(self, i: int) -> int:
        """The clip length in frames of batch `i` (a function of the seed and `i` only)."""
        rng = np.random.default_rng([self.seed, 11, i])
        if len(self.lengths) == 1 or rng.random() < self.tile_fraction:
            return self.lengths[0]
        return int(self.lengths[1 + rng.integers(len(self.lengths) - 1)])

    def images(self, i: int, batch: int):
        """Image batch `i` (the image stage): `batch(i, batch)`'s triple for single frames drawn
        from any clip and time, `[B, 1, H, W, 3]`; a function of the seed and `i` only."""
        rng = np.random.default_rng([self.seed, 17, i])
        video, weight = [], []
        for _ in range(batch):
            clip = self.clips[int(rng.integers(len(self.clips)))]
            s = int(rng.integers(len(clip.frames)))
            video.append(clip.frames[s : s + 1])
            weight.append(region_weights(clip, self.weights, slice(s, s + 1)))
        return (np.stack(video).astype(np.float32) / 127.5 - 1.0, np.stack(weight)[..., None],
                np.zeros(batch, bool))

    def batch(self, i: int, batch: int):
        """Batch `i`: float32 video `[B, T, H, W, 3]` in [-1, 1], loss weights `[B, T, H, W, 1]` and
        bool `[B]` (latent 0 from the first frame alone); a function of the seed and `i` only."""
        frames = self.length(i)
        rng = np.random.default_rng([self.seed, 13, i])
        video, weight = [], []
        for _ in range(batch):
            clip = self.clips[int(rng.integers(len(self.clips)))]
            s = int(rng.integers(0, len(clip.frames) - frames + 1))
            video.append(clip.frames[s : s + frames])
            weight.append(region_weights(clip, self.weights, slice(s, s + frames)))
        portrait = rng.random(batch) < self.portrait_fraction
        return (np.stack(video).astype(np.float32) / 127.5 - 1.0, np.stack(weight)[..., None], portrait)


def region_weights(clip, weights: tuple[float, float, float], frames: slice = slice(None)) -> np.ndarray:
    """float32 [T, H, W]: 1 + face x (any face mask) + mouth x (any mouth box) + eyes x (any eye band)."""
    face, mouth, eyes = weights
    masks = clip.face_masks[:, frames]
    t, h, w = masks.shape[1:]
    out = 1.0 + face * masks.any(0).astype(np.float32)
    ys, xs = np.arange(h)[None, :, None] + 0.5, np.arange(w)[None, None, :] + 0.5
    for weight, all_boxes in ((mouth, clip.mouth_boxes), (eyes, clip.eye_boxes)):
        for boxes in all_boxes[:, frames]:  # [T, 4] per speaker
            x0, y0, x1, y1 = (boxes[:, k, None, None] for k in range(4))
            out = out + weight * ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1))
    return out.astype(np.float32)


def start_from(folder: str, vcfg: VAEConfig, fresh: dict) -> dict:
    """The parameters of the diffusers VAE in `folder` as a start for `vcfg` (fine-tuning a
    pretrained VAE, as video models start from HunyuanVideo's). Same architecture but more
    latent channels: the VAE is widened so that it still decodes exactly as before (new encoder
    outputs from the fresh init `fresh`, with a small posterior noise; the decoder's weights on
    them zero, pass-through 1x1 quant convs), and training teaches the new channels what the
    old ones dropped."""
    old_cfg, old = load_diffusers_vae(folder)
    c, n = old_cfg.latent_channels, vcfg.latent_channels
    arch = lambda cfg, **kw: {k: v for k, v in dict(cfg.to_diffusers(), **kw).items() if k != "scaling_factor"}  # noqa: E731
    same = arch(old_cfg, latent_channels=n) == arch(vcfg)
    if not same or n < c:
        raise ValueError(f"vae_train.init={folder}: a VAE of another architecture ({old_cfg.to_diffusers()}); "
                         f"it can only start one that differs by more latent channels ({vcfg.to_diffusers()})")
    if n == c:
        return old
    out = jax.tree.map(np.asarray, old)
    var_old, var_new = slice(n, n + c), slice(n + c, 2 * n)
    k_out, b_out = (np.array(fresh["encoder"]["conv_out"]["conv"][k]) for k in ("kernel", "bias"))
    k_out[..., :c], b_out[:c] = old["encoder"]["conv_out"]["conv"]["kernel"][..., :c], old["encoder"]["conv_out"]["conv"]["bias"][:c]
    k_out[..., var_old], b_out[var_old] = (old["encoder"]["conv_out"]["conv"][k][..., c:] for k in ("kernel", "bias"))
    k_out[..., var_new], b_out[var_new] = 0.0, -8.0  # new channels: posterior std e^-4 to start
    out["encoder"]["conv_out"]["conv"] = {"kernel": k_out, "bias": b_out}
    index = np.r_[0:c, n : n + c]  # the old mean / logvar channels among the new 2n
    for name, rows, width in (("quant_conv", index, 2 * n), ("post_quant_conv", np.arange(c), n)):
        kernel = np.zeros((1, 1, 1, width, width), np.float32)
        kernel[0, 0, 0, np.arange(width), np.arange(width)] = 1.0  # new channels pass through
        kernel[0, 0, 0][np.ix_(rows, rows)] = old[name]["kernel"][0, 0, 0]
        bias = np.zeros(width, np.float32)
        bias[rows] = old[name]["bias"]
        out[name] = {"kernel": kernel, "bias": bias}
    k_in = np.zeros(fresh["decoder"]["conv_in"]["conv"]["kernel"].shape, np.float32)
    k_in[..., :c, :] = old["decoder"]["conv_in"]["conv"]["kernel"]
    out["decoder"]["conv_in"]["conv"] = dict(out["decoder"]["conv_in"]["conv"], kernel=k_in)
    return jax.tree.map(jnp.asarray, out)


def temporal_init(params, config: VAEConfig) -> dict:
    """`params` with every 3-tap causal temporal kernel replaced by one that computes exactly the
    same on a still clip (the taps' sum: a still clip's frames are equal) and makes the VAE a
    per-frame coder in time: latent k is frame 4k (the newest of its own frames 4k-3 .. 4k) and
    the decoder draws frames 4k-3 .. 4k as the linear blend from latent k-1 to latent k.

    Plain convolutions put the sum on the current frame; the encoder's time-strided downsamplers
    put it on the newest frame of their window (two of them: every 4th frame); the decoder's
    time upsamplers, which repeat each frame, split it over the current and the previous frame
    (two of them: blends of 1/4, 1/2, 3/4, 1), so motion is spread over a latent's frames
    without delay instead of jumping at every 4th frame.

    Why: a VAE trained mostly on short clips learns taps of equal weight, and with the causal
    replicate padding every layer then multiplies the weight of a clip's first frame, so each
    latent is drawn from the previous latent's frames; and kernels on the current frame alone
    make the decoder repeat a latent over its 4 frames (benchmarks/vae_regime.py measures both).
    Images are unchanged; training through the stream then starts from a VAE that maps each
    latent to its own frames and moves between latents smoothly.

    Args:
      params: the VAE's parameters.
      config: its `VAEConfig` (which blocks resample in time).

    Returns:
      The parameters with the new temporal kernels (jax arrays).
    """
    up = {f"up_blocks_{i}" for i, (t, _) in enumerate(config.resample_factors) if t > 1}  # the time upsamplers

    def fix(path, v):
        v = np.asarray(v)
        if v.ndim != 5 or v.shape[0] != 3:
            return v
        keys = [str(getattr(k, "key", k)) for k in path]
        out = np.zeros_like(v)
        if keys[0] == "decoder" and "upsamplers_0" in keys and up & set(keys):
            out[1] = out[2] = v.sum(0) / 2
        else:  # the encoder's strided downsamplers too: tap 2 is the newest frame of their window
            out[2] = v.sum(0)
        return out

    return jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(fix, params))


def round_trip(stream: VAEStream, p, x, portrait, key=None):
    """video [B, T, H, W, 3] -> (reconstruction, mean, logvar) through `stream`, the `VAEStream`
    that `prepare` encodes and generation decodes with (its temporal tiles; a clip shorter than
    a tile is one pass). `portrait` [B] bool: latent 0 is the first frame encoded alone, as
    generation encodes a portrait. `key`: draws the posterior sample (None: its mean)."""
    z, mean, logvar = _posterior(stream.vae, p, x, *stream.encode(p, x), portrait, key)
    return stream.decode(p, z), mean, logvar


def _posterior(model, p, x, mean, logvar, portrait, key):
    """(z, mean, logvar) of a clip's encoding: latent 0 replaced by the first frame encoded alone
    where `portrait`, z drawn with `key` (None: the mean)."""
    m1, lv1 = model.apply({"params": p}, x[:, :1], method="encode")
    first = portrait[:, None, None, None, None]
    mean = jnp.concatenate([jnp.where(first, m1, mean[:, :1]), mean[:, 1:]], axis=1)
    logvar = jnp.concatenate([jnp.where(first, lv1, logvar[:, :1]), logvar[:, 1:]], axis=1)
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    return z, mean, logvar


def tile_round_trip(stream: VAEStream, p, x, portrait, key=None):
    """`round_trip` for tilings whose temporal tiles do not overlap (stride == min: the demo's
    5-frame tiles), with all tiles of a clip coded as one batch instead of a `lax.scan` over
    them, which is faster on CPU; equal to `round_trip` (tests/test_vae_regime.py)."""
    t, cfg = stream.tiling, stream.config
    m = t.tile_sample_min_num_frames
    if t.tile_sample_stride_num_frames != m:
        raise ValueError(f"tile_round_trip needs non-overlapping temporal tiles (stride == min), got min "
                         f"{m} / stride {t.tile_sample_stride_num_frames}; use round_trip")
    b, n = x.shape[:2]
    k, rest = divmod(n - 1, m)
    if k <= 1 or rest:  # one tile (one pass), a shorter last tile or a bad length: the stream's scan (and errors)
        return round_trip(stream, p, x, portrait, key)
    model = stream.vae

    def tiles(seq, size):  # [B, n, ...] -> the k tiles of size + 1 starting every `size`, [B * k, size + 1, ...]
        idx = (jnp.arange(k) * size)[:, None] + jnp.arange(size + 1)
        out = seq[:, idx]
        return out.reshape(b * k, *out.shape[2:])

    def join(out):  # [B * k, L, ...] -> every tile's outputs but the first tile's dropped first one
        out = out.reshape(b, k, *out.shape[1:])
        return jnp.concatenate([out[:, 0], out[:, 1:, 1:].reshape(b, -1, *out.shape[3:])], axis=1)

    mean, logvar = split_moments(join(model.apply({"params": p}, tiles(x, m), method="moments")))
    z, mean, logvar = _posterior(model, p, x, mean, logvar, portrait, key)
    y = join(model.apply({"params": p}, tiles(z, m // cfg.temporal_factor), method="decode"))
    return y, mean, logvar


def make_vae_step(model: CausalVAE, tx, beta: float, tiling: Tiling = Tiling(), grad_weight: float = 0.0):
    """`step(params, opt, video, weight, portrait, key) -> (params, opt, metrics)`, jitted: the
    weighted L1 of `round_trip` through the `VAEStream` of `tiling` (as `tile_round_trip`, one
    batch of tiles, when the tiles do not overlap; single frames: one encode and decode), plus
    `grad_weight` x the weighted L1 of the frames' forward differences in x and y: plain L1
    is content with a blur, and a blur draws no eyes."""
    stream = VAEStream(model, tiling)
    tiled = tiling.tile_sample_stride_num_frames == tiling.tile_sample_min_num_frames

    def code(p, x, portrait, key):
        if x.shape[1] > 1:
            return (tile_round_trip if tiled else round_trip)(stream, p, x, portrait, key)
        mean, logvar = model.apply({"params": p}, x, method="encode")  # an image: one pass, as the stream
        z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        return model.apply({"params": p}, z, method="decode"), mean, logvar

    def weighted_l1(err, w):
        return (err * w).sum() / (w.sum() * err.shape[-1])

    def loss_fn(p, x, w, portrait, key):
        y, mean, logvar = code(p, x, portrait, key)
        err = jnp.abs(y - x)
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        weighted = weighted_l1(err, w)
        d = y - x
        grad = (weighted_l1(jnp.abs(jnp.diff(d, axis=2)), w[:, :, 1:]) +
                weighted_l1(jnp.abs(jnp.diff(d, axis=3)), w[:, :, :, 1:])) / 2
        loss = weighted + grad_weight * grad + beta * kl
        return loss, {"weighted_l1": weighted, "l1": err.mean(), "grad_l1": grad, "kl": kl}

    @jax.jit
    def step(p, o, x, w, portrait, key):
        (_, metrics), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, w, portrait, key)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, metrics

    return step


def train_vae(config, out_dir: str, *, work_dir: str | None = None, log=print, **overrides) -> dict:
    """Trains the small VAE of the synthetic world and writes it as a diffusers VAE folder.

    `mi-jax train-vae`. Resumable: a second call resumes from `work_dir`, which is removed once
    `out_dir` is written (temp name + rename).

    Args:
      config: a run config; `VAEConfig(**config.prepare.vae_random)` is trained at
        `prepare.height x prepare.width` through `prepare.vae_tiling` with `config.vae_train`.
      out_dir: the diffusers `AutoencoderKLHunyuanVideo` folder to write.
      work_dir: checkpoints (default None: `out_dir + ".train"`).
      log: where progress lines go (default `print`).
      **overrides: `vae_train` settings that win over the config's (`steps`, `seed`, `init`,
        `learning_rate`, ...).

    Returns:
      The final metrics (`weighted_l1`, `l1`, `kl`), `scaling_factor`, the settings and the wall
      time; also in `out_dir/training.json`.

    Raises:
      ValueError: an unknown override or schedule, a `work_dir` holding a run with other
        settings, or an `init` VAE of another architecture.
    """
    t = dict(config.vae_train.to_dict(), **overrides)
    unknown = set(overrides) - set(config.vae_train.to_dict())
    if unknown:
        raise ValueError(f"train_vae: unknown setting(s) {sorted(unknown)}; known: {sorted(config.vae_train)}")
    vcfg = VAEConfig(**config.prepare.vae_random.to_dict())
    model = CausalVAE(vcfg)
    size = (int(config.prepare.height), int(config.prepare.width))
    tiling = Tiling(**dict(config.prepare.get("vae_tiling") or {}))
    lengths = tuple(t["lengths"]) or vae_regime_lengths(vcfg, tiling)
    work_dir = work_dir or out_dir.rstrip("/") + ".train"
    steps, seed = int(t["steps"]), int(t["seed"])
    image_steps, image_batch = int(t["image_steps"]), int(t["image_batch"])
    total = image_steps + steps
    schedule = learning_rate_schedule(t["schedule"], float(t["learning_rate"]), total)  # checked before any work
    clip_lr, image_every = t["clip_learning_rate"], int(t["image_every"])
    if clip_lr:  # the clip stage at its own rate: at batch 2 the image stage's rate undid its detail
        schedule = _scaled_after(schedule, image_steps, float(clip_lr) / float(t["learning_rate"]))
    pool = ClipPool(seed, size, clips=int(t["clips"]), lengths=lengths, tile_fraction=float(t["tile_fraction"]),
                    weights=(float(t["face_weight"]), float(t["mouth_weight"]), float(t["eye_weight"])),
                    portrait_fraction=float(t["portrait_fraction"]))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 1, *size, 3))))["params"]
    if t["init"]:
        params = start_from(t["init"], vcfg, params)
    if t["temporal_init"]:
        params = temporal_init(params, vcfg)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))
    state = {"params": params, "opt": tx.init(params), "step": 0, "seconds": 0.0}
    record = {"settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in t.items()},
              "lengths": list(lengths), "tiling": dataclasses.asdict(tiling), "vae": vcfg.to_diffusers(), "size": list(size)}
    state = _resume(work_dir, state, record, log)
    step = make_vae_step(model, tx, float(t["beta"]), tiling, float(t["grad_weight"]))
    every, batch = int(t["checkpoint_every"]), int(t["batch"])
    t0, start, metrics, before = time.time(), state["step"], {}, float(state["seconds"])  # earlier runs' time
    params, opt = state["params"], state["opt"]
    for i in range(start, total):
        if i == image_steps > 0 and t["temporal_init"]:
            # images train only each temporal kernel's sum (a still frame's taps see the same
            # input), and that sum is all `temporal_init` keeps: the clips start from latents of
            # their own frames again, with nothing of the image stage lost
            params = temporal_init(params, vcfg)
        # the image stage (single frames: spatial detail at a high batch), then clips through the stream
        # (in the clip stage every `image_every`-th batch is images again, which keeps the detail)
        image = i < image_steps or (image_every and (i - image_steps) % image_every == image_every - 1)
        video, weight, portrait = pool.images(i, image_batch) if image else pool.batch(i - image_steps, batch)
        params, opt, metrics = step(params, opt, jnp.asarray(video), jnp.asarray(weight), jnp.asarray(portrait),
                                    jax.random.fold_in(jax.random.key(seed), i))
        done = i + 1
        if done % every == 0 or done == total:
            metrics = {k: float(v) for k, v in metrics.items()}
            seconds = before + time.time() - t0
            state = {"params": params, "opt": opt, "step": done, "seconds": seconds}
            _checkpoint(work_dir, state, record, metrics)
            stage = f"{'image' if image else 'clip'} at {float(schedule(i)):.1e}"
            log(f"vae step {done}/{total} ({stage}): weighted l1 {metrics['weighted_l1']:.4f} l1 {metrics['l1']:.4f} "
                f"grad l1 {metrics['grad_l1']:.4f} kl {metrics['kl']:.2f} ({(done - start) / (time.time() - t0):.2f} steps/s)")
    if start >= total:
        metrics = record.get("last_metrics", {})
    # scaling factor: unit-variance latents as `prepare` stores them (whole-clip VAEStream encodes)
    stream = VAEStream(model, tiling)
    n = 1 + vcfg.temporal_factor * 12  # 13 latents of each clip
    means = [np.asarray(stream.encode(params, jnp.asarray(c.frames[None, :n], jnp.float32) / 127.5 - 1)[0])
             for c in pool.clips[:16]]
    scaling = float(1.0 / np.concatenate([m.ravel() for m in means]).std())
    diffusers_cfg = dict(vcfg.to_diffusers(), scaling_factor=scaling, _class_name="AutoencoderKLHunyuanVideo")
    out = dict(metrics, scaling_factor=scaling, steps=steps, image_steps=image_steps, batch=batch, size=list(size), lengths=list(lengths),
               seed=seed, wall_seconds=round(float(state["seconds"]), 1),
               settings=record["settings"])
    _write_vae(out_dir, params, diffusers_cfg, out)
    shutil.rmtree(work_dir, ignore_errors=True)
    return out


def learning_rate_schedule(kind: str, lr: float, steps: int) -> optax.Schedule:
    """AdamW's rate over `steps`: a linear warm-up over the first 100 steps (or half the run),
    then `"constant"`, or `"cosine"` decay to 5 % at `steps`.

    Why constant is offered: on the small VAE a decay that ends with the run stopped learning
    detail and colour before they were there; a constant rate kept improving.

    Raises:
      ValueError: an unknown `kind`.
    """
    warmup = min(100, steps // 2 + 1)
    if kind == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
    if kind == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, 2 * warmup), lr * 0.05)
    raise ValueError(f"vae_train.schedule={kind!r}; choose 'constant' or 'cosine'")


def _scaled_after(schedule: optax.Schedule, boundary: int, factor: float) -> optax.Schedule:
    """`schedule` times `factor` from step `boundary` on."""
    return lambda step: schedule(step) * jnp.where(step < boundary, 1.0, factor)


def _resume(work_dir: str, state: dict, record: dict, log) -> dict:
    """The checkpointed state in `work_dir` if it was written by the same settings; else `state`."""
    path = os.path.join(work_dir, "state.msgpack")
    if not os.path.exists(path):
        return state
    with open(os.path.join(work_dir, "record.json")) as f:
        saved = json.load(f)
    keys = ("settings", "lengths", "tiling", "vae", "size")
    if {k: saved.get(k) for k in keys} != {k: json.loads(json.dumps(record[k])) for k in keys}:
        raise ValueError(f"{work_dir} holds a VAE run with other settings; remove it to start over "
                         f"(saved {saved.get('settings')}, asked {record['settings']})")
    with open(path, "rb") as f:
        state = serialization.from_bytes(state, f.read())
    record["last_metrics"] = saved.get("last_metrics", {})
    log(f"vae: resuming from step {int(state['step'])} ({work_dir})")
    return state


def _checkpoint(work_dir: str, state: dict, record: dict, metrics: dict) -> None:
    """state.msgpack, then record.json, each written to a temp name and renamed (a kill between
    the two leaves the previous step's record: same settings, so the state still resumes)."""
    rec = dict(record, last_metrics=metrics, step=int(state["step"]))
    atomic.write_file(os.path.join(work_dir, "state.msgpack"), serialization.to_bytes(state))
    atomic.write_file(os.path.join(work_dir, "record.json"), json.dumps(rec).encode())


def _write_vae(out_dir: str, params, diffusers_cfg: dict, metrics: dict) -> None:
    """A diffusers VAE folder (config.json + safetensors + training.json), written whole or not
    at all (`atomic.folder`)."""
    with atomic.folder(out_dir) as tmp:
        write_model(tmp, params, VAE_NAME_MAP, diffusers_cfg, weights_name="diffusion_pytorch_model",
                    dtype=np.float32, max_shard_size="1GB")
        with open(os.path.join(tmp, "training.json"), "w") as f:
            json.dump(metrics, f)
