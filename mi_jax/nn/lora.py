"""LoRA over a frozen copy of the base parameters, as a parameter transform.

`lora_init(params, rng, rank, targets)` makes `{path: {"a": [..., in, r], "b": [..., r, out]}}`
for every 2-D (or scan-stacked 3-D) `kernel` whose path matches a target regex; `b` starts
at zero so the adapted model equals the base at step 0. `lora_apply(params, lora, scale)`
returns the merged tree `W + scale * a @ b` for a forward pass: the base tree is never copied
into the optimiser state, so a generator and a critic (DMD2) can share one base.
Merging inside the step costs `in * out * r` flops per kernel, negligible beside a forward
pass over thousands of tokens; `lora_merge` bakes it in for export.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
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


def lora_apply(params: Mapping, lora: Mapping | None, scale: float = 1.0) -> dict:
    """`params` with `W + scale * a @ b` for every kernel that has LoRA factors."""
    if lora is None:
        return params
    flat = traverse_util.flatten_dict(params)
    factors = traverse_util.flatten_dict(lora)
    for path in {p[:-1] for p in factors}:
        if path not in flat:
            raise KeyError(f"LoRA factors for {'/'.join(path)}, which the model does not have")
        w = flat[path]
        delta = jnp.matmul(factors[path + ("a",)], factors[path + ("b",)])
        flat[path] = (w.astype(jnp.float32) + scale * delta.astype(jnp.float32)).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


lora_merge = lora_apply  # the same maths; named for export
