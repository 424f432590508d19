"""One generation window and one train step on one GPU, measured beside `plan`'s estimate.

    source launch/xla_flags.sh h100 && python benchmarks/gpu_window.py            # on a GPU
    python benchmarks/gpu_window.py --dry-run                                    # CPU smoke test

What runs (real weights are not needed: parameters are random, shapes are the real ones):
- window: the DiT forward of one generation window, batch = 3 CFG branches, bf16 parameters and
  compute, cuDNN flash attention (`--attention auto`: cuDNN wherever there is no dense mask, i.e.
  all but the 256-token text refiner), at the largest of `--window-frames` (latent frames, tried largest
  first) whose compiled program fits the GPU's memory.
- train: the stage-2 train step (`make_job`'s step, donated state) at batch 1 and the largest of
  `--train-frames` that fits. The 13B model's full AdamW state (about 210 GB) fits no single GPU,
  so by default the step trains LoRA factors (`--lora-rank`, with the audio modules) over the
  frozen bf16 base: the single-GPU fine-tuning setting. `--lora-rank 0` trains everything.

Printed per workload: measured seconds (median of `--iters` after one warm-up), MFU (model
FLOPs, i.e. without remat recomputation, over the GPU's dense bf16 peak), peak device memory
(`memory_stats()['peak_bytes_in_use']`), and the plan's numbers for the same shape, compiled on
this backend: its memory total and its estimated seconds at `--mfu` (default 40%).
`--dry-run`: the tiny config on CPU, float32, XLA attention: checks the script, measures nothing
meaningful.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from mi_jax.config_utils import load_config  # noqa: E402
from mi_jax import plan  # noqa: E402
from mi_jax.parallel.mesh import make_mesh, with_rules  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADROOM = 0.92  # of the device's bytes_limit: the allocator needs some slack beyond the plan


def detect_gpu() -> tuple[str, str]:
    """(plan.GPUS key, device kind). Unknown or CPU devices are costed as an H100."""
    kind = jax.devices()[0].device_kind
    for key in plan.GPUS:
        if key in kind.lower():
            return key, kind
    return "h100", kind


def device_limit() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return stats.get("bytes_limit") if stats else None


def peak_bytes() -> int | None:
    stats = jax.devices()[0].memory_stats()
    return stats.get("peak_bytes_in_use") if stats else None


def random_like(tree, seed: int, scale: float = 1.0):
    """Random arrays for abstract leaves, made on the device in their shardings (a 13B tree never
    touches the host): floats normal x scale, integers 0/1."""
    leaves, treedef = jax.tree.flatten(tree)

    def make(key):
        out = []
        for k, a in zip(jax.random.split(key, len(leaves)), leaves):
            if jnp.issubdtype(a.dtype, jnp.floating):
                out.append((scale * jax.random.normal(k, a.shape, jnp.float32)).astype(a.dtype))
            else:
                out.append(jax.random.bernoulli(k, 0.5, a.shape).astype(a.dtype))
        return out

    made = jax.jit(make, out_shardings=[getattr(a, "sharding", None) for a in leaves])(jax.random.key(seed))
    return jax.tree.unflatten(treedef, made)


def timed(fn, args, iters: int, donate: bool = False) -> list[float]:
    """Seconds per call (after one warm-up); a donated first argument is threaded through."""
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        if donate:
            args = (out[0], *args[1:])
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return times


def largest_fitting(build, candidates, limit):
    """Compiles `build(c)` for each candidate, largest first; returns (c, spec, compiled)."""
    for c in sorted(candidates, reverse=True):
        spec = build(c)
        compiled, seconds = plan.compile_step(spec)
        total = plan.memory_gb(compiled)["total"] * plan.GB
        print(f"  {c} latent frames: planned {total / plan.GB:.3g} GB, compiled in {seconds:.0f} s", flush=True)
        if limit is None or total <= HEADROOM * limit:
            return c, spec, compiled
    raise SystemExit(f"none of {candidates} fits {limit / plan.GB:.1f} GB; try smaller --window-frames/--train-frames")


def report(name, spec, compiled, times, model_flops, gpu, mfu) -> dict:
    card = plan.GPUS[gpu]
    with with_rules(spec.mesh):
        counted = plan.count_flops(spec.fn, *spec.args)
    seconds = statistics.median(times)
    peak = peak_bytes()
    row = dict(workload=name, shape=spec.shape, seconds=seconds, mfu=model_flops / seconds / card.bf16_flops,
               peak_memory_gb=None if peak is None else peak / plan.GB,
               plan_memory_gb=plan.memory_gb(compiled)["total"],
               plan_seconds=plan.estimate_seconds(counted["flops"], counted["matmul_bytes"], card, mfu),
               model_tflops=model_flops / 1e12, executed_tflops=counted["flops"] / 1e12)
    s = spec.shape
    peak_txt = "n/a" if peak is None else f"{row['peak_memory_gb']:.3g} GB"
    print(f"{name}: B={s['batch']} {s['size']} {s['frames']} frames "
          f"({s['latent_frames']} latent, {s['tokens']} tokens): "
          f"{seconds:.3f} s, MFU {row['mfu']:.1%}, peak {peak_txt} | plan: {row['plan_memory_gb']:.3g} GB, "
          f"{row['plan_seconds']:.3f} s at {mfu:.0%} MFU", flush=True)
    return row


def bench_window(config, mesh, frames, gpu, args) -> dict:
    dtype = None if args.dry_run else "bfloat16"
    build = lambda t: plan.generate_window(config, mesh, latent_frames=t, branches=3, dtype=dtype)  # noqa: E731
    print("window: choosing the largest window that fits", flush=True)
    t, spec, compiled = largest_fitting(build, frames, device_limit())
    # small random weights keep activations finite (speed does not depend on the values)
    params, inputs = random_like(spec.args[0], 0, scale=0.02), random_like(spec.args[1], 1)
    times = timed(compiled, (params, inputs), args.iters)
    with with_rules(mesh):
        model_flops = plan.count_flops(spec.fn, *spec.args)["flops"]
    del params, inputs
    return report("window", spec, compiled, times, model_flops, gpu, args.mfu)


class FixedBatch:
    """A data source for `make_job`: one random batch of the planned shape, served forever."""

    def __init__(self, config, mesh):
        from mi_jax.data.loader import batch_sharding

        sh = batch_sharding(mesh)
        self.element_spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh)
                             for k, v in plan.abstract_batch(config).items()}
        self.batch = random_like(self.element_spec, 2)
        self.batch["index"] = jax.device_put(jnp.arange(config.data.global_batch, dtype=jnp.int32), sh)

    def __iter__(self):
        return self

    def __next__(self):
        return self.batch

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        del state


def _with_frames(config, t: int, **model):
    c = copy.deepcopy(config)
    c.prepare.latent_frames = t
    c.model.update(model)
    return c


def bench_train(config, mesh, frames, gpu, args) -> dict:
    from mi_jax.train.pretrain import make_job

    def build(t, **model):
        c = _with_frames(config, t, **model)
        return plan.job_step(make_job(c, plan.AbstractData(plan.abstract_batch(c)), mesh))

    print("train: choosing the largest window that fits", flush=True)
    t, spec, compiled = largest_fitting(build, frames, device_limit())
    cfg = _with_frames(config, t)
    job = make_job(cfg, FixedBatch(cfg, mesh), mesh)
    times = timed(compiled, (job.init_state(), next(job.data)), args.iters, donate=True)
    no_remat = build(t, remat_policy="none")  # model FLOPs: the same step without recomputation
    with with_rules(mesh):
        model_flops = plan.count_flops(no_remat.fn, *no_remat.args)["flops"]
    return report("train", spec, compiled, times, model_flops, gpu, args.mfu)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "magicinfinite.py") + ":full,stage2")
    ap.add_argument("--size", type=int, default=544, help="frame height = width in pixels (multiple of 16)")
    ap.add_argument("--window-frames", default="63,33,21", help="latent frames to try for the window")
    ap.add_argument("--train-frames", default="13,9,5", help="latent frames to try for the train step")
    ap.add_argument("--lora-rank", type=int, default=64)
    ap.add_argument("--attention", default="auto",
                    help="auto: cuDNN flash attention for every unmasked bf16 attention on GPU (the DiT's joint "
                         "attention, the audio cross-attention), XLA for the text refiner's dense mask; or cudnn")
    ap.add_argument("--remat", default="full", help="train remat policy (config.model.remat_policy)")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--mfu", type=float, default=plan.DEFAULT_MFU, help="the plan's MFU assumption")
    ap.add_argument("--only", choices=("window", "train"), default=None)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--dry-run", action="store_true", help="tiny config on CPU (smoke test)")
    args = ap.parse_args(argv)

    if args.dry_run:
        config = load_config(os.path.join(ROOT, "configs", "magicinfinite.py") + ":tiny,stage2")
        window_frames = train_frames = [config.prepare.latent_frames]
        attention, lora = "xla", 0
        args.iters = min(args.iters, 2)
    else:
        config = load_config(args.config)
        config.prepare.height = config.prepare.width = args.size
        window_frames = [int(f) for f in args.window_frames.split(",")]
        train_frames = [int(f) for f in args.train_frames.split(",")]
        attention, lora = args.attention, args.lora_rank
        # bf16 weights and compute; LoRA factors / audio modules keep their own optimiser state
        config.model.dtype = config.model.param_dtype = "bfloat16"
    config.model.attention = attention
    config.model.remat_policy = args.remat if not args.dry_run else "none"
    config.data.global_batch, config.train.grad_accum, config.init.lora_rank = 1, 1, lora
    gpu, kind = detect_gpu()
    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    print(f"device: {kind} (costed as {plan.GPUS[gpu].name}); backend {jax.default_backend()}", flush=True)

    if args.only is None and not args.dry_run:
        # one process per workload: peak_bytes_in_use never resets within a process
        return separately(argv or sys.argv[1:], args.json)
    rows = []
    if args.only in (None, "window"):
        rows.append(bench_window(config, mesh, window_frames, gpu, args))
    if args.only in (None, "train"):
        rows.append(bench_train(config, mesh, train_frames, gpu, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=kind, rows=rows), f, indent=1)
    return 0


def separately(argv, json_path) -> int:
    rows, device = [], None
    for only in ("window", "train"):
        out = f"/tmp/gpu_window_{os.getpid()}_{only}.json"
        code = subprocess.call([sys.executable, os.path.abspath(__file__), *argv, "--only", only, "--json", out])
        if code:
            return code
        with open(out) as f:
            result = json.load(f)
        device, rows = result["device"], rows + result["rows"]
    if json_path:
        with open(json_path, "w") as f:
            json.dump(dict(device=device, rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
