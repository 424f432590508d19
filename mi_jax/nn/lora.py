"""LoRA over a frozen copy of the base parameters, as a parameter transform.

`lora_init(params, rng, rank, targets)` makes `{path: {"a": [..., in, r], "b": [..., r, out]}}`
for every 2-D (or scan-stacked 3-D) `kernel` whose path matches a target regex; `b` starts
at zero so the adapted model equals the base at step 0. The base tree is never copied into the
optimiser state, so a generator and a critic (DMD2) can share one base. Two ways to run it:

- `lora_apply(params, lora, scale)`: the merged tree `W + scale * a @ b` (for export and
  sampling; `merge_run` for a LoRA run's `{"base", "lora"}` tree). Inside a training step this
  materialises every adapted kernel at full size (and its gradient); with replicated factors
  the product `a @ b` is replicated too, so under FSDP each device holds whole-model
  temporaries (`lora_shardings` shards the factors as their kernels; benchmarks/dmd2_memory.py
  measures both forms in a DMD2 step).
- `lora_params(params, lora, scale)` + `activation_lora()`: the factors sit beside each kernel
  (`lora_a`, `lora_b`) and every layer called under `activation_lora()` computes
  `x @ W + (x @ a) @ (scale b)` (PEFT's form), one layer at a time inside the scanned stack;
  no full-size kernel is ever formed, at `2 L r (in + out)` extra flops per layer.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

DEFAULT_TARGETS = (r"attn/(to_q|to_k|to_v|to_out_0|add_q_proj|add_k_proj|add_v_proj|to_add_out)/kernel$",
                   r"(proj_mlp|proj_out)/kernel$", r"ff(_context)?/net_[02]/kernel$")


def _matches(path: tuple[str, ...], targets: Sequence[str]) -> bool:
    joined = "/".join(path)
    return any(re.search(t, joined) for t in targets)


def lora_init(params: Mapping, rng, rank: int, targets: Sequence[str] = DEFAULT_TARGETS, dtype=jnp.float32) -> dict:
    """LoRA factors for the matching kernels (a ~ N(0, 1/in), b = 0)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    flat = {p: v for p, v in traverse_util.flatten_dict(params).items() if p[-1] == "kernel" and _matches(p, targets)}
    if not flat:
        raise ValueError(f"no kernel matches the LoRA targets {list(targets)}")
    out = {}
    for (path, w), key in zip(flat.items(), jax.random.split(rng, len(flat))):
        *lead, d_in, d_out = w.shape
        a = jax.random.normal(key, (*lead, d_in, rank), dtype) / jnp.sqrt(d_in).astype(dtype)
        out[path] = {"a": a, "b": jnp.zeros((*lead, rank, d_out), dtype)}
    return traverse_util.unflatten_dict({p + (k,): v for p, ab in out.items() for k, v in ab.items()})


def _flat_with_factors(params: Mapping, lora: Mapping) -> tuple[dict, dict]:
    """Flattened `params` and `lora`, checked: every factor pair belongs to a kernel of params."""
    flat, factors = traverse_util.flatten_dict(params), traverse_util.flatten_dict(lora)
    for path in {p[:-1] for p in factors}:
        if path not in flat:
            raise KeyError(f"LoRA factors for {'/'.join(path)}, which the model does not have")
    return flat, factors


