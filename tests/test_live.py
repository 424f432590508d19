"""Live streams (mi_jax/live.py) on the tiny trained run: the frames do not depend on how the
audio is chunked and are generate's given generate's audio features; each window runs before
the audio past its lookahead is read; a stream that falls behind says so; bad audio fails
before anything is computed."""

import os
import time
import warnings

import numpy as np
import pytest
import soundfile as sf

from conftest import write_talk_inputs
from mi_jax.data.inputs import InputError
from mi_jax.live import LateFramesWarning
from mi_jax.pipeline import Pipeline, _AudioWindows

SR = 16000


@pytest.fixture(scope="module")
def pipe(tiny_run):
    return Pipeline.from_checkpoint(tiny_run)


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    folder = write_talk_inputs(tmp_path_factory.mktemp("live_inputs"), 1_000_005, 2.2)
    audio, rate = sf.read(os.path.join(folder, "voice.wav"), dtype="float32")
    assert rate == SR
    return os.path.join(folder, "portrait.png"), audio


class Source:
    """Yields `audio` in random-size chunks (some empty), recording how much has been read."""

    def __init__(self, audio, seed=0, largest=3000):
        rng = np.random.default_rng(seed)
        self.audio, self.read, self.sizes = audio, 0, []
        cuts, at = [0], 0
        while at < len(audio):
            at = min(len(audio), at + int(rng.integers(0, largest)))
            cuts.append(at)
        self.cuts = cuts

    def __iter__(self):
        for a, b in zip(self.cuts[:-1], self.cuts[1:]):
            self.read, self.sizes = b, self.sizes + [b - a]
            yield self.audio[a:b]


def test_frames_do_not_depend_on_chunking_and_are_generates_given_its_features(pipe, talk):
    """One chunk or random chunks: the same frames bit for bit (every whole-track quantity is a
    function of the audio and the window index). With generate's audio features and rest
    weights put in, the stream is generate exactly (the same jitted window step, noise and VAE
    decoder on the same inputs). With its own causal features the frames stay close to generate's."""
    portrait, audio = talk
    kw = dict(steps=2, seed=1, pace=None)
    whole = list(pipe.live(portrait, [audio], **kw))
    stream = pipe.live(portrait, Source(audio, seed=3), **kw)
    features, own = [], stream._features
    stream._features = lambda k, need: features.append(own(k, need)) or features[-1]
    parts = list(stream)
    frames = np.concatenate([p.frames for p in whole])
    np.testing.assert_array_equal(np.concatenate([p.frames for p in parts]), frames)
    assert len(parts) > 1 and [p.start for p in parts] == list(np.cumsum([0] + [len(p.frames) for p in parts[:-1]]))
    assert len(frames) == 55  # 2.2 s at 25 fps, as generate
    np.testing.assert_array_equal(np.concatenate([p.audio for p in parts]), audio[: 55 * 640])

    video = pipe.generate(portrait, audio, steps=2, seed=1)
    req = pipe._request(portrait, audio, "", seconds=None, masks=None, steps=2, cfg_text=None, cfg_audio=None,
                        size=None, allow_silence=True)
    windows = _AudioWindows(pipe.enc, [audio[: 55 * 640]], req.scfg, 55, 25.0)  # generate's, anew
    expected = [windows.window(k) for k in range(len(features))]
    rel = [np.linalg.norm(f - e) / np.linalg.norm(e) for f, e in zip(features, expected)]
    print(f"live vs generate audio features per window: relative L2 error median {np.median(rel):.3f} "
          f"max {max(rel):.3f}")
    stream = pipe.live(portrait, Source(audio, seed=4), **kw)
    stream._features = lambda k, need: req.audio.window(k)  # generate's features and rest weights
    stream._rest = lambda k, need: req.window_rest(k)
    np.testing.assert_array_equal(np.concatenate([p.frames for p in stream]), video.frames)

    # the live features (causal statistics, a segment ending `lookahead` after the window) move
    # the frames by a fraction of what another seed moves them
    other = pipe.generate(portrait, audio, steps=2, seed=2).frames.astype(np.float64)
    live_diff = np.abs(frames.astype(np.float64) - video.frames).mean()
    seed_diff = np.abs(other - video.frames).mean()
    print(f"mean |live - generate| {live_diff:.2f}, |seed 2 - seed 1| {seed_diff:.2f} (uint8 levels)")
    assert live_diff < 0.5 * seed_diff, (live_diff, seed_diff)


