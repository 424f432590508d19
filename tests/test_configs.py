"""Every MagicInfinite config trains and serves in one regime: generation's windows are the
training windows' length (RoPE positions, audio windows and the reference's place as in training),
and the overlap carries enough latents for the motion to go on across a window seam."""

import itertools
import os

import pytest

from conftest import CONFIGS
from mi_jax.config_utils import load_config


@pytest.mark.parametrize("variant, stage", itertools.product(("tiny", "demo", "full"), ("stage1", "stage2", "distill")))
def test_generation_windows_are_the_training_windows(variant, stage):
    c = load_config(os.path.join(CONFIGS, f"magicinfinite.py:{variant},{stage}"))
    assert c.sample.window == c.prepare.latent_frames
    assert 0 <= c.sample.overlap <= c.sample.window - 2


def test_demo_windows_carry_position_and_velocity():
    """The demo model's windows carry 2 latents (a position and a direction of motion, not one
    latent's position alone) and span about a nod's period (1.4 Hz at 25 fps: 18 frames)."""
    c = load_config(os.path.join(CONFIGS, "magicinfinite.py:demo,distill"))
    assert c.sample.overlap >= 2
    assert 1 + 4 * (c.prepare.latent_frames - 1) >= 17
