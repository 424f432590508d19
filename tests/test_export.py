"""Weights in and out: diffusers / transformers -> import_weights -> export -> from_pretrained.

Tiny random models. The exported transformer and VAE compute what the JAX models compute
(fp32, <= 1e-5; VAE decode in float64, <= 1e-5, as its fp32 noise floor is above 1e-5); the
whole audio-conditioned model in PyTorch (`MagicInfiniteTransformer`, non-zero audio adapters,
two speakers with masks) equals `DiT.apply` (<= 1e-4); the round trip
diffusers -> mi_jax -> diffusers is byte-identical (fp32 and bf16 sources); LoRA is merged like
`lora_apply` or kept and applied by the PyTorch wrapper; errors leave no partial output; the
writer holds one tensor at a time.
"""

import dataclasses
import importlib
import json
import os
import shutil
import tracemalloc

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import max_abs
from flax import traverse_util

from mi_jax.convert.export import export, open_checkpoint, write_model
from mi_jax.convert.hunyuan import dit_name_map, is_audio_path
from mi_jax.convert.import_weights import format_report, import_weights, load_imported
from mi_jax.convert.name_map import NameMap, WeightMismatchError, export_params
from mi_jax.convert.safetensors_io import CheckpointError, SafetensorsFolder, read_header
from mi_jax.models import CausalVAE, DiT
from mi_jax.nn.lora import lora_apply, lora_init

TINY = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
            num_single_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, text_embed_dim=24,
            pooled_projection_dim=12, rope_axes_dim=(4, 6, 6), guidance_embeds=True,
            image_condition_type="token_replace")
AUDIO = dict(audio_blocks=1, audio_feature_layers=3, audio_feature_dim=8, audio_window=1, audio_hidden=16,
             audio_tokens=4, audio_token_dim=12)
VAE = dict(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)
W2V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(32, 32, 32),
           conv_stride=(5, 4, 4), conv_kernel=(10, 8, 8), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
B, T, H, W, S = 2, 3, 4, 6, 2  # latents [B, C, T, H, W], S speakers
F_VIDEO = 1 + 4 * (T - 1)


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def sources(tmp_path_factory, torch):
    """Tiny diffusers transformer (sharded), VAE and transformers Wav2Vec2 folders."""
    import transformers
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    dit = HunyuanVideoTransformer3DModel(**TINY).eval()
    dit.save_pretrained(root / "transformer", max_shard_size="40KB")
    vae = AutoencoderKLHunyuanVideo(**VAE).eval()
    vae.save_pretrained(root / "vae")
    w2v = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**W2V)).eval()
    w2v.save_pretrained(root / "wav2vec2")
    return {"root": root, "transformer": str(root / "transformer"), "vae": str(root / "vae"),
            "wav2vec2": str(root / "wav2vec2"), "dit_model": dit, "vae_model": vae}


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("imports") / "ckpt")
    report = import_weights(sources["transformer"], out, vae_dir=sources["vae"], wav2vec_dir=sources["wav2vec2"],
                            config_overrides=AUDIO)
    return out, report


