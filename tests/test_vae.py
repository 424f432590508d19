"""HunyuanVideo causal VAE vs diffusers' `AutoencoderKLHunyuanVideo` (fp32, tiny random configs).

Single pass (`CausalVAE`) vs diffusers with framewise coding off; `VAEStream` (scan and the
chunk-by-chunk loop) vs diffusers' default, temporally tiled `encode/decode`; spatial tiles vs
diffusers' `enable_tiling()`; config, loader and input errors.
"""

import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import max_abs
from flax import linen as nn
from flax import traverse_util

from mi_jax.convert.name_map import WeightMismatchError, export_params
from mi_jax.convert.safetensors_io import CheckpointError
from mi_jax.convert.vae import VAE_NAME_MAP, load_diffusers_vae
from mi_jax.models.vae import HUNYUAN_VIDEO_VAE, CausalVAE, Tiling, VAEConfig, VAEStream, abstract_vae_params
from mi_jax.nn.layers import GroupNorm

TOL = 1e-4
CONFIGS = {
    # 4 blocks (space down in blocks 0-2, time in 1-2), mid-block attention.
    "4blocks": dict(
        latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
    ),
    # 3 blocks (space in all, time in 0-1), 2 resnets per block, no attention.
    "3blocks": dict(
        latent_channels=6, block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=2,
        mid_block_add_attention=False, down_block_types=("HunyuanVideoDownBlock3D",) * 3,
        up_block_types=("HunyuanVideoUpBlock3D",) * 3,
    ),
}


def to_jax(t):
    """torch [B, C, T, H, W] -> numpy channels-last [B, T, H, W, C]."""
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


@pytest.fixture(scope="module")
def models(torch, tmp_path_factory):
    """name -> (diffusers model, checkpoint folder, VAEConfig, params, jitted methods)."""
    from diffusers import AutoencoderKLHunyuanVideo

    out = {}
    for i, (name, kwargs) in enumerate(CONFIGS.items()):
        torch.manual_seed(i)
        model = AutoencoderKLHunyuanVideo(**kwargs).eval()
        path = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(path)
        config, params = load_diffusers_vae(path)
        vae = CausalVAE(config)
        run = {
            m: jax.jit(lambda p, x, m=m, vae=vae: vae.apply({"params": p}, x, method=m))
            for m in ("encode", "decode")
        }
        out[name] = (model, path, config, params, run)
    return out


def torch_decode(torch, model, z, framewise):
    model.use_framewise_decoding = model.use_framewise_encoding = framewise
    with torch.no_grad():
        return to_jax(model.decode(z).sample)


def torch_encode(torch, model, x, framewise):
    model.use_framewise_decoding = model.use_framewise_encoding = framewise
    with torch.no_grad():
        dist = model.encode(x).latent_dist
    return to_jax(dist.mean), to_jax(dist.logvar)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_single_pass_matches_diffusers(torch, models, name):
    model, _, config, params, run = models[name]
    x = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    mean, logvar = run["encode"](params, to_jax(x))
    want_mean, want_logvar = torch_encode(torch, model, x, framewise=False)
    assert mean.shape == (2, 3, 2, 3, config.latent_channels)
    assert max_abs(mean, want_mean) < TOL and max_abs(logvar, want_logvar) < TOL

    z = torch.randn(2, config.latent_channels, 3, 2, 3)
    video = run["decode"](params, to_jax(z))
    assert video.shape == (2, 9, 16, 24, 3)
    assert max_abs(video, torch_decode(torch, model, z, framewise=False)) < TOL


def test_full_pass_is_not_causal(torch, models):
    """Why streaming uses diffusers' tiles rather than a causal-conv cache: GroupNorm statistics
    span all frames, so the first decoded frame of the single pass depends on the last latent."""
    _, _, config, params, run = models["4blocks"]
    z = np.asarray(torch.randn(2, 3, 2, 3, config.latent_channels))
    z2 = z.copy()
    z2[:, -1] += 1.0
    assert max_abs(run["decode"](params, z)[:, 0], run["decode"](params, z2)[:, 0]) > 1e-3


