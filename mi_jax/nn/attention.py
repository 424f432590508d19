"""Attention behind a small registry.

All implementations take `q, k, v: [B, L, H, D]` and return `[B, Lq, H, D]`; padding is given
either as `kv_lengths: [B]` (keys at positions >= length are ignored: the text padding of the
DiT, which cuDNN handles natively) or as a boolean `mask` broadcastable to `[B, H, Lq, Lk]`.

- `xla`: `jax.nn.dot_product_attention(implementation="xla")`, everywhere.
- `cudnn`: cuDNN flash attention (GPU, bf16/fp16). Raises on shapes cuDNN does not support.
- `dense`: the same maths with a hand-written backward from the kept probabilities (faster
  than `xla` forward + backward on XLA:CPU; benchmarks/cpu_vs_torch.py).
- `auto`: cuDNN on GPU for half precision inputs without a dense mask, `dense` on CPU, else XLA.

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


@register("dense")
def _dense(q, k, v, *, mask=None, kv_lengths=None):
    bias = jnp.zeros((1, 1, 1, k.shape[1]), jnp.float32)
    if kv_lengths is not None:
        keep = jnp.arange(k.shape[1])[None, :] < kv_lengths[:, None]
        bias = bias + jnp.where(keep, 0.0, _MASKED)[:, None, None, :]
    if mask is not None:
        bias = bias + jnp.where(mask, 0.0, _MASKED)
    return _dense_attention(q, k, v, bias)


_MASKED = -1e30  # a masked score, as jax.nn.dot_product_attention's (fully masked rows: uniform)


@jax.custom_vjp
def _dense_attention(q, k, v, bias):
    return _dense_fwd(q, k, v, bias)[0]


@jax.named_scope("attention_dense")  # profiles (benchmarks/cpu_vs_torch.py) find the core by this name
def _dense_fwd(q, k, v, bias):
    """Scores in float32 on the heads-major layout, probabilities kept for the backward."""
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    scale = 1.0 / float(q.shape[-1]) ** 0.5
    s = jnp.einsum("bhld,bhmd->bhlm", qt, kt, preferred_element_type=jnp.float32) * scale + bias
    # kept apart from the softmax: XLA:CPU otherwise fuses the row max into the QK^T matmul
    # (a YNNPACK fusion slower than the matmul and a separate max)
    s = jax.lax.optimization_barrier(s)
    e = jnp.exp(s - s.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    out = jnp.einsum("bhlm,bhmd->bhld", p.astype(v.dtype), vt)
    return out.transpose(0, 2, 1, 3), (qt, kt, vt, p, bias, out)


@jax.named_scope("attention_dense")
def _dense_bwd(res, g):
    """The softmax-attention gradient in its five matmuls (FlashAttention's backward, Dao et al.
    2022, without the tiling): ds = p (dp - delta), delta = rowsum(dp p) = rowsum(g out), the
    latter over [L, D] instead of [L, L]. XLA's autodiff of the forward keeps the scores and
    recomputes the softmax pieces in more passes (slower on CPU)."""
    qt, kt, vt, p, bias, out = res
    scale = 1.0 / float(qt.shape[-1]) ** 0.5
    gt = g.transpose(0, 2, 1, 3)
    f32 = dict(preferred_element_type=jnp.float32)
    dv = jnp.einsum("bhlm,bhld->bhmd", p.astype(gt.dtype), gt, **f32)
    dp = jnp.einsum("bhld,bhmd->bhlm", gt, vt, **f32)
    delta = (gt.astype(jnp.float32) * out.astype(jnp.float32)).sum(-1, keepdims=True)
    ds = (p * (dp - delta) * scale).astype(qt.dtype)
    dq = jnp.einsum("bhlm,bhmd->bhld", ds, kt, **f32)
    dk = jnp.einsum("bhlm,bhld->bhmd", ds, qt, **f32)
    back = lambda x, like: x.astype(like.dtype).transpose(0, 2, 1, 3)  # noqa: E731
    return back(dq, qt), back(dk, kt), back(dv, vt), jnp.zeros_like(bias)


_dense_attention.defvjp(_dense_fwd, _dense_bwd)


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
    backend = jax.default_backend()
    if backend == "gpu" and mask is None and q.dtype in (jnp.bfloat16, jnp.float16):
        return _cudnn(q, k, v, kv_lengths=kv_lengths)
    if backend == "cpu":
        return _dense(q, k, v, mask=mask, kv_lengths=kv_lengths)
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
