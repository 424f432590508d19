"""Context-parallel attention (Ulysses, ring) and the blockwise kernel equal plain attention, alone
and inside the DiT and its train step, on 8 forced CPU devices."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mi_jax.nn.context_parallel  # noqa: F401  (registers blockwise / ulysses / ring)
from conftest import max_abs
from mi_jax.config_utils import load_config
from mi_jax.models import DiT
from mi_jax.models.dit import example_inputs
from mi_jax.nn.attention import attention
from mi_jax.parallel.mesh import logical_shardings, make_mesh, with_rules
from mi_jax.plan import abstract_batch
from mi_jax.train.pretrain import make_loss_fn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "magicinfinite.py")


def _qkv(b=4, length=37, heads=4, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((b, length, heads, dim)), jnp.float32) for _ in range(3)]


def close(a, b, tol=1e-5) -> bool:
    """Within tol, relative to the larger of 1 and |b| (gradients summed over many queries reach
    ~45 here, where float32 summation order alone moves the last digits)."""
    return max_abs(a, b) <= tol * max(1.0, float(np.max(np.abs(np.asarray(b)))))


def _loss(impl, lengths):
    return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, implementation=impl, kv_lengths=lengths)))


# 37 tokens: not divisible by 2 or 4 (padded and masked); lengths pad the keys of three samples
@pytest.mark.parametrize("impl", ["ulysses", "ring"])
@pytest.mark.parametrize("mesh_spec", ["data=2,fsdp=2,context=2", "data=2,context=4", "fsdp=2,context=2,tensor=2"])
def test_context_parallel_equals_plain(impl, mesh_spec):
    q, k, v = _qkv()
    lengths = jnp.array([37, 20, 5, 30], jnp.int32)
    ref = attention(q, k, v, implementation="xla", kv_lengths=lengths)
    ref_grads = jax.grad(_loss("xla", lengths), argnums=(0, 1, 2))(q, k, v)
    mesh = make_mesh(mesh_spec)
    with with_rules(mesh):
        fn = jax.jit(lambda q, k, v: attention(q, k, v, implementation=impl, kv_lengths=lengths))
        out = fn(q, k, v)
        grads = jax.jit(jax.grad(_loss(impl, lengths), argnums=(0, 1, 2)))(q, k, v)
        hlo = fn.lower(q, k, v).compile().as_text()
    assert max_abs(out, ref) <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert close(g, r)
    # the communication really is there: Ulysses all-to-all, ring collective-permute
    assert ("all-to-all" if impl == "ulysses" else "collective-permute") in hlo


def test_blockwise_and_fallbacks_equal_plain():
    q, k, v = _qkv(length=45)
    lengths = jnp.array([45, 1, 44, 9], jnp.int32)
    ref = attention(q, k, v, implementation="xla", kv_lengths=lengths)
    from mi_jax.nn.context_parallel import flash_attention

    # several key blocks (block 8 over 45 keys), fully masked blocks included (length 1, 9)
    valid = jnp.arange(45)[None] < lengths[:, None]
    small_blocks = lambda q, k, v: flash_attention(q, k, v, valid, 8)[0]  # noqa: E731
    assert max_abs(small_blocks(q, k, v), ref) <= 1e-5
    g = jax.grad(lambda *a: jnp.sum(jnp.sin(small_blocks(*a))), argnums=(0, 1, 2))(q, k, v)
    g_ref = jax.grad(_loss("xla", lengths), argnums=(0, 1, 2))(q, k, v)
    assert all(close(a, b) for a, b in zip(g, g_ref))
    # no ambient mesh, or context = 1: the local attention
    for impl in ("blockwise", "ulysses", "ring"):
        assert max_abs(attention(q, k, v, implementation=impl, kv_lengths=lengths), ref) <= 1e-5
    with with_rules(make_mesh("fsdp=8")):
        ring = jax.jit(lambda *a: attention(*a, implementation="ring", kv_lengths=lengths))
        assert max_abs(ring(q, k, v), ref) <= 1e-5
    # a dense mask goes to plain attention
    mask = jnp.tril(jnp.ones((45, 45), bool))[None, None]
    assert max_abs(attention(q, k, v, implementation="ring", mask=mask),
                   attention(q, k, v, implementation="xla", mask=mask)) <= 1e-6


def test_dense_equals_xla_with_lengths_and_masks():
    """`dense` (the CPU choice of `auto`: a hand-written backward from the kept probabilities)
    computes XLA's attention and its gradients, with key lengths, a causal mask and both."""
    q, k, v = _qkv(length=45)
    lengths = jnp.array([45, 1, 44, 9], jnp.int32)
    causal = jnp.tril(jnp.ones((45, 45), bool))[None, None]
    for kw in (dict(kv_lengths=lengths), dict(mask=causal), dict(mask=causal, kv_lengths=lengths)):
        def loss(impl, kw=kw):
            return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, implementation=impl, **kw)))

        assert max_abs(jax.jit(lambda *a, kw=kw: attention(*a, implementation="dense", **kw))(q, k, v),
                       attention(q, k, v, implementation="xla", **kw)) <= 1e-6
        got = jax.jit(jax.grad(loss("dense"), argnums=(0, 1, 2)))(q, k, v)
        want = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
        assert all(close(a, b) for a, b in zip(got, want))
    assert jax.default_backend() != "cpu" or max_abs(
        attention(q, k, v, implementation="auto", kv_lengths=lengths),
        attention(q, k, v, implementation="dense", kv_lengths=lengths)) == 0.0


