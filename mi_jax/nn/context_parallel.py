"""Context (sequence) parallel attention over the `context` mesh axis, plus the blockwise kernel
both variants use. Registered in mi_jax.nn.attention as:

- `blockwise`: exact attention in plain JAX, flash-style: keys in blocks of `BLOCK` with an
  online softmax in float32 and a custom VJP that recomputes the scores, so memory is
  O(L * BLOCK) instead of O(L^2) on every backend (what `plan` uses on CPU to stand in for
  cuDNN flash attention, and the CPU lever for long sequences).
- `ulysses`: q/k/v arrive sequence-sharded; an all-to-all over `context` turns them into
  head-sharded, full-sequence tensors; each device attends over its heads; a second all-to-all
  restores sequence sharding. Needs (heads per tensor shard) divisible by the context size.
- `ring`: q stays put; k/v blocks travel round the ring with `ppermute`, and each device merges
  the partial results (o, logsumexp) in float32. Works for any head count. The forward pass holds
  one k/v block (1/c of the sequence) plus the one in flight; the backward pass (JAX autodiff
  through the ring) keeps every step's block, i.e. the full k/v, as Ulysses does.

All take `q, k, v: [B, L, H, D]` and `kv_lengths: [B]` (keys at positions >= length are
ignored) and return `[B, L, H, D]`. The mesh is the ambient one (`jax.set_mesh`, e.g. via
`mi_jax.parallel.mesh.with_rules`); which mesh axes hold batch, sequence and heads comes from the
active logical rules (`activation_batch`, `activation_length`, `activation_heads`). Without a
mesh, with a context axis of size 1, or for cross-attention (Lq != Lk: the audio blocks attend
per frame to 32 audio tokens), `ulysses` and `ring` run the local attention instead.
A dense `mask` (the DiT's text refiner, a few hundred tokens) is never worth splitting: it goes
to plain XLA attention. Sequences not divisible by the context size are padded at the end and
the padding is masked as keys and dropped as queries.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from mi_jax.nn.attention import attention, register
from mi_jax.parallel.mesh import DEFAULT_RULES

BLOCK = 512  # keys per block of the blockwise kernel: scores are [B, H, Lq, BLOCK] float32
NEG = -1e30  # finite "minus infinity": keeps exp/logaddexp of fully masked rows free of NaN
LOGICAL = ("activation_batch", "activation_length", "activation_heads", "activation_kv")


# ------------------------------------------------------------------ blockwise (flash-style) kernel


def _key_blocks(k, v, valid, block):
    """[B, Lk, H, D] -> [n, B, block, H, D] (keys padded to a multiple of block, padding invalid)."""
    b, lk = k.shape[:2]
    block = min(block, lk)  # short keys (the audio cross-attention's 32) need no padding
    n = -(-lk // block)
    pad = n * block - lk
    if pad:
        k = jnp.pad(k, ((0, 0), (0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, pad), (0, 0), (0, 0)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    split = lambda x: jnp.moveaxis(x.reshape(b, n, block, *x.shape[2:]), 1, 0)  # noqa: E731
    return split(k), split(v), split(valid)


def _scores(q, kj, validj, scale):
    """[B, H, Lq, block] float32 scores, masked keys at NEG."""
    s = jnp.einsum("bqhd,bkhd->bhqk", q, kj, preferred_element_type=jnp.float32) * scale
    return jnp.where(validj[:, None, None, :], s, NEG)


def _flash_forward(q, k, v, valid, block):
    b, lq, h, d = q.shape
    scale = 1.0 / math.sqrt(d)
    kb, vb, mb = _key_blocks(k, v, valid, block)

    def body(carry, xs):
        acc, m, l = carry  # acc [B, H, Lq, D], m / l [B, H, Lq], all float32
        kj, vj, validj = xs
        s = _scores(q, kj, validj, scale)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(validj[:, None, None, :], jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("bhqk,bkhd->bhqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
        return (acc * corr[..., None] + pv, m_new, l), None

    init = (jnp.zeros((b, h, lq, d), jnp.float32), jnp.full((b, h, lq), NEG, jnp.float32),
            jnp.zeros((b, h, lq), jnp.float32))
    (acc, m, l), _ = jax.lax.scan(body, init, (kb, vb, mb))
    empty = l == 0  # every key of this row masked (possible for one ring block, never overall)
    o = acc / jnp.where(empty, 1.0, l)[..., None]
    lse = jnp.where(empty, NEG, m + jnp.log(jnp.where(empty, 1.0, l)))
    return jnp.moveaxis(o, 1, 2), lse  # [B, Lq, H, D] float32, [B, H, Lq] float32


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def flash_attention(q, k, v, valid, block=BLOCK):
    """Exact attention, O(Lq * block) memory: q [B, Lq, H, D], k/v [B, Lk, H, D], valid [B, Lk]
    bool -> (out [B, Lq, H, D] float32, logsumexp [B, H, Lq] float32; NEG for rows with no valid
    key). The logsumexp output is differentiable, so partial results can be merged (ring)."""
    return _flash_forward(q, k, v, valid, block)


def _flash_fwd(q, k, v, valid, block):
    o, lse = _flash_forward(q, k, v, valid, block)
    return (o, lse), (q, k, v, valid, o, lse)


def _flash_bwd(block, res, cts):
    q, k, v, valid, o, lse = res
    do, dlse = cts
    lk, d = k.shape[1], q.shape[-1]
    scale = 1.0 / math.sqrt(d)
    kb, vb, mb = _key_blocks(k, v, valid, block)
    do = do.astype(jnp.float32)
    # d(out)/d(s) gives p * (dp - rowsum(do * o)); d(lse)/d(s) gives p * dlse
    delta = jnp.moveaxis(jnp.sum(do * o, -1), 1, 2) - dlse  # [B, H, Lq]

    def body(dq, xs):
        kj, vj, validj = xs
        s = _scores(q, kj, validj, scale)
        p = jnp.where(validj[:, None, None, :], jnp.exp(s - lse[..., None]), 0.0)
        dv = jnp.einsum("bhqk,bqhd->bkhd", p, do)
        dp = jnp.einsum("bqhd,bkhd->bhqk", do, vj.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) * scale
        dq = dq + jnp.einsum("bhqk,bkhd->bqhd", ds, kj.astype(jnp.float32))
        dk = jnp.einsum("bhqk,bqhd->bkhd", ds, q.astype(jnp.float32))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), (kb, vb, mb))
    merge = lambda x: jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])[:, :lk]  # noqa: E731
    return dq.astype(q.dtype), merge(dk).astype(k.dtype), merge(dv).astype(v.dtype), None


flash_attention.defvjp(_flash_fwd, _flash_bwd)


def _valid(lengths, positions):
    """[B, Lk] bool: key position < kv length. lengths [B], positions [Lk]."""
    return positions[None, :] < lengths[:, None]


@register("blockwise")
def _blockwise(q, k, v, *, mask=None, kv_lengths=None):
    if mask is not None:
        return attention(q, k, v, implementation="xla", mask=mask, kv_lengths=kv_lengths)
    b, lk = k.shape[:2]
    lengths = jnp.full((b,), lk, jnp.int32) if kv_lengths is None else kv_lengths.astype(jnp.int32)
    out, _ = flash_attention(q, k, v, _valid(lengths, jnp.arange(lk)))
    return out.astype(q.dtype)


def _local(q, k, v, kv_lengths):
    """Single-device attention for the fallbacks and Ulysses' inner step: cuDNN flash on GPU for
    half precision, else the blockwise kernel (exact, O(L) memory)."""
    if jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
        return attention(q, k, v, implementation="cudnn", kv_lengths=kv_lengths)
    return _blockwise(q, k, v, kv_lengths=kv_lengths)


# ------------------------------------------------------------------ mesh plumbing


def _layout(shape, mesh):
    """(context axis name or None, in/out PartitionSpec for [B, L, H, D]) from the logical rules.

    Batch / head axes that do not divide the array are dropped (replicated) rather than failing."""
    rules = nn.get_logical_axis_rules()
    if not rules:
        rules = DEFAULT_RULES
    spec = list(nn.logical_to_mesh_axes(LOGICAL, rules))
    size = lambda axes: math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))  # noqa: E731
    ctx = spec[1]
    if isinstance(ctx, tuple):
        if len(ctx) != 1:
            raise ValueError(f"context-parallel attention needs activation_length on one mesh axis, got {ctx}")
        ctx = ctx[0]
    if ctx is None or ctx not in mesh.axis_names or mesh.shape[ctx] == 1:
        return None, None
    for dim in (0, 2):
        if spec[dim] is not None and shape[dim] % size(spec[dim]):
            spec[dim] = None
    spec[3] = None
    return ctx, P(spec[0], ctx, spec[2], None)


def _prepare(q, k, v, kv_lengths, c):
    """Pads L to a multiple of c; lengths default to the unpadded L (so padding is masked)."""
    b, lq = q.shape[:2]
    lengths = jnp.full((b,), lq, jnp.int32) if kv_lengths is None else jnp.minimum(kv_lengths.astype(jnp.int32), lq)
    pad = -lq % c
    if pad:
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    return q, k, v, lengths, lq


def _parallel(body, q, k, v, mask, kv_lengths):
    if mask is not None:  # the refiner's dense text mask: short, not worth splitting
        return attention(q, k, v, implementation="xla", mask=mask, kv_lengths=kv_lengths)
    mesh = jax.sharding.get_abstract_mesh()
    cross = q.shape[1] != k.shape[1]  # e.g. the audio cross-attention: per frame, short keys
    ctx, spec = (None, None) if mesh.empty or cross else _layout(q.shape, mesh)
    if ctx is None:
        return _local(q, k, v, kv_lengths)
    c = mesh.shape[ctx]
    qp, kp, vp, lengths, lq = _prepare(q, k, v, kv_lengths, c)
    fn = jax.shard_map(
        functools.partial(body, axis=ctx, size=c),
        mesh=mesh,
        in_specs=(spec, spec, spec, P(spec[0])),
        out_specs=spec,
        check_vma=False,  # the blockwise kernel's scan carries start replicated; every output varies anyway
    )
    return fn(qp, kp, vp, lengths)[:, :lq].astype(q.dtype)


# ------------------------------------------------------------------ Ulysses


def _ulysses_body(q, k, v, lengths, *, axis, size):
    """Per device: q/k/v [b, L/c, h, D] -> all-to-all -> [b, L, h/c, D] -> attend -> back."""
    h = q.shape[2]
    if h % size:
        raise ValueError(
            f"attention='ulysses' splits the {h} heads per device (after tensor sharding) over context={size}; "
            "they must divide evenly: change the mesh, or use attention='ring' (any head count)"
        )
    to_heads = lambda x: jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)  # noqa: E731
    out = _local(to_heads(q), to_heads(k), to_heads(v), lengths)
    return jax.lax.all_to_all(out, axis, split_axis=1, concat_axis=2, tiled=True)


@register("ulysses")
def ulysses_attention(q, k, v, *, mask=None, kv_lengths=None):
    """DeepSpeed-Ulysses sequence parallelism over the `context` axis (see the module docstring)."""
    return _parallel(_ulysses_body, q, k, v, mask, kv_lengths)


# ------------------------------------------------------------------ ring


def _ring_body(q, k, v, lengths, *, axis, size):
    """Per device: q [b, Lc, h, D] stays; at step s it holds the k/v block of device (i - s) mod c
    and merges that block's (out, logsumexp) into a float32 running result."""
    lc = q.shape[1]
    me = jax.lax.axis_index(axis)
    perm = [(i, (i + 1) % size) for i in range(size)]
    o = jnp.zeros(q.shape, jnp.float32)
    lse = jnp.full((q.shape[0], q.shape[2], lc), NEG, jnp.float32)  # [b, h, Lc]
    for s in range(size):  # static and small: XLA can overlap each ppermute with the next block
        src = (me - s) % size
        valid = _valid(lengths, src * lc + jnp.arange(lc))
        o_s, lse_s = flash_attention(q, k, v, valid)
        new = jnp.logaddexp(lse, lse_s)
        w_old = jnp.moveaxis(jnp.exp(lse - new), 1, 2)[..., None]
        w_new = jnp.moveaxis(jnp.exp(lse_s - new), 1, 2)[..., None]
        o, lse = o * w_old + o_s * w_new, new
        if s + 1 < size:
            k, v = jax.lax.ppermute(k, axis, perm), jax.lax.ppermute(v, axis, perm)
    return o


@register("ring")
def ring_attention(q, k, v, *, mask=None, kv_lengths=None):
    """Ring attention over the `context` axis (see the module docstring)."""
    return _parallel(_ring_body, q, k, v, mask, kv_lengths)
