"""Sampling cost of the base model against the DMD2-distilled one, measured side by side.

One generation window (config.sample.window latents at config.prepare's size) through the
pipeline's window function (mi_jax/diffusion/sampler.py `make_window_fn`), for the same inputs:

    base       `--base-steps` Euler steps (default 50), multi-condition CFG over the text, audio
               and no-condition branches: 3 DiT passes per step and sample. `batched` stacks
               the branches on the batch axis (one call of batch 3, as the pipeline does);
               `sequential` makes three calls of batch 1.
    distilled  config.distill.num_steps (K = 4) x0 steps, one pass each (CFG baked in by DMD2).

NFE counts DiT passes per sample (steps x branches). Wall time: after a compile-and-warm-up
call, the median of `--repeats` calls, the variants interleaved. The weights are random (the
cost does not depend on them) and so are the inputs; both samplers see the same ones.

Measured here (2 shared CPU cores; goal >= 25x):
  tiny (hidden 32, 60 tokens): base 150 NFE 0.044 s batched / 0.057 s sequential, distilled 4 NFE
    0.0023 s: 18.8x / 24.6x wall, 37.5x NFE. The tiny DiT is overhead-bound: a pass over the 3
    batched branches costs 1.5x a single one, and fixed per-call work weighs on 4 steps.
  hidden 256, 128x128 (204 tokens; the command below): 3.02 s batched / 3.48 s sequential
    against 0.093 s: 32.6x / 37.5x wall. Once the DiT's passes are compute-bound the wall ratio
    approaches the NFE ratio (expected of the real model on a GPU; not measured here).
    python benchmarks/dmd2_speed.py --repeats 3 --config.model.num_attention_heads=4 \
        --config.model.attention_head_dim=64 "--config.model.rope_axes_dim=(16, 24, 24)" \
        --config.prepare.height=128 --config.prepare.width=128

    python benchmarks/dmd2_speed.py                       # tiny config on the CPU
    python benchmarks/dmd2_speed.py --config configs/magicinfinite.py:full,distill \
        --config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16 \
        --config.prepare.latent_frames=9 --config.sample.window=9      # on a GPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
from flax import linen as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from mi_jax.config_utils import load_config, parse_args  # noqa: E402
from mi_jax.diffusion.conditions import dit_inputs  # noqa: E402
from mi_jax.diffusion.flow import euler_step, sampling_times  # noqa: E402
from mi_jax.diffusion.guidance import GuidanceSchedule, combine, drop_for_branch  # noqa: E402
from mi_jax.diffusion.sampler import SamplerConfig, initial_carry, make_window_fn  # noqa: E402
from mi_jax.models.dit import DiT, example_inputs  # noqa: E402
from mi_jax.models.dit_config import DiTConfig  # noqa: E402

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "magicinfinite.py") + ":tiny,distill"


def window_inputs(config, mcfg, seed: int = 0):
    """Random conditions `(cond, audio)` of one window for batch 1, shaped as the pipeline's."""
    p, s = config.prepare, config.sample
    h, w = p.height // 8, p.width // 8
    keys = jax.random.split(jax.random.key(seed), 4)
    cond = dict(text_embeds=jax.random.normal(keys[0], (1, p.text_len, mcfg.text_embed_dim), jnp.float32),
                text_mask=jnp.ones((1, p.text_len), jnp.int32),
                pooled=jax.random.normal(keys[1], (1, mcfg.pooled_projection_dim), jnp.float32),
                ref_latent=jax.random.normal(keys[2], (1, 1, h, w, mcfg.out_channels), jnp.float32))
    audio = None
    if mcfg.audio_blocks:
        frames = 1 + 4 * (s.window - 1)
        audio = jax.random.normal(keys[3], (1, p.speakers, frames, mcfg.audio_feature_layers,
                                            mcfg.audio_feature_dim), jnp.float32)
        cond["speaker_masks"] = jnp.ones((1, p.speakers, s.window, h, w), jnp.float32)
    return cond, audio


def samplers(config, base_steps: int):
    """{name: (SamplerConfig, NFE per sample, branches per call)} of the base and distilled samplers."""
    s, d = config.sample, config.distill
    cfg_guidance = GuidanceSchedule(text=d.teacher_cfg_text, audio=d.teacher_cfg_audio)
    # the time shift moves the grid, not the cost: both samplers take the distill config's
    base = SamplerConfig(window=s.window, overlap=s.overlap, steps=base_steps, shift=d.time_shift, kind="euler",
                         guidance=cfg_guidance, embedded_guidance=s.embedded_guidance)
    distilled = SamplerConfig(window=s.window, overlap=s.overlap, steps=d.num_steps, shift=d.time_shift,
                              kind="x0", guidance=GuidanceSchedule(text=1.0, audio=1.0),
                              embedded_guidance=d.student_guidance)
    nb = len(cfg_guidance.branches)
    return {"base batched": (base, base_steps * nb, nb),
            "base sequential": (base, base_steps * nb, 1),
            "distilled": (distilled, d.num_steps * len(distilled.guidance.branches), 1)}


