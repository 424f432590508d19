"""Training a small causal VAE on the synthetic world (no pretrained VAE can be downloaded
here, and a random one cannot decode a face): `mi-jax train-vae --out DIR`.

Loss: L1 reconstruction of 1 + 4k-frame clips (the causal VAE's native length) plus a small KL
term (beta), AdamW. The result is written as a diffusers `AutoencoderKLHunyuanVideo` folder
(config.json + safetensors, through the export name map), so `prepare`, `generate` and PyTorch
all load it like the real HunyuanVideo VAE. The scaling factor is set from the data (1 / std
of the latent means), as Stable Diffusion's was.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn


def clip_batches(seed: int, batch: int, frames: int, size: tuple[int, int], seconds: float = 2.0,
                 weights: tuple[float, float] | None = None):
    """Endless batches `[B, frames, H, W, 3]` in [-1, 1] of random windows of synthetic clips.
    With `weights=(face, mouth)`, yields `(video, weight)`: weight `[B, frames, H, W, 1]` is
    1 + face inside the faces' masks + mouth inside the mouths' boxes (ground truth)."""
    from mi_jax.data import synthetic

    rng = np.random.default_rng(seed)
    prompts = ["", "nodding", "shaking head", "smiling", "looking left"]
    pool, i = [], 0
    while True:
        if len(pool) < 8 * batch or rng.random() < 0.25:
            c = synthetic.render_clip(int(rng.integers(0, 999_999)), seconds, size=size,
                                      prompt=prompts[i % len(prompts)], speakers=1 + int(rng.random() < 0.2))
            pool.append((c.frames, _region_weights(c, weights) if weights else None))
            pool = pool[-32 * batch:]
            i += 1
        out, wts = [], []
        for _ in range(batch):
            f, w = pool[int(rng.integers(len(pool)))]
            s = int(rng.integers(0, len(f) - frames + 1))
            out.append(f[s : s + frames])
            if w is not None:
                wts.append(w[s : s + frames])
        video = np.stack(out).astype(np.float32) / 127.5 - 1.0
        yield (video, np.stack(wts)[..., None]) if weights else video


def _region_weights(clip, weights: tuple[float, float]) -> np.ndarray:
    """float32 [T, H, W]: 1 + face x (any face mask) + mouth x (any mouth box)."""
    face, mouth = weights
    t, h, w, _ = clip.frames.shape
    out = 1.0 + face * clip.face_masks.any(0).astype(np.float32)
    ys, xs = np.arange(h)[None, :, None] + 0.5, np.arange(w)[None, None, :] + 0.5
    for boxes in clip.mouth_boxes:  # [T, 4] per speaker
        x0, y0, x1, y1 = (boxes[:, k, None, None] for k in range(4))
        out = out + mouth * ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1))
    return out.astype(np.float32)


def train_vae(config, out_dir: str, *, steps: int = 2000, batch: int = 4, frames: int = 5, lr: float = 2e-3,
              beta: float = 1e-6, seed: int = 0, log=print) -> dict:
    """Trains `VAEConfig(**config.prepare.vae_random)` at the prepare size; writes a diffusers
    VAE folder to `out_dir` (temp name + rename). Returns the final metrics."""
    from mi_jax.models.vae import CausalVAE, VAEConfig

    vcfg = VAEConfig(**config.prepare.vae_random.to_dict())
    model = CausalVAE(vcfg)
    size = (int(config.prepare.height), int(config.prepare.width))
    data = clip_batches(seed, batch, frames, size)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.asarray(next(data))))["params"]
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.warmup_cosine_decay_schedule(0, lr, min(100, steps // 2 + 1), max(steps, 2 * min(100, steps // 2 + 1)), lr * 0.05)))
    opt = tx.init(params)

    def loss_fn(p, x, key):
        mean, logvar = model.apply({"params": p}, x, method="encode")
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        recon = model.apply({"params": p}, z, method="decode")
        l1 = jnp.abs(recon - x).mean()
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        return l1 + beta * kl, (l1, kl)

    @jax.jit
    def step(p, o, x, key):
        (loss, (l1, kl)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, x, key)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, l1, kl

    t0, l1 = time.time(), float("nan")
    for i in range(steps):
        params, opt, l1, kl = step(params, opt, jnp.asarray(next(data)), jax.random.key(i))
        if (i + 1) % 100 == 0:
            log(f"vae step {i + 1}/{steps}: l1 {float(l1):.4f} kl {float(kl):.2f} ({(i + 1) / (time.time() - t0):.1f} steps/s)")
    # scaling factor: unit variance latents for the diffusion model
    means = [np.asarray(model.apply({"params": params}, jnp.asarray(next(data)), method="encode")[0]) for _ in range(8)]
    scaling = float(1.0 / np.concatenate([m.ravel() for m in means]).std())
    diffusers_cfg = dict(vcfg.to_diffusers(), scaling_factor=scaling, _class_name="AutoencoderKLHunyuanVideo")
    metrics = {"l1": float(l1), "scaling_factor": scaling, "steps": steps, "batch": batch, "size": list(size)}
    _write_vae(out_dir, params, diffusers_cfg, metrics)
    return metrics


def _write_vae(out_dir: str, params, diffusers_cfg: dict, metrics: dict) -> None:
    """A diffusers VAE folder (config.json + safetensors + training.json) written under a temp
    name, then renamed over `out_dir`: no partial folder is ever left at `out_dir`."""
    import shutil

    from mi_jax.convert.export import write_model
    from mi_jax.convert.vae import VAE_NAME_MAP

    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    write_model(tmp, params, VAE_NAME_MAP, diffusers_cfg, weights_name="diffusion_pytorch_model",
                dtype=np.float32, max_shard_size="1GB")
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(metrics, f)
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def refine_vae(vae_dir: str, *, steps: int = 600, batch: int = 4, frames: int = 5, lr: float = 5e-4,
               face_weight: float = 2.0, mouth_weight: float = 20.0, train_encoder: bool = True,
               beta: float = 1e-6, seed: int = 1, log=print) -> dict:
    """Phase 2 of the demo VAE: fine-tuning with an L1 loss weighted up on faces and, most, on
    mouths (ground-truth regions of the synthetic world). A uniform L1 spends a small VAE's
    capacity on background: the bundled VAE after phase 1 reconstructed ground-truth clips whose
    mouth opening correlated 0.99 with the voice as clips correlating ~0 (mouth opening measured
    from pixels, the eval's lip-sync measure), i.e. its latents dropped the mouth. Weighting the
    loss towards the regions that matter is the idea of the DiT's face / mouth loss weights.
    `train_encoder=False` tunes the decoder (and post-quant conv) alone, so latents, and stores
    prepared with this VAE, stay valid; with the encoder the scaling factor is re-measured.
    Rewrites `vae_dir` in place (temp name + rename); returns the metrics."""
    from mi_jax.convert.vae import load_diffusers_vae
    from mi_jax.models.vae import CausalVAE

    vcfg, params = load_diffusers_vae(vae_dir)
    with open(os.path.join(vae_dir, "config.json")) as f:
        diffusers_cfg = json.load(f)
    model = CausalVAE(vcfg)
    # the frame size the VAE was trained at (train_vae records it)
    data = clip_batches(seed, batch, frames, _trained_size(vae_dir), weights=(face_weight, mouth_weight))
    tuned = ("decoder", "post_quant_conv") + (("encoder", "quant_conv") if train_encoder else ())
    trainable = {k: v for k, v in params.items() if k in tuned}
    frozen = {k: v for k, v in params.items() if k not in trainable}
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(optax.cosine_decay_schedule(lr, max(steps, 1), 0.05)))
    opt = tx.init(trainable)

    def loss_fn(t, x, w, key):
        p = {**frozen, **t}
        mean, logvar = model.apply({"params": p}, x, method="encode")
        if not train_encoder:
            mean, logvar = jax.lax.stop_gradient((mean, logvar))
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
        err = jnp.abs(model.apply({"params": p}, z, method="decode") - x)
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        return (err * w).sum() / (w.sum() * x.shape[-1]) + beta * kl, err.mean()

    @jax.jit
    def step(t, o, x, w, key):
        (loss, l1), g = jax.value_and_grad(loss_fn, has_aux=True)(t, x, w, key)
        u, o = tx.update(g, o, t)
        return optax.apply_updates(t, u), o, loss, l1

    t0, loss, l1 = time.time(), float("nan"), float("nan")
    for i in range(steps):
        x, w = next(data)
        trainable, opt, loss, l1 = step(trainable, opt, jnp.asarray(x), jnp.asarray(w), jax.random.key(10_000 + i))
        if (i + 1) % 50 == 0:
            log(f"refine step {i + 1}/{steps}: weighted l1 {float(loss):.4f} l1 {float(l1):.4f} "
                f"({(i + 1) / (time.time() - t0):.2f} steps/s)")
    params = {**frozen, **trainable}
    if train_encoder:  # latents moved: unit-variance latents again (as train_vae)
        means = [np.asarray(model.apply({"params": params}, jnp.asarray(next(data)[0]), method="encode")[0])
                 for _ in range(8)]
        diffusers_cfg["scaling_factor"] = float(1.0 / np.concatenate([m.ravel() for m in means]).std())
    metrics = {}
    if os.path.exists(os.path.join(vae_dir, "training.json")):
        with open(os.path.join(vae_dir, "training.json")) as f:
            metrics = json.load(f)
    metrics["refine"] = {"steps": steps, "batch": batch, "face_weight": face_weight, "mouth_weight": mouth_weight,
                         "train_encoder": train_encoder, "weighted_l1": float(loss), "l1": float(l1),
                         "scaling_factor": diffusers_cfg["scaling_factor"]}
    _write_vae(vae_dir, params, diffusers_cfg, metrics)
    return metrics


def _trained_size(vae_dir: str) -> tuple[int, int]:
    with open(os.path.join(vae_dir, "training.json")) as f:
        size = json.load(f).get("size", [64, 64])
    return int(size[0]), int(size[1])
