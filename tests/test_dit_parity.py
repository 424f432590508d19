"""The Flax DiT, loaded with `load_diffusers_transformer` from a `save_pretrained` folder,
computes what diffusers' `HunyuanVideoTransformer3DModel` computes (fp32, <= 1e-5)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import max_abs
from mi_jax.convert import CheckpointError, WeightMismatchError, load_diffusers_transformer
from mi_jax.models import DiT, DiTConfig, image_condition_input
from mi_jax.models.dit import scan_unroll
from mi_jax.nn.layers import layer_norm, modulate, modulated_layer_norm

TINY = dict(
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=2,
    mlp_ratio=2.0,
    patch_size=2,
    text_embed_dim=24,
    pooled_projection_dim=12,
    rope_axes_dim=(4, 6, 6),
)

# (name, diffusers kwargs, latent shape [B, C, T, H, W])
CASES = {
    "t2v_guidance": (dict(TINY, in_channels=4, guidance_embeds=True, image_condition_type=None), (2, 4, 3, 6, 8)),
    "latent_concat_no_guidance": (
        dict(TINY, in_channels=9, guidance_embeds=False, image_condition_type="latent_concat"),
        (2, 9, 2, 4, 8),
    ),
    "token_replace_guidance": (
        dict(TINY, in_channels=4, guidance_embeds=True, image_condition_type="token_replace"),
        (2, 4, 3, 8, 6),
    ),
    "token_replace_patch_t2": (
        dict(TINY, in_channels=4, patch_size_t=2, guidance_embeds=False, image_condition_type="token_replace",
             num_refiner_layers=1, mlp_ratio=4.0),
        (1, 4, 4, 4, 6),
    ),
}


def _inputs(torch, kwargs, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = shape[0]
    lt = 7
    mask = torch.ones(b, lt, dtype=torch.long)
    mask[-1, 3:] = 0  # real padding at the end of the last prompt
    inputs = dict(
        hidden_states=torch.randn(*shape, generator=g),
        timestep=torch.linspace(900.0, 10.0, b),
        encoder_hidden_states=torch.randn(b, lt, kwargs["text_embed_dim"], generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(b, kwargs["pooled_projection_dim"], generator=g),
    )
    if kwargs["guidance_embeds"]:
        inputs["guidance"] = torch.linspace(6000.0, 2000.0, b)
    return inputs


def _to_jax(inputs):
    out = {k: jnp.asarray(v.numpy()) for k, v in inputs.items()}
    out["hidden_states"] = jnp.moveaxis(out["hidden_states"], 1, -1)  # [B, C, T, H, W] -> [B, T, H, W, C]
    return out


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory, torch):
    from diffusers import HunyuanVideoTransformer3DModel

    models = {}
    for i, (name, (kwargs, shape)) in enumerate(CASES.items()):
        torch.manual_seed(100 + i)
        model = HunyuanVideoTransformer3DModel(**kwargs).eval()
        path = str(tmp_path_factory.mktemp(name))
        # a small shard size makes diffusers write a sharded checkpoint with an index
        model.save_pretrained(path, max_shard_size="20KB" if name == "t2v_guidance" else "5GB")
        models[name] = (model, path)
    return models


@pytest.mark.parametrize("name", list(CASES))
def test_matches_diffusers(name, saved_models, torch):
    kwargs, shape = CASES[name]
    model, path = saved_models[name]
    inputs = _inputs(torch, kwargs, shape)
    with torch.no_grad():
        ref = model(**inputs).sample.numpy()

    config, params = load_diffusers_transformer(path)
    assert config.image_condition_type == kwargs["image_condition_type"]
    out = jax.jit(DiT(config).apply)({"params": params}, **_to_jax(inputs))
    out = np.moveaxis(np.asarray(out), -1, 1)
    assert out.shape == ref.shape
    assert max_abs(out, ref) <= 1e-5, max_abs(out, ref)
    assert np.abs(ref).max() > 0.1  # a meaningful comparison, not two zeros


def test_sharded_index_is_really_used(saved_models):
    _, path = saved_models["t2v_guidance"]
    assert os.path.exists(os.path.join(path, "diffusion_pytorch_model.safetensors.index.json"))


def test_unscanned_and_remat_paths_agree(saved_models, torch):
    kwargs, shape = CASES["token_replace_guidance"]
    _, path = saved_models["token_replace_guidance"]
    inputs = _to_jax(_inputs(torch, kwargs, shape, seed=1))
    config, params = load_diffusers_transformer(path)
    ref = jax.jit(DiT(config).apply)({"params": params}, **inputs)

    cfg_loop, params_loop = load_diffusers_transformer(path, scan_layers=False)
    assert "transformer_blocks_1" in params_loop and "transformer_blocks" not in params_loop
    out_loop = jax.jit(DiT(cfg_loop).apply)({"params": params_loop}, **inputs)
    assert max_abs(out_loop, ref) <= 1e-6

    cfg_remat = config.replace(remat_policy="full")
    grad = lambda cfg: jax.jit(jax.grad(lambda p: jnp.sum(DiT(cfg).apply({"params": p}, **inputs) ** 2)))  # noqa: E731
    g_plain = grad(config)(params)
    g_remat = grad(cfg_remat)(params)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), g_plain, g_remat))
    assert max(diffs) <= 1e-5


def test_scan_unroll_changes_speed_not_values(saved_models, torch):
    """`scan_unroll` (auto: every block unrolled on CPU) keeps the stacked weights and gives the
    one-block-per-iteration scan's output and gradients."""
    kwargs, shape = CASES["token_replace_guidance"]
    _, path = saved_models["token_replace_guidance"]
    inputs = _to_jax(_inputs(torch, kwargs, shape, seed=2))
    config, params = load_diffusers_transformer(path)
    assert config.scan_unroll == "auto" and scan_unroll("auto", 3) == 3  # the tests run on CPU
    loss = lambda cfg: jax.jit(jax.value_and_grad(  # noqa: E731
        lambda p: jnp.sum(DiT(cfg).apply({"params": p}, **inputs) ** 2)))
    (l_auto, g_auto), (l_one, g_one) = loss(config)(params), loss(config.replace(scan_unroll=1))(params)
    assert abs(float(l_auto - l_one)) <= 1e-5 * abs(float(l_one))
    for a, b in zip(jax.tree.leaves(g_auto), jax.tree.leaves(g_one)):  # float32 round-off of sums
        assert max_abs(a, b) <= 1e-5 * max(1.0, float(jnp.abs(b).max()))
    with pytest.raises(ValueError, match="scan_unroll"):
        config.replace(scan_unroll=0)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_modulated_layer_norm_gradient_matches_autodiff(backend, monkeypatch):
    """adaLN's hand-written backward equals autodiff of layer_norm + modulate, for per-sample
    ([B, D]) and per-token ([B, L, D], token replace) shift and scale (relative 1e-5), in its
    CPU form (sums as contractions) and its form elsewhere (reductions)."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    rng = np.random.default_rng(0)
    x = jnp.asarray(2 + 3 * rng.standard_normal((2, 7, 16)), jnp.float32)
    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    for mod_shape in ((2, 16), (2, 7, 16)):
        shift, scale = (jnp.asarray(rng.standard_normal(mod_shape), jnp.float32) for _ in range(2))
        want_y, pull_want = jax.vjp(lambda *a: modulate(layer_norm(a[0], 1e-6), *a[1:]), x, shift, scale)
        got_y, pull_got = jax.vjp(lambda *a: modulated_layer_norm(*a, 1e-6), x, shift, scale)
        assert max_abs(got_y, want_y) <= 1e-5
        for a, b in zip(pull_want(g), pull_got(g)):
            assert a.shape == b.shape and max_abs(a, b) <= 1e-5 * float(jnp.abs(a).max())


def test_bf16_runs_close_to_fp32(saved_models, torch):
    kwargs, shape = CASES["t2v_guidance"]
    _, path = saved_models["t2v_guidance"]
    inputs = _to_jax(_inputs(torch, kwargs, shape))
    config, params = load_diffusers_transformer(path)
    ref = jax.jit(DiT(config).apply)({"params": params}, **inputs)
    cfg16, params16 = load_diffusers_transformer(path, dtype="bfloat16", param_dtype="bfloat16")
    assert {p.dtype for p in jax.tree.leaves(params16)} == {jnp.dtype(jnp.bfloat16)}
    out = jax.jit(DiT(cfg16).apply)({"params": params16}, **inputs)
    assert out.dtype == jnp.bfloat16
    rel = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel


def test_image_condition_input_matches_diffusers_pipeline_layout():
    lat = jnp.arange(2 * 3 * 2 * 2 * 4, dtype=jnp.float32).reshape(2, 3, 2, 2, 4)
    img = -jnp.ones((2, 1, 2, 2, 4))
    tr = image_condition_input(lat, img, "token_replace")
    assert tr.shape == lat.shape and bool((tr[:, 0] == -1).all()) and bool((tr[:, 1:] == lat[:, 1:]).all())
    lc = image_condition_input(lat, img, "latent_concat")
    assert lc.shape == (2, 3, 2, 2, 9)
    assert bool((lc[..., :4] == lat).all())
    assert bool((lc[:, 0, ..., 4:8] == -1).all()) and bool((lc[:, 1:, ..., 4:8] == 0).all())
    assert bool((lc[:, 0, ..., 8] == 1).all()) and bool((lc[:, 1:, ..., 8] == 0).all())


# ----------------------------------------------------------------- clear errors


def test_misshaped_and_missing_keys_are_listed(saved_models, tmp_path):
    from safetensors.numpy import save_file

    from mi_jax.convert import SafetensorsFolder

    _, path = saved_models["latent_concat_no_guidance"]
    tensors = {k: np.asarray(v) for k, v in SafetensorsFolder(path).items()}
    tensors["proj_out.bias"] = np.zeros(3, np.float32)
    del tensors["norm_out.linear.weight"]
    tensors["extra.weight"] = np.zeros(2, np.float32)
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    with pytest.raises(WeightMismatchError) as err:
        load_diffusers_transformer(str(tmp_path))
    msg = str(err.value)
    assert "norm_out.linear.weight" in msg and "extra.weight" in msg and "proj_out.bias" in msg
    assert err.value.missing == ["norm_out.linear.weight"] and err.value.unexpected == ["extra.weight"]


def test_other_model_type_and_pickle_only_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLHunyuanVideo"}))
    with pytest.raises(CheckpointError, match="not a HunyuanVideoTransformer3DModel"):
        load_diffusers_transformer(str(tmp_path))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(
        json.dumps({"_class_name": "HunyuanVideoTransformer3DModel", **TINY, "in_channels": 4})
    )
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_diffusers_transformer(str(pickled))


def test_missing_shard_is_named(saved_models, tmp_path):
    import shutil

    _, path = saved_models["t2v_guidance"]
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    shard = sorted(n for n in os.listdir(copy) if n.endswith(".safetensors"))[0]
    os.remove(copy / shard)
    with pytest.raises(CheckpointError, match=shard):
        load_diffusers_transformer(str(copy))


def test_bad_inputs_fail_before_compute():
    cfg = DiTConfig(**{**TINY, "in_channels": 4, "image_condition_type": None, "guidance_embeds": True})
    model = DiT(cfg)
    good = dict(
        hidden_states=jnp.zeros((1, 1, 4, 4, 4)),
        timestep=jnp.zeros((1,)),
        encoder_hidden_states=jnp.zeros((1, 3, 24)),
        encoder_attention_mask=jnp.ones((1, 3)),
        pooled_projections=jnp.zeros((1, 12)),
        guidance=jnp.zeros((1,)),
    )
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), **good))
    for change, pattern in [
        (dict(hidden_states=jnp.zeros((1, 4, 1, 4, 4)).transpose(0, 2, 3, 4, 1)[..., :3]), "channels"),
        (dict(hidden_states=jnp.zeros((1, 1, 5, 4, 4))), "divisible by the patch"),
        (dict(guidance=None), "guidance"),
        (dict(encoder_hidden_states=jnp.zeros((1, 3, 8))), "text_embed_dim"),
        (dict(pooled_projections=jnp.zeros((1, 5))), "pooled_projections"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            jax.eval_shape(lambda p, kw: model.apply(p, **kw), params, {**good, **change})
    with pytest.raises(ValueError, match="in_channels must be 2"):
        DiTConfig(in_channels=16, image_condition_type="latent_concat")
    with pytest.raises(ValueError, match="rope_axes_dim"):
        DiTConfig(rope_axes_dim=(16, 56, 50))