def sequential_window_fn(mcfg, scfg):
    """The base window (window 0: no motion latents carried) with the CFG branches as separate
    DiT calls of batch 1: the maths of `make_window_fn`'s batched velocity and Euler steps, with
    its noise, in three passes per step instead of one (`measure` checks the outputs agree)."""
    model, branches = DiT(mcfg), scfg.guidance.branches
    times = sampling_times(scfg.steps, scfg.shift)

    def velocity(params, x, t, cond):
        outs = [model.apply({"params": params}, **dit_inputs(mcfg, x, t, drop_for_branch(cond, name),
                                                              scfg.embedded_guidance)).astype(jnp.float32)
                for name in branches]
        return combine(jnp.concatenate(outs, 0), branches, scfg.guidance.scales(t))

    def window_fn(params, cond, carry, audio):
        k_x, _, _ = jax.random.split(jax.random.fold_in(carry["key"], carry["index"]), 3)
        shape = carry["motion"].shape[:1] + (scfg.window,) + carry["motion"].shape[2:]
        x = jax.random.normal(k_x, shape, jnp.float32)
        cond = cond if audio is None else dict(cond, audio_states=audio)
        step = lambda x, tt: (euler_step(x, velocity(params, x, tt[0], cond), tt[0], tt[1]), None)  # noqa: E731
        x, _ = jax.lax.scan(step, x, (times[:-1], times[1:]))
        o = scfg.overlap
        return carry, (x[:, 1 : 1 + o], x[:, 1 + o :])

    return window_fn


def measure(config, *, base_steps: int = 50, repeats: int = 5, sequential: bool = True, log=print) -> dict:
    """{name: {"nfe", "seconds" (median), "all" (every repeat), "compile_s"}} for each sampler."""
    mcfg = DiTConfig.coerce(config.model)
    params = jax.jit(lambda k: nn.unbox(DiT(mcfg).init(k, **example_inputs(mcfg)))["params"])(jax.random.key(0))
    cond, audio = window_inputs(config, mcfg)
    h, w = config.prepare.height // 8, config.prepare.width // 8
    fns, rows = {}, {}
    for name, (scfg, nfe, per_call) in samplers(config, base_steps).items():
        if name == "base sequential" and not sequential:
            continue
        build = sequential_window_fn if name == "base sequential" else make_window_fn
        fn = jax.jit(build(mcfg, scfg))
        carry = initial_carry(0, 1, (h, w, mcfg.out_channels), scfg)  # the same noise for every sampler
        t0 = time.perf_counter()
        jax.block_until_ready(fn(params, cond, carry, audio))
        fns[name] = (fn, carry)
        rows[name] = dict(nfe=nfe, compile_s=time.perf_counter() - t0, all=[])
        log(f"{name}: compiled and warmed up in {rows[name]['compile_s']:.1f} s")
    if "base sequential" in fns:  # the same maths: the same latents, up to float rounding
        outs = [fns[k][0](params, cond, fns[k][1], audio)[1] for k in ("base batched", "base sequential")]
        rows["base sequential"]["max_abs_diff"] = float(max(jnp.abs(a - b).max() for a, b in zip(*outs)))
    for _ in range(repeats):  # interleaved, so that drifts of the machine hit every sampler alike
        for name, (fn, carry) in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, cond, carry, audio))
            rows[name]["all"].append(time.perf_counter() - t0)
    for row in rows.values():
        row["seconds"] = statistics.median(row["all"])
    return rows


def report(rows: dict, config) -> str:
    m, p, s = config.model, config.prepare, config.sample
    d = rows["distilled"]
    lines = [f"device {jax.devices()[0].device_kind}; model {m.num_layers} dual + {m.num_single_layers} single "
             f"blocks, hidden {m.num_attention_heads * m.attention_head_dim}, {m.dtype}; one window of {s.window} "
             f"latents at {p.height}x{p.width}, batch 1",
             f"{'sampler':<16} {'NFE':>5} {'median s':>10} {'NFE ratio':>9} {'time ratio':>10}"]
    for name, r in rows.items():
        lines.append(f"{name:<16} {r['nfe']:>5} {r['seconds']:>10.4f} {r['nfe'] / d['nfe']:>9.1f} "
                     f"{r['seconds'] / d['seconds']:>10.1f}")
    if "max_abs_diff" in rows.get("base sequential", {}):
        lines.append(f"(batched and sequential CFG give the same latents: max |diff| "
                     f"{rows['base sequential']['max_abs_diff']:.2g})")
    ratio = rows["base batched"]["seconds"] / d["seconds"]
    lines.append(f"speed-up of the distilled sampler over the base (batched CFG, as the pipeline runs it): "
                 f"{ratio:.1f}x wall, {rows['base batched']['nfe'] / d['nfe']:.1f}x NFE (goal >= 25x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=DEFAULT_CONFIG, help="a distill config (FILE:VARIANT)")
    ap.add_argument("--base-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-sequential", action="store_true", help="skip the unbatched-CFG base sampler")
    args, overrides = parse_args(ap, argv)
    config = load_config(args.config, overrides)
    if "distill" not in config:
        ap.error(f"{args.config}: not a distill config (use e.g. configs/magicinfinite.py:tiny,distill)")
    rows = measure(config, base_steps=args.base_steps, repeats=args.repeats, sequential=not args.no_sequential,
                   log=lambda s: print(s, flush=True))
    print(report(rows, config))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