def test_bfloat16_compute(models):
    """bf16 activations (float32 parameters and norm statistics) stay close to float32: mean
    error within 10% of the mean magnitude, as diffusers' own bf16 run of this tiny random model
    (whose few-channel GroupNorms amplify rounding)."""
    _, _, config, params, run = models["4blocks"]
    z = np.random.default_rng(0).standard_normal((1, 3, 2, 3, config.latent_channels)).astype(np.float32)
    vae = CausalVAE(config, dtype=jnp.bfloat16)
    video = jax.jit(lambda p, z: vae.apply({"params": p}, z, method="decode"))(params, z)
    want = run["decode"](params, z)
    assert video.dtype == jnp.bfloat16
    err = np.abs(np.asarray(video, np.float32) - np.asarray(want))
    assert err.mean() < 0.1 * np.abs(np.asarray(want)).mean()


def test_group_norm_statistics_are_accurate():
    """GroupNorm's float32 statistics are as accurate as torch's cascaded sums: within 1e-6 of
    float64 on a video whose groups have mean 10, std 1 (XLA's one flat reduction gave 1.5e-5,
    which the decoder's few-channel GroupNorms amplify past 1e-5)."""
    x = (10 + np.random.default_rng(0).standard_normal((1, 5, 32, 32, 8))).astype(np.float32)
    xs = x.astype(np.float64).reshape(1, -1, 4, 2)
    mean = xs.mean((1, 3), keepdims=True)
    want = ((xs - mean) / np.sqrt(xs.var((1, 3), keepdims=True) + 1e-6)).reshape(x.shape)
    norm = GroupNorm(4)
    got = jax.jit(norm.apply)(norm.init(jax.random.key(0), x), x)
    assert max_abs(got, want) <= 1e-6


