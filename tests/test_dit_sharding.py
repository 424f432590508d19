"""On 8 forced CPU devices: the sharded DiT computes what the unsharded one computes, and its
parameters are really placed as the rules table says."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from conftest import max_abs
from mi_jax.config_utils import load_config
from mi_jax.convert import load_diffusers_transformer
from mi_jax.models import DiT, DiTConfig
from mi_jax.parallel.mesh import (
    DEFAULT_RULES,
    init_sharded,
    logical_shardings,
    make_mesh,
    parse_mesh_shape,
    with_rules,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "hunyuan_video_i2v.py")


@pytest.fixture(scope="module")
def tiny():
    config = DiTConfig.coerce(load_config(CONFIG + ":tiny").model).replace(attention="xla")
    rng = np.random.default_rng(0)
    b, lt = 4, 8
    mask = np.ones((b, lt), np.int32)
    mask[1, 5:] = 0
    inputs = dict(
        hidden_states=jnp.asarray(rng.standard_normal((b, 2, 8, 8, config.in_channels)), jnp.float32),
        timestep=jnp.asarray([900.0, 500.0, 100.0, 10.0]),
        encoder_hidden_states=jnp.asarray(rng.standard_normal((b, lt, config.text_embed_dim)), jnp.float32),
        encoder_attention_mask=jnp.asarray(mask),
        pooled_projections=jnp.asarray(rng.standard_normal((b, config.pooled_projection_dim)), jnp.float32),
        guidance=jnp.full((b,), 6000.0),
    )
    model = DiT(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), **inputs)["params"])
    ref = jax.jit(model.apply)({"params": params}, **inputs)
    return config, inputs, params, ref


def _sharded_forward(config, mesh, params, inputs):
    model = DiT(config)
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    in_sh = {k: batch for k in inputs}
    shardings = logical_shardings(jax.eval_shape(model.init, jax.random.key(0), **inputs), mesh)
    placed = jax.device_put(params, shardings["params"])
    with with_rules(mesh):  # activations follow the logical constraints inside the blocks
        out = jax.jit(model.apply)({"params": placed}, **jax.device_put(inputs, in_sh))
    return out, placed


@pytest.mark.parametrize("mesh_spec", ["data=2,fsdp=2,tensor=2", "fsdp=2,context=2,tensor=2"])
def test_sharded_forward_equals_unsharded(tiny, mesh_spec):
    config, inputs, params, ref = tiny
    mesh = make_mesh(mesh_spec)
    out, placed = _sharded_forward(config, mesh, params, inputs)
    assert max_abs(out, ref) <= 1e-5

    def spec(*path):
        leaf = placed
        for p in path:
            leaf = leaf[p]
        return leaf.sharding.spec

    # the stacked layer axis stays whole; embed -> fsdp; heads / mlp -> tensor
    assert spec("transformer_blocks", "attn", "to_q", "kernel") == P(None, "fsdp", "tensor")
    assert spec("transformer_blocks", "attn", "to_out_0", "kernel") == P(None, "tensor", "fsdp")
    assert spec("transformer_blocks", "ff", "net_0", "kernel") == P(None, "fsdp", "tensor")
    assert spec("single_transformer_blocks", "proj_out", "kernel") == P(None, "tensor", "fsdp")
    assert spec("transformer_blocks", "norm1", "linear", "kernel") == P(None, "fsdp", "tensor")
    assert spec("x_embedder", "kernel") == P(None, None, None, None, "fsdp")
    k = placed["transformer_blocks"]["attn"]["to_q"]["kernel"]
    shard_shapes = {s.data.shape for s in k.addressable_shards}
    assert shard_shapes == {(k.shape[0], k.shape[1] // 2, k.shape[2] // 2)}


def test_init_sharded_never_builds_whole_params(tiny):
    config, inputs, _, _ = tiny
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    variables, shardings = init_sharded(DiT(config).init, mesh, jax.random.key(1), **inputs)
    kernel = variables["params"]["single_transformer_blocks"]["proj_mlp"]["kernel"]
    assert kernel.sharding == shardings["params"]["single_transformer_blocks"]["proj_mlp"]["kernel"]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    assert all(s.data.size == kernel.size // 4 for s in kernel.addressable_shards)


def test_loader_places_shards_directly(tmp_path, tiny, torch):
    from diffusers import HunyuanVideoTransformer3DModel

    config, inputs, _, _ = tiny
    torch.manual_seed(0)
    HunyuanVideoTransformer3DModel(**config.to_diffusers()).save_pretrained(str(tmp_path))
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    cfg, params = load_diffusers_transformer(str(tmp_path), mesh=mesh)
    _, plain = load_diffusers_transformer(str(tmp_path))
    k = params["transformer_blocks"]["ff"]["net_2"]["kernel"]
    assert k.sharding.spec == P(None, "tensor", "fsdp")
    np.testing.assert_array_equal(np.asarray(k), np.asarray(plain["transformer_blocks"]["ff"]["net_2"]["kernel"]))  # copies


def test_mesh_spec_errors():
    assert parse_mesh_shape("data=2,fsdp=-1", 8) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    with pytest.raises(ValueError, match="unknown axis"):
        parse_mesh_shape("model=8", 8)
    with pytest.raises(ValueError, match="device count"):
        parse_mesh_shape("data=3", 8)
    mesh = make_mesh("tensor=8")
    assert mesh.axis_names == ("data", "fsdp", "context", "tensor")
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert dict(DEFAULT_RULES)["embed"] == "fsdp"
