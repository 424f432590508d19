"""`plan`: per-device memory, FLOPs and an estimated step time of the train / distill (DMD2) /
generate steps, from an ahead-of-time compile on abstract shapes. Nothing is allocated: parameters,
optimiser state and batches are `jax.eval_shape` results carrying their shardings, and each step
is `jit(...).lower(abstract).compile()`d for the mesh over (forced host) devices.

    mi-jax plan --config configs/magicinfinite.py:full,stage2 --mesh fsdp=8 \
        --budget 80 --gpu h100 [--config.prepare.latent_frames=9 ...]

Where the numbers come from:
- memory: `compiled.memory_analysis()` of the per-device program (arguments, outputs, temporaries;
  donated inputs counted once). Compiled by the CPU backend, so it is an estimate of the GPU
  program: XLA:GPU fuses and schedules differently. On CPU the `auto` / `cudnn` / `xla`
  attention is planned as `blockwise` (O(L) memory, like cuDNN flash attention), host
  offloading (`offload_dots`) is not modelled, and CPU-only bf16 artefacts are switched off
  (`CPU_COMPILER_OPTIONS`); `scan_unroll="auto"` is planned as one block per iteration (what it
  means off CPU).
- FLOPs: counted on the step's jaxpr (matmuls and convolutions, scan trip counts and remat
  recomputation included). XLA's `cost_analysis()` counts a loop body once, so with scanned
  layers it undercounts by the layer count; it is reported as `xla_flops_per_device` only.
- time: max(FLOPs per device / (peak bf16 rate x MFU), matmul operand bytes / HBM bandwidth);
  communication is not modelled. The MFU is an assumption (default 40%), stated in the report.
- live streaming on GPUs (with the generate step; `latency`, `--gpus N`): a live window's DiT
  steps, Wav2Vec2 and VAE decode, each counted the same way at the config's shapes, give the
  seconds per window, the real-time factor, the fewest GPUs for real time and the audio-to-frame
  latency of mi_jax/live.py's loop (`stream_timeline`).

Steps are registered with `register_step(name)`: `train` (stage 1/2), `distill` (DMD2, planned
by default for a config with a `distill` section), `generate` (one sampler window).

A tool over the whole stack (it builds the train and distill jobs), so it sits beside cli.py
at the top of the import order, not in parallel/ (which nn/ imports).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import mi_jax.nn.context_parallel  # noqa: F401  (registers the blockwise / ulysses / ring attention)
from mi_jax.config_utils import load_config, parse_args
from mi_jax.data.loader import batch_sharding
from mi_jax.diffusion.guidance import GuidanceSchedule
from mi_jax.models.dit import DiT, example_inputs
from mi_jax.models.dit_config import DiTConfig
from mi_jax.models.vae import TEMPORAL_FACTOR
from mi_jax.parallel.mesh import DEFAULT_RULES, MESH_AXES, logical_shardings, make_mesh, with_rules
from mi_jax.train.distill import make_distill_job
from mi_jax.train.pretrain import make_job
from mi_jax.train.state import state_shardings

GB = 1e9  # budgets and reports in GB (10^9 bytes), as GPU memory is sold


@dataclasses.dataclass(frozen=True)
class GPU:
    """An accelerator as the time estimate sees it: its name, dense bf16 peak FLOP/s, HBM
    bandwidth in bytes/s, memory in GB and dense TF32 peak FLOP/s (float32 matmuls and
    convolutions, as the VAE and Wav2Vec2 run)."""

    name: str
    bf16_flops: float  # dense peak, FLOP/s
    hbm_bandwidth: float  # bytes/s
    memory_gb: float
    tf32_flops: float = 0.0  # dense peak, FLOP/s; 0: half the bf16 peak


# Vendor datasheets: dense (no sparsity) bf16 and TF32 tensor-core peaks and HBM bandwidth.
GPUS = {
    "h100": GPU("H100 SXM", 989e12, 3.35e12, 80, 494.5e12),
    "h200": GPU("H200 SXM", 989e12, 4.8e12, 141, 494.5e12),
    "a100": GPU("A100 SXM", 312e12, 2.0e12, 80, 156e12),
}
DEFAULT_MFU = 0.4
# cheapest recomputation first; each saves more memory than the one before
REMAT_ORDER = ("none", "dots", "dots_no_batch", "offload_dots", "full")


# ------------------------------------------------------------------ steps


@dataclasses.dataclass
class StepSpec:
    """A step to plan: `jit(fn, **jit_kwargs).lower(*args)` under `with_rules(mesh)`.
    args: abstract values (ShapeDtypeStruct with shardings). batch / tokens describe the shape."""

    fn: Callable
    args: tuple
    mesh: jax.sharding.Mesh
    jit_kwargs: dict
    batch: int
    shape: dict
    rules: tuple = DEFAULT_RULES


STEP_BUILDERS: dict[str, Callable[..., StepSpec]] = {}


def register_step(name: str):
    """Registers a step builder for `plan` under `name`.

    `@register_step("distill")` on a `builder(config, mesh, **options) -> StepSpec`; replaces
    an existing builder of that name (e.g. the sampler's window step for "generate").

    Args:
      name: the step's name in `plan(steps=...)` and `mi-jax plan --steps`.

    Returns:
      The decorator (it returns the builder unchanged).
    """

    def deco(builder):
        STEP_BUILDERS[name] = builder
        return builder

    return deco


def _video_frames(latent_frames: int) -> int:
    """Video frames the causal VAE encodes into `latent_frames` latents: 1 + TEMPORAL_FACTOR (T - 1)."""
    return 1 + TEMPORAL_FACTOR * (latent_frames - 1)


def _spatial(config) -> int:
    """Pixels per latent cell side: the `spatial_factor` of the VAE `config.prepare` names (8 for
    the released HunyuanVideo VAE, 4 for a `spatial_compression_ratio=4` one)."""
    from mi_jax.data.prepare import vae_config

    return vae_config(config.prepare).spatial_factor


def abstract_batch(config, batch: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """The training batch `mi-jax prepare` would write for `config.prepare`, as shapes.

    Args:
      config: a run config.
      batch: the batch size (default None: `config.data.global_batch`).

    Returns:
      `{field: ShapeDtypeStruct [B, ...]}` (see mi_jax/data/store.py), plus the loader's `index`.

    Raises:
      ValueError: a frame size that is not a multiple of the VAE's factor times the patch size.
    """
    p, m = config.prepare, config.model
    b = batch or config.data.global_batch
    sf = _spatial(config)
    grid = sf * m.patch_size
    if p.height % grid or p.width % grid:
        raise ValueError(f"prepare.height/width {p.height}x{p.width} must be multiples of {grid} (VAE "
                         f"{sf} x patch {m.patch_size}); e.g. 540 -> 544")
    t, h, w, c = p.latent_frames, p.height // sf, p.width // sf, m.out_channels
    f, s = _video_frames(t), p.speakers
    sds = jax.ShapeDtypeStruct
    spec = dict(
        latents=sds((b, t, h, w, c), jnp.float32),
        ref_latent=sds((b, 1, h, w, c), jnp.float32),
        text_embeds=sds((b, p.text_len, m.text_embed_dim), jnp.float16),
        text_mask=sds((b, p.text_len), jnp.int32),
        pooled=sds((b, m.pooled_projection_dim), jnp.float32),
        face_mask=sds((b, t, h, w), jnp.uint8),
        mouth_mask=sds((b, t, h, w), jnp.uint8),
        speaker_masks=sds((b, s, t, h, w), jnp.uint8),
        index=sds((b,), jnp.int32),
    )
    if m.audio_blocks:
        audio = (b, f, m.audio_feature_layers, m.audio_feature_dim) if s == 1 else \
            (b, s, f, m.audio_feature_layers, m.audio_feature_dim)
        spec["audio_states"] = sds(audio, jnp.float16)
    return spec


@dataclasses.dataclass
class AbstractData:
    """What `make_job` reads from a data source: only `element_spec` (shapes, for planning)."""

    element_spec: dict


def _tokens(config, latent_frames: int) -> dict:
    p, m = config.prepare, config.model
    sf = _spatial(config)
    h, w = p.height // sf // m.patch_size, p.width // sf // m.patch_size
    video = latent_frames // m.patch_size_t * h * w
    return dict(video_tokens=video, text_tokens=p.text_len, tokens=video + p.text_len)


def job_step(job, rules=DEFAULT_RULES) -> StepSpec:
    """The StepSpec of a job's train step, placed as `loop.compile_step` places it.

    Args:
      job: a `loop.Job` (`make_job` or `make_distill_job`).
      rules: the logical-axis rules (default `DEFAULT_RULES`).

    Returns:
      `StepSpec` of the donated-state step.
    """
    config = job.config
    place = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
    state = jax.tree.map(place, job.abstract_state, job.state_shardings)
    batch = jax.tree.map(place, job.data.element_spec, job.batch_shardings)
    p, t = config.prepare, config.prepare.latent_frames
    shape = dict(batch=config.data.global_batch, grad_accum=config.train.grad_accum, frames=_video_frames(t),
                 latent_frames=t, size=f"{p.height}x{p.width}", **_tokens(config, t))
    return StepSpec(job.step_fn, (state, batch), job.mesh,
                    dict(out_shardings=(job.state_shardings, None), donate_argnums=0),
                    config.data.global_batch // config.train.grad_accum, shape, tuple(rules))


def _reshard(job, mesh, rules):
    """`job` with its state and batch placed by `rules` instead of the default table (what-if
    plans: e.g. the optimiser state sharded over context as well as fsdp)."""
    mcfg = DiTConfig.coerce(job.config.model)
    boxed = jax.eval_shape(lambda: DiT(mcfg).init(jax.random.key(0), **example_inputs(mcfg))["params"])
    param_sh = logical_shardings(boxed, mesh, rules)
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    if job.config.init.lora_rank:
        param_sh = {"base": param_sh, "lora": jax.tree.map(lambda _: replicated, job.abstract_state.params["lora"])}
    return dataclasses.replace(
        job, state_shardings=state_shardings(job.abstract_state, param_sh, replicated),
        batch_shardings=jax.tree.map(lambda _: batch_sharding(mesh, rules), job.data.element_spec))


@register_step("train")
def train_step(config, mesh, *, rules=None, **_) -> StepSpec:
    """The stage-1/2 train step exactly as `loop.compile_step` compiles it (donated state).

    Args:
      config: a run config.
      mesh: the devices.
      rules: the logical-axis rules (default None: `DEFAULT_RULES`).
      **_: other steps' options, ignored.

    Returns:
      `StepSpec`.

    Raises:
      ValueError: a micro-batch that does not split over data x fsdp.
    """
    micro, split = config.data.global_batch // config.train.grad_accum, mesh.shape["data"] * mesh.shape["fsdp"]
    if micro % split:
        raise ValueError(f"train: the micro-batch of {micro} (data.global_batch / train.grad_accum) does not split "
                         f"over data x fsdp = {split} devices; change the batch or the mesh")
    job = make_job(config, AbstractData(abstract_batch(config)), mesh)
    if rules is None:
        return job_step(job)
    return job_step(_reshard(job, mesh, rules), rules)


@register_step("distill")
def distill_step(config, mesh, *, rules=None, **_) -> StepSpec:
    """The DMD2 step (mi_jax/train/distill.py) exactly as `mi-jax distill` compiles it (donated
    state): generator and critic (LoRA factors over the one frozen base, or full copies with
    `distill.lora_rank=0`), the real score with its CFG branches, backward simulation, TTUR's
    generator update under `lax.cond` (the plan counts its larger branch).

    Args:
      config: a `...:distill` run config.
      mesh: the devices.
      rules: the logical-axis rules (default None: `DEFAULT_RULES`).
      **_: other steps' options, ignored.

    Returns:
      `StepSpec`.

    Raises:
      ValueError: no `distill` section, or a batch that does not split over data x fsdp.
    """
    if "distill" not in config:
        raise ValueError("distill: the config has no `distill` section; use e.g. configs/magicinfinite.py:tiny,distill")
    batch, split = config.data.global_batch, mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % split:
        raise ValueError(f"distill: the batch of {batch} (data.global_batch) does not split over data x fsdp = "
                         f"{split} devices; change the batch or the mesh")
    job = make_distill_job(config, AbstractData(abstract_batch(config)), mesh, rules=rules, need_teacher=False)
    spec = job_step(job, rules or DEFAULT_RULES)
    spec.shape["grad_accum"] = 1  # the DMD2 step takes the whole batch at once
    spec.batch = batch
    return spec


@register_step("generate")
def generate_window(config, mesh, *, latent_frames: int | None = None, branches: int = 3,
                    dtype: str | None = "bfloat16", rules=None, **_) -> StepSpec:
    """One DiT evaluation of a generation window, at config.prepare's size.

    Args:
      config: a run config.
      mesh: the devices.
      latent_frames: the window's latent frames (default None: `config.prepare.latent_frames`).
      branches: the batch, one per CFG branch (text / audio / reference unconditional +
        conditional; default 3).
      dtype: parameter and compute dtype (default "bfloat16"; None: the config's).
      rules: the logical-axis rules (default None: `DEFAULT_RULES`).
      **_: other steps' options, ignored.

    Returns:
      `StepSpec` of the forward pass.
    """
    mcfg = DiTConfig.coerce(config.model)
    if dtype:
        mcfg = mcfg.replace(dtype=dtype, param_dtype=dtype)
    t = latent_frames or config.prepare.latent_frames
    p = config.prepare
    sf = _spatial(config)
    inputs = jax.eval_shape(lambda: example_inputs(mcfg, batch=branches, frames=t, height=p.height // sf,
                                                   width=p.width // sf, text_len=p.text_len))
    model = DiT(mcfg)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **example_inputs(mcfg))["params"])
    rules = tuple(rules or DEFAULT_RULES)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          nn.unbox(boxed), logical_shardings(boxed, mesh, rules))
    batch_sh = batch_sharding(mesh, rules)
    if branches % math.prod(batch_sh.mesh.shape[a] for a in _axes(batch_sh.spec[0])):
        batch_sh = jax.sharding.NamedSharding(mesh, jax.P())  # 3 branches on 8 devices: replicate
    inputs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=batch_sh) for k, v in inputs.items()}

    def forward(params, inputs):
        return model.apply({"params": params}, **inputs)

    shape = dict(batch=branches, frames=_video_frames(t), latent_frames=t, size=f"{p.height}x{p.width}",
                 dtype=mcfg.dtype, **_tokens(config, t))
    return StepSpec(forward, (params, inputs), mesh, {}, branches, shape, rules)


def _axes(entry) -> tuple:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


# ------------------------------------------------------------------ FLOPs from the jaxpr


def _dot_flops(eqn) -> tuple[float, float, float]:
    """[flops, operand + result bytes, the same bytes again for a batched dot (attention's
    per-head score and value products; a layer's x @ W has no batch dimension) else 0]."""
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    (lc, _), (lb, _) = eqn.params["dimension_numbers"]
    k = math.prod(lhs.shape[i] for i in lc)
    nbytes = float(sum(math.prod(a.shape) * a.dtype.itemsize for a in (lhs, rhs, out)))
    return 2.0 * math.prod(out.shape) * k, nbytes, nbytes if len(lb) else 0.0


def _conv_flops(eqn) -> tuple[float, float, float]:
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
    nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in (lhs, rhs, out))
    return 2.0 * math.prod(out.shape) * math.prod(rhs.shape) / out_features, float(nbytes), 0.0


def _walk(jaxpr) -> np.ndarray:
    """[flops, matmul bytes, batched-dot bytes] of a jaxpr (global shapes; shard_map bodies
    scaled by their mesh)."""
    total = np.zeros(3)
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
            continue
        if name == "conv_general_dilated":
            total += _conv_flops(eqn)
            continue
        subs = [j.jaxpr if isinstance(j, jax.extend.core.ClosedJaxpr) else j
                for j in jax.extend.core.jaxprs_in_params(eqn.params)]
        if not subs:
            continue
        counts = [_walk(j) for j in subs]
        if name == "cond":
            total += max(counts, key=lambda c: c[0])
            continue
        times = 1
        if name == "scan":
            times = eqn.params["length"]
        elif name == "shard_map":
            times = math.prod(eqn.params["mesh"].shape[a] for a in eqn.params["newly_manual_axes"])
        total += times * sum(counts)  # while loops: trip count unknown, counted once
    return total


def count_flops(fn, *args) -> dict[str, float]:
    """Matmul / conv FLOPs and matmul operand bytes of `fn(*args)` for the whole (global) step.

    Scans count `length` times, shard_map bodies times their mesh, `cond` its larger branch,
    while loops once (their trip count is unknown).

    Args:
      fn: the step function.
      *args: its arguments (abstract values are enough).

    Returns:
      `{"flops", "matmul_bytes", "batched_dot_bytes"}`: the last is the part of matmul_bytes in
      dots with batch dimensions (attention's scores and values per head), which a fused
      flash-attention kernel keeps on chip.
    """
    flops, nbytes, batched = _walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return dict(flops=float(flops), matmul_bytes=float(nbytes), batched_dot_bytes=float(batched))


# ------------------------------------------------------------------ one compile


# CPU compile options for planning:
# - LLVM's optimisations only slow the plan down: buffer assignment, hence
#   memory_analysis, is decided before them and comes out byte-identical without them.
# - The CPU has no bf16 dots, so XLA upcasts bf16 weights to f32 and while-loop-invariant code
#   motion then hoists that upcast of the whole scanned weight stack out of the layer loop: an f32
#   copy of every layer at once, which the GPU program never has. Without the pass the upcast
#   stays per layer.
CPU_COMPILER_OPTIONS = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True,
                            xla_disable_hlo_passes="while-loop-invariant-code-motion")


def compiler_options() -> dict:
    """The compile options planning uses: `CPU_COMPILER_OPTIONS` on CPU, none elsewhere."""
    return dict(CPU_COMPILER_OPTIONS) if jax.default_backend() == "cpu" else {}


def compile_step(spec: StepSpec):
    """Compiles a step as `loop.compile_step` does for the train step.

    Returns:
      `(compiled, seconds)`.
    """
    t0 = time.time()
    with with_rules(spec.mesh, spec.rules):
        compiled = jax.jit(spec.fn, **spec.jit_kwargs).lower(*spec.args).compile(compiler_options=compiler_options())
    return compiled, time.time() - t0


def memory_gb(compiled) -> dict[str, float]:
    """Per-device memory of a compiled step, in GB.

    Returns:
      `{"arguments", "outputs", "aliased", "temporaries", "code", "total"}`; total = arguments +
      outputs - aliased (donated buffers reused for outputs) + temporaries + generated code.
    """
    m = compiled.memory_analysis()
    parts = dict(arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes, aliased=m.alias_size_in_bytes,
                 temporaries=m.temp_size_in_bytes, code=m.generated_code_size_in_bytes)
    parts["total"] = parts["arguments"] + parts["outputs"] - parts["aliased"] + parts["temporaries"] + parts["code"]
    return {k: v / GB for k, v in parts.items()}


def work_split(mesh, batch: int) -> float:
    """How many ways a step's work divides: the batch over (data, fsdp) (padded when uneven), the
    tokens over context, heads / MLP over tensor."""
    bf = mesh.shape["data"] * mesh.shape["fsdp"]
    return batch / math.ceil(batch / bf) * mesh.shape["context"] * mesh.shape["tensor"]


def estimate_seconds(flops_per_device: float, bytes_per_device: float, gpu: GPU, mfu: float) -> float:
    """A step's seconds: compute at `mfu` of the peak or the matmuls' memory traffic, the slower."""
    return max(flops_per_device / (gpu.bf16_flops * mfu), bytes_per_device / gpu.hbm_bandwidth)


def plan_step(spec: StepSpec, gpu: GPU, mfu: float = DEFAULT_MFU) -> dict:
    """Compiles one step and measures it.

    Args:
      spec: the step (`StepSpec`).
      gpu: the accelerator of the time estimate.
      mfu: the model-FLOPs utilisation assumed (default `DEFAULT_MFU`).

    Returns:
      `{"shape", "memory_gb", "flops_per_step", "flops_per_device", "xla_flops_per_device",
      "est_seconds", "compile_seconds"}`; memory in GB per device (`memory_gb`).
    """
    compiled, seconds = compile_step(spec)
    with with_rules(spec.mesh, spec.rules):
        counted = count_flops(spec.fn, *spec.args)
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    split = work_split(spec.mesh, spec.batch)
    flops_dev, bytes_dev = counted["flops"] / split, counted["matmul_bytes"] / split
    return dict(shape=spec.shape, memory_gb=memory_gb(compiled), flops_per_step=counted["flops"],
                flops_per_device=flops_dev, xla_flops_per_device=float(cost.get("flops", 0.0)),
                est_seconds=estimate_seconds(flops_dev, bytes_dev, gpu, mfu), compile_seconds=round(seconds, 1))


# ------------------------------------------------------------------ the plan


def _with(config, train: dict | None = None, **model_fields):
    """A copy of `config` with `model_fields` (and `train` fields) replaced; `scan_unroll="auto"`
    planned as an accelerator runs it (one block per iteration; "auto" unrolls on CPU only)."""
    c = copy.deepcopy(config)
    if c.model.get("scan_unroll", "auto") == "auto":
        model_fields.setdefault("scan_unroll", 1)
    with c.model.ignore_type():
        c.model.update(model_fields)
    if train:
        c.train.update(train)
    return c


def _planned_attention(attention: str) -> str:
    """cuDNN cannot compile on CPU and XLA's attention materialises [L, L] scores: plan the
    blockwise kernel instead, whose memory is what cuDNN's flash attention needs."""
    if jax.default_backend() == "cpu" and attention in ("auto", "cudnn", "xla"):
        return "blockwise"
    return attention


def _named_devices(mesh_spec) -> int | None:
    """Devices a mesh spec names (product of its sizes); None when one is -1 or none is given."""
    if isinstance(mesh_spec, dict):
        sizes = dict(mesh_spec)
    else:
        parts = (p.partition("=") for p in (mesh_spec or "").split(",") if p.strip())
        sizes = {name.strip(): int(value) for name, _, value in parts}
    if not sizes or -1 in sizes.values():
        return None
    return math.prod(sizes.values())


def ensure_devices(mesh_spec) -> jax.sharding.Mesh:
    """The mesh for `mesh_spec` over the first devices.

    Raises:
      RuntimeError: fewer devices than the spec names (with how to force host devices).
    """
    n = _named_devices(mesh_spec) or jax.device_count()
    if jax.device_count() < n:
        raise RuntimeError(
            f"mesh {mesh_spec!r} needs {n} devices, {jax.device_count()} present. Plan on forced host devices: "
            f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} JAX_PLATFORMS=cpu before JAX starts "
            f"(or call jax.config.update('jax_num_cpu_devices', {n}) first).")
    return make_mesh(mesh_spec, jax.devices()[:n])


def rules_with_embed(axes: Sequence[str]) -> tuple:
    """DEFAULT_RULES with parameters' `embed` dimension sharded over `axes` (e.g. fsdp and context:
    context parallelism then also splits the weights and optimiser state, ZeRO-style, instead of
    replicating them over the context axis)."""
    axes = tuple(axes)
    return tuple((name, (axes if len(axes) > 1 else axes[0]) if name == "embed" else target)
                 for name, target in DEFAULT_RULES)


def _mesh_candidates(mesh, heads: int) -> list[tuple[dict, str | None, int]]:
    """(mesh sizes, attention or None, split) over the same devices, trading fsdp for context
    parallelism or tensor parallelism `split` ways."""
    n = mesh.devices.size
    out = []
    for c in (2, 4, 8):
        if n % c == 0 and c != mesh.shape["context"]:
            out.append(({"fsdp": n // c, "context": c}, "ulysses" if heads % c == 0 else "ring", c))
    for t in (2, 4, 8):
        if n % t == 0 and heads % t == 0 and t != mesh.shape["tensor"]:
            out.append(({"fsdp": n // t, "tensor": t}, None, t))
    return out


def _accum_for(config, sizes: dict, split: int) -> int:
    """grad_accum for a mesh with `split`-way context / tensor parallelism: `split` times more
    micro-batches, so each device still holds one sample's tokens / split (a smaller fsdp axis with
    the same micro-batch would only give each device more samples). Unchanged when it cannot divide."""
    accum, batch = config.train.grad_accum * split, config.data.global_batch
    ok = batch % accum == 0 and (batch // accum) % (sizes.get("data", 1) * sizes.get("fsdp", 1)) == 0
    return accum if ok else config.train.grad_accum


def default_steps(config) -> tuple[str, ...]:
    """train and generate; with a `distill` section, the DMD2 step beside the train step (the
    plain fine-tuning step it is measured against)."""
    return ("train", "distill", "generate") if "distill" in config else ("train", "generate")


def sampling_branches(config) -> int:
    """DiT passes per sampling step of `config.sample`: the batched CFG branches (1 when the
    scales are all 1, as for a distilled model)."""
    s = config.sample
    return len(GuidanceSchedule(text=s.cfg_text, audio=s.cfg_audio, reference=s.cfg_reference).branches)


def plan(config, mesh_spec=None, *, budget_gb: float = 80.0, gpu: str = "h100",
         steps: Sequence[str] | None = None, mfu: float = DEFAULT_MFU, suggest: bool = True,
         generate_mesh_spec=None, window_frames: int | None = None, cfg_branches: int | None = None,
         generate_dtype: str | None = "bfloat16", max_trials: int = 6, rules=None, gpus: int | None = None,
         pipelined: bool = False, log: Callable[[str], Any] | None = None) -> dict:
    """Compiles each step for `config` on a mesh and reports its memory, FLOPs and time.

    `mi-jax plan`. Runs on forced host devices (no GPU needed): the compiled program's buffer
    sizes are the GPU's.

    Args:
      config: a run config.
      mesh_spec: the training mesh, e.g. "fsdp=8,context=1" (default None: every device over fsdp).
      budget_gb: memory per device a step must fit (default 80).
      gpu: "h100" (default), "h200" or "a100": the peak FLOP/s and bandwidth of the estimate.
      steps: step names (default None: `default_steps(config)`: train, then distill for a config
        with a `distill` section, then generate).
      mfu: the model-FLOPs utilisation the time estimate assumes (default `DEFAULT_MFU`).
      suggest: over budget, compile alternatives (default True).
      generate_mesh_spec: the generate step's mesh (default None: `mesh_spec`).
      window_frames: the generate step's latent frames (default None: `config.prepare.latent_frames`).
      cfg_branches: the generate step's batch (default None: the branches `config.sample`'s
        guidance runs: 3, or 1 for a distilled model).
      generate_dtype: the generate step's parameter and compute dtype (default "bfloat16").
      max_trials: alternatives compiled per step at most (default 6).
      rules: a logical-axis rules table (default None: `mesh.DEFAULT_RULES`; see `rules_with_embed`).
      gpus: with the generate step, the GPUs of the live-streaming estimate (`latency`; default
        None: the generate mesh's devices).
      pipelined: the live-streaming estimate decodes beside the next window's steps (default False).
      log: called with a progress line before each compile (default None: silent).

    Returns:
      `{"gpu", "budget_gb", "mfu", "steps": {name: {...}}, "warnings": [...]}`, with the generate
      step also `"latency"`: `latency(config, gpus=...)` (live streaming on GPUs); each step has
      `shape`, `mesh`, `remat_policy`, `attention`, `memory_gb` (arguments, outputs, aliased,
      temporaries, total per device), `flops_per_step`, `flops_per_device`, `est_seconds`,
      `compile_seconds`, `fits`, and, over budget with `suggest`, `alternatives` (the remat
      policies then meshes compiled, in order, with their totals) and `suggestion`.

    Raises:
      ValueError: an unknown `gpu` or step, `gpus` < 1 or `mfu` outside (0, 1].
      RuntimeError: a mesh naming more devices than there are.
    """
    say = log or (lambda _: None)
    steps = default_steps(config) if steps is None else steps
    if cfg_branches is None:
        cfg_branches = sampling_branches(config)
    if gpu.lower() not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; choose one of {sorted(GPUS)}")
    unknown = [s for s in steps if s not in STEP_BUILDERS]
    if unknown:
        raise ValueError(f"unknown step(s) {unknown}; registered: {sorted(STEP_BUILDERS)}")
    _check_gpus(gpus, mfu, optional=True)
    card = GPUS[gpu.lower()]
    report = dict(gpu=card.name, budget_gb=budget_gb, mfu=mfu, steps={}, warnings=[])
    for name in steps:
        mesh = ensure_devices(generate_mesh_spec if name == "generate" and generate_mesh_spec else mesh_spec)
        options = dict(rules=rules)
        if name == "generate":
            options.update(latent_frames=window_frames, branches=cfg_branches, dtype=generate_dtype)
        policy, attention = config.model.remat_policy, _planned_attention(config.model.attention)
        if name == "generate":
            policy = "none"  # no backward pass: nothing to rematerialise
        say(f"plan {name}: compiling (remat={policy}, attention={attention}, mesh={dict(mesh.shape)}) ...")
        entry = plan_step(STEP_BUILDERS[name](_with(config, remat_policy=policy, attention=attention), mesh, **options),
                          card, mfu)
        entry.update(mesh=dict(mesh.shape), remat_policy=policy, attention=attention)
        entry["fits"] = entry["memory_gb"]["total"] <= budget_gb
        say(f"plan {name}: {entry['memory_gb']['total']:.3g} GB/device, compiled in {entry['compile_seconds']} s")
        if not entry["fits"]:
            report["warnings"].append(
                f"{name}: {entry['memory_gb']['total']:.3g} GB per device is over the {budget_gb:g} GB budget "
                f"(remat_policy={policy}, mesh={_mesh_str(mesh)})")
            if suggest:
                _suggest(name, config, mesh, policy, attention, options, card, mfu, budget_gb, entry, report, say,
                         max_trials)
        report["steps"][name] = entry
        if name == "generate":
            say("plan latency: counting a live window's DiT, VAE and Wav2Vec2 work ...")
            report["latency"] = latency(config, gpu=gpu, gpus=gpus or int(mesh.devices.size), mfu=mfu,
                                        pipelined=pipelined)
    return report


def _suggest(name, config, mesh, policy, attention, options, card, mfu, budget_gb, entry, report, say,
             max_trials):
    """Remat policies in REMAT_ORDER after the current one, then other meshes (with `full`, and
    for training the grad_accum that keeps per-device tokens falling: `_accum_for`)."""
    alternatives = entry["alternatives"] = []
    cpu = jax.default_backend() == "cpu"
    accum = config.train.grad_accum if name != "generate" else 1
    candidates = [(p, mesh, attention, accum) for p in REMAT_ORDER[REMAT_ORDER.index(policy) + 1:]
                  if name != "generate" and not (cpu and p == "offload_dots")]
    for sizes, attn, split in _mesh_candidates(mesh, config.model.num_attention_heads):
        # only the train step accumulates gradients over micro-batches
        candidates.append(("full" if name != "generate" else "none", make_mesh(sizes, list(mesh.devices.flat)),
                           attn or attention, accum if name != "train" else _accum_for(config, sizes, split)))
    for p, m, attn, acc in candidates[:max_trials]:
        say(f"plan {name}: trying remat={p}, attention={attn}, mesh={_mesh_str(m)}, grad_accum={acc} ...")
        row = dict(remat_policy=p, mesh=_mesh_str(m), attention=attn, grad_accum=acc)
        try:
            train = {"grad_accum": acc} if name != "generate" else None
            step = STEP_BUILDERS[name](_with(config, train, remat_policy=p, attention=attn), m, **options)
            total = plan_step(step, card, mfu)["memory_gb"]["total"]
        except Exception as e:  # noqa: BLE001 - a mesh the model cannot use is a result, not a crash
            alternatives.append(dict(row, error=str(e).splitlines()[0][:200]))
            continue
        alternatives.append(dict(row, total_gb=total))
        if total <= budget_gb:
            parts = ([] if name == "generate" else [f"remat_policy={p}"]) + \
                ([] if m is mesh else [f"mesh {_mesh_str(m)}", f"attention={attn}"]) + \
                ([] if acc == accum else [f"train.grad_accum={acc}"])
            entry["suggestion"] = ", ".join(parts)
            report["warnings"].append(f"{name}: fits with {entry['suggestion']} ({total:.3g} GB per device)")
            return
    hint = "" if options.get("rules") else (
        "; context / tensor parallelism replicate the weights and optimiser state unless parameters are "
        "also sharded over those axes: try rules_with_embed(('fsdp', 'context')) (--embed-axes fsdp,context)")
    report["warnings"].append(f"{name}: none of the {len(alternatives)} alternatives fits {budget_gb:g} GB; "
                              f"lower the batch or the window, or add devices{hint}")


def _mesh_str(mesh) -> str:
    return ",".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES if mesh.shape[a] > 1) or "single device"


# ------------------------------------------------------------------ live streaming: latency on GPUs


def _wav2vec2_config(prepare_cfg):
    """The Wav2Vec2 `prepare.wav2vec2` names, without its weights: `random:SEED` ->
    `prepare.wav2vec2_random`; a transformers folder -> its config.json; "" (the full configs,
    no folder named yet) -> wav2vec2-base, whose 12 layers of 768 the full configs' audio path takes."""
    from mi_jax.models.wav2vec2 import WAV2VEC2_BASE, Wav2Vec2Config

    spec = prepare_cfg.wav2vec2
    if spec.startswith("random"):
        return Wav2Vec2Config(**prepare_cfg.wav2vec2_random.to_dict())
    if spec:
        with open(os.path.join(spec, "config.json")) as f:
            return Wav2Vec2Config.from_transformers(json.load(f))
    return WAV2VEC2_BASE


@dataclasses.dataclass(frozen=True)
class WindowWork:
    """The counted work of one live window, each part `{"flops", "matmul_bytes"}` of the whole
    computation (`count_flops`): `dit` one denoising step (all CFG branches batched), `dit_param_bytes`
    the DiT's weights (read whole by every GPU that splits the step), `vae_chunk` one
    `VAEStream.decode_chunk` (`latents_per_chunk` latents -> `frames_per_chunk` frames), `audio` one
    Wav2Vec2 call on the window's audio segment of `audio_seconds`."""

    dit: dict
    dit_param_bytes: float
    vae_chunk: dict
    audio: dict
    audio_seconds: float
    latents_first: int
    latents_per_chunk: int
    frames_per_chunk: int
    heads: int


def count_window_work(config, *, branches: int | None = None, dtype: str | None = "bfloat16") -> WindowWork:
    """Counts the FLOPs of one live window's parts at the config's shapes, on abstract values.

    Traces (no compile, nothing allocated) the DiT's window forward at `sample.window` latents of
    `prepare.height x width`, one streaming VAE decode chunk and Wav2Vec2 on the segment
    mi_jax/live.py feeds it (1 s of context + the window's frames + the lookahead).

    Args:
      config: a run config.
      branches: the DiT's batch, one per CFG branch (default None: `sampling_branches(config)`).
      dtype: the DiT's parameter and compute dtype (default "bfloat16"; None: the config's).

    Returns:
      `WindowWork`.
    """
    from mi_jax.data.prepare import vae_config
    from mi_jax.live import CONTEXT_S, LOOKAHEAD_S
    from mi_jax.models import wav2vec2
    from mi_jax.models.vae import CausalVAE, Tiling, VAEStream, abstract_vae_params

    branches = sampling_branches(config) if branches is None else branches
    mesh = make_mesh("fsdp=1", jax.devices()[:1])
    planned = _with(config, remat_policy="none", attention=_planned_attention(config.model.attention))
    spec = generate_window(planned, mesh, latent_frames=config.sample.window, branches=branches, dtype=dtype)
    with with_rules(mesh, spec.rules):
        dit = count_flops(spec.fn, *spec.args)
    param_bytes = float(sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(spec.args[0])))

    p = config.prepare
    vcfg = vae_config(p)
    stream = VAEStream(CausalVAE(vcfg), Tiling(**dict(p.get("vae_tiling") or {})))
    params = nn.unbox(abstract_vae_params(vcfg))
    sf = vcfg.spatial_factor
    latents = lambda n: jax.ShapeDtypeStruct((1, n, p.height // sf, p.width // sf, vcfg.latent_channels),  # noqa: E731
                                             jnp.float32)
    state = jax.eval_shape(stream.decode_start, params, latents(stream.latents_first))[1]
    vae_chunk = count_flops(stream.decode_chunk, params, state, latents(stream.latents_per_chunk))

    wcfg = _wav2vec2_config(p)
    w2v = wav2vec2.Wav2Vec2(wcfg)
    w2v_params = nn.unbox(wav2vec2.abstract_params(wcfg))
    fps, rate = float(p.fps), int(p.sample_rate)
    lookahead = float(config.sample.get("stream_lookahead_s", LOOKAHEAD_S))
    span = _video_frames(config.sample.window)
    samples = round(CONTEXT_S * rate) + math.ceil((span + math.ceil(lookahead * fps - 1e-9)) * rate / fps)
    audio = count_flops(lambda q, x: w2v.apply({"params": q}, x).last_hidden_state, w2v_params,
                        jax.ShapeDtypeStruct((1, samples), jnp.float32))
    tiles = stream.tiling
    return WindowWork(dit=dit, dit_param_bytes=param_bytes, vae_chunk=vae_chunk, audio=audio,
                      audio_seconds=samples / rate, latents_first=stream.latents_first,
                      latents_per_chunk=stream.latents_per_chunk,
                      frames_per_chunk=tiles.tile_sample_stride_num_frames,
                      heads=DiTConfig.coerce(config.model).num_attention_heads)


def dit_step_seconds(work: WindowWork, gpu: GPU, gpus: int, mfu: float) -> float:
    """One denoising step of the window split `gpus` ways by sequence (context) parallelism.

    Each GPU computes 1/`gpus` of the FLOPs and moves 1/`gpus` of the activations' matmul
    bytes, but reads every weight (the weights are replicated over the context axis);
    attention's score and value products (`batched_dot_bytes`) stay on chip, as in a fused
    flash-attention kernel (cuDNN's on GPUs); communication is not modelled. `estimate_seconds`
    of that share.

    Args:
      work: `count_window_work`'s result.
      gpu: the card.
      gpus: the GPUs splitting the step (>= 1).
      mfu: the model-FLOPs utilisation assumed.

    Returns:
      Seconds.
    """
    activations = max(work.dit["matmul_bytes"] - work.dit["batched_dot_bytes"] - work.dit_param_bytes, 0.0)
    return estimate_seconds(work.dit["flops"] / gpus, activations / gpus + work.dit_param_bytes, gpu, mfu)


def _fp32_seconds(counted: dict, gpu: GPU, mfu: float) -> float:
    """float32 work (the VAE, Wav2Vec2) on one GPU: at the TF32 tensor-core peak x `mfu`."""
    peak = gpu.tf32_flops or gpu.bf16_flops / 2
    return max(counted["flops"] / (peak * mfu), counted["matmul_bytes"] / gpu.hbm_bandwidth)


def stream_timeline(*, window: int, overlap: int, fps: float, lookahead_s: float, compute_s: float,
                    chunk_s: float, latents_first: int, latents_per_chunk: int, frames_per_chunk: int,
                    pipelined: bool = False, windows: int = 24) -> dict:
    """When each frame of a live stream comes out, given each part's seconds: mi_jax/live.py's
    loop as a discrete-event model.

    The audio is spoken in real time from t = 0. Window k runs once the audio of its frames plus
    the lookahead is in (frame `4 k (W - 1 - O) + 1 + 4 (W - 1)` + lookahead frames) and the
    previous work is done: its audio features and denoising steps (`compute_s`), then the
    streaming VAE decodes every full tile its latents complete (`chunk_s` each; a first tile of
    `latents_first` latents, then `latents_per_chunk` at a time; leftovers wait for the next
    window), each tile's frames yielded when it is decoded. `pipelined` gives the decoder a
    resource of its own (window k + 1's steps run while window k decodes).

    Args:
      window: latents per window W (`sample.window`).
      overlap: latents carried O (`sample.overlap`).
      fps: video frames per second.
      lookahead_s: audio read past a window's last frame before it runs.
      compute_s: a window's audio features + denoising steps, seconds.
      chunk_s: one VAE decode tile, seconds.
      latents_first: latents of the first decode tile.
      latents_per_chunk: latents of each later tile.
      frames_per_chunk: frames a later tile yields (the first yields one more).
      pipelined: the decoder runs beside the DiT (default False: one after the other, as live.py).
      windows: windows simulated (default 24).

    Returns:
      `{"first_frame_s", "latency_s"}`: when the first frame comes out (from the first audio) and
      each frame's latency (yield time minus the end of its audio), float64 [frames].
    """
    tf = TEMPORAL_FACTOR
    new = window - 1 - overlap
    ahead = math.ceil(lookahead_s * fps - 1e-9)
    dit_free = dec_free = 0.0
    buffered, started, emitted, out = 1, False, 0, []  # the decoder's buffer starts with the portrait's latent
    for k in range(windows):
        ready = (tf * new * k + 1 + tf * (window - 1) + ahead) / fps
        done = max(dit_free, ready) + compute_s
        dit_free = done
        buffered += window - 1 if k == 0 else new
        t = max(dec_free, done) if pipelined else done
        while True:
            if not started and buffered >= latents_first:
                take, frames, started = latents_first, frames_per_chunk + 1, True
            elif started and buffered >= latents_per_chunk:
                take, frames = latents_per_chunk, frames_per_chunk
            else:
                break
            t += chunk_s
            buffered -= take
            out.append(t - (emitted + 1 + np.arange(frames)) / fps)
            emitted += frames
        if pipelined:
            dec_free = t
        else:
            dit_free = t
    latency = np.concatenate(out) if out else np.zeros(0)
    return dict(first_frame_s=float(latency[0]) if latency.size else None, latency_s=latency)


def _check_gpus(gpus, mfu, optional: bool = False) -> None:
    """Raises ValueError for a GPU count that is not a whole number >= 1 (None passes when
    `optional`) or an MFU outside (0, 1]."""
    if not (optional and gpus is None) and (isinstance(gpus, bool) or not isinstance(gpus, (int, np.integer))
                                            or gpus < 1):
        raise ValueError(f"gpus={gpus!r}: the GPUs splitting a window must be a whole number >= 1")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu={mfu!r}: the assumed model-FLOPs utilisation must be in (0, 1]")


def latency(config, *, gpu: str = "h100", gpus: int = 1, mfu: float = DEFAULT_MFU, pipelined: bool = False,
            max_gpus: int = 4096, work: WindowWork | None = None) -> dict:
    """Live streaming on `gpus` GPUs: seconds per window, real-time factor and latencies.

    A window (`sample.window` latents, `sample.overlap` carried) gives `4 (W - 1 - O)` new frames.
    Its compute is `sample.steps` DiT evaluations of all its CFG branches at once (FLOPs counted
    at the config's shapes, split over `gpus` by sequence parallelism), Wav2Vec2 on its audio
    segment and the VAE decode of its new latents (float32, on one GPU, not split). The
    latencies come from `stream_timeline` (mi_jax/live.py's loop) with those times. Why: what a
    full-size model needs for real time, before renting the GPUs.

    Args:
      config: a run config (the distilled one for few-step sampling).
      gpu: "h100" (default), "h200" or "a100".
      gpus: GPUs splitting each window's DiT steps (default 1).
      mfu: the model-FLOPs utilisation assumed for every part (default `DEFAULT_MFU`).
      pipelined: the VAE decode of window k runs beside window k + 1's steps (default False:
        one after the other, as mi_jax/live.py runs them).
      max_gpus: the largest GPU count searched for real time (default 4096).
      work: the counted work (default None: `count_window_work(config)`).

    Returns:
      A dict: `gpu`, `gpus`, `mfu`, `pipelined`, `window` (latents, overlap, new_frames,
      new_seconds, steps, cfg_branches, tokens), `seconds` (dit_step, dit, audio, vae, per_window:
      the time between windows, compute: all parts of one window), `tflop` (dit_step, audio,
      vae), `realtime_factor` (video seconds per compute second), `realtime` (bool),
      `min_gpus_realtime` (the fewest GPUs with factor >= 1, None when none up to `max_gpus`:
      the unsplit parts alone are too slow), `latency_s` (steady-state p50 and max, None
      when slower than real time: it then grows by `latency_growth_s_per_window`),
      `first_frame_s`, `lookahead_s`, `max_latency_s` (the lateness budget), `within_budget`,
      `min_gpus_within_budget` (the fewest GPUs whose steady max latency is within the budget,
      None when none up to `max_gpus`: the window's own span is too long) and `assumptions`
      (lines).

    Raises:
      ValueError: an unknown gpu, gpus < 1, mfu outside (0, 1] or a window with no new frames.
    """
    from mi_jax.live import LOOKAHEAD_S, MAX_LATENCY_S

    if not isinstance(gpu, str) or gpu.lower() not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; choose one of {sorted(GPUS)}")
    _check_gpus(gpus, mfu)
    s, p = config.sample, config.prepare
    new = s.window - 1 - s.overlap
    if new < 1:
        raise ValueError(f"sample.window={s.window} with sample.overlap={s.overlap} leaves no new latents per window")
    card = GPUS[gpu.lower()]
    work = work or count_window_work(config)
    fps = float(p.fps)
    lookahead = float(s.get("stream_lookahead_s", LOOKAHEAD_S))
    budget = float(s.get("stream_max_latency_s", MAX_LATENCY_S))
    steps, branches = int(s.steps), sampling_branches(config)
    new_frames = TEMPORAL_FACTOR * new
    span = new_frames / fps
    audio_s = _fp32_seconds(work.audio, card, mfu)
    chunk_s = _fp32_seconds(work.vae_chunk, card, mfu)
    vae_s = chunk_s * new / work.latents_per_chunk  # the tiles a window completes, on average

    def times(n: int) -> tuple[float, float, float]:
        step = dit_step_seconds(work, card, n, mfu)
        busy = audio_s + steps * step
        return step, busy, max(busy, vae_s) if pipelined else busy + vae_s

    def stream(n: int) -> tuple[float, float | None, float | None, float]:
        """(real-time factor, steady p50, steady max, first frame) on n GPUs."""
        busy, period = times(n)[1:]
        timeline = stream_timeline(window=s.window, overlap=s.overlap, fps=fps, lookahead_s=lookahead, compute_s=busy,
                                   chunk_s=chunk_s, latents_first=work.latents_first,
                                   latents_per_chunk=work.latents_per_chunk,
                                   frames_per_chunk=work.frames_per_chunk, pipelined=pipelined)
        steady = timeline["latency_s"][_video_frames(s.window):]  # after the first window (its warm-up)
        keeps_up = span / period >= 1 and steady.size
        return (span / period, round(float(np.median(steady)), 4) if keeps_up else None,
                round(float(steady.max()), 4) if keeps_up else None, timeline["first_frame_s"])

    def within(n: int) -> bool:
        worst = stream(n)[2]
        return worst is not None and worst <= budget

    step_s, busy_s, period = times(gpus)
    rtf, p50, worst, first = stream(gpus)
    realtime = rtf >= 1
    need = next((n for n in range(1, max_gpus + 1) if span / times(n)[2] >= 1), None)
    # the latency falls as GPUs are added, towards what the unsplit parts and the audio's wait leave
    in_budget = None
    if need is not None and within(max_gpus):
        lo, hi = need, max_gpus
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if within(mid) else (mid + 1, hi)
        in_budget = lo
    tokens = _tokens(config, s.window)
    attention = "ulysses" if work.heads % gpus == 0 else "ring"  # Ulysses splits heads, ring any sequence
    return dict(
        gpu=card.name, gpus=int(gpus), mfu=mfu, pipelined=pipelined,
        window=dict(latents=int(s.window), overlap=int(s.overlap), new_frames=new_frames, new_seconds=round(span, 4),
                    fps=fps, steps=steps, cfg_branches=branches, tokens=tokens["tokens"],
                    audio_seconds=round(work.audio_seconds, 4)),
        seconds=dict(dit_step=step_s, dit=steps * step_s, audio=audio_s, vae=vae_s, per_window=period,
                     compute=busy_s + vae_s),
        tflop=dict(dit_step=work.dit["flops"] / 1e12, audio=work.audio["flops"] / 1e12,
                   vae=work.vae_chunk["flops"] * new / work.latents_per_chunk / 1e12),
        realtime_factor=rtf, realtime=realtime, min_gpus_realtime=need, min_gpus_within_budget=in_budget,
        attention_for_gpus=attention,
        latency_s=dict(p50=p50, max=worst),
        latency_growth_s_per_window=None if realtime else round(period - span, 4),
        first_frame_s=round(first, 4),
        lookahead_s=lookahead, max_latency_s=budget, within_budget=bool(realtime and worst <= budget),
        assumptions=[
            f"{mfu:.0%} MFU for every part (assumed): the DiT in bf16 at the {card.bf16_flops / 1e12:.0f} TFLOP/s "
            f"peak, the VAE and Wav2Vec2 in float32 at the {(card.tf32_flops or card.bf16_flops / 2) / 1e12:.0f} "
            f"TFLOP/s TF32 peak; a part is the slower of its FLOPs at that rate and its matmul bytes at "
            f"{card.hbm_bandwidth / 1e12:.2f} TB/s, attention's score and value products kept on chip (flash "
            "attention; the step table's est s counts them as memory traffic)",
            f"the DiT step split evenly over {gpus} GPU(s) by sequence parallelism ({attention} attention for "
            "this count), every GPU reading all weights; communication not modelled",
            "the VAE decode and Wav2Vec2 on one GPU, not split; "
            + ("the decode of window k beside window k+1's steps (pipelined)" if pipelined else
               "one after the other (audio features, steps, decode), as mi_jax/live.py runs them"),
            f"audio spoken in real time; a window runs once its frames' audio + {lookahead:g} s lookahead is in; "
            "compilation and the one-off text / portrait encoding not counted",
        ])


# ------------------------------------------------------------------ printing


def format_report(report: dict) -> str:
    """The plan as text: a table with one row per step, then the alternatives compiled and the
    warnings.

    Args:
      report: what `plan` returns.

    Returns:
      The lines, joined.
    """
    lines = [f"GPU {report['gpu']}, budget {report['budget_gb']:g} GB per device, est s at "
             f"{report['mfu']:.0%} MFU (assumed; communication not modelled). Memory in GB per device: "
             "total = args + outs - donated + temps.", ""]
    head = (f"{'step':<9} {'shape (B, size, frames/latent, tokens)':<40} {'mesh':<10} {'attention':<9} "
            f"{'remat':<13} {'args':>6} {'outs':>6} {'temps':>6} {'total':>6} {'TFLOP/dev':>9} {'est s':>6} "
            f"{'compile s':>9} fits")
    lines += [head, "-" * len(head)]
    for name, e in report["steps"].items():
        s, m = e["shape"], e["memory_gb"]
        shape = f"B={s['batch']} {s['size']} {s['frames']}f/{s['latent_frames']}lat {s['tokens']}tok"
        mesh = ",".join(f"{a}={n}" for a, n in e["mesh"].items() if n > 1) or "1 device"
        lines.append(f"{name:<9} {shape:<40} {mesh:<10} {e['attention']:<9} {e['remat_policy']:<13} "
                     f"{m['arguments']:6.3g} {m['outputs']:6.3g} {m['temporaries']:6.3g} {m['total']:6.3g} "
                     f"{e['flops_per_device'] / 1e12:9.4g} {e['est_seconds']:6.3g} {e['compile_seconds']:9.1f} "
                     f"{'yes' if e['fits'] else 'NO'}")
    for name, e in report["steps"].items():
        for t in e.get("alternatives", []):
            res = f"{t['total_gb']:.3g} GB" if "total_gb" in t else f"failed: {t['error']}"
            lines.append(f"  {name}: alternative remat={t['remat_policy']}, mesh {t['mesh']}, "
                         f"attention={t['attention']}, grad_accum={t['grad_accum']}: {res}")
    if "latency" in report:
        lines += ["", format_latency(report["latency"])]
    lines += [f"WARNING {w}" for w in report["warnings"]]
    return "\n".join(lines)


def format_latency(lat: dict) -> str:
    """Live streaming on GPUs as text: the window, the seconds per part, the real-time factor,
    the GPUs real time needs, the latencies and the assumptions.

    Args:
      lat: what `latency` returns.

    Returns:
      The lines, joined.
    """
    w, sec = lat["window"], lat["seconds"]
    ms = lambda x: f"{x:.3g} s" if x >= 1 else f"{x * 1e3:.3g} ms" if x >= 1e-3 else f"{x * 1e6:.3g} us"  # noqa: E731
    lines = [
        f"Live streaming on {lat['gpus']} x {lat['gpu']}: window of {w['latents']} latents, {w['overlap']} carried -> "
        f"{w['new_frames']} new frames = {w['new_seconds']:g} s of video per window ({w['tokens']} tokens); "
        f"{w['steps']} steps x {w['cfg_branches']} CFG branch(es)",
        f"  per window: DiT {w['steps']} x {ms(sec['dit_step'])} = {ms(sec['dit'])} "
        f"({lat['tflop']['dit_step']:.4g} TFLOP per step, split over {lat['gpus']} GPU(s), "
        f"{lat['attention_for_gpus']} attention), Wav2Vec2 {ms(sec['audio'])} ({w['audio_seconds']:g} s of audio, "
        f"{lat['tflop']['audio']:.3g} TFLOP), VAE decode {ms(sec['vae'])} ({lat['tflop']['vae']:.3g} TFLOP); "
        f"one window every {ms(sec['per_window'])}",
        f"  real-time factor {lat['realtime_factor']:.3g} (video s per compute s): "
        + ("real time" if lat["realtime"] else "slower than real time")
        + (f"; real time from {lat['min_gpus_realtime']} GPU(s)" if lat["min_gpus_realtime"] else
           "; no GPU count reaches real time (the unsplit VAE decode and Wav2Vec2 alone are too slow)"),
    ]
    if lat["realtime"]:
        lines.append(f"  audio-to-frame latency (steady state): p50 {lat['latency_s']['p50']:.3g} s, max "
                     f"{lat['latency_s']['max']:.3g} s (a frame waits for the audio of its window's last frame + "
                     f"{lat['lookahead_s']:g} s lookahead, then the window's compute and its VAE tile); "
                     f"budget {lat['max_latency_s']:g} s: " + ("met" if lat["within_budget"] else "late"))
    else:
        lines.append(f"  audio-to-frame latency grows by {lat['latency_growth_s_per_window']:.3g} s per window")
    if lat["min_gpus_within_budget"]:
        lines.append(f"  every frame within the {lat['max_latency_s']:g} s budget from {lat['min_gpus_within_budget']} "
                     "GPU(s)")
    else:
        lines.append(f"  no GPU count keeps every frame within the {lat['max_latency_s']:g} s budget: the window's "
                     f"{w['new_seconds']:g} s of new frames wait for their audio (a shorter sample.window shortens it)")
    lines.append(f"  first frame {lat['first_frame_s']:.3g} s after the first audio")
    lines += [f"  assumes: {a}" for a in lat["assumptions"]]
    return "\n".join(lines)


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number of GPUs >= 1")
    return value


def main(argv=None) -> int:
    """`mi-jax plan` / `python -m mi_jax.plan`: parses `argv`, prints the plan; returns 0."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--mesh", default="fsdp=-1")
    ap.add_argument("--generate-mesh", default=None)
    ap.add_argument("--budget", type=float, default=80.0, help="GB per device")
    ap.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    ap.add_argument("--steps", default=None,
                    help="comma-separated, from %s (default: train,generate; train,distill,generate for a "
                         "distill config)" % ",".join(sorted(STEP_BUILDERS)))
    ap.add_argument("--window-frames", type=int, default=None, help="latent frames of the generation window")
    ap.add_argument("--no-suggest", action="store_true")
    ap.add_argument("--max-trials", type=int, default=6)
    ap.add_argument("--embed-axes", default=None,
                    help="shard parameters' embed dimension over these mesh axes, e.g. fsdp,context (default: fsdp)")
    ap.add_argument("--gpus", type=_positive_int, default=None,
                    help="GPUs splitting each live window (sequence parallel) in the latency estimate "
                         "(default: the generate mesh's devices)")
    ap.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                    help="model-FLOPs utilisation the time estimates assume (default %(default)s)")
    ap.add_argument("--pipelined", action="store_true",
                    help="latency: decode window k beside window k+1's denoising steps (default: one after the other)")
    ap.add_argument("--json", default=None, help="also write the report here")
    args, overrides = parse_args(ap, argv)
    if not 0 < args.mfu <= 1:
        ap.error(f"--mfu {args.mfu}: the assumed model-FLOPs utilisation must be in (0, 1]")

    n = max(_named_devices(args.mesh) or 8, _named_devices(args.generate_mesh) or 0)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        # before any JAX computation: plan on n forced host (CPU) devices
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
    config = load_config(args.config, overrides)
    rules = rules_with_embed(args.embed_axes.split(",")) if args.embed_axes else None
    steps = args.steps.split(",") if args.steps else None
    report = plan(config, args.mesh, budget_gb=args.budget, gpu=args.gpu, steps=steps,
                  suggest=not args.no_suggest, max_trials=args.max_trials, rules=rules,
                  generate_mesh_spec=args.generate_mesh, window_frames=args.window_frames, mfu=args.mfu,
                  gpus=args.gpus, pipelined=args.pipelined, log=lambda s: print(s, flush=True))
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