def test_ulysses_needs_divisible_heads():
    q, k, v = _qkv(heads=2)
    with with_rules(make_mesh("data=2,context=4")), pytest.raises(ValueError, match="attention='ring'"):
        jax.jit(lambda *a: attention(*a, implementation="ulysses"))(q, k, v)


# ------------------------------------------------------------------ inside the DiT


@pytest.fixture(scope="module")
def tiny():
    config = load_config(CONFIG + ":tiny,stage2")
    with config.model.ignore_type():
        config.model.attention = "xla"
    model = DiT(config.model)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), **example_inputs(model.config))["params"])
    return config, params


def _dit_inputs(mcfg, b=4, text_len=7):
    """Random inputs: 2x8x8 latents -> 32 video tokens + 7 text = 39 (odd: padded for context=2)."""
    rng = np.random.default_rng(1)
    inputs = {k: jnp.asarray(rng.standard_normal(v.shape), v.dtype)
              for k, v in example_inputs(mcfg, batch=b, frames=2, height=8, width=8, text_len=text_len).items()}
    mask = np.ones((b, text_len), np.int32)
    mask[1, 3:] = 0
    mask[2, 1:] = 0
    inputs.update(encoder_attention_mask=jnp.asarray(mask), timestep=jnp.array([900.0, 500.0, 100.0, 10.0]),
                  guidance=jnp.full((b,), 1000.0))
    return inputs


def _placed(tree, mesh, shardings=None):
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    return jax.device_put(tree, shardings if shardings is not None else jax.tree.map(lambda _: batch, tree))


@pytest.mark.parametrize("impl", ["ulysses", "ring"])
def test_dit_forward_context_parallel(tiny, impl):
    config, params = tiny
    ref_model = DiT(config.model)
    inputs = _dit_inputs(ref_model.config)
    ref = jax.jit(ref_model.apply)({"params": params}, **inputs)
    model = DiT(ref_model.config.replace(attention=impl))
    mesh = make_mesh("data=2,fsdp=2,context=2")
    shardings = logical_shardings(jax.eval_shape(model.init, jax.random.key(0), **example_inputs(model.config)), mesh)
    with with_rules(mesh):
        out = jax.jit(model.apply)({"params": _placed(params, mesh, shardings["params"])}, **_placed(inputs, mesh))
    assert max_abs(out, ref) <= 1e-5


def _train_batch(config, b=4):
    """A random batch with the fields and shapes `mi-jax prepare` writes (text padded at the end)."""
    rng = np.random.default_rng(2)
    spec = abstract_batch(config, b)
    batch = {}
    for k, s in spec.items():
        if jnp.issubdtype(s.dtype, jnp.floating):
            batch[k] = jnp.asarray(rng.standard_normal(s.shape), s.dtype)
        else:
            batch[k] = jnp.asarray(rng.integers(0, 2, s.shape), s.dtype)
    mask = np.ones(spec["text_mask"].shape, np.int32)
    mask[1, 4:] = 0
    mask[3, 9:] = 0
    batch.update(text_mask=jnp.asarray(mask), index=jnp.arange(b, dtype=jnp.int32))
    return batch


@pytest.mark.parametrize("impl", ["ulysses", "ring"])
def test_train_grads_context_parallel(tiny, impl):
    config, params = tiny
    batch = _train_batch(config)
    rng = jax.random.key(3)
    grad_fn = lambda cfg: jax.jit(jax.value_and_grad(make_loss_fn(cfg), has_aux=True))  # noqa: E731
    (ref_loss, _), ref = grad_fn(config)(params, batch, rng)

    sharded = load_config(CONFIG + ":tiny,stage2")
    with sharded.model.ignore_type():
        sharded.model.attention = impl
        # remat changes no value; with ring it checks that shard_map and ppermute rematerialise
        sharded.model.remat_policy = "full" if impl == "ring" else "none"
    mesh = make_mesh("data=2,fsdp=2,context=2")
    model = DiT(sharded.model)
    shardings = logical_shardings(jax.eval_shape(model.init, jax.random.key(0), **example_inputs(model.config)), mesh)
    with with_rules(mesh):
        (loss, _), grads = grad_fn(sharded)(_placed(params, mesh, shardings["params"]), _placed(batch, mesh), rng)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))
    diff = np.sqrt(sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref))))
    norm = np.sqrt(sum(float(jnp.sum(b**2)) for b in jax.tree.leaves(ref)))
    assert diff <= 1e-5 * norm, (diff, norm)
