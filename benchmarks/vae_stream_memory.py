"""Peak memory of VAE decoding: single pass vs streaming, at N and 4N latent frames.

How it measures: nothing is run. Each function is lowered with abstract inputs (parameters from
`jax.eval_shape`, so even the real 246M-parameter VAE costs no memory) and compiled by XLA for
the current backend; `compiled.memory_analysis()` reports the buffers the executable needs:
`temp` (its working memory: activations, scratch) plus its inputs and outputs. Parameters are
shared by all rows and left out.

Rows:
  single pass      `CausalVAE.decode` on the whole clip (diffusers with framewise decoding off)
  stream, scan     `VAEStream.decode`: one `lax.scan` over temporal tiles (diffusers' default)
  stream, loop     `VAEStream.decode_chunk`, called in a Python loop: one step's executable; it
                   is the same for any stream length, so a loop's peak is this at any N

Usage: python benchmarks/vae_stream_memory.py [--config hunyuan|tiny] [--size 256] [--latents 11]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import linen as nn  # noqa: E402

from mi_jax.models.vae import (  # noqa: E402
    HUNYUAN_VIDEO_VAE,
    CausalVAE,
    VAEConfig,
    VAEStream,
    abstract_vae_params,
)

TINY = VAEConfig(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def footprint(fn, params, *inputs) -> tuple[int, int]:
    """(temp bytes, inputs + outputs bytes) of `jit(fn)(params, *inputs)`, parameters left out."""
    temp = jax.jit(fn).lower(params, *inputs).compile().memory_analysis().temp_size_in_bytes
    return temp, nbytes(inputs) + nbytes(jax.eval_shape(fn, params, *inputs))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=("hunyuan", "tiny"), default="hunyuan")
    ap.add_argument("--size", type=int, default=256, help="frame height = width, in pixels")
    ap.add_argument("--latents", type=int, default=11, help="N latent frames (>= 5); also measured at 4N")
    args = ap.parse_args()

    config = HUNYUAN_VIDEO_VAE if args.config == "hunyuan" else TINY
    vae = CausalVAE(config)
    stream = VAEStream(vae)
    params = nn.unbox(abstract_vae_params(config))
    h = args.size // config.spatial_factor

    def z(n):
        return jax.ShapeDtypeStruct((1, n, h, h, config.latent_channels), jnp.float32)

    single = lambda p, z: vae.apply({"params": p}, z, method="decode")  # noqa: E731
    _, state = jax.eval_shape(stream.decode_start, params, z(stream.latents_first))
    loop = footprint(stream.decode_chunk, params, state, z(stream.latents_per_chunk))

    ns = (args.latents, 4 * args.latents)
    rows = {
        "single pass": [footprint(single, params, z(n)) for n in ns],
        "stream, scan": [footprint(stream.decode, params, z(n)) for n in ns],
        "stream, loop": [loop, loop],
    }
    gib = lambda b: f"{b / 2**30:8.3f} GiB"  # noqa: E731
    frames = [config.temporal_factor * (n - 1) + 1 for n in ns]
    backend = jax.default_backend()
    print(f"VAE decode memory, {args.config} config, {args.size}x{args.size} frames, backend {backend}")
    print("(XLA compiled memory_analysis; temp = working memory, io = latents/state in + frames out)")
    heads = [f"{tag}={n} ({f} frames)" for tag, n, f in zip(("N", "4N"), ns, frames)]
    print(f"{'':14s} {heads[0]:>26s} {heads[1]:>26s}   ratio 4N/N")
    for name, ((t1, io1), (t4, io4)) in rows.items():
        print(f"{name:14s} temp {gib(t1)} io {gib(io1)}  temp {gib(t4)} io {gib(io4)}   "
              f"temp x{t4 / t1:.2f}  temp+io x{(t4 + io4) / (t1 + io1):.2f}")
    flat = all(t4 <= 1.1 * t1 for (t1, _), (t4, _) in (rows["stream, scan"], rows["stream, loop"]))
    print(f"streaming working memory flat within +10%: {flat}")


if __name__ == "__main__":
    main()