def test_each_window_runs_before_the_audio_past_its_lookahead_is_read(pipe, talk):
    portrait, audio = talk
    source = Source(audio, seed=5, largest=1200)
    stream = pipe.live(portrait, source, steps=2, pace=None, lookahead_s=0.2)
    first = next(stream)
    assert source.read < len(audio) // 2  # frames come out while most of the audio is still to come
    parts = [first, *stream]
    assert sum(len(p.frames) for p in parts) == 55
    per_frame = SR // 25
    for entry in stream.log:
        if not entry["ended"]:
            # window k: its last frame + 5 frames (0.2 s) of audio, and less than one more chunk
            assert entry["need"] == per_frame * (4 * entry["window"] + 9 + 5)
            assert entry["need"] <= entry["read"] < entry["need"] + max(source.sizes), entry
    assert stream.log[-1]["ended"] and len(stream.log) == stream.scfg.num_windows(55) == 13  # as generate


def test_a_stream_behind_real_time_says_so(pipe, talk):
    """A slow consumer (or model, or source) makes frames late: each part counts its late
    frames, the report sums them and the first one warns. Without a pace nothing is late."""
    portrait, audio = talk
    stream = pipe.live(portrait, [audio], steps=2, pace=4.0, max_latency_s=0.1)  # speech at 4x: 0.55 s
    late = 0
    with pytest.warns(LateFramesWarning, match="behind real time"):
        for part in stream:
            late += part.late
            assert np.all(np.isfinite(part.latency))
            time.sleep(0.3)  # the consumer is slower than the audio
    report = stream.report()
    assert late == report["late"] > 0 and report["late_after_warmup"] > 0
    assert report["latency_p95_s"] > 0.1 and report["frames"] == 55

    with warnings.catch_warnings():
        warnings.simplefilter("error", LateFramesWarning)
        calm = pipe.live(portrait, [audio], steps=2, pace=None)
        assert sum(p.late for p in calm) == 0 and calm.report()["late"] == 0


@pytest.mark.parametrize("chunks, message", [
    ([(np.zeros(800, np.float32), 44100)], "44100 Hz"),
    ([np.zeros((800, 2), np.float32)], "mono"),
    ([np.zeros(800, np.int16)], "dtype int16"),
    ([np.full(800, np.nan, np.float32)], "non-finite"),
    ([], "ended before any audio"),
    ([np.zeros(0, np.float32)], "ended before any audio"),
    ([np.zeros(100, np.float32)], "shorter than one video frame"),
])
def test_bad_audio_fails_clearly_before_anything_is_computed(pipe, talk, monkeypatch, chunks, message):
    portrait, _ = talk

    def computed(*a, **k):
        raise AssertionError("computed before the audio was checked")

    stream = pipe.live(portrait, iter(chunks), steps=2)
    monkeypatch.setattr(pipe.enc, "encode_video", computed)
    monkeypatch.setattr(pipe, "_window_fn", computed)
    with pytest.raises(InputError, match=message):
        next(stream)


def test_bad_portrait_or_settings_fail_at_the_call(pipe, talk, tmp_path):
    _, audio = talk
    with pytest.raises(InputError, match="does not exist"):
        pipe.live(str(tmp_path / "missing.png"), [audio])
    with pytest.raises(InputError, match="lookahead"):
        pipe.live(talk[0], [audio], lookahead_s=-1)
    with pytest.raises(InputError, match="pace"):
        pipe.live(talk[0], [audio], pace=0)
