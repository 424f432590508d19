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
    bandwidth in bytes/s and memory in GB."""

    name: str
    bf16_flops: float  # dense peak, FLOP/s
    hbm_bandwidth: float  # bytes/s
    memory_gb: float


# Vendor datasheets: dense (no sparsity) bf16 tensor-core peak and HBM bandwidth.
GPUS = {
    "h100": GPU("H100 SXM", 989e12, 3.35e12, 80),
    "h200": GPU("H200 SXM", 989e12, 4.8e12, 141),
    "a100": GPU("A100 SXM", 312e12, 2.0e12, 80),
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


def _dot_flops(eqn) -> tuple[float, float]:
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    (lc, _), _ = eqn.params["dimension_numbers"]
    k = math.prod(lhs.shape[i] for i in lc)
    nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in (lhs, rhs, out))
    return 2.0 * math.prod(out.shape) * k, float(nbytes)


def _conv_flops(eqn) -> tuple[float, float]:
    lhs, rhs = (v.aval for v in eqn.invars)
    out = eqn.outvars[0].aval
    out_features = rhs.shape[eqn.params["dimension_numbers"].rhs_spec[0]]
    nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in (lhs, rhs, out))
    return 2.0 * math.prod(out.shape) * math.prod(rhs.shape) / out_features, float(nbytes)


def _walk(jaxpr) -> np.ndarray:
    """[flops, matmul bytes] of a jaxpr (global shapes; shard_map bodies scaled by their mesh)."""
    total = np.zeros(2)
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
      `{"flops", "matmul_bytes"}`.
    """
    flops, nbytes = _walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return dict(flops=float(flops), matmul_bytes=float(nbytes))


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
         generate_dtype: str | None = "bfloat16", max_trials: int = 6, rules=None,
         log: Callable[[str], Any] | None = None) -> dict:
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
      log: called with a progress line before each compile (default None: silent).

    Returns:
      `{"gpu", "budget_gb", "mfu", "steps": {name: {...}}, "warnings": [...]}`; each step has
      `shape`, `mesh`, `remat_policy`, `attention`, `memory_gb` (arguments, outputs, aliased,
      temporaries, total per device), `flops_per_step`, `flops_per_device`, `est_seconds`,
      `compile_seconds`, `fits`, and, over budget with `suggest`, `alternatives` (the remat
      policies then meshes compiled, in order, with their totals) and `suggestion`.

    Raises:
      ValueError: an unknown `gpu` or step.
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
    lines += [f"WARNING {w}" for w in report["warnings"]]
    return "\n".join(lines)


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
    ap.add_argument("--json", default=None, help="also write the report here")
    args, overrides = parse_args(ap, argv)

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
                  generate_mesh_spec=args.generate_mesh, window_frames=args.window_frames,
                  log=lambda s: print(s, flush=True))
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
