"""Is the input pipeline fast enough? Loader throughput against the tiny DiT's training rate.

    .venv/bin/python benchmarks/loader_throughput.py [--batch 8] [--frames 4] [--workers 0]

Writes a store of tiny-config-sized windows (latents [T, 8, 8, 4], audio [1 + 4(T-1), 12, 768]
fp16, text [16, 32] fp16, pooled [16]), then measures, in one run on the same machine:

  loader    samples/s of Loader -> to_global (batches placed on the mesh, blocked until ready)
  consumer  samples/s of a jitted tiny-DiT train step (flow-matching loss, forward + backward +
            SGD update; audio path on, token_replace conditioning) on data already on device
  ratio     loader / consumer; >= 10 means the step, not the input, sets the pace

and finally the two together (loader feeding the step), to show the pipeline's overhead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mi_jax.config_utils import load_config  # noqa: E402
from mi_jax.data.loader import Loader, LoaderConfig, to_global  # noqa: E402
from mi_jax.data.store import StoreWriter  # noqa: E402
from mi_jax.diffusion import flow  # noqa: E402
from mi_jax.diffusion.conditions import conditions, dit_inputs  # noqa: E402
from mi_jax.models import DiT, DiTConfig  # noqa: E402
from mi_jax.parallel.mesh import make_mesh  # noqa: E402

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "hunyuan_video_i2v.py")


def write_store(directory: str, cfg: DiTConfig, windows: int, frames: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    f, hw, text_len = 1 + 4 * (frames - 1), 8, 16

    def window(i):
        return dict(
            latents=rng.standard_normal((frames, hw, hw, cfg.in_channels), np.float32),
            ref_latent=rng.standard_normal((1, hw, hw, cfg.in_channels), np.float32),
            audio_states=rng.standard_normal((f, cfg.audio_feature_layers, cfg.audio_feature_dim)).astype(np.float16),
            text_embeds=rng.standard_normal((text_len, cfg.text_embed_dim)).astype(np.float16),
            text_mask=(np.arange(text_len) < 12).astype(np.int32),
            pooled=rng.standard_normal(cfg.pooled_projection_dim).astype(np.float32),
            face_mask=np.ones((frames, hw, hw), np.uint8),
            mouth_mask=np.zeros((frames, hw, hw), np.uint8),
            speaker_masks=np.ones((1, frames, hw, hw), np.uint8),
            window=i,
            fps=25.0,
            truth={"mouth_open": rng.random(f).round(3).tolist()},
        )

    with StoreWriter(directory, shard_size=64) as writer:
        for c in range(windows // 4):
            writer.write_clip(f"clip{c:05d}", [window(i) for i in range(4)])


def make_train_step(cfg: DiTConfig):
    model = DiT(cfg)

    def loss_fn(params, batch, rng):
        b = batch["latents"].shape[0]
        t_rng, n_rng = jax.random.split(rng)
        t = flow.sample_time(t_rng, b)
        noise = jax.random.normal(n_rng, batch["latents"].shape)
        x_t = flow.interpolate(batch["latents"], noise, t)
        v = model.apply({"params": params}, **dit_inputs(cfg, x_t, t, conditions(batch), guidance=6.0))
        return jnp.mean((v - flow.velocity_target(batch["latents"], noise)) ** 2)

    @jax.jit
    def step(params, batch, rng):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
        return jax.tree.map(lambda p, g: p - 1e-4 * g, params, grads), loss

    return model, step


def timed(fn, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="global batch size")
    parser.add_argument("--frames", type=int, default=4, help="latent frames per window (T)")
    parser.add_argument("--windows", type=int, default=512, help="windows in the store")
    parser.add_argument("--workers", type=int, default=0, help="loader worker processes")
    parser.add_argument("--threads", type=int, default=2, help="loader read threads")
    parser.add_argument("--steps", type=int, default=20, help="timed train steps")
    parser.add_argument("--batches", type=int, default=200, help="timed loader batches")
    args = parser.parse_args()

    # the tiny variant leaves the audio path off; the store carries audio, so the step uses it
    cfg = DiTConfig.coerce(load_config(CONFIG + ":tiny").model).replace(audio_blocks=1, attention="xla")
    mesh = make_mesh("data=-1")
    print(f"jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s), "
          f"{os.cpu_count()} CPUs; batch {args.batch}, T={args.frames}, workers {args.workers}, threads {args.threads}")
    config = LoaderConfig(global_batch_size=args.batch, seed=0, num_epochs=None,
                          num_workers=args.workers, read_threads=args.threads)
    with tempfile.TemporaryDirectory() as store:
        write_store(store, cfg, args.windows, args.frames)
        size = sum(os.path.getsize(os.path.join(store, f)) for f in os.listdir(store))
        print(f"store: {args.windows} windows, {size / args.windows / 1024:.0f} KiB per window")

        with Loader(store, config) as loader:
            first = to_global(next(loader), mesh)  # warm up: threads, workers, first reads

            def load():
                jax.block_until_ready(to_global(next(loader), mesh))

            timed(load, 10)
            loader_rate = args.batches * args.batch / timed(load, args.batches)

        model, step = make_train_step(cfg)
        batch = {"latents": first["latents"], **conditions(first)}
        params = jax.jit(lambda k: model.init(k, **dit_inputs(cfg, batch["latents"], 0.0, conditions(batch))))(
            jax.random.key(0))["params"]
        params = nn.unbox(params)
        rng = jax.random.key(1)
        state = {"params": params}

        def train():
            state["params"], loss = step(state["params"], batch, rng)
            loss.block_until_ready()

        train()  # compile
        timed(train, 3)
        consumer_rate = args.steps * args.batch / timed(train, args.steps)

        with Loader(store, config) as loader:
            def both():
                fed = to_global(next(loader), mesh)
                state["params"], loss = step(state["params"], {k: fed[k] for k in batch}, rng)
                loss.block_until_ready()

            both()
            fed_rate = args.steps * args.batch / timed(both, args.steps)

    print(f"loader   {loader_rate:10.1f} samples/s  (Loader + to_global)")
    print(f"consumer {consumer_rate:10.1f} samples/s  (tiny DiT train step: {consumer_rate / args.batch:.2f} steps/s x {args.batch})")
    print(f"ratio    {loader_rate / consumer_rate:10.1f}  (goal >= 10)")
    print(f"fed      {fed_rate:10.1f} samples/s  (train step fed by the loader: {100 * (1 - fed_rate / consumer_rate):.1f} % slower)")


if __name__ == "__main__":  # grain worker processes re-import this module
    main()
