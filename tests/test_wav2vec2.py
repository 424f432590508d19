"""Wav2Vec2 parity with transformers' Wav2Vec2Model (tiny random models) and the loader."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_abs
from flax import linen as nn

from mi_jax.convert.name_map import WeightMismatchError
from mi_jax.convert.safetensors_io import CheckpointError
from mi_jax.convert.wav2vec2 import load_transformers_wav2vec2, wav2vec2_name_map
from mi_jax.models.wav2vec2 import (
    WAV2VEC2_BASE,
    Wav2Vec2,
    Wav2Vec2Config,
    abstract_params,
    count_params,
    min_samples,
    num_output_frames,
)

TINY = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
    conv_dim=(16, 24, 16), conv_kernel=(10, 3, 2), conv_stride=(5, 2, 2), num_conv_pos_embedding_groups=4,
)
VARIANTS = {
    # base-960h style; even pos-conv kernel (one padded frame removed)
    "group_postln": dict(feat_extract_norm="group", do_stable_layer_norm=False, num_conv_pos_embeddings=16),
    # large-lv60 style; odd pos-conv kernel, conv bias, tanh GELU
    "layer_stable": dict(
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True, num_conv_pos_embeddings=15,
        hidden_act="gelu_new",
    ),
}
SAMPLES = 1200


def _torch_model(torch, variant, cls_name="Wav2Vec2Model"):
    import transformers

    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(**TINY, **VARIANTS[variant])
    return getattr(transformers, cls_name)(config).eval()


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def saved(request, torch, tmp_path_factory):
    """(variant, torch model, folder written by save_pretrained)."""
    model = _torch_model(torch, request.param)
    folder = str(tmp_path_factory.mktemp(request.param))
    model.save_pretrained(folder)
    return request.param, model, folder


def _inputs(torch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, SAMPLES, generator=g)
    mask = torch.ones(2, SAMPLES, dtype=torch.long)
    mask[1, 700:] = 0
    return x, mask


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_hidden_states_match_transformers(saved, torch, with_mask):
    variant, model, folder = saved
    config, params = load_transformers_wav2vec2(folder)
    assert config == Wav2Vec2Config(**TINY, **VARIANTS[variant])
    x, mask = _inputs(torch)
    mask = mask if with_mask else None
    with torch.no_grad():
        ref = model(x, attention_mask=mask, output_hidden_states=True)
    apply = jax.jit(Wav2Vec2(config).apply)
    out = apply({"params": params}, jnp.asarray(x.numpy()), None if mask is None else jnp.asarray(mask.numpy()))

    assert len(out.hidden_states) == len(ref.hidden_states) == config.num_hidden_layers + 1
    for i, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert ours.shape == tuple(theirs.shape), i
        assert max_abs(ours, theirs.numpy()) < 1e-4, f"hidden_states[{i}]"
    assert max_abs(out["last_hidden_state"], ref.last_hidden_state.numpy()) < 1e-4
    assert max_abs(out.extract_features, ref.extract_features.numpy()) < 1e-4
    assert out.last_hidden_state.shape[1] == num_output_frames(config, SAMPLES)


def test_frames_helper_matches_transformers(torch):
    model = _torch_model(torch, "group_postln")
    config = Wav2Vec2Config(**TINY, **VARIANTS["group_postln"])
    lengths = [min_samples(config), 640, 641, 999, 16000]
    ref = model._get_feat_extract_output_lengths(torch.tensor(lengths)).tolist()
    assert [num_output_frames(config, n) for n in lengths] == ref
    assert list(num_output_frames(config, np.array(lengths))) == ref
    assert num_output_frames(config, min_samples(config)) == 1
    assert (min_samples(WAV2VEC2_BASE), num_output_frames(WAV2VEC2_BASE, 16000)) == (400, 49)
    with pytest.raises(ValueError, match="at least"):
        num_output_frames(config, min_samples(config) - 1)
    with pytest.raises(ValueError, match="samples >="):
        Wav2Vec2(config).init(jax.random.key(0), jnp.zeros((1, min_samples(config) - 1)))


def test_task_checkpoint_and_old_weight_norm_keys(torch, tmp_path):
    """A Wav2Vec2ForCTC folder (`wav2vec2.` prefix, lm_head) whose positional conv uses the
    pre-parametrization `weight_g` / `weight_v` keys, as the Hub's base-960h does."""
    from safetensors.torch import load_file, save_file

    ctc = _torch_model(torch, "group_postln", "Wav2Vec2ForCTC")
    ctc.save_pretrained(tmp_path)
    file = os.path.join(tmp_path, "model.safetensors")
    old = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    renamed = {}
    for key, value in load_file(file).items():
        for new_name, old_name in old.items():
            key = key.replace(new_name, old_name)
        renamed[key] = value
    assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in renamed and "lm_head.weight" in renamed
    save_file(renamed, file)

    config, params = load_transformers_wav2vec2(str(tmp_path))
    x, _ = _inputs(torch)
    with torch.no_grad():
        ref = ctc.wav2vec2(x).last_hidden_state.numpy()
    out = jax.jit(Wav2Vec2(config).apply)({"params": params}, jnp.asarray(x.numpy()))
    assert max_abs(out.last_hidden_state, ref) < 1e-4