def test_group_norm_gradient_matches_autodiff():
    """GroupNorm's hand-written backward (two passes, as torch's) equals autodiff of the plain
    formula for the input, scale and bias (relative 1e-5)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(3 + 2 * rng.standard_normal((2, 5, 12, 10, 8)), jnp.float32)
    norm = GroupNorm(4)
    params = jax.tree.map(lambda a: a + 0.3 * jnp.asarray(rng.standard_normal(a.shape), a.dtype),
                          nn.unbox(norm.init(jax.random.key(0), x)))

    def plain(p, x):
        xf = x.reshape(*x.shape[:-1], 4, 2)
        mean = xf.mean((1, 2, 3, 5), keepdims=True)
        var = jnp.square(xf - mean).mean((1, 2, 3, 5), keepdims=True)
        return ((xf - mean) / jnp.sqrt(var + 1e-6)).reshape(x.shape) * p["params"]["scale"] + p["params"]["bias"]

    g = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    want = jax.vjp(plain, params, x)[1](g)
    got = jax.vjp(norm.apply, params, x)[1](g)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        assert max_abs(a, b) <= 1e-5 * float(jnp.abs(a).max())


CONV_CASES = [  # input shape, output channels, strides, replicate padding (frames in front, rows, columns)
    ((2, 11, 18, 14, 8), 16, (1, 1, 1), (0, 0, 0)),  # small frames: XLA's kernel gradient
    ((2, 11, 18, 14, 8), 16, (1, 2, 2), (2, 1, 1)),  # the VAE's strides and causal padding
    ((2, 11, 18, 14, 8), 16, (2, 2, 2), (2, 1, 1)),
    ((1, 5, 34, 36, 8), 16, (1, 1, 1), (2, 1, 1)),  # frames of >= 32 x 32: the FFT kernel gradient
    ((1, 5, 34, 36, 3), 8, (1, 1, 1), (2, 1, 1)),  # RGB in: taps folded into the channels
    ((1, 5, 34, 36, 8), 3, (1, 1, 1), (2, 1, 1)),  # RGB out: the kernel widened to 8 outputs
    ((1, 6, 13, 21, 5), 12, (2, 1, 2), (0, 0, 0)),  # uneven: strides that leave input unread, 12 = 8 + 4 outputs
    ((1, 4, 9, 30, 16), 8, (1, 1, 2), (1, 2, 3)),  # padding wider than the kernel's reach, 16 inputs
]


def reference_conv(x, k, strides, pads):
    """`jnp.pad(mode="edge")` by (pt frames in front, ph rows, pw columns each side), then XLA's
    3-D convolution: what every CPU convolution path must equal."""
    pt, ph, pw = pads
    x = jnp.pad(x, ((0, 0), (pt, 0), (ph, ph), (pw, pw), (0, 0)), mode="edge")
    return jax.lax.conv_general_dilated(x, k, strides, "VALID", dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))


def require_native_kernels():
    """The native kernels must have built, except in a run that turned them off on purpose
    (`MI_JAX_CPU_KERNELS=0`, the suite's fallback pass), which tests XLA's forms instead."""
    from mi_jax.nn import cpu_kernels

    if os.environ.get("MI_JAX_CPU_KERNELS") == "0":
        pytest.skip("MI_JAX_CPU_KERNELS=0: this run covers XLA's convolutions, the native kernels are off")
    assert cpu_kernels.available(), "the native CPU kernels did not build (see the log)"


@pytest.mark.parametrize("impl", ["native", "xla_forms"])
@pytest.mark.parametrize("shape, co, strides, pads", CONV_CASES)
def test_cpu_convolution_and_its_gradients_match_xla(shape, co, strides, pads, impl):
    """On CPU `conv3d` runs on the native kernels (mi_jax/nn/cpu_conv.cc: replicate padding read
    through clamped indices) or, without a C++ compiler, pads then convolves as 2-D convolutions
    of the frames (the form picked by channel counts) with a custom gradient (the kernel's through
    FFT cross-correlations on large frames). Either way its output and both gradients equal
    `jnp.pad(mode="edge")` then XLA's 3-D convolution (relative 1e-5), at the VAE's strides, with an
    uneven output gradient; the comments name the path of the XLA forms."""
    from mi_jax.models import vae
    from mi_jax.nn import cpu_kernels

    rng = np.random.default_rng(sum(strides) + co)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, shape[-1], co)), jnp.float32)
    want, pull_want = jax.vjp(lambda x, k: reference_conv(x, k, strides, pads), x, kernel)
    g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    if impl == "native":
        require_native_kernels()
        got, pull_got = jax.vjp(lambda x, k: cpu_kernels.conv3d(x, k, strides, pads), x, kernel)
        grads = pull_got(g)
    else:
        with cpu_kernels.disabled():
            got, pull_got = jax.vjp(lambda x, k: vae.conv3d(x, k, strides, pads), x, kernel)
            grads = pull_got(g)
    for a, b in zip((want, *pull_want(g)), (got, *grads)):
        assert a.shape == b.shape
        assert max_abs(a, b) <= 1e-5 * float(jnp.abs(a).max())


@pytest.mark.parametrize("strides", [(1, 1, 1), (2, 2, 2)])
def test_a_single_frame_convolves_with_the_kernel_summed_over_time(strides):
    """A lone frame with causal padding is that frame three times: `conv3d` convolves it in 2-D
    with the time-summed kernel (the image fast path). Output and both gradients equal the
    explicit three-frame clip through XLA's 3-D convolution, relative 1e-5: the two sum the
    same products in another order."""
    from mi_jax.models import vae

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 1, 12, 10, 8)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 8, 16)), jnp.float32)
    want, pull_want = jax.vjp(lambda x, k: reference_conv(x, k, strides, (2, 1, 1)), x, kernel)
    got, pull_got = jax.vjp(lambda x, k: vae.conv3d(x, k, strides, (2, 1, 1)), x, kernel)
    g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    assert got.shape == want.shape == (2, 1, 12 // strides[1], 10 // strides[2], 16)
    for a, b in zip((want, *pull_want(g)), (got, *pull_got(g))):
        assert max_abs(a, b) <= 1e-5 * float(jnp.abs(a).max())
    jaxpr = str(jax.make_jaxpr(lambda x, k: vae.conv3d(x, k, strides, (2, 1, 1)))(x, kernel))
    assert "reduce_sum" in jaxpr  # the kernel is summed over time, the frame is not repeated


def test_vae_convolutions_use_the_native_kernels_on_cpu_for_float32_only():
    """float32 convolutions of the VAE lower to the native kernels (forward, and in the gradient
    the kernel-gradient call); float64 (the exactness checks) keeps XLA's own."""
    from mi_jax.models.vae import conv3d

    require_native_kernels()
    x, k = jnp.ones((1, 5, 10, 10, 8)), jnp.ones((3, 3, 3, 8, 8))
    loss = lambda x, k: jnp.sum(conv3d(x, k, (1, 1, 1), (2, 1, 1)) ** 2)  # noqa: E731
    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, k).as_text()
    assert "mi_jax_conv3d_fwd" in hlo and "mi_jax_conv3d_dk" in hlo
    assert "gather" not in hlo  # the padding is read in place, not written out
    with jax.enable_x64(True):
        hlo64 = jax.jit(loss).lower(x.astype(jnp.float64), k.astype(jnp.float64)).as_text()
    assert "mi_jax_conv3d" not in hlo64 and "convolution" in hlo64