@pytest.fixture(scope="module")
def exported(imported, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exports") / "plain")
    return out, export(imported[0], out, max_shard_size="40KB")


@pytest.fixture(scope="module")
def loaded(imported):
    return load_imported(imported[0])


def _torch_inputs(torch, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(B, 5, dtype=torch.long)
    mask[-1, 3:] = 0  # padding at the end of the last prompt
    return dict(
        hidden_states=torch.randn(B, 4, T, H, W, generator=g),
        timestep=torch.tensor([900.0, 250.0]),
        encoder_hidden_states=torch.randn(B, 5, 24, generator=g),
        encoder_attention_mask=mask,
        pooled_projections=torch.randn(B, 12, generator=g),
        guidance=torch.tensor([6000.0, 3500.0]),
    )


def _audio_inputs(torch, seed=1):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(B, S, F_VIDEO, AUDIO["audio_feature_layers"], AUDIO["audio_feature_dim"], generator=g)
    mask = torch.zeros(B, S, T, H, W)
    mask[:, 0, :, :, :3] = 1  # speaker A: left half
    mask[:, 1, :, :3, 3:] = 1  # speaker B: top right, cutting through patches (token masks of 0.5)
    return states, mask


def _to_jax(inputs):
    out = {k: jnp.asarray(v.numpy()) for k, v in inputs.items()}
    out["hidden_states"] = jnp.moveaxis(out["hidden_states"], 1, -1)  # [B, C, T, H, W] -> channels last
    return out


@pytest.fixture(scope="module")
def dit_apply():
    """One jitted apply per config, shared by the tests (compiles once per input structure)."""
    cache = {}

    def get(config):
        if config not in cache:
            cache[config] = jax.jit(DiT(config).apply)
        return cache[config]

    return get


def _jax_out(apply, params, inputs):
    return np.moveaxis(np.asarray(apply({"params": params}, **inputs)), -1, 1)


def _tensors(folder, name="diffusion_pytorch_model"):
    return SafetensorsFolder(folder, name)


def _save_run(run_dir, config, params, ema=None):
    """A training run folder as mi_jax.train.loop writes it (TrainState + data + config)."""
    from mi_jax.train.loop import checkpoint_manager, save
    from mi_jax.train.state import TrainState

    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero + 7, params=params, opt_state=(), ema=ema, nan_count=zero, nan_streak=zero)
    cfg = ml_collections.ConfigDict({"model": dataclasses.asdict(config), "init": {"lora_rank": 0}})
    manager = checkpoint_manager(str(run_dir), keep=1)
    save(manager, 7, state, None, cfg)
    manager.wait_until_finished()
    manager.close()
    return str(run_dir)


def _with_trained_audio(params, seed=0):
    """Audio modules with noise instead of the fresh init (a non-zero out projection)."""
    flat = traverse_util.flatten_dict(params)
    keys = jax.random.split(jax.random.key(seed), len(flat))
    return traverse_util.unflatten_dict({
        p: (0.3 * jax.random.normal(k, v.shape, v.dtype) if is_audio_path(p) else v)
        for (p, v), k in zip(flat.items(), keys)
    })


def _no_partial_output(parent, before):
    assert sorted(os.listdir(parent)) == before, f"left behind: {set(os.listdir(parent)) - set(before)}"


# ------------------------------------------------------------------ import


def test_import_report_and_training_compatible_layout(imported, loaded, sources):
    from mi_jax.convert.checkpoint import load_run_params

    out, report = imported
    assert report["dit"]["new"]["modules"] == [
        "audio_projector/norm", "audio_projector/proj_frame", "audio_projector/proj_group",
        "audio_projector/proj_tokens", "audio_single_blocks/audio_attn"]
    assert report["dit"]["new"]["parameters"] > 0
    assert "transformer_blocks" in report["dit"]["imported"]["modules"]
    assert report["dit"]["imported"]["tensors"] == len(_tensors(sources["transformer"]))
    assert report["vae"]["parameters"] > 0 and report["wav2vec2"]["parameters"] > 0
    assert json.load(open(os.path.join(out, "mi_jax_import.json"))) == report
    assert "freshly initialised" in format_report(report)

    assert loaded["dit_config"].audio_blocks == 1 and loaded["vae_config"].latent_channels == 4
    assert loaded["wav2vec2_config"].hidden_size == 32
    # the fresh audio adapter starts at zero output
    assert not np.any(np.asarray(loaded["dit"]["audio_single_blocks"]["audio_attn"]["to_out"]["kernel"]))
    # a training config's init.checkpoint reads it unchanged
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), loaded["dit"])
    params = load_run_params(out, abstract, jax.tree.map(lambda _: device, abstract))
    assert max(jax.tree.leaves(jax.tree.map(lambda a, b: max_abs(a, b), params, loaded["dit"]))) == 0.0


# ------------------------------------------------------------------ export parity


