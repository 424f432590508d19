"""The latent grid comes from the VAE's config: a 4x-spatial HunyuanVideo VAE
(`AutoencoderKLHunyuanVideo(spatial_compression_ratio=4)`) gives 64x64 frames a 16x16 latent
grid, the grid 128x128 frames get from the released 8x VAE (issue 29).

(i) the tiny random 4x VAE equals diffusers' with the same weights, and exports back to a folder
diffusers loads; (ii) prepare (latents and masks at H/4), the masks' cells line up with the face
boxes in pixels / 4, and the pipeline (sampler windows, speaker masks, decoded frames) on it;
(iii) the eye-detail measure: ~1 on the renderer's face, low on a blurred one; (iv) two speakers
on a 16x16 grid: each track's audio cross-attention changes only its own face's tokens.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import traverse_util

from conftest import CONFIGS, max_abs
from mi_jax.config_utils import load_config
from mi_jax.convert.export import write_model
from mi_jax.convert.name_map import export_params
from mi_jax.convert.vae import VAE_NAME_MAP, load_diffusers_vae, read_vae_config
from mi_jax.data import faces, synthetic
from mi_jax.models.vae import CausalVAE

# the tests' tiny VAE (configs/magicinfinite.py:tiny prepare.vae_random) with one spatial
# downsampling fewer: blocks 0-1 halve space, blocks 1-2 halve time
VAE4 = dict(latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4,
            spatial_compression_ratio=4)
# float32 round-off: the same sums in another order (XLA / the native CPU convolutions against
# torch's) on activations of order 1, through ~20 layers; the 8x VAE's parity tests use the same
TOL = 1e-4
SIZE = 64  # frames; 16 x 16 latents at 4x


def to_jax(t):
    """torch [B, C, T, H, W] -> numpy channels-last [B, T, H, W, C]."""
    return t.detach().numpy().transpose(0, 2, 3, 4, 1)


def test_4x_vae_matches_diffusers_and_exports_back(torch, tmp_path):
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(4)
    model = AutoencoderKLHunyuanVideo(**VAE4).eval()
    model.use_framewise_encoding = model.use_framewise_decoding = False  # the single pass
    model.save_pretrained(str(tmp_path / "src"))
    config, params = load_diffusers_vae(str(tmp_path / "src"))
    assert (config.spatial_factor, config.temporal_factor) == (4, 4)
    assert config.resample_factors == ((1, 2), (2, 2), (2, 1), (1, 1))  # diffusers' rule for ratio 4
    assert read_vae_config(str(tmp_path / "src")) == config

    vae = CausalVAE(config)
    x = torch.rand(1, 3, 5, 16, 24) * 2 - 1
    z = torch.randn(1, 4, 2, 4, 6)
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        want_video = to_jax(model.decode(z).sample)
    mean, logvar = jax.jit(lambda p, v: vae.apply({"params": p}, v, method="encode"))(params, to_jax(x))
    assert mean.shape == (1, 2, 4, 6, 4)  # 16 x 24 pixels -> 4 x 6 cells
    assert max_abs(mean, to_jax(dist.mean)) < TOL and max_abs(logvar, to_jax(dist.logvar)) < TOL
    video = jax.jit(lambda p, v: vae.apply({"params": p}, v, method="decode"))(params, to_jax(z))
    assert video.shape == (1, 5, 16, 24, 3)
    assert max_abs(video, want_video) < TOL

    # export: the name map gives diffusers' keys and tensors; diffusers loads the folder as a 4x VAE
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    exported = dict(export_params(params, VAE_NAME_MAP))
    assert exported.keys() == state.keys() and all(np.array_equal(exported[k], state[k]) for k in state)
    out = str(tmp_path / "out")
    write_model(out, params, VAE_NAME_MAP, config.to_diffusers(), weights_name="diffusion_pytorch_model",
                dtype=np.float32, max_shard_size="1GB")
    back = AutoencoderKLHunyuanVideo.from_pretrained(out).eval()
    back.use_framewise_encoding = back.use_framewise_decoding = False
    assert back.config.spatial_compression_ratio == 4
    with torch.no_grad():
        np.testing.assert_array_equal(to_jax(back.decode(z).sample), want_video)  # the same VAE, bit for bit
    assert load_diffusers_vae(out)[0] == config


# ----------------------------------------------------------------------------- prepare, masks, pipeline


@pytest.fixture(scope="module")
def grid4():
    """The tiny config on a 4x VAE (random, seeded) at 64x64, and its encoders."""
    from mi_jax.data.prepare import Encoders

    config = load_config(os.path.join(CONFIGS, "magicinfinite.py:tiny,stage1"), ["sample.steps=1"])
    config.prepare.vae_random.spatial_compression_ratio = 4
    # the demo's 5-frame tiles: fewer stream programs to compile than diffusers' 17-frame ones
    config.prepare.vae_tiling.update(tile_sample_min_num_frames=4, tile_sample_stride_num_frames=4)
    return config, Encoders(config)


def _pooled_any(mask: np.ndarray, f: int) -> np.ndarray:
    """bool [..., H, W] -> [..., H/f, W/f]: a cell is set when any of its f x f pixels is."""
    *lead, h, w = mask.shape
    return mask.reshape(*lead, h // f, f, w // f, f).any(axis=(-3, -1))


def test_prepare_gives_16x16_latents_and_masks_on_the_face_boxes(grid4):
    from mi_jax.data.prepare import RawClip, patch_grid, vae_config, windows

    config, enc = grid4
    assert vae_config(config.prepare).spatial_factor == enc.vae_config.spatial_factor == 4
    assert patch_grid(config) == 8  # 4 pixels per cell x patch 2: frame sizes go in steps of 8
    p = config.prepare.copy_and_resolve_references()
    p.speakers = 2
    clip = synthetic.render_clip(1_000_011, 0.4, size=(SIZE, SIZE), speakers=2)  # 10 frames: one window of 9
    boxes = np.transpose(clip.face_boxes, (1, 0, 2)).astype(np.float64)  # [T, S, 4]
    raw = RawClip("two", clip.frames, clip.audio, clip.speaker_audio, boxes, "a person talking", {})
    (sample,) = windows(raw, enc, p)
    t = p.latent_frames
    assert sample["latents"].shape == (t, 16, 16, 4) and sample["ref_latent"].shape == (1, 16, 16, 4)
    assert sample["speaker_masks"].shape == (2, t, 16, 16)
    assert sample["face_mask"].shape == sample["mouth_mask"].shape == (t, 16, 16)

    f = 1 + 4 * (t - 1)
    fm = faces.masks_from_boxes(boxes[:f], f, SIZE, SIZE, margin=p.face_margin, spatial=4)
    np.testing.assert_array_equal(sample["speaker_masks"], fm.face)
    # latent 0 is frame 0: its cells are the 4 x 4 pixel blocks the (grown) face box touches
    pixels = faces.pixel_masks(fm.boxes[:1], SIZE, SIZE)[:, 0]  # [S, H, W]
    np.testing.assert_array_equal(fm.face[:, 0], _pooled_any(pixels, 4))
    for s, cols in ((0, slice(0, 8)), (1, slice(8, 16))):  # each face in its half of the frame
        assert fm.face[s, 0].sum() >= 30 and fm.mouth[s, 0].sum() >= 4  # a mouth of several cells
        assert fm.mouth[s].any() and not np.delete(fm.mouth[s], np.s_[cols], axis=-1).any()
        assert not (fm.mouth[s] & ~fm.face[s]).any()


def test_pipeline_generates_on_the_16x16_grid(grid4):
    from mi_jax.models import DiT, DiTConfig
    from mi_jax.models.dit import example_inputs
    from mi_jax.pipeline import Pipeline, read_inputs

    config, enc = grid4
    mcfg = DiTConfig.coerce(config.model)
    params = nn.unbox(jax.jit(DiT(mcfg).init)(jax.random.key(0), **example_inputs(mcfg)))["params"]
    pipe = Pipeline(config, params, enc)
    clip = synthetic.render_clip(1_000_012, 0.6, size=(SIZE, SIZE), speakers=2)
    left = np.zeros((SIZE, SIZE), np.uint8)
    left[:, : SIZE // 2] = 255
    masks = [left, 255 - left]
    inputs = read_inputs(config, clip.frames[0], list(clip.speaker_audio), masks=masks)  # the VAE from config
    assert inputs.masks.shape == inputs.mouths.shape == (2, 16, 16)
    np.testing.assert_array_equal(inputs.masks[0], np.repeat([[1.0] * 8 + [0.0] * 8], 16, 0))

    req = pipe._request(clip.frames[0], list(clip.speaker_audio), "", seconds=None, masks=masks, steps=None,
                        cfg_text=None, cfg_audio=None, size=None, allow_silence=True)
    assert req.cond["speaker_masks"].shape == (1, 2, req.scfg.window, 16, 16)
    assert req.ref.shape == (1, 1, 16, 16, 4) and req.rest.shape[1:] == (16, 16)
    video = pipe.generate(clip.frames[0], list(clip.speaker_audio), masks=masks, seed=1)
    assert video.frames.shape == (len(clip.frames), SIZE, SIZE, 3)


# ----------------------------------------------------------------------------- eye detail


def test_eye_detail_is_one_on_the_renderer_and_low_on_a_blurred_face():
    import cv2

    from mi_jax.eval.metrics import eye_detail

    clip = synthetic.render_clip(1_000_013, 0.4, size=(SIZE, SIZE))
    base = float(eye_detail(clip.frames, clip.eye_boxes[0]).mean())
    assert base > 10  # luma units per pixel: the renderer's eyes, lids and brows are edges
    again = synthetic.render_clip(1_000_013, 0.4, size=(SIZE, SIZE))
    assert float(eye_detail(again.frames, again.eye_boxes[0]).mean()) / base == pytest.approx(1.0)
    moved = np.roll(clip.frames, 1, axis=2)  # the same face one pixel to the right, its box with it
    assert float(eye_detail(moved, clip.eye_boxes[0] + [1, 0, 1, 0]).mean()) / base == pytest.approx(1.0, abs=0.1)
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 1.0) for f in clip.frames])
    assert float(eye_detail(blurred, clip.eye_boxes[0]).mean()) / base < 0.35
    # what cells of 8 x 8 pixels can hold of the eyes (each cell's mean, interpolated back)
    cells = np.stack([cv2.resize(cv2.resize(f, (8, 8), interpolation=cv2.INTER_AREA), (SIZE, SIZE),
                                 interpolation=cv2.INTER_LINEAR) for f in clip.frames])
    assert float(eye_detail(cells, clip.eye_boxes[0]).mean()) / base < 0.2


# ----------------------------------------------------------------------------- two speakers


def test_two_speaker_masks_route_each_voice_to_its_own_face():
    from mi_jax.models import DiTConfig
    from mi_jax.models.audio import AudioCrossAttention, token_masks

    clip = synthetic.render_clip(1_000_014, 0.2, size=(SIZE, SIZE), speakers=2)  # 5 frames: 2 latents
    n = len(clip.frames)
    fm = faces.masks_from_boxes(np.transpose(clip.face_boxes, (1, 0, 2)), n, SIZE, SIZE, spatial=4)
    assert fm.face.shape == (2, 2, 16, 16) and not (fm.face[0] & fm.face[1]).any()
    tp, patch = fm.face.shape[1], 2
    mask = token_masks(jnp.asarray(fm.face[None], jnp.float32), (tp, 16 // patch, 16 // patch), (1, patch, patch))
    assert mask.shape == (1, 2, tp * 64)  # 64 tokens per latent frame at patch 2

    tiny = dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
                num_single_layers=1, text_embed_dim=24, pooled_projection_dim=12, rope_axes_dim=(4, 6, 6))
    cfg = DiTConfig(**tiny, audio_blocks=1, audio_feature_layers=3, audio_feature_dim=8, audio_window=1,
                    audio_hidden=16, audio_tokens=4, audio_token_dim=12)
    ks = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(ks[0], (1, tp * 64, cfg.hidden_size))
    audio = jax.random.normal(ks[1], (1, 2, tp, 4, 12))
    module = AudioCrossAttention(cfg)
    params = nn.unbox(module.init(ks[2], x, audio, mask)["params"])
    flat = traverse_util.flatten_dict(params)  # a trained adapter: to_out non-zero
    flat = {k: (0.3 * jax.random.normal(ks[3], v.shape) if k[0] == "to_out" else v) for k, v in flat.items()}
    fn = jax.jit(lambda a: module.apply({"params": traverse_util.unflatten_dict(flat)}, x, a, mask))
    base = fn(audio)
    # token (i, j) of a latent frame covers pixels [8i, 8i + 8) x [8j, 8j + 8)
    box_tokens = _pooled_any(faces.pixel_masks(fm.boxes[:1], SIZE, SIZE)[:, 0], 8).reshape(2, 64)  # [S, 64]
    for s in range(2):
        changed = np.abs(np.asarray(fn(audio.at[:, s].add(1.0)) - base)).max(-1)[0].reshape(tp, 64)
        own = np.asarray(mask[0, s]).reshape(tp, 64) > 0
        assert changed[own].min() > 1e-4  # this voice moves every token of its face
        assert np.all(changed[~own] == 0.0)  # and nothing else: the other face never hears it
        assert (own[0] <= box_tokens[s]).all() and not (own[0] & box_tokens[1 - s]).any()
