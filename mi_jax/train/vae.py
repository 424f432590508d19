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


def clip_batches(seed: int, batch: int, frames: int, size: tuple[int, int], seconds: float = 2.0):
    """Endless batches `[B, frames, H, W, 3]` in [-1, 1] of random windows of synthetic clips."""
    from mi_jax.data import synthetic

    rng = np.random.default_rng(seed)
    prompts = ["", "nodding", "shaking head", "smiling", "looking left"]
    pool, i = [], 0
    while True:
        if len(pool) < 8 * batch or rng.random() < 0.25:
            c = synthetic.render_clip(int(rng.integers(0, 999_999)), seconds, size=size,
                                      prompt=prompts[i % len(prompts)], speakers=1 + int(rng.random() < 0.2))
            pool.append(c.frames)
            pool = pool[-32 * batch:]
            i += 1
        out = []
        for _ in range(batch):
            f = pool[int(rng.integers(len(pool)))]
            s = int(rng.integers(0, len(f) - frames + 1))
            out.append(f[s : s + frames])
        yield np.stack(out).astype(np.float32) / 127.5 - 1.0


def train_vae(config, out_dir: str, *, steps: int = 2000, batch: int = 4, frames: int = 5, lr: float = 2e-3,
              beta: float = 1e-6, seed: int = 0, log=print) -> dict:
    """Trains `VAEConfig(**config.prepare.vae_random)` at the prepare size; writes a diffusers
    VAE folder to `out_dir` (temp name + rename). Returns the final metrics."""
    from mi_jax.convert.export import write_model
    from mi_jax.convert.vae import VAE_NAME_MAP
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
    tmp = out_dir.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    write_model(tmp, params, VAE_NAME_MAP, diffusers_cfg, weights_name="diffusion_pytorch_model",
                dtype=np.float32, max_shard_size="1GB")
    metrics = {"l1": float(l1), "scaling_factor": scaling, "steps": steps}
    with open(os.path.join(tmp, "training.json"), "w") as f:
        json.dump(metrics, f)
    if os.path.exists(out_dir):
        import shutil

        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return metrics