def test_transformer_export_matches_jax(exported, loaded, torch, dit_apply):
    from diffusers import HunyuanVideoTransformer3DModel

    out, report = exported
    folder = report["transformer"]["path"]
    files = report["transformer"]["files"]
    assert len(files) > 1 and os.path.exists(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"))
    assert all(os.path.getsize(os.path.join(folder, f)) < 40_000 + 4096 for f in files[:-1])  # + header
    model = HunyuanVideoTransformer3DModel.from_pretrained(folder).eval()
    inputs = _torch_inputs(torch)
    with torch.no_grad():
        ref = model(**inputs).sample.numpy()
    got = _jax_out(dit_apply(loaded["dit_config"]), loaded["dit"], _to_jax(inputs))
    assert np.abs(ref).max() > 0.1
    assert max_abs(got, ref) <= 1e-5, max_abs(got, ref)


def test_vae_export_matches_jax(exported, loaded, sources, torch):
    """Encode agrees in float32 within 1e-5. Decode is checked in float64 (JAX x64 vs diffusers
    .double()) within 1e-5, which is what shows the two compute the same function: in float32
    this tiny random decoder has a noise floor above 1e-5 (each of its 22 GroupNorms, 2 channels
    a group, multiplies the accumulated rounding error by 2-7). On this draw diffusers' own fp32
    decode is 2.6e-5 from its fp64 decode, JAX's fp32 decode 1.1e-5, and JAX's fp32 decode moves
    by 4e-5 when only XLA's host device count changes (1 vs 8). So fp32 decode is held to
    diffusers' own fp32 error."""
    from diffusers import AutoencoderKLHunyuanVideo

    def load(dtype):
        vae = AutoencoderKLHunyuanVideo.from_pretrained(exported[1]["vae"]["path"]).to(dtype).eval()
        vae.use_framewise_encoding = vae.use_framewise_decoding = False
        return vae

    vae_t, vae_64 = load(torch.float32), load(torch.float64)
    x = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    z = torch.randn(1, 4, 2, 2, 2)
    with torch.no_grad():
        mean_t = vae_t.encode(x).latent_dist.mean.numpy()
        mean_64 = vae_64.encode(x.double()).latent_dist.mean.numpy()
        video_t = vae_t.decode(z).sample.numpy()
        video_64 = vae_64.decode(z.double()).sample.numpy()
        video_src = sources["vae_model"].decode(z).sample.numpy()
    # the exported VAE is the source VAE, bit for bit: the same torch program with the same weights
    np.testing.assert_array_equal(video_t, video_src)

    def run(dtype):
        """(mean, video), channels first, from the JAX VAE computing in `dtype`."""
        vae = CausalVAE(loaded["vae_config"], dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(lambda a: jnp.asarray(a, dtype), loaded["vae"])
        apply = jax.jit(lambda p, v, m: vae.apply({"params": p}, v, method=m), static_argnums=2)
        mean, _ = apply(params, jnp.moveaxis(x.numpy(), 1, -1).astype(dtype), "encode")
        video = apply(params, jnp.moveaxis(z.numpy(), 1, -1).astype(dtype), "decode")
        return [np.moveaxis(np.asarray(a), -1, 1) for a in (mean, video)]

    mean_j, video_j = run(jnp.float32)
    with jax.enable_x64(True):
        mean_j64, video_j64 = run(jnp.float64)
    assert video_j64.dtype == np.float64
    assert max_abs(mean_j, mean_t) <= 1e-5
    # float64 decode is 9.5e-7 off, not 1e-15: jax.nn.dot_product_attention takes its softmax in
    # float32 (4e-8) and the decoder's GroupNorms amplify that as they amplify float32 rounding.
    assert max_abs(mean_j64, mean_64) <= 1e-5 and max_abs(video_j64, video_64) <= 1e-5
    noise = max_abs(video_t, video_64)
    assert max_abs(video_j, video_t) <= min(5e-5, max(1e-5, 2 * noise)), (max_abs(video_j, video_t), noise)


def test_trained_vae_export_matches_jax_fp32(sources, tmp_path, torch):
    """The bundled demo VAE (trained on the synthetic world, demo/vae): import -> export ->
    diffusers from_pretrained, then encode and decode real frames in float32: both within 1e-5
    of JAX (measured 5.7e-6 / 1.8e-6; diffusers' own fp32-vs-fp64 decode gap here is 1.7e-6).
    A trained decoder is well conditioned, unlike the tiny random one above."""
    from diffusers import AutoencoderKLHunyuanVideo

    from mi_jax.data import synthetic

    demo_vae = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", "vae")
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    import_weights(sources["transformer"], ckpt, vae_dir=demo_vae, config_overrides=AUDIO)
    report = export(ckpt, out)
    tv = AutoencoderKLHunyuanVideo.from_pretrained(report["vae"]["path"]).eval()
    tv.use_framewise_encoding = tv.use_framewise_decoding = False
    got = load_imported(ckpt)
    vae = CausalVAE(got["vae_config"])
    frames = synthetic.render_clip(1_000_009, 0.5, size=(64, 64)).frames[:9].astype(np.float32) / 127.5 - 1
    mean_j, _ = vae.apply({"params": got["vae"]}, jnp.asarray(frames)[None], method="encode")
    video_j = vae.apply({"params": got["vae"]}, mean_j, method="decode")
    with torch.no_grad():
        mean_t = tv.encode(torch.from_numpy(frames).permute(3, 0, 1, 2)[None]).latent_dist.mean
        video_t = tv.decode(torch.from_numpy(np.moveaxis(np.asarray(mean_j), -1, 1))).sample
    assert max_abs(np.moveaxis(np.asarray(mean_j), -1, 1), mean_t.numpy()) <= 1e-5
    assert max_abs(np.moveaxis(np.asarray(video_j), -1, 1), video_t.numpy()) <= 1e-5


# ------------------------------------------------------------------ round trips


def _assert_identical(src: SafetensorsFolder, dst: SafetensorsFolder, skip=()):
    assert sorted(set(src) - set(skip)) == sorted(dst)
    for key in dst:
        a, b = src[key], dst[key]
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert a.tobytes() == b.tobytes(), key  # a weight round trip copies bytes


def test_round_trip_is_byte_identical_fp32(exported, sources):
    report = exported[1]
    _assert_identical(_tensors(sources["transformer"]), _tensors(report["transformer"]["path"]))
    _assert_identical(_tensors(sources["vae"]), _tensors(report["vae"]["path"]))
    # masked_spec_embed is SpecAugment's training-time mask vector: mi_jax does not keep it
    _assert_identical(_tensors(sources["wav2vec2"], "model"), _tensors(report["wav2vec2"]["path"], "model"),
                      skip={"masked_spec_embed"})
    import transformers

    _, info = transformers.Wav2Vec2Model.from_pretrained(report["wav2vec2"]["path"], output_loading_info=True)
    assert set(info["missing_keys"]) <= {"masked_spec_embed"} and not info["unexpected_keys"], info
    src_cfg = json.load(open(os.path.join(sources["transformer"], "config.json")))
    out_cfg = json.load(open(os.path.join(report["transformer"]["path"], "config.json")))
    drop = lambda d: {k: v for k, v in d.items() if k != "_diffusers_version"}  # noqa: E731
    assert drop(out_cfg) == drop(src_cfg)


def test_round_trip_is_byte_identical_bf16(sources, tmp_path, torch):
    from diffusers import HunyuanVideoTransformer3DModel

    src = tmp_path / "bf16"
    HunyuanVideoTransformer3DModel(**TINY).to(torch.bfloat16).save_pretrained(src)
    import_weights(str(src), str(tmp_path / "ckpt"))  # float32 parameters: bf16 -> f32 is exact
    report = export(str(tmp_path / "ckpt"), str(tmp_path / "out"), dtype="bf16")
    assert read_header(os.path.join(report["transformer"]["path"], report["transformer"]["files"][0]))[1][
        "proj_out.weight"]["dtype"] == "BF16"
    _assert_identical(_tensors(str(src)), _tensors(report["transformer"]["path"]))
    assert report["audio"] is None and report["vae"] is None


# ------------------------------------------------------------------ the audio model in PyTorch


def test_audio_model_in_pytorch_matches_jax(loaded, sources, tmp_path, torch, dit_apply):
    from mi_jax.convert.torch_audio import MagicInfiniteTransformer

    config = loaded["dit_config"]
    params = _with_trained_audio(loaded["dit"])
    run = _save_run(tmp_path / "run", config, params)
    report = export(run, str(tmp_path / "out"))
    model = MagicInfiniteTransformer.from_pretrained(str(tmp_path / "out"))
    assert model.audio is not None and list(model.audio.single_transformer_blocks) == ["1"]

    inputs = _torch_inputs(torch, seed=3)
    states, mask = _audio_inputs(torch)
    with torch.no_grad():
        got = model(**inputs, audio_states=states, audio_mask=mask).numpy()
        silent = model(**inputs).numpy()
    ref = _jax_out(dit_apply(config), params, _to_jax(dict(inputs, audio_states=states, audio_mask=mask)))
    assert max_abs(got, silent) > 1e-2  # the audio path matters
    assert max_abs(got, ref) <= 1e-4, max_abs(got, ref)

    # and back: transformer + audio folders import to the same parameters
    back = tmp_path / "back"
    import_weights(report["transformer"]["path"], str(back), audio_dir=report["audio"]["path"])
    again = traverse_util.flatten_dict(load_imported(str(back))["dit"])
    for path, value in traverse_util.flatten_dict(params).items():
        # a weight round trip copies values
        np.testing.assert_array_equal(np.asarray(again[path]), np.asarray(value), err_msg="/".join(path))


def test_lora_merged_kept_and_ema(loaded, tmp_path, torch, dit_apply):
    from mi_jax.convert.torch_audio import MagicInfiniteTransformer

    config = loaded["dit_config"]
    base = _with_trained_audio(loaded["dit"], seed=1)
    lora = lora_init(base, jax.random.key(2), rank=2)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), lora)  # trained b != 0
    assert "audio_single_blocks" in lora  # LoRA reaches the audio cross-attention too
    flat = traverse_util.flatten_dict(base)
    ema_base = traverse_util.unflatten_dict({p: (v + 1.0 if is_audio_path(p) else None) for p, v in flat.items()})
    run = _save_run(tmp_path / "run", config, {"base": base, "lora": lora}, ema={"base": ema_base, "lora": lora})

    merged = lora_apply(base, lora, 1.0)
    name_map = dit_name_map(config)
    want = dict(export_params(merged, name_map))
    r_merged = export(run, str(tmp_path / "merged"), merge_lora=True)
    got = {**_tensors(r_merged["transformer"]["path"]), **_tensors(r_merged["audio"]["path"])}
    assert sorted(got) == sorted(want) and r_merged["lora"] is None
    assert max(max_abs(got[k], want[k]) for k in want) <= 1e-6

    r_kept = export(run, str(tmp_path / "kept"))
    base_t = dict(export_params(base, name_map))
    kept = _tensors(r_kept["transformer"]["path"])
    assert all(np.array_equal(kept[k], base_t[k]) for k in kept)  # the base, unmerged
    lora_keys = list(SafetensorsFolder(r_kept["lora"]["path"], "pytorch_lora_weights"))
    assert "transformer.single_transformer_blocks.0.proj_out.lora_A.weight" in lora_keys
    assert "audio.single_transformer_blocks.1.audio_attn.to_q.lora_B.weight" in lora_keys
    # the PyTorch wrapper applies the kept factors: the same weights and outputs as merged
    m_kept = MagicInfiniteTransformer.from_pretrained(str(tmp_path / "kept"))
    m_merged = MagicInfiniteTransformer.from_pretrained(str(tmp_path / "merged"))
    sd_kept, sd_merged = m_kept.state_dict(), m_merged.state_dict()
    assert max(max_abs(sd_kept[k], sd_merged[k]) for k in sd_merged) <= 1e-6
    inputs = _torch_inputs(torch, seed=4)
    states, mask = _audio_inputs(torch, seed=5)
    with torch.no_grad():
        out = m_kept(**inputs, audio_states=states, audio_mask=mask).numpy()
    ref = _jax_out(dit_apply(config), merged, _to_jax(dict(inputs, audio_states=states, audio_mask=mask)))
    assert max_abs(out, ref) <= 1e-4, max_abs(out, ref)

    # EMA: the audio modules from the EMA, the frozen backbone from the params
    r_ema = export(run, str(tmp_path / "ema"), which="ema", merge_lora=True)
    ema_merged = lora_apply(traverse_util.unflatten_dict(
        {p: (v + 1.0 if is_audio_path(p) else v) for p, v in flat.items()}), lora, 1.0)
    want_ema = dict(export_params(ema_merged, name_map))
    got_ema = _tensors(r_ema["audio"]["path"])
    assert max(max_abs(got_ema[k], want_ema[k]) for k in got_ema) <= 1e-6
    assert max_abs(got_ema["audio_projector.norm.bias"], got["audio_projector.norm.bias"]) == pytest.approx(1.0)


