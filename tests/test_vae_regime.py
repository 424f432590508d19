"""One VAE regime from training to generation: the VAE is trained at the clip lengths
`VAEStream` runs it at, `prepare` stores latents cut from one `VAEStream` encode of the whole
clip, and the pipeline decodes through the same `VAEStream`. The old demo drifted apart here
(trained on 5 frames, prepared on 9, decoded on 17) and its mouth came out half a second late."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONFIGS, max_abs
from mi_jax.config_utils import load_config
from mi_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raw(clip):
    from mi_jax.data.prepare import RawClip

    return RawClip("c", clip.frames, clip.audio, None, clip.face_boxes.transpose(1, 0, 2), clip.prompt,
                   {"mouth_open": list(clip.mouth_open)})


def test_prepared_latents_are_the_pipelines_stream_encode_of_the_same_frames():
    """Window k's stored latents == the clip's `VAEStream.encode` (the whole-clip scan, a
    different code path from prepare's streamed tiles) at latents k (T-1) .. k (T-1) + T - 1;
    the pipeline decodes with that very `VAEStream`; the reference is the first frame alone."""
    from mi_jax.data import synthetic
    from mi_jax.data.prepare import Encoders, windows

    cfg = load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,stage1"))
    enc = Encoders(cfg)
    clip = synthetic.render_clip(5, 2.4, size=(64, 64))  # 60 frames: 4 tiles of the encoder
    out = list(windows(_raw(clip), enc, cfg.prepare))
    t = cfg.prepare.latent_frames
    used = 1 + 4 * (t - 1) * len(out)
    assert used > enc.vae_stream.frames_first + enc.vae_stream.frames_per_chunk  # start, chunk and end ran
    video = jnp.asarray(clip.frames[None, :used], jnp.float32) / 127.5 - 1.0
    whole = np.asarray(enc.vae_stream.encode(enc.vae_params, video)[0][0]) * enc.vae_config.scaling_factor
    for k, w in enumerate(out):
        np.testing.assert_allclose(w["latents"], whole[k * (t - 1) : k * (t - 1) + t], atol=2e-5, rtol=1e-5)
        assert w["truth"]["start_frame"] == 4 * k * (t - 1)
    first = np.asarray(enc.vae_stream.encode(enc.vae_params, video[:, :1])[0][0]) * enc.vae_config.scaling_factor
    np.testing.assert_allclose(out[0]["ref_latent"], first, atol=1e-6)
    # a window's latents are not what a separate encode of its own frames gives (the old regime)
    alone = np.asarray(enc.vae_stream.encode(enc.vae_params, video[:, 8 : 8 + 1 + 4 * (t - 1)])[0][0])
    assert np.abs(alone * enc.vae_config.scaling_factor - out[1]["latents"]).max() > 1e-3


def test_the_pipeline_decodes_with_its_encoders_stream(tiny_run):
    from mi_jax.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(tiny_run)
    assert pipe.vae_stream is pipe.enc.vae_stream


@pytest.mark.slow  # three VAE training runs, one stopped and resumed
def test_train_vae_runs_the_stream_regime_and_resumes_to_the_same_weights(tmp_path):
    """The VAE trainer's clip lengths are VAEStream's (tile, shorter ends, the lone portrait
    frame); killed after its first checkpoint and started again, it ends with the weights of a
    run that never stopped."""
    from mi_jax.convert.vae import load_diffusers_vae
    from mi_jax.models.vae import VAEConfig
    from mi_jax.train.vae import ClipPool, train_vae, vae_regime_lengths

    cfg = load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,stage1"))
    vcfg = VAEConfig(**cfg.prepare.vae_random.to_dict())
    assert vae_regime_lengths(vcfg) == (17, 13, 9, 5, 1)
    pool = ClipPool(0, (64, 64), clips=4, lengths=(9, 5, 1), tile_fraction=0.5)
    lengths = {pool.length(i) for i in range(40)}
    assert lengths == {9, 5, 1}
    video, weight, portrait = pool.batch(3, 2)
    again = pool.batch(3, 2)
    assert np.array_equal(video, again[0]) and np.array_equal(portrait, again[2])  # same seed, same program
    assert weight.max() > 10 and weight.min() == 1.0  # mouth / eye band on top of face on top of 1

    small = dict(steps=4, batch=1, clips=4, lengths=(5, 1), checkpoint_every=2)
    train_vae(cfg, str(tmp_path / "a"), log=lambda *_: None, **small)

    class Stop(Exception):
        pass

    def stop_after_first_checkpoint(msg):
        if "step 2/" in msg:
            raise Stop

    try:
        train_vae(cfg, str(tmp_path / "b"), log=stop_after_first_checkpoint, **small)
    except Stop:
        pass
    assert not os.path.exists(tmp_path / "b") and os.path.exists(tmp_path / "b.train" / "state.msgpack")
    resumed = []
    train_vae(cfg, str(tmp_path / "b"), log=resumed.append, **small)
    assert any("resuming from step 2" in m for m in resumed)
    (_, a), (_, b) = load_diffusers_vae(str(tmp_path / "a")), load_diffusers_vae(str(tmp_path / "b"))
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))  # same program, same data: bit equal
    assert not os.path.exists(tmp_path / "b.train")


def test_train_vae_image_stage_then_clips_with_an_edge_term(tmp_path):
    """`vae_train.image_steps` single-frame batches of `image_batch` come first, then clips; the
    loss reports the edge term (`grad_weight`); a constant schedule keeps its rate and a cosine
    one decays; an unknown schedule is refused before any compute."""
    from mi_jax.train.vae import ClipPool, learning_rate_schedule, train_vae

    pool = ClipPool(0, (64, 64), clips=3, lengths=(5, 1))
    video, weight, portrait = pool.images(2, 3)
    assert video.shape == (3, 1, 64, 64, 3) and weight.shape == (3, 1, 64, 64, 1) and not portrait.any()
    assert np.array_equal(video, pool.images(2, 3)[0])  # same seed and index, same program: the same frames
    constant, cosine = learning_rate_schedule("constant", 1e-3, 1000), learning_rate_schedule("cosine", 1e-3, 1000)
    assert float(constant(0)) == 0.0 and float(constant(999)) == pytest.approx(1e-3)
    assert float(cosine(999)) < 1e-4
    with pytest.raises(ValueError, match="schedule"):
        learning_rate_schedule("linear", 1e-3, 10)

    # 32 x 32 frames: the stages and the loss are what is tested, not the picture
    cfg = load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,stage1"), ["prepare.height=32", "prepare.width=32"])
    lines = []
    out = train_vae(cfg, str(tmp_path / "v"), log=lines.append, steps=3, image_steps=2, image_batch=2, batch=1,
                    clips=3, lengths=(5,), checkpoint_every=1, grad_weight=1.0, schedule="constant",
                    learning_rate=1e-3, clip_learning_rate=1e-12, image_every=2, temporal_init=True)
    stages = [m.split("(")[1].split(")")[0] for m in lines if m.startswith("vae step")]
    # 5 steps: a warm-up of 3 (rate 0, 1/3, 2/3 of 1e-3), two image steps, then the clip stage at
    # its own rate (x 2/3 while still warming up), every second batch images
    assert stages == ["image at 0.0e+00", "image at 3.3e-04", "clip at 6.7e-13", "image at 1.0e-12", "clip at 1.0e-12"]
    assert out["image_steps"] == 2 and out["grad_l1"] > 0
    # the image steps moved every temporal tap alike; the clip stage began from `temporal_init`
    # again (all of a plain convolution's weight on the current frame) and its rate of 1e-12
    # left it there
    from mi_jax.convert.vae import load_diffusers_vae

    kernel = np.asarray(load_diffusers_vae(str(tmp_path / "v"))[1]["decoder"]["conv_out"]["conv"]["kernel"])
    assert np.abs(kernel[:2]).max() < 1e-8 < np.abs(kernel[2]).max()
    with pytest.raises(ValueError, match="schedule"):
        train_vae(cfg, str(tmp_path / "w"), log=lines.append, steps=1, schedule="linear", clips=3)
    assert not os.path.exists(tmp_path / "w")


def test_a_pretrained_vae_widened_to_more_latent_channels_decodes_as_before(tmp_path):
    """`vae_train.init`: a VAE of 4 latent channels (random, written as a diffusers folder)
    widened to the demo config's 8 encodes the old channels and decodes exactly as before; the
    new channels start with a small posterior and no effect on the decoder, for training to fill."""
    from flax import linen as nn

    from mi_jax.convert.vae import load_diffusers_vae
    from mi_jax.data import synthetic
    from mi_jax.models.vae import CausalVAE, VAEConfig
    from mi_jax.train.vae import _write_vae, start_from

    cfg = load_config(os.path.join(CONFIGS, "magicinfinite.py:demo,stage1"))
    vcfg = VAEConfig(**cfg.prepare.vae_random.to_dict())
    model = CausalVAE(vcfg)
    fresh = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 1, 64, 64, 3))))["params"]
    base_cfg = VAEConfig(**dict(cfg.prepare.vae_random.to_dict(), latent_channels=4))
    base = str(tmp_path / "base")
    base_params = nn.unbox(CausalVAE(base_cfg).init(jax.random.key(1), jnp.zeros((1, 1, 64, 64, 3))))["params"]
    _write_vae(base, base_params, base_cfg.to_diffusers(), {})
    params = start_from(base, vcfg, fresh)
    old_cfg, old = load_diffusers_vae(base)
    assert old_cfg.latent_channels < vcfg.latent_channels
    x = jnp.asarray(synthetic.render_clip(1_000_001, 0.7, size=(64, 64)).frames[None, :17], jnp.float32) / 127.5 - 1
    mean, logvar = model.apply({"params": params}, x, method="encode")
    old_mean, old_logvar = CausalVAE(old_cfg).apply({"params": old}, x, method="encode")
    c = old_cfg.latent_channels
    # equal up to float32 round-off: the widened encoder's last convolution has twice the output
    # channels, so the native kernels (or XLA) block and order its sums of 3x3x3xCi terms otherwise
    for got, want in ((mean[..., :c], old_mean), (logvar[..., :c], old_logvar)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
    assert np.allclose(logvar[..., c:], -8.0) and float(jnp.abs(mean[..., c:]).max()) > 0
    noisy = mean.at[..., c:].add(1.0)  # the new channels do not reach the decoder yet
    # equal up to float32 round-off: on CPU the decoder's first convolution takes another form
    # for 4 input channels than for 8 (mi_jax/nn/cpu_conv_forms.py `_forward`), so sums run in
    # another order
    np.testing.assert_allclose(model.apply({"params": params}, noisy, method="decode"),
                               CausalVAE(old_cfg).apply({"params": old}, old_mean, method="decode"), rtol=0, atol=1e-5)
    import pytest

    with pytest.raises(ValueError, match="another architecture"):
        start_from(base, VAEConfig(**dict(cfg.prepare.vae_random.to_dict(), block_out_channels=(8, 8, 8, 16))), fresh)


def test_train_vae_reconstructs_through_the_stream_that_prepare_and_generation_use():
    """With the demo's 5-frame tiles, the VAE trainer's reconstruction (`round_trip`, zero noise)
    is the encoders' `VAEStream` encode + decode of the clip (what prepare stores and generation
    decodes), not the single pass over the clip."""
    from mi_jax.data.prepare import Encoders
    from mi_jax.train.vae import round_trip

    config = load_config(os.path.join(CONFIGS, "magicinfinite.py:demo,stage1"))
    assert config.prepare.vae_tiling.tile_sample_min_num_frames == 4
    enc = Encoders(config)
    stream, params = enc.vae_stream, enc.vae_params
    clip = synthetic.render_clip(3, 0.7, size=(64, 64))
    x = jnp.asarray(clip.frames[:13], jnp.float32)[None] / 127.5 - 1.0
    mean, _ = stream.encode(params, x)
    y, _, _ = round_trip(stream, params, x, jnp.array([False]))
    assert max_abs(y, stream.decode(params, mean)) <= 1e-6
    vae = stream.vae
    single = vae.apply({"params": params}, vae.apply({"params": params}, x, method="encode")[0], method="decode")
    assert max_abs(y, single) > 1e-3


def test_tile_round_trip_is_the_streams_round_trip():
    """The trainer codes the demo's non-overlapping tiles as one batch (`tile_round_trip`): the
    same reconstruction, means and log-variances as `round_trip`'s scan over the stream, for a
    clip of several tiles, a single tile and a lone frame, with and without the portrait latent;
    tilings whose tiles overlap are refused."""
    import pytest

    from mi_jax.models.vae import Tiling, VAEStream
    from mi_jax.train.vae import round_trip, tile_round_trip

    from mi_jax.data.prepare import Encoders

    clip = synthetic.render_clip(4, 0.8, size=(64, 64))
    video = jnp.asarray(clip.frames[:17], jnp.float32) / 127.5 - 1.0
    x = jnp.stack([video, video[::-1]])
    portrait = jnp.array([True, False])
    # a random VAE, and the shipped one (its raw log-variances pass the stream's clamp at -30)
    for vae in ("random:3", os.path.join(ROOT, "demo", "vae")):
        enc = Encoders(load_config(os.path.join(CONFIGS, "magicinfinite.py:demo,stage1"), [f"prepare.vae={vae!r}"]))
        stream, params = enc.vae_stream, enc.vae_params
        for n in (17, 5, 1):
            for a, b in zip(round_trip(stream, params, x[:, :n], portrait),
                            tile_round_trip(stream, params, x[:, :n], portrait)):
                assert a.shape == b.shape
                assert max_abs(a, b) <= 1e-4 * max(1.0, float(jnp.abs(a).max()))  # float32 round-off of other batch shapes
    overlapping = VAEStream(stream.vae, Tiling(tile_sample_min_num_frames=8, tile_sample_stride_num_frames=4))
    with pytest.raises(ValueError, match="non-overlapping"):
        tile_round_trip(overlapping, params, x, portrait)


def test_temporal_init_keeps_stills_makes_each_latent_from_its_own_frames_and_blends_between_them():
    """`temporal_init`: a still clip encodes and decodes exactly as before (the taps' sum is
    kept), while latent 1 of a 5-frame tile now reads its own newest frame 4 above all (the
    random VAE leans on the tile's context frame 0), and the decoder's frames 1-4 blend
    from latent 0 to latent 1: each frame leans less on latent 0 and more on latent 1 than the
    one before (a decoder that repeats a latent over its frames, as the kernels on the current
    frame alone did, draws them alike: steps at every 4th frame)."""
    from mi_jax.models.vae import CausalVAE, VAEConfig
    from mi_jax.train.vae import temporal_init

    config = load_config(os.path.join(CONFIGS, "magicinfinite.py:demo,stage1"))
    assert config.vae_train.temporal_init
    vcfg = VAEConfig(**config.prepare.vae_random.to_dict())
    model = CausalVAE(vcfg)
    before = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 1, 64, 64, 3)))["params"]
    import flax.linen as nn

    before = nn.unbox(before)
    after = temporal_init(before, vcfg)
    clip = synthetic.render_clip(6, 0.4, size=(64, 64))
    enc = lambda p, x: model.apply({"params": p}, x, method="encode")[0]  # noqa: E731
    dec = lambda p, z: model.apply({"params": p}, z, method="decode")  # noqa: E731
    still = jnp.repeat(jnp.asarray(clip.frames[None, :1], jnp.float32) / 127.5 - 1.0, 5, axis=1)
    scale = float(jnp.abs(enc(before, still)).max())
    assert max_abs(enc(before, still), enc(after, still)) <= 1e-4 * scale  # float32 round-off of a reordered sum
    z = enc(before, still)
    assert max_abs(dec(before, z), dec(after, z)) <= 1e-4 * float(jnp.abs(dec(before, z)).max())

    x = jnp.asarray(clip.frames[None, :5], jnp.float32) / 127.5 - 1.0
    r = jax.random.normal(jax.random.key(1), z.shape)
    ry = jax.random.normal(jax.random.key(2), x.shape[1:])

    @jax.jit
    def reads(p):
        """(|d latent 1 / d frame t| for t = 0..4, |d frame t / d latent k| for t = 1..4, k = 0, 1)"""
        g = jax.grad(lambda x: (enc(p, x)[:, 1] * r[:, 1]).sum())(x)
        z = enc(p, x)
        masks = jnp.eye(5)[1:, :, None, None, None]  # one output frame at a time, in one program
        gz = jax.vmap(lambda m: jax.grad(lambda z: (dec(p, z)[0] * ry * m).sum())(z))(masks)  # [4, 1, 2, ...]
        return (jnp.sqrt((g[0] ** 2).sum((1, 2, 3))), jnp.sqrt((gz[:, 0] ** 2).sum((2, 3, 4))))

    def host(out):
        return [float(v) for v in out[0]], np.asarray(out[1])

    frames, latents = host(reads(before))
    assert frames[0] > max(frames[1:])  # the context frame dominates
    frames, latents = host(reads(after))
    # the newest own frame; the others only through the group norms' statistics over the tile and
    # the mid block's causal attention to latent 0 (measured: frame 4 ~12x any other)
    assert frames[4] > 5 * max(frames[:4]), frames
    assert np.all(np.diff(latents[:, 0]) < 0) and np.all(np.diff(latents[:, 1]) > 0), latents


def test_shipped_demo_vae_keeps_the_mouth_in_time_through_the_pipelines_path():
    """The bundled `demo/vae` through the pipeline's own encode / decode path (`vae_round_trip`:
    prepare's stream encode, the portrait latent, generation's streaming decoder) on held-out
    clips: the mouth follows the voice at an offset within +-2 frames with correlation >= 0.65
    (an earlier demo VAE: 0.69 at +5, its mouth a latent late; benchmarks/vae_regime.py), and
    the eyes are drawn: eye-band edge energy >= 0.6 x the renderer's (the 8x VAE's 8-pixel
    cells held none: 0.08 x; the shipped 4x VAE about 0.75 x), and the frames move within a
    latent: the change into a new latent is at most 2x the change inside one (the renderer's
    ~1; a decoder that repeats a latent over its 4 frames scored 8.9)."""
    from mi_jax.data.prepare import Encoders
    from mi_jax.eval.metrics import best_offset_correlation, eye_detail, seam_score
    from mi_jax.pipeline import vae_round_trip

    vae = os.path.join(ROOT, "demo", "vae")
    cfg = load_config(os.path.join(CONFIGS, "magicinfinite.py:demo,stage1"), [f"prepare.vae={vae!r}"])
    enc = Encoders(cfg)
    for i in range(2):
        clip = synthetic.render_clip(synthetic.HELDOUT_SEED_START + i, 4.0, size=(64, 64), prompt="a person talking")
        n = 1 + 4 * ((len(clip.frames) - 1) // 4)
        video = vae_round_trip(enc, clip.frames[:n])[:n]
        mouth = synthetic.measure_mouth_open(video, clip.mouth_boxes[0, :n])
        corr, offset = best_offset_correlation(synthetic.mouth_envelope(clip.audio, n, clip.fps), mouth, 5)
        assert abs(offset) <= 2 and corr >= 0.65, (i, corr, offset)
        eyes = clip.eye_boxes[0, :n]
        detail = eye_detail(video, eyes).mean() / eye_detail(clip.frames[:n], eyes).mean()
        assert detail >= 0.6, (i, detail)
        steps = seam_score(video, range(5, n, 4))
        assert steps <= 2.0, (i, steps)
