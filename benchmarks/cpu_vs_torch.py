"""mi_jax against diffusers' eager PyTorch on this CPU: the same train steps, side by side.

    python benchmarks/cpu_vs_torch.py [--cases dit_medium,dit_tiny,dit_demo,vae] [--repeats 5] [--warmup 3] [--no-profile]

A train step is forward + backward + AdamW update: `optax.adamw` inside one `jax.jit` with donated
params and optimizer state, against `torch.optim.AdamW(foreach=True)`. Both sides start from the
same weights (diffusers' random init, `save_pretrained`, loaded with mi_jax.convert) and see the
same inputs; the first-step losses are printed to show they compute the same thing. Cases:

  dit_medium  HunyuanVideoTransformer3DModel, hidden 256 (4 x 64), 2 dual + 4 single blocks,
              ~10.4 M parameters, 352 tokens (320 video after 2x2 patching + 32 text); batch 1.
  dit_tiny    the tests' tiny DiT (configs/hunyuan_video_i2v.py:tiny with 8 latent channels, no
              audio blocks: diffusers has none) on latents [4, 8, 3, 8, 8] and 12 text tokens.
  dit_demo    the demo model's DiT (configs/magicinfinite.py:demo: hidden 128 = 4 x 32, no audio
              blocks) on its training batch: latents [4, 8, 5, 8, 8] and 12 text tokens.
  vae         the demo VAE (latent 8, blocks (8, 8, 16, 16)) on 2 x 17 frames x 64 x 64:
              loss = mean |decode(encode mean(x)) - x|, single pass (no framewise / tiling).
  DiT losses: MSE of the model output against a fixed random target.

Timing: one compile / warm-up step per side, `--warmup` more steps each (alternating: both sides'
allocators and caches settle; the VAE's JAX step ran 30-50% slow for its first 2-3 steps after a
compile in one run of 2026-12-05), then jax, torch, jax, torch ... `--repeats` times;
the median per side and torch_ms / jax_ms (mi_jax speed as a multiple of PyTorch eager; >= 1 is
as fast or faster). torch runs `--threads` threads (default all cores) with libgomp's default wait
policy (see the comment below on OMP_WAIT_POLICY); XLA uses its own pool of all cores.
MFU: the step's FLOPs from XLA's cost analysis of the compiled step (the same count is used for
torch; 3 x the forward's is printed too) over this machine's fp32 matmul peak (best of 2048^3
matmuls in jax and torch). The analysis does not see inside custom calls, so the step is counted
as lowered with XLA's own convolutions (`mi_jax.nn.cpu_kernels.disabled()`; their FFT kernel
gradients make that count ~20% above 3 x forward). The count is right only without `while` loops
(XLA counts a loop body once): on CPU the DiT's scanned blocks are unrolled
(`scan_unroll="auto"`), so it is. In the profile the native convolutions (custom calls) are
"conv".

Profile (`--no-profile` skips it), ms per step by category: attention (QK^T, softmax, PV; not
the projections), matmul, conv, fft, norm/reduce, layout copies, elementwise/other, framework
overhead. JAX: a jax.profiler trace of 2 steps, the self time of each XLA thunk on every thread,
mapped to a category through the compiled HLO (the called fusion's opcodes and op_name
metadata; while-loop control is overhead). torch: torch.profiler self CPU time of 2 steps by
aten op (views, allocation, the autograd engine and the optimizer's Python are overhead).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the comparison is on the CPU even where a GPU exists
# torch's OpenMP (libgomp) runs with its default wait policy (a short spin, then sleep): the fair
# setting on an idle machine. OMP_WAIT_POLICY=ACTIVE keeps torch's threads spinning into the JAX
# steps that alternate with them (JAX 1.5x slower, torch 2x faster, here); PASSIVE halves torch's
# DiT speed. On a CPU shared with other work the default spin crawls (the tiny DiT's step: 1.5 s
# instead of 20 ms on 2 busy cores): there, set PASSIVE and say so. Measured on 2026-12-04:
# default 0.86x / 0.41x (dit_medium / vae), PASSIVE 1.6x / 0.51x, ACTIVE 0.56x / 0.25x.

CASES = ("dit_medium", "dit_tiny", "dit_demo", "vae")
CATEGORIES = ("attention", "matmul", "conv", "fft", "norm/reduce", "layout copies", "elementwise/other",
              "framework overhead")
LR, WEIGHT_DECAY = 1e-4, 0.01

DIT_MEDIUM = dict(in_channels=8, out_channels=8, num_attention_heads=4, attention_head_dim=64, num_layers=2,
                  num_single_layers=4, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, text_embed_dim=384,
                  pooled_projection_dim=256, rope_axes_dim=(16, 24, 24), guidance_embeds=False,
                  image_condition_type=None)
# configs/hunyuan_video_i2v.py:tiny as diffusers kwargs, with the demo's 8 latent channels
DIT_TINY = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                num_single_layers=2, num_refiner_layers=1, mlp_ratio=4.0, patch_size=2, text_embed_dim=32,
                pooled_projection_dim=16, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
                image_condition_type="token_replace")
# configs/magicinfinite.py:demo's DiT (the tiny one 4x wider)
DIT_DEMO = dict(DIT_TINY, num_attention_heads=4, attention_head_dim=32, rope_axes_dim=(8, 12, 12))
# (kwargs, latents [B, C, T, H, W], text length)
DIT_CASES = {"dit_medium": (DIT_MEDIUM, (1, 8, 5, 16, 16), 32), "dit_tiny": (DIT_TINY, (4, 8, 3, 8, 8), 12),
             "dit_demo": (DIT_DEMO, (4, 8, 5, 8, 8), 12)}
VAE_KWARGS = dict(latent_channels=8, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
VAE_VIDEO = (2, 3, 17, 64, 64)  # [B, C, T, H, W]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per side after the first")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads")
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--json", default="", help="also write the figures here")
    ap.add_argument("--top", type=int, default=12, help="the most expensive ops listed per side in --json")
    args = ap.parse_args(argv)
    summarize.__defaults__ = (args.top,)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if set(cases) - set(CASES):
        ap.error(f"unknown case(s) {sorted(set(cases) - set(CASES))}; choose from {','.join(CASES)}")
    try:
        import diffusers  # noqa: F401
        import torch
    except ImportError as e:
        print(f"error: this benchmark needs torch and diffusers ({e}); pip install -e '.[test]'", file=sys.stderr)
        return 1
    import jax

    torch.set_num_threads(args.threads)
    peak = matmul_peak()
    print(f"torch {torch.__version__}: {torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}; jax {jax.__version__} "
          f"({jax.default_backend()}): XLA uses its own pool of all {os.cpu_count()} cores")
    print(f"fp32 matmul peak (2048^3, best of jax / torch): {peak:.1f} GFLOP/s")
    results = {"threads_torch": args.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
               "cpu_count": os.cpu_count(), "peak_gflops": peak, "cases": {}}
    for name in cases:
        with tempfile.TemporaryDirectory() as folder:
            case = build_vae(folder) if name == "vae" else build_dit(name, folder)
            results["cases"][name] = r = run_case(name, case, args.repeats, args.profile, peak, args.warmup)
        report(name, r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


# ----------------------------------------------------------------------------- the cases
# Each builder returns the torch model and loss(model, batch), the JAX params and
# loss(params, batch), each side's batch, and a description.


def build_dit(name: str, folder: str) -> dict:
    import jax.numpy as jnp
    import torch
    from diffusers import HunyuanVideoTransformer3DModel

    from mi_jax.convert import load_diffusers_transformer
    from mi_jax.models import DiT

    kwargs, shape, text_len = DIT_CASES[name]
    torch.manual_seed(0)
    model = HunyuanVideoTransformer3DModel(**kwargs).train()
    model.save_pretrained(folder)
    config, params = load_diffusers_transformer(folder)
    g = torch.Generator().manual_seed(1)
    b = shape[0]
    batch = dict(hidden_states=torch.randn(*shape, generator=g), timestep=torch.linspace(900.0, 10.0, b),
                 encoder_hidden_states=torch.randn(b, text_len, kwargs["text_embed_dim"], generator=g),
                 encoder_attention_mask=torch.ones(b, text_len, dtype=torch.long),
                 pooled_projections=torch.randn(b, kwargs["pooled_projection_dim"], generator=g),
                 target=torch.randn(b, kwargs["out_channels"], *shape[2:], generator=g))
    if kwargs["guidance_embeds"]:
        batch["guidance"] = torch.linspace(6000.0, 2000.0, b)
    jbatch = {k: jnp.asarray(v.numpy()) for k, v in batch.items()}
    for k in ("hidden_states", "target"):  # [B, C, T, H, W] -> channels-last
        jbatch[k] = jnp.moveaxis(jbatch[k], 1, -1)
    p = kwargs["patch_size"]
    tokens = shape[2] * (shape[3] // p) * (shape[4] // p) + text_len
    dit = DiT(config)

    def torch_loss(m, batch):
        inputs = {k: v for k, v in batch.items() if k != "target"}
        return torch.mean((m(**inputs).sample - batch["target"]) ** 2)

    def jax_loss(params, batch):
        inputs = {k: v for k, v in batch.items() if k != "target"}
        return jnp.mean((dit.apply({"params": params}, **inputs) - batch["target"]) ** 2)

    n = sum(q.numel() for q in model.parameters())
    desc = (f"HunyuanVideoTransformer3DModel hidden {config.hidden_size}, {config.num_layers} dual + "
            f"{config.num_single_layers} single blocks: {n:,} parameters; latents {list(shape)}, "
            f"{tokens} tokens per sample ({tokens - text_len} video + {text_len} text)")
    return dict(torch_model=model, torch_loss=torch_loss, torch_batch=batch, jax_params=params, jax_loss=jax_loss,
                jax_batch=jbatch, desc=desc, parameters=n, tokens=tokens, kwargs=kwargs, shape=shape)


def build_vae(folder: str) -> dict:
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKLHunyuanVideo

    from mi_jax.convert.vae import load_diffusers_vae
    from mi_jax.models.vae import CausalVAE

    torch.manual_seed(0)
    model = AutoencoderKLHunyuanVideo(**VAE_KWARGS).train()
    model.save_pretrained(folder)
    config, params = load_diffusers_vae(folder)
    vae, c = CausalVAE(config), VAE_KWARGS["latent_channels"]
    x = torch.rand(*VAE_VIDEO, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def torch_loss(m, x):
        z = m.quant_conv(m.encoder(x))[:, :c]
        return torch.mean(torch.abs(m.decoder(m.post_quant_conv(z)) - x))

    def jax_loss(params, x):
        mean, _ = vae.apply({"params": params}, x, method="encode")
        return jnp.mean(jnp.abs(vae.apply({"params": params}, mean, method="decode") - x))

    n = sum(q.numel() for q in model.parameters())
    desc = (f"AutoencoderKLHunyuanVideo {VAE_KWARGS}: {n:,} parameters; video [B, C, T, H, W] = "
            f"{list(VAE_VIDEO)}, encode mean -> decode, L1")
    return dict(torch_model=model, torch_loss=torch_loss, torch_batch=x, jax_params=params, jax_loss=jax_loss,
                jax_batch=jnp.asarray(x.numpy()).transpose(0, 2, 3, 4, 1), desc=desc, parameters=n,
                kwargs=VAE_KWARGS, shape=VAE_VIDEO)


# ----------------------------------------------------------------------------- the two sides


def jax_side(params, loss_fn, batch):
    """-> (step() -> loss, compiled step, FLOPs of the step, FLOPs of the forward pass alone).
    Compiles; runs nothing."""
    import jax
    import optax

    opt = optax.adamw(LR, weight_decay=WEIGHT_DECAY)

    def train_step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def flops(compiled) -> float:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float((cost or {}).get("flops", 0.0))

    from mi_jax.nn import cpu_kernels

    state = [params, opt.init(params)]
    compiled = jax.jit(train_step, donate_argnums=(0, 1)).lower(*state, batch).compile()
    with cpu_kernels.disabled():  # XLA's cost analysis does not count what the native kernels compute
        counted = jax.jit(lambda *a: train_step(*a)).lower(*state, batch).compile()  # a new trace, not the cached one
        forward = jax.jit(loss_fn).lower(params, batch).compile()

    def step():
        state[0], state[1], loss = compiled(*state, batch)
        return float(loss)  # waits for the step

    return step, compiled, flops(counted), flops(forward)


def torch_side(model, loss_fn, batch):
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, foreach=True)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step


def alternate(steps: dict, repeats: int) -> dict:
    """Calls each step in turn, `repeats` rounds; -> {name: [seconds, ...]}."""
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def matmul_peak(n: int = 2048, tries: int = 3) -> float:
    """Best fp32 GFLOP/s of an n x n @ n x n matmul, in jax and in torch."""
    import jax
    import jax.numpy as jnp
    import torch

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(jnp.matmul)
    ta = torch.randn(n, n)
    runs = {"jax": lambda: mm(a, a).block_until_ready(), "torch": lambda: torch.mm(ta, ta)}
    for run in runs.values():
        run()  # compile / warm up
    best = min(min(t) for t in alternate(runs, tries).values())
    return 2 * n**3 / best / 1e9


def run_case(name: str, case: dict, repeats: int, profile: bool, peak: float, warmup: int = 3) -> dict:
    print(f"\n== {name}: {case['desc']}", flush=True)
    t0 = time.perf_counter()
    jstep, compiled, flops, flops_fwd = jax_side(case["jax_params"], case["jax_loss"], case["jax_batch"])
    compile_s = time.perf_counter() - t0
    tstep = torch_side(case["torch_model"], case["torch_loss"], case["torch_batch"])
    first = {"jax": jstep(), "torch": tstep()}  # warm-up; the loss before any update
    alternate({"jax": jstep, "torch": tstep}, warmup)
    times = alternate({"jax": jstep, "torch": tstep}, repeats)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    gflops = {k: flops / (v / 1e3) / 1e9 for k, v in ms.items()}
    r = dict(description=case["desc"], parameters=case["parameters"], tokens=case.get("tokens"),
             kwargs={k: list(v) if isinstance(v, tuple) else v for k, v in case["kwargs"].items()},
             input_shape=list(case["shape"]), jax_compile_s=compile_s, first_loss=first,
             loss_rel_diff=abs(first["jax"] - first["torch"]) / abs(first["torch"]),
             times_ms={k: [1e3 * t for t in v] for k, v in times.items()}, median_ms=ms,
             torch_over_jax=ms["torch"] / ms["jax"], flops_per_step=flops, flops_forward=flops_fwd, gflops=gflops,
             mfu={k: v / peak for k, v in gflops.items()})
    if profile:
        r["profile"] = {"jax": profile_jax(jstep, compiled.as_text()), "torch": profile_torch(tstep)}
    return r


# ----------------------------------------------------------------------------- profiles

_MOVES = {"copy", "transpose", "bitcast", "reshape", "broadcast", "slice", "dynamic-slice", "dynamic-update-slice",
          "concatenate", "pad", "reverse", "parameter", "constant", "tuple", "get-tuple-element", "iota"}
_CONTAINERS = {"while", "call", "conditional"}  # their bodies' instructions are traced as events of their own
# the core of jax.nn.dot_product_attention (QK^T, softmax, PV) inside an attention module; the
# projections (attn._project/to_q ...) count as matmul, as torch's linear layers do
_ATTN = re.compile(r"(attn|attention)\w*/(vmap\(|.*_dense)")  # jax.nn.dot_product_attention / mi_jax's `dense`


def hlo_categories(hlo: str) -> dict:
    """HLO instruction name -> (category, op_name), from the opcodes and op_name metadata of
    each instruction and of the computations its fusion calls."""
    comps, insts, current = collections.defaultdict(list), {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            current = head.group(1)
            continue
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$", line)
        if not m or current is None:
            continue
        rhs = m.group(2)
        op = re.search(r"(?:^|\s)([a-z][a-z0-9\-]*)\(", rhs)
        op = op.group(1) if op else ""
        if 'custom_call_target="mi_jax_conv3d' in rhs:  # mi_jax.nn.cpu_kernels' convolutions
            op = "convolution"
        op_name = re.search(r'op_name="([^"]*)"', rhs)
        calls = re.findall(r"(?:calls|to_apply)=\{?%?([\w.\-]+)", rhs) + re.findall(r"calls=\{([^}]*)\}", rhs)
        calls = [c.strip().lstrip("%") for group in calls for c in group.split(",")]
        inst = (op, op_name.group(1) if op_name else "", calls)
        comps[current].append(inst)
        insts[m.group(1)] = inst

    def ops(inst, seen):
        yield inst
        if inst[0] not in _CONTAINERS:
            for c in inst[2]:
                if c not in seen:
                    seen.add(c)
                    for sub in comps.get(c, ()):
                        yield from ops(sub, seen)

    def category(inst):
        found = list(ops(inst, set()))
        codes = {o[0] for o in found} - {"fusion"}
        if inst[0] in _CONTAINERS:
            return "framework overhead"  # loop / call control
        if any(_ATTN.search(o[1]) for o in found):
            return "attention"
        for code, cat in (("dot", "matmul"), ("convolution", "conv"), ("fft", "fft"), ("reduce", "norm/reduce")):
            if code in codes:
                return cat
        return "layout copies" if codes <= _MOVES else "elementwise/other"

    return {name: (category(inst), inst[1]) for name, inst in insts.items()}


def profile_jax(step, hlo: str, steps: int = 2) -> dict:
    """Self time of the XLA thunks of `steps` steps, all threads: `summarize`d."""
    import jax

    totals = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                step()
        for path in glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True):
            for plane in jax.profiler.ProfileData.from_file(path).planes:
                for line in plane.lines:
                    if line.name == "python":
                        continue
                    events = sorted(((e.start_ns, e.duration_ns, e.name) for e in line.events
                                     if not (e.name.startswith(("ThunkExecutor", "ThreadpoolListener", "end: "))
                                             or "Await" in e.name)), key=lambda e: (e[0], -e[1]))
                    stack = []  # (end, name): nested events (a while loop's body) are subtracted from the parent
                    for start, dur, name in events:
                        while stack and stack[-1][0] <= start:
                            stack.pop()
                        if stack:
                            totals[stack[-1][1]] -= dur
                        totals[name] += dur
                        stack.append((start + dur, name))
    labels = hlo_categories(hlo)
    return summarize({k: v / 1e6 / steps for k, v in totals.items()},
                     lambda name: labels.get(name, ("framework overhead", "")))


_TORCH_COPIES = {"copy_", "contiguous", "clone", "cat", "stack", "_to_copy", "to", "repeat", "repeat_interleave",
                 "constant_pad_nd", "pad", "replication_pad3d", "replication_pad3d_backward", "index_select",
                 "upsample_nearest3d", "upsample_nearest3d_backward"}
# no data moves: views, allocation, the autograd engine's and the optimizer's own time
_TORCH_OVERHEAD = {"view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand", "slice", "narrow",
                   "select", "unsqueeze", "squeeze", "split", "split_with_sizes", "unbind", "reshape", "flatten",
                   "unflatten", "detach", "alias", "empty", "empty_strided", "empty_like", "resize_", "chunk"}


def torch_category(op: str) -> str:
    if not op.startswith("aten::"):
        return "framework overhead"  # autograd::engine::..., Optimizer.step#AdamW.step, *Backward0
    op = op.removeprefix("aten::").lower()
    if any(s in op for s in ("scaled_dot_product", "flash_attention", "bmm", "softmax")):
        return "attention"
    if op in ("addmm", "mm", "matmul", "linear"):
        return "matmul"
    if "conv" in op:
        return "conv"
    if "fft" in op:
        return "fft"
    if "norm" in op or op in ("sum", "mean", "var", "std", "amax", "var_mean"):
        return "norm/reduce"
    if op in _TORCH_COPIES:
        return "layout copies"
    return "framework overhead" if op in _TORCH_OVERHEAD else "elementwise/other"


def profile_torch(step, steps: int = 2) -> dict:
    """torch.profiler self CPU time of `steps` steps by aten op: `summarize`d."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ms = {ev.key: ev.self_cpu_time_total / 1e3 / steps for ev in prof.key_averages()}  # microseconds
    return summarize(ms, lambda key: (torch_category(key), ""))