# ------------------------------------------------------------------ errors, atomicity, streaming


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def _misshaped(src, dst, torch):
    from safetensors.torch import load_file, save_file

    dst = _copy(src, dst)
    path = os.path.join(dst, "diffusion_pytorch_model.safetensors")
    tensors = load_file(path)
    tensors["proj_out.bias"] = torch.zeros(3)
    save_file(tensors, path, metadata={"format": "pt"})
    return dst


def _sharded_missing(src, dst, torch):
    dst = _copy(src, dst)
    os.remove(os.path.join(dst, sorted(f for f in os.listdir(dst) if f.endswith(".safetensors"))[1]))
    return dst


def _pickle_only(src, dst, torch):
    from diffusers import HunyuanVideoTransformer3DModel

    HunyuanVideoTransformer3DModel(**TINY).save_pretrained(dst, safe_serialization=False)
    return str(dst)


CASES = {  # name -> (make the transformer folder, kwargs, error type, message part)
    "missing_shard": (_sharded_missing, "sharded", {}, CheckpointError, "not in the folder"),
    "misshaped": (_misshaped, "single", {}, WeightMismatchError, "mis-shaped: proj_out.bias"),
    "pickle_only": (_pickle_only, "single", {}, CheckpointError, "only pickle checkpoints"),
    "vae_as_transformer": (lambda s, d, t: s, "vae", {}, CheckpointError, "'AutoencoderKLHunyuanVideo', not a"),
    "transformer_as_vae": (lambda s, d, t: s, "sharded", {"vae_dir": "sharded"}, CheckpointError,
                           "'HunyuanVideoTransformer3DModel', not a 'AutoencoderKLHunyuanVideo'"),
    "wav2vec2_as_transformer": (lambda s, d, t: s, "wav2vec2", {}, CheckpointError, "'wav2vec2', not a"),
    "architecture_override": (lambda s, d, t: s, "sharded", {"config_overrides": {"num_layers": 3}},
                              CheckpointError, "cannot be overridden"),
}