def lora_apply(params: Mapping, lora: Mapping | None, scale: float = 1.0) -> dict:
    """`params` with `W + scale * a @ b` for every kernel that has LoRA factors."""
    if lora is None:
        return params
    flat, factors = _flat_with_factors(params, lora)
    for path in {p[:-1] for p in factors}:
        w = flat[path]
        delta = jnp.matmul(factors[path + ("a",)], factors[path + ("b",)])
        flat[path] = (w.astype(jnp.float32) + scale * delta.astype(jnp.float32)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def is_lora_run(params) -> bool:
    """A LoRA training run's parameter tree: `{"base": the frozen DiT, "lora": its factors}`."""
    return isinstance(params, Mapping) and set(params) == {"base", "lora"}


def merge_run(params, scale: float = 1.0):
    """The DiT parameter tree of a run's `params`: a LoRA run's factors merged into its base
    (for sampling and export), any other tree unchanged."""
    return lora_apply(params["base"], params["lora"], scale) if is_lora_run(params) else params


def lora_run_layout(abstract: Mapping, shardings: Mapping, rank: int) -> tuple[dict, dict]:
    """`({"base", "lora"} shapes, their shardings)` of a LoRA run over the DiT `abstract`
    (placed as `shardings`): the factors of `lora_init` (default targets), split like their
    kernels (`lora_shardings`)."""
    lora = jax.eval_shape(lambda p: lora_init(p, jax.random.key(0), rank), abstract)
    return {"base": abstract, "lora": lora}, {"base": shardings, "lora": lora_shardings(lora, shardings)}


def lora_trainable(patterns: Sequence[str]) -> list[str]:
    """The trainable-parameter regexes of a LoRA run (`{"base", "lora"}`) from the stage's
    `patterns`: the factors, and the stage's audio modules trained in full beside them."""
    return [r"^lora/"] + [r"^base/" + p.lstrip("^") for p in patterns if "audio" in p]


def lora_shardings(lora: Mapping, kernel_shardings: Mapping) -> dict:
    """Shardings for LoRA factors: each factor placed as its kernel (`kernel_shardings`: the
    parameter tree's), so `a` `[..., in, r]` splits `in` as the kernel does and its rank axis as
    the kernel's `out`; `b` `[..., r, out]` the other way round. Under FSDP either kernel axis
    may be the split one (to_q: `in`; to_out: `out`); this way both factors, and their optimiser
    state, are split like the weights instead of replicated on every device (rank 64 on the 13B
    DiT: 1.1 GB per factor set, x 6 for a generator and a critic with Adam)."""
    kernels, factors = _flat_with_factors(kernel_shardings, lora)
    out = {}
    for path, leaf in factors.items():
        kernel = kernels[path[:-1]]
        spec = list(kernel.spec) + [None] * (len(leaf.shape) - len(kernel.spec))
        for i, (dim, axes) in enumerate(zip(leaf.shape, spec)):
            names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if dim % math.prod(kernel.mesh.shape[n] for n in names):
                spec[i] = None  # e.g. a rank smaller than the mesh axis: that axis whole
        out[path] = jax.sharding.NamedSharding(kernel.mesh, jax.sharding.PartitionSpec(*spec))
    return traverse_util.unflatten_dict(out)


LORA_A, LORA_B = "lora_a", "lora_b"  # the factors' names beside an adapted layer's `kernel`


def lora_params(params: Mapping, lora: Mapping | None, scale: float = 1.0) -> dict:
    """`params` with each adapted kernel's factors beside it: `lora_a` = a `[..., in, r]` and
    `lora_b` = scale * b `[..., r, out]` (leaves of the base are shared, not copied). Apply the
    model under `activation_lora()`; without it the factors are ignored."""
    if lora is None:
        return params
    flat, factors = _flat_with_factors(params, lora)
    for path in {p[:-1] for p in factors}:
        flat[path[:-1] + (LORA_A,)] = factors[path + ("a",)]
        flat[path[:-1] + (LORA_B,)] = scale * factors[path + ("b",)]
    return traverse_util.unflatten_dict(flat)


def _interceptor(next_fun, args, kwargs, context):
    """Adds `(x @ lora_a) @ lora_b` to the output of any layer `y = x @ kernel (+ bias)` that
    carries factors (mi_jax.nn.layers.Dense, flax.linen.Dense), in the output's dtype."""
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__" or not module.has_variable("params", LORA_A):
        return out
    a = module.get_variable("params", LORA_A)
    b = module.get_variable("params", LORA_B)
    x = args[0].astype(out.dtype)
    return out + jnp.dot(jnp.dot(x, a.astype(out.dtype)), b.astype(out.dtype))


@contextlib.contextmanager
def activation_lora():
    """While tracing `model.apply` inside this context, layers with `lora_params` factors run
    LoRA on activations (see the module docstring)."""
    with nn.intercept_methods(_interceptor):
        yield
