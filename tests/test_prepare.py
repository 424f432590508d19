"""prepare: synthetic clip -> mp4 + wav -> store -> loader keeps shapes, values and truth;
bad clips are skipped with reasons and a second run does no work."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import CONFIGS
from mi_jax.config_utils import load_config
from mi_jax.data import synthetic
from mi_jax.data.loader import Loader, LoaderConfig
from mi_jax.data.prepare import Encoders, prepare
from mi_jax.data.store import StoreReader
from mi_jax.data.video_io import read_clip, write_video

CONFIG = os.path.join(CONFIGS, "magicinfinite.py:tiny,stage1")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    clips = tmp_path_factory.mktemp("clips")
    good = synthetic.render_clip(7, 1.5, size=(64, 64), prompt="nodding")
    good.save(str(clips / "good"))
    synthetic.render_clip(8, 1.5, size=(64, 64)).save(str(clips / "also_good"))
    (clips / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    write_video(str(clips / "silent_track.mp4"), good.frames, 25.0)  # no audio stream at all
    write_video(str(clips / "short.mp4"), good.frames[:5], 25.0, audio=good.audio[: 5 * 640])  # 0.2 s
    out = str(tmp_path_factory.mktemp("store"))
    config = load_config(CONFIG)
    report = prepare(config, str(clips), out, progress=False)
    return config, clips, out, report, good


def test_bad_clips_are_listed_and_the_rest_prepared(prepared):
    config, clips, out, report, _ = prepared
    assert sorted(report["prepared"]) == ["also_good", "good"]
    skipped = report["skipped"]
    assert set(skipped) == {"corrupt.mp4", "silent_track.mp4", "short.mp4"}
    assert "decode" in skipped["corrupt.mp4"].lower()
    assert "audio" in skipped["silent_track.mp4"].lower()
    assert "shorter than one window" in skipped["short.mp4"]
    with open(os.path.join(out, "prepare_report.json")) as f:
        assert json.load(f)["skipped"] == skipped
    again = prepare(config, str(clips), out, progress=False)  # a second run does no work
    assert again["prepared"] == [] and again["already_done"] == 2 and again["windows"] == 0


def test_loader_batch_keeps_values_and_truth(prepared):
    config, clips, out, _, clip = prepared
    reader = StoreReader(out)
    ids = [i for i in range(len(reader)) if reader[i]["clip_id"] == "good"]
    assert len(ids) == (len(clip.frames) - 1) // 8  # windows of 9 frames, stride 8
    loader = Loader(reader, LoaderConfig(global_batch_size=len(reader), shuffle=False))
    batch = next(loader)
    k = int(np.flatnonzero(batch["clip_id"] == "good")[batch["window"][batch["clip_id"] == "good"].argmax()])
    window = int(batch["window"][k])
    enc = Encoders(config)
    video, _ = read_clip(str(clips / "good" / "clip.mp4"), fps=25.0)
    # window k: latents 2k .. 2k + 2 of one encode of the whole clip (the frames its windows use)
    whole = enc.encode_video(video.frames[: 1 + 8 * len(ids)])
    np.testing.assert_allclose(batch["latents"][k], whole[2 * window : 2 * window + 3], atol=1e-5)
    np.testing.assert_allclose(batch["ref_latent"][k], enc.encode_video(video.frames[:1]), atol=1e-5)
    assert batch["latents"].shape[1:] == (3, 8, 8, 4) and batch["audio_states"].shape[1:] == (9, 4, 32)
    truth = batch["truth"][k]
    np.testing.assert_allclose(truth["mouth_open"][0], clip.mouth_open[0, 8 * window : 8 * window + 9], atol=1e-6)
    assert truth["actions"] == ["nodding"] and truth["start_frame"] == 8 * window
    assert batch["face_mask"][k].any() and (batch["mouth_mask"][k] <= batch["face_mask"][k]).all()


def test_stored_audio_features_are_what_generation_reads(prepared):
    """Training and generation see the same Wav2Vec2 features: each stored window's
    audio_states equal the pipeline's audio windows (`_AudioWindows`, from the same streamed
    chunks) for a sampler whose windows are the training windows (3 latents, no overlap)."""
    from mi_jax.diffusion.sampler import SamplerConfig
    from mi_jax.pipeline import _AudioWindows

    config, clips, out, _, _ = prepared
    reader = StoreReader(out)
    stored = {int(r["window"]): r["audio_states"] for r in (reader[i] for i in range(len(reader)))
              if r["clip_id"] == "good"}
    video, audio = read_clip(str(clips / "good" / "clip.mp4"), fps=25.0)
    windows = _AudioWindows(Encoders(config), audio[None], SamplerConfig(window=3, overlap=0), len(video.frames), 25.0)
    for k in sorted(stored):
        generation = windows.window(k)[0, 0]  # [9, n_layers, C]
        assert stored[k].shape == generation.shape
        # stored as float16: equal up to its rounding
        np.testing.assert_allclose(stored[k].astype(np.float32), generation, rtol=1e-3, atol=1e-3)
    assert len(stored) >= 2 and np.abs(generation).max() > 0.1
