"""Every MagicInfinite config trains and serves in one regime: generation's windows are the
training windows' length (RoPE positions, audio windows and the reference's place as in training),
and the overlap carries enough latents for the motion to go on across a window seam."""

import itertools
import os

import pytest

from conftest import CONFIGS
from mi_jax.config_utils import load_config


@pytest.mark.parametrize("variant, stage",
                         list(itertools.product(("tiny", "demo", "full"), ("stage1", "stage2", "distill"))))
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


def test_the_cpu_benchmark_measures_the_demo_models_dit():
    """benchmarks/cpu_vs_torch.py's `dit_demo` case is the DiT `make demo-model` trains (diffusers
    kwargs against the demo config), on the demo's training batch of latents."""
    import importlib.util

    from mi_jax.models.vae import SPATIAL_FACTOR

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("cpu_vs_torch", os.path.join(root, "benchmarks", "cpu_vs_torch.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = load_config(os.path.join(CONFIGS, "magicinfinite.py:demo,stage2,text_first"))
    kwargs, shape, text_len = bench.DIT_CASES["dit_demo"]

    def plain(v):
        return tuple(v) if isinstance(v, (tuple, list)) else v

    shared = [k for k in kwargs if k in cfg.model]
    assert {"num_attention_heads", "attention_head_dim", "num_layers", "num_single_layers", "rope_axes_dim",
            "in_channels", "mlp_ratio", "patch_size"} <= set(shared)
    assert {k: plain(kwargs[k]) for k in shared} == {k: plain(cfg.model[k]) for k in shared}
    f = SPATIAL_FACTOR
    assert shape == (cfg.data.global_batch, cfg.model.in_channels, cfg.prepare.latent_frames,
                     cfg.prepare.height // f, cfg.prepare.width // f)
    assert text_len == cfg.prepare.text_len