def test_native_convolution_under_vmap_and_scan():
    """The native kernels are plain JAX ops to transformations: `vmap` (one call per example) and a
    gradient through `lax.scan` give what the per-example XLA convolution gives."""
    from mi_jax.nn import cpu_kernels

    require_native_kernels()
    rng = np.random.default_rng(5)
    xs = jnp.asarray(rng.standard_normal((3, 1, 4, 6, 6, 8)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 8, 8)), jnp.float32)
    pads = (2, 1, 1)
    ref = lambda x, k: reference_conv(x, k, (1, 1, 1), pads)  # noqa: E731

    got = jax.vmap(lambda x: cpu_kernels.conv3d(x, k, (1, 1, 1), pads))(xs)
    assert max_abs(got, jnp.stack([ref(x, k) for x in xs])) <= 1e-5 * float(jnp.abs(got).max())

    def scanned(k, conv):
        return jax.lax.scan(lambda c, x: (c + jnp.sum(jnp.sin(conv(x, k))), None), 0.0, xs)[0]

    want = jax.grad(scanned)(k, ref)
    got = jax.grad(scanned)(k, lambda x, k: cpu_kernels.conv3d(x, k, (1, 1, 1), pads))
    assert max_abs(got, want) <= 1e-5 * float(jnp.abs(want).max())


