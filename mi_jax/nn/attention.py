"""Attention behind a small registry.

All implementations take `q, k, v: [B, L, H, D]` and return `[B, Lq, H, D]`; padding is given
either as `kv_lengths: [B]` (keys at positions >= length are ignored: the text padding of the
DiT, which cuDNN handles natively) or as a boolean `mask` broadcastable to `[B, H, Lq, Lk]`.

- `xla`: `jax.nn.dot_product_attention(implementation="xla")`, everywhere.
- `cudnn`: cuDNN flash attention (GPU, bf16/fp16). Raises on shapes cuDNN does not support.
- `auto`: cuDNN on GPU for half precision inputs without a dense mask, else XLA.

- `blockwise`: exact flash-style attention in plain JAX (memory O(L), custom backward).
- `ulysses` / `ring`: context (sequence) parallel attention over the `context` mesh axis
  (mi_jax/nn/context_parallel.py, `jax.shard_map`).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

AttentionFn = Callable[..., jax.Array]
_REGISTRY: dict[str, AttentionFn] = {}


def register(name: str):
    def deco(fn: AttentionFn) -> AttentionFn:
        _REGISTRY[name] = fn
        return fn

    return deco


def available() -> list[str]:
    return sorted(_REGISTRY)


@register("xla")
def _xla(q, k, v, *, mask=None, kv_lengths=None):
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, key_value_seq_lengths=kv_lengths, implementation="xla"
    )


@register("cudnn")
def _cudnn(q, k, v, *, mask=None, kv_lengths=None):
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(
            f"attention='cudnn' needs bf16/fp16 inputs, got {q.dtype}; set model.dtype='bfloat16' "
            "or use attention='xla'."
        )
    if kv_lengths is not None:
        q_lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
        return jax.nn.dot_product_attention(
            q, k, v, mask=mask, query_seq_lengths=q_lengths, key_value_seq_lengths=kv_lengths,
            implementation="cudnn",
        )
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")


@register("auto")
def _auto(q, k, v, *, mask=None, kv_lengths=None):
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu and mask is None and q.dtype in (jnp.bfloat16, jnp.float16):
        return _cudnn(q, k, v, kv_lengths=kv_lengths)
    return _xla(q, k, v, mask=mask, kv_lengths=kv_lengths)


def attention(q, k, v, *, implementation: str = "xla", mask=None, kv_lengths=None) -> jax.Array:
    """Dispatches to the registered implementation `implementation`."""
    try:
        fn = _REGISTRY[implementation]
    except KeyError:
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose one of {available()}"
        ) from None
    return fn(q, k, v, mask=mask, kv_lengths=kv_lengths)


# context-parallel and blockwise implementations register themselves ("blockwise", "ulysses", "ring")
from mi_jax.nn import context_parallel  # noqa: E402,F401
