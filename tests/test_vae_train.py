"""The demo VAE's trainer (`mi-jax train-vae`, mi_jax/train/vae.py): it trains through the
`VAEStream` regime that `prepare` and generation run, resumes to the same weights, runs an image
stage before the clips, and widens a pretrained VAE to more latent channels without changing it.
(Split from tests/test_vae_regime.py so that xdist's per-file workers share the VAE tests.)"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONFIGS, max_abs
from mi_jax.config_utils import load_config
from mi_jax.data import synthetic


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