@pytest.fixture(scope="module")
def single_file_source(tmp_path_factory, torch):
    from diffusers import HunyuanVideoTransformer3DModel

    path = tmp_path_factory.mktemp("single") / "transformer"
    HunyuanVideoTransformer3DModel(**TINY).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("case", list(CASES))
def test_import_errors_are_clear_and_leave_nothing(case, sources, single_file_source, tmp_path, torch):
    make, which, kwargs, error, message = CASES[case]
    src = {"sharded": sources["transformer"], "single": single_file_source, "vae": sources["vae"],
           "wav2vec2": sources["wav2vec2"]}[which]
    folder = make(src, tmp_path / "src", torch)
    kwargs = {k: (sources["transformer"] if v == "sharded" else v) for k, v in kwargs.items()}
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(error, match=message.replace("(", r"\(")):
        import_weights(folder, str(parent / "ckpt"), wav2vec_dir=sources["wav2vec2"], **kwargs)
    _no_partial_output(str(parent), [])


def test_import_failure_while_writing_leaves_nothing(single_file_source, tmp_path, monkeypatch):
    module = importlib.import_module("mi_jax.atomic")  # import_weights writes through atomic.folder

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(module, "commit", fail)  # everything written, the final rename fails
    with pytest.raises(OSError, match="disk full"):
        import_weights(single_file_source, str(tmp_path / "ckpt"))
    _no_partial_output(str(tmp_path), [])