def test_loader_reports_mismatched_and_unexpected_keys(saved, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, _, folder = saved
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    tensors["feature_projection.projection.bias"] = np.zeros((5,), np.float32)
    tensors["encoder.layers.0.attention.extra.weight"] = np.zeros((2,), np.float32)
    del tensors["encoder.layers.1.final_layer_norm.weight"]
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    with open(os.path.join(folder, "config.json")) as src, open(os.path.join(tmp_path, "config.json"), "w") as dst:
        dst.write(src.read())
    with pytest.raises(WeightMismatchError) as err:
        load_transformers_wav2vec2(str(tmp_path))
    msg = str(err.value)
    assert "feature_projection.projection.bias: model expects (32,), checkpoint has (5,)" in msg
    assert "unexpected (1): encoder.layers.0.attention.extra.weight" in msg
    assert "missing (1): encoder.layers.1.final_layer_norm.weight" in msg


def test_loader_refuses_pickle_only_folder(torch, tmp_path):
    model = _torch_model(torch, "group_postln")
    torch.save(model.state_dict(), os.path.join(tmp_path, "pytorch_model.bin"))
    with open(os.path.join(tmp_path, "config.json"), "w") as f:
        json.dump(model.config.to_dict(), f)
    with pytest.raises(CheckpointError, match="only pickle checkpoints.*safetensors"):
        load_transformers_wav2vec2(str(tmp_path))
    os.remove(os.path.join(tmp_path, "config.json"))
    with pytest.raises(CheckpointError, match="config.json"):
        load_transformers_wav2vec2(str(tmp_path))


def test_config_from_transformers():
    import transformers

    assert Wav2Vec2Config.from_transformers(transformers.Wav2Vec2Config().to_dict()) == WAV2VEC2_BASE
    with pytest.raises(ValueError, match="model_type 'hubert'"):
        Wav2Vec2Config.from_transformers({"model_type": "hubert"})
    with pytest.raises(ValueError, match="adapters"):
        Wav2Vec2Config.from_transformers({"add_adapter": True})
    with pytest.raises(ValueError, match="same length"):
        Wav2Vec2Config(conv_dim=(8, 8), conv_kernel=(3,), conv_stride=(1,))


def test_base_parameter_tree_matches_transformers(torch):
    """Every key and shape of the real-size model, without allocating it (meta device)."""
    import transformers

    with torch.device("meta"):
        ref = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config())
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "masked_spec_embed"}
    name_map = wav2vec2_name_map()
    got = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(WAV2VEC2_BASE)))[0]:
        path = tuple(p.key for p in path)
        shape = leaf.shape[1:] if name_map.is_stacked(path) else leaf.shape
        if path[-1] == "kernel":  # [*k, in, out] -> [out, in, *k]
            shape = (shape[-1], shape[-2], *shape[:-2])
        for key in name_map.torch_keys(path, leaf.shape):
            got[key] = tuple(shape)
    assert got == want
    assert count_params(abstract_params(WAV2VEC2_BASE)) == sum(int(np.prod(s)) for s in want.values())


def test_sharded_load_and_bf16(saved, torch):
    from mi_jax.parallel.mesh import make_mesh

    _, model, folder = saved
    config, params = load_transformers_wav2vec2(folder, mesh=make_mesh("fsdp=8"))
    kernel = params["encoder_layers"]["attention"]["q_proj"]["kernel"]
    assert kernel.shape == (2, 32, 32) and len(kernel.sharding.device_set) == 8
    x, _ = _inputs(torch)
    with torch.no_grad():
        ref = model(x).last_hidden_state.numpy()
    out = jax.jit(Wav2Vec2(config).apply)({"params": params}, jnp.asarray(x.numpy()))
    assert max_abs(out.last_hidden_state, ref) < 1e-4

    _, params16 = load_transformers_wav2vec2(folder, dtype=jnp.bfloat16)
    out16 = jax.jit(Wav2Vec2(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply)(
        {"params": params16}, jnp.asarray(x.numpy())
    )
    assert out16.last_hidden_state.dtype == jnp.bfloat16
    assert max_abs(out16.last_hidden_state, ref) < 0.15 * float(np.abs(ref).max())