def summarize(ms: dict, label, top: int = 12) -> dict:
    """{name: ms per step}, label(name) -> (category, detail) => ms per step by category and the
    `top` names (with category and detail: the HLO op_name)."""
    by_cat = collections.Counter()
    for name, t in ms.items():
        by_cat[label(name)[0]] += t
    names = sorted(ms, key=ms.get, reverse=True)[:top]
    return {"ms_per_step": dict(by_cat), "top": [[n, *label(n), ms[n]] for n in names]}


# ----------------------------------------------------------------------------- output


def report(name: str, r: dict) -> None:
    ms, fl = r["median_ms"], r["first_loss"]
    print(f"first-step loss: jax {fl['jax']:.7g}  torch {fl['torch']:.7g}  "
          f"(relative difference {r['loss_rel_diff']:.1e})")
    print(f"JAX compile (step + forward) {r['jax_compile_s']:.1f} s; step FLOPs (XLA cost analysis) "
          f"{r['flops_per_step'] / 1e9:.3f} G (3 x forward: {3 * r['flops_forward'] / 1e9:.3f} G)")
    print(f"{'':6}{'median ms':>10}{'GFLOP/s':>9}{'MFU':>7}   all ms")
    for side in ("jax", "torch"):
        runs = " ".join(f"{t:.1f}" for t in r["times_ms"][side])
        print(f"{side:<6}{ms[side]:>10.1f}{r['gflops'][side]:>9.1f}{r['mfu'][side]:>7.1%}   {runs}")
    print(f"{name}: mi_jax speed = {r['torch_over_jax']:.2f}x PyTorch eager (torch_ms / jax_ms)")
    prof = r.get("profile") and {side: p["ms_per_step"] for side, p in r["profile"].items()}
    if prof:
        sums = {side: sum(prof[side].values()) for side in prof}
        print(f"profile, ms per step (self time; sums: jax {sums['jax']:.1f}, torch {sums['torch']:.1f}):")
        print(f"  {'category':<18}{'jax ms':>9}{'%':>6}{'torch ms':>10}{'%':>6}")
        for cat in CATEGORIES:
            j, t = prof["jax"].get(cat, 0.0), prof["torch"].get(cat, 0.0)
            if j or t:
                print(f"  {cat:<18}{j:>9.1f}{j / sums['jax']:>6.0%}{t:>10.1f}{t / sums['torch']:>6.0%}")


if __name__ == "__main__":
    sys.exit(main())