def test_export_errors_and_atomicity(imported, sources, tmp_path, monkeypatch):
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(CheckpointError, match="run import_weights"):
        export(sources["transformer"], str(parent / "x"))
    with pytest.raises(CheckpointError, match="no EMA"):
        export(imported[0], str(parent / "x"), which="ema")
    with pytest.raises(ValueError, match="fp32"):
        export(imported[0], str(parent / "x"), dtype="fp8")
    (parent / "taken").mkdir()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export(imported[0], str(parent / "taken"))

    # a failure half-way through writing (disk full, killed reader, ...) leaves nothing behind
    export_mod = importlib.import_module("mi_jax.convert.export")  # the module, whatever __init__ re-exports
    real = export_mod.export_params

    def failing(params, name_map):
        for i, kv in enumerate(real(params, name_map)):
            if i == 5:
                raise OSError("disk full")
            yield kv

    monkeypatch.setattr(export_mod, "export_params", failing)
    with pytest.raises(OSError, match="disk full"):
        export(imported[0], str(parent / "x"))
    _no_partial_output(str(parent), ["taken"])
    assert sorted(open_checkpoint(imported[0])) == sorted(
        ["step_dir", "config", "params", "vae_config", "vae", "wav2vec2_config", "wav2vec2", "wav2vec2_source_config"])