def test_native_kernels_build_errors_name_the_compiler(tmp_path, monkeypatch):
    """No usable compiler: `_build` says which command failed (and `available()` would log it and
    fall back to XLA's convolutions); the cache holds no partial library."""
    from mi_jax.nn import cpu_kernels

    monkeypatch.setenv("MI_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
    with pytest.raises((RuntimeError, OSError), match="no-such-c\\+\\+"):
        cpu_kernels._build()
    assert not list((tmp_path / "cpu_kernels").glob("*.so"))


def test_native_kernel_cache_is_keyed_on_what_march_native_means(monkeypatch):
    """A cache shared between machines (a cluster's NFS home) keeps one library per CPU target:
    the key follows what the compiler resolves `-march=native` to, and this CPU's flags."""
    from mi_jax.nn import cpu_kernels

    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler here: the native kernels are not built on this machine")
    target = cpu_kernels.native_target(cxx)
    assert "-march=" in target or "+" in target, target  # gcc's -march=CPU -m..., clang's +features
    key = cpu_kernels.cache_key(b"source", cxx)
    assert cpu_kernels.cache_key(b"source", cxx) == key  # one machine: one library
    monkeypatch.setattr(cpu_kernels, "native_target", lambda cxx: target.replace("-mavx2", "-mno-avx2") + " x")
    assert cpu_kernels.cache_key(b"source", cxx) != key  # another instruction set: another library
    monkeypatch.undo()
    monkeypatch.setattr(cpu_kernels, "_cpu_signature", lambda: "x86_64 model name : another CPU")
    assert cpu_kernels.cache_key(b"source", cxx) != key
    assert cpu_kernels.cache_key(b"another source", cxx) != cpu_kernels.cache_key(b"source", cxx)


def test_native_kernels_off_by_environment():
    """`MI_JAX_CPU_KERNELS=0`: no native library is loaded and the VAE's convolutions lower to XLA's."""
    code = ("import jax, jax.numpy as jnp\n"
            "from mi_jax.nn import cpu_kernels\nfrom mi_jax.models.vae import conv3d\n"
            "assert not cpu_kernels.available()\n"
            "hlo = jax.jit(lambda x, k: conv3d(x, k, (1, 1, 1), (2, 1, 1))).lower("
            "jnp.ones((1, 5, 10, 10, 8)), jnp.ones((3, 3, 3, 8, 8))).as_text()\n"
            "assert 'mi_jax_conv3d' not in hlo and 'convolution' in hlo, hlo[:2000]\n")
    env = dict(os.environ, MI_JAX_CPU_KERNELS="0", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def test_stream_decode_matches_diffusers_default(torch, models):
    """13 latents: first tile, two scanned tiles, a 4-latent end tile (and a 1-latent one that
    yields nothing). 8 latents: one scanned tile, a 2-latent end tile."""
    model, _, config, params, _ = models["4blocks"]
    stream = VAEStream(CausalVAE(config))
    z8 = torch.randn(1, config.latent_channels, 8, 2, 2)
    assert max_abs(stream.decode(params, to_jax(z8)), torch_decode(torch, model, z8, framewise=True)) < TOL
    z = torch.randn(1, config.latent_channels, 13, 2, 2)
    whole = stream.decode(params, to_jax(z))
    assert whole.shape == (1, 49, 16, 16, 3)
    assert max_abs(whole, torch_decode(torch, model, z, framewise=True)) < TOL

    zj = to_jax(z)
    frames, state = stream.decode_start(params, zj[:, : stream.latents_first])
    outs, i = [frames], stream.latents_first
    while zj.shape[1] - i >= stream.latents_per_chunk:
        frames, state = stream.decode_chunk(params, state, zj[:, i : i + stream.latents_per_chunk])
        assert frames.shape[1] == 4 * stream.latents_per_chunk
        outs.append(frames)
        i += stream.latents_per_chunk
    outs.append(stream.decode_end(params, state, zj[:, i:]))
    assert max_abs(np.concatenate(outs, axis=1), whole) < 1e-5


def test_stream_encode_matches_diffusers_default(torch, models):
    """45 frames: first 17-frame tile, two scanned 12-frame chunks, a 9-frame end tile."""
    model, _, config, params, _ = models["4blocks"]
    x = torch.rand(1, 3, 45, 16, 16) * 2 - 1
    stream = VAEStream(CausalVAE(config))
    mean, logvar = stream.encode(params, to_jax(x))
    want_mean, want_logvar = torch_encode(torch, model, x, framewise=True)
    assert mean.shape == (1, 12, 2, 2, config.latent_channels)
    assert max_abs(mean, want_mean) < TOL and max_abs(logvar, want_logvar) < TOL

    xj = to_jax(x)
    (m, lv), state = stream.encode_start(params, xj[:, : stream.frames_first])
    means, logvars, i = [m], [lv], stream.frames_first
    while xj.shape[1] - i >= stream.frames_per_chunk:
        (m, lv), state = stream.encode_chunk(params, state, xj[:, i : i + stream.frames_per_chunk])
        means.append(m), logvars.append(lv)
        i += stream.frames_per_chunk
    m, lv = stream.encode_end(params, state, xj[:, i:])
    assert max_abs(np.concatenate([*means, m], 1), mean) < 1e-5
    assert max_abs(np.concatenate([*logvars, lv], 1), logvar) < 1e-5


def test_spatial_tiling_matches_diffusers(torch, models):
    """Tiles of 32 px (4 latents) every 24 px (3 latents), blended over 8 px / 1 latent, on
    48x24-px frames: two rows of tiles (the second one cut short), one column."""
    model, _, config, params, _ = models["3blocks"]
    sizes = dict(
        tile_sample_min_height=32, tile_sample_min_width=32, tile_sample_stride_height=24, tile_sample_stride_width=24
    )
    stream = VAEStream(CausalVAE(config), Tiling(use_tiling=True, **sizes))
    model.enable_tiling(**sizes)
    try:
        z = torch.randn(1, config.latent_channels, 3, 6, 3)
        assert max_abs(stream.decode(params, to_jax(z)), torch_decode(torch, model, z, framewise=True)) < TOL
        x = torch.rand(1, 3, 9, 48, 24) * 2 - 1
        mean, logvar = stream.encode(params, to_jax(x))
        want_mean, want_logvar = torch_encode(torch, model, x, framewise=True)
        assert max_abs(mean, want_mean) < TOL and max_abs(logvar, want_logvar) < TOL
    finally:
        model.disable_tiling()


def test_input_errors(models):
    _, _, config, params, _ = models["4blocks"]
    vae = CausalVAE(config)
    encode = lambda x: vae.apply({"params": params}, x, method="encode")  # noqa: E731
    cases = [
        (encode, (1, 10, 16, 16, 3), r"1 \+ 4k frames"),
        (encode, (1, 9, 12, 16, 3), "divisible by 8"),
        (encode, (1, 9, 16, 16, 4), "channels-last"),
        (encode, (1, 3, 9, 16, 16), "channels-last"),  # PyTorch layout
        (lambda z: vae.apply({"params": params}, z, method="decode"), (1, 3, 2, 2, 5), "latents must be"),
    ]
    for fn, shape, message in cases:
        with pytest.raises(ValueError, match=message):
            fn(np.zeros(shape, np.float32))
    stream = VAEStream(vae)
    with pytest.raises(ValueError, match="decode_start takes the first 5"):
        stream.decode_start(params, np.zeros((1, 4, 2, 2, 4), np.float32))
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        stream.encode(params, np.zeros((1, 20, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match="multiples of 4"):
        VAEStream(vae, Tiling(tile_sample_min_num_frames=16, tile_sample_stride_num_frames=10))
    _, state = stream.decode_start(params, np.zeros((1, 5, 2, 2, 4), np.float32))
    with pytest.raises(ValueError, match="decode_chunk takes exactly 3"):
        stream.decode_chunk(params, state, np.zeros((1, 4, 2, 2, 4), np.float32))


def test_config_errors():
    with pytest.raises(ValueError, match="only supports 4"):
        VAEConfig(temporal_compression_ratio=8)
    with pytest.raises(ValueError, match="at least 3 block_out_channels"):
        VAEConfig(block_out_channels=(32, 32), down_block_types=("HunyuanVideoDownBlock3D",) * 2,
                  up_block_types=("HunyuanVideoUpBlock3D",) * 2)
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig(block_out_channels=(8, 12, 16, 16), norm_num_groups=8)


def test_real_config_matches_diffusers(torch):
    """`HUNYUAN_VIDEO_VAE` is diffusers' default model: same config and every parameter's key and
    shape (built on torch's meta device: no memory)."""
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.device("meta"):
        model = AutoencoderKLHunyuanVideo()
    assert VAEConfig.from_diffusers(model.config) == HUNYUAN_VIDEO_VAE
    assert VAEConfig.from_diffusers(HUNYUAN_VIDEO_VAE.to_diffusers()) == HUNYUAN_VIDEO_VAE
    ours = {}
    for path, leaf in traverse_util.flatten_dict(nn.unbox(abstract_vae_params(HUNYUAN_VIDEO_VAE))).items():
        shape = leaf.shape if path[-1] != "kernel" else (*leaf.shape[-1:-3:-1], *leaf.shape[:-2])
        ours[VAE_NAME_MAP.torch_key(path)] = tuple(shape)
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_loader_round_trip_and_mesh(torch, models):
    from mi_jax.parallel.mesh import make_mesh

    model, path, config, params, _ = models["3blocks"]
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    exported = dict(export_params(params, VAE_NAME_MAP))
    assert exported.keys() == state.keys()
    assert all(np.array_equal(exported[k], state[k]) for k in state)  # export copies weights
    assert config == VAEConfig.from_diffusers(model.config)

    mesh = make_mesh()
    _, sharded = load_diffusers_vae(path, mesh=mesh)
    leaf = sharded["decoder"]["conv_out"]["conv"]["kernel"]
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == jax.device_count()


def test_loader_errors(torch, models, tmp_path):
    from safetensors.torch import save_file

    model, path, *_ = models["3blocks"]
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    bad_key = "decoder.up_blocks.0.resnets.1.conv1.conv.weight"
    state[bad_key] = torch.zeros(16, 16, 3, 3, 1)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(os.path.join(path, "config.json"), bad / "config.json")
    save_file(state, str(bad / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(WeightMismatchError, match=bad_key.replace(".", r"\.")) as err:
        load_diffusers_vae(str(bad))
    assert "(16, 16, 3, 3, 3)" in str(err.value) and "(16, 16, 3, 3, 1)" in str(err.value)

    # A pipeline folder holding vae/ is accepted; another model's folder is not.
    pipeline = tmp_path / "pipeline"
    shutil.copytree(path, pipeline / "vae")
    assert load_diffusers_vae(str(pipeline))[0] == models["3blocks"][2]
    other = tmp_path / "other"
    shutil.copytree(path, other)
    (other / "config.json").write_text('{"_class_name": "AutoencoderKLWan"}')
    with pytest.raises(CheckpointError, match="not a AutoencoderKLHunyuanVideo"):
        load_diffusers_vae(str(other))


@pytest.mark.parametrize("pads", [((0, 0), (2, 0), (1, 1), (1, 1), (0, 0)), ((1, 3), (0, 0), (2, 1), (0, 0), (0, 0))])
def test_edge_pad_and_its_gradient_match_jnp_pad(pads):
    """The causal convolution's replicate padding (a gather with a written-out transpose) equals
    `jnp.pad(mode="edge")` and its autodiff gradient exactly, including pads wider than 1."""
    from mi_jax.nn.layers import edge_pad

    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((3, 4, 5, 6, 2)), jnp.float32)
    want, pull_want = jax.vjp(lambda v: jnp.pad(v, pads, mode="edge"), x)
    got, pull_got = jax.vjp(lambda v: edge_pad(v, pads), x)
    g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    assert max_abs(want, got) == 0
    assert max_abs(pull_want(g)[0], pull_got(g)[0]) <= 1e-6
