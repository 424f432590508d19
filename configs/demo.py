"""The bundled demo model: configs/magicinfinite.py's tiny variant, wider, on the demo VAE's latents.

    mi-jax demo-model --out demo/model --work runs/demo      # builds demo/vae and demo/model (make demo-model)
    mi-jax train --config configs/demo.py:stage2,text_first --workdir runs/demo_s2
    mi-jax eval --checkpoint demo/model --clips 3 --seconds 180 --out demo/eval

`get_config("STAGE[,text_first]")` takes magicinfinite.py's stage parts (`stage1`, `stage2`,
`distill`, `text_first`; a leading `demo` or `tiny` is accepted and ignored) and returns
`magicinfinite.py:tiny,...` with the demo's model, VAE and windows. `configs/magicinfinite.py:demo,...`
returns the same config. `mi_jax/demo.py` builds the shipped model from it; the docs' demo page
gives its figures.
"""

import os

import ml_collections

from mi_jax.config_utils import load_config

_HERE = os.path.dirname(os.path.abspath(__file__))


def get_config(arg: str = "stage1") -> ml_collections.ConfigDict:
    """The demo config for one training stage.

    Args:
      arg: comma-separated stage parts for configs/magicinfinite.py (default `"stage1"`); `demo`
        and `tiny` parts are dropped.

    Returns:
      The tiny config of that stage with the demo's changes.

    Raises:
      ValueError: a part magicinfinite.py does not know, or `full`.
    """
    parts = [p.strip() for p in arg.split(",") if p.strip() and p.strip() not in ("demo", "tiny")]
    if "full" in parts:
        raise ValueError("configs/demo.py builds on the tiny variant; drop 'full' from the config arg")
    c = load_config(os.path.join(_HERE, "magicinfinite.py:" + ",".join(["tiny", *parts])))
    # 8 latent channels (the demo VAE's): 4 lost the mouth and the eyes, and a 2x2 patch's output
    # (2 x 2 x 8 = 32 values) still fits the DiT; the tests keep the 4-channel tiny variant
    c.model.update(in_channels=8, out_channels=8)
    c.prepare.vae_random.latent_channels = 8
    # a 4x-spatial VAE: 16x16 latents at 64 px, cells of 4 px, smaller than an eye (an 8x grid's
    # 8-px cells hold no eye, and two speakers' mouths at half the frame each get about one cell)
    c.prepare.vae_random.spatial_compression_ratio = 4
    # two audio tracks and masks per window: a share of the training clips has two speakers
    # taking turns (single-speaker windows carry an empty second track)
    c.prepare.speakers = 2
    # a DiT 4x wider than the tests' tiny one (hidden 128 = 4 heads x 32, audio cross-attention in
    # the last 2 blocks at width 128): narrower DiTs lost most of the mouth the VAE keeps
    c.model.update(num_attention_heads=4, attention_head_dim=32, rope_axes_dim=(8, 12, 12), audio_blocks=2,
                   audio_hidden=128)
    # 5-frame tiles (2 latents, the second's 4 frames kept): the length at which the small VAE keeps
    # the mouth per tile (benchmarks/vae_regime.py); trained through those tiles on clips of up to
    # 17 frames, so each tile pairs a 4-frame latent with the next, as in decoding
    c.prepare.vae_tiling.update(tile_sample_min_num_frames=4, tile_sample_stride_num_frames=4)
    c.vae_train.lengths = (17, 13, 9, 5, 1)
    # from scratch on 2 cores: single frames first at batch 16 (eyes and colour), then clips
    # through the stream at a fifth of the rate with every other batch images (at the full rate
    # the clip batches of 2 undid the eyes); a constant rate and an edge term (docs/demo.md)
    c.vae_train.update(init="", schedule="constant", learning_rate=2e-3, grad_weight=1.0, image_steps=2000,
                       image_batch=16, steps=600, batch=2, clip_learning_rate=4e-4, image_every=2)
    # start from kernels that read each latent's own frames, not each tile's first (mi_jax/train/vae.py)
    c.vae_train.temporal_init = True
    # windows of 5 latents (17 frames, about a nod's period), 2 carried, 2 new: a window sees where
    # the head was and where it was going
    c.prepare.latent_frames = 5
    c.sample.update(window=5, overlap=2)
    return c