def test_export_streams_one_tensor_at_a_time(tmp_path):
    """24 stacked layers of 128 KiB kernels (3.2 MB): many shards of <= 300 KB, and the writer's
    peak host allocation stays near one tensor, far below a shard or the model."""
    rng = np.random.default_rng(0)
    params = {"blocks": {"proj": {"kernel": rng.standard_normal((24, 128, 256), np.float32),
                                  "bias": rng.standard_normal((24, 256), np.float32)}},
              "head": {"kernel": rng.standard_normal((256, 64), np.float32)}}
    name_map = NameMap(stacked=("blocks",))
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    tensor_bytes = 128 * 256 * 4
    tracemalloc.start()
    tracemalloc.reset_peak()
    report = write_model(str(tmp_path / "m"), params, name_map, {"_class_name": "Test"}, weights_name="w",
                         dtype=np.float32, max_shard_size=300_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # below 1.6 tensors: less than one 2-kernel shard, a 16th of the model
    assert peak < 1.6 * tensor_bytes < model_bytes / 15, (peak, tensor_bytes, model_bytes)
    files = report["files"]
    assert len(files) == 13 and files[0] == "w-00001-of-00013.safetensors"
    sizes = [os.path.getsize(tmp_path / "m" / f) for f in files]
    assert max(sizes) <= 300_000 + 4096 and sum(sizes) > model_bytes
    index = json.load(open(tmp_path / "m" / "w.safetensors.index.json"))
    assert index["metadata"]["total_size"] == model_bytes and len(index["weight_map"]) == 24 * 2 + 1

    from safetensors.numpy import load_file

    back = {}
    for f in files:
        back.update(load_file(str(tmp_path / "m" / f)))  # safetensors' own reader accepts the files
    for key, value in export_params(params, name_map):
        np.testing.assert_array_equal(back[key], value)  # a weight round trip copies values
    assert back["blocks.3.proj.weight"].shape == (256, 128)
