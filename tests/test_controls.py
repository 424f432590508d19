"""Long-video controls (mi_jax/generation/controls.py, colour_anchor.py and their use in the
pipeline): prompt schedule, voice activity and the mouth rest in silence, the speaker timeline,
the colour anchor. Behaviour on the tiny config, not quality (README "Long-video controls" has
the demo model's figures)."""

import numpy as np
import pytest

from conftest import write_talk_inputs
from mi_jax.data import synthetic
from mi_jax.generation import controls
from mi_jax.data.inputs import InputError


def test_prompt_schedule_parses_and_rejects_clearly():
    assert controls.prompt_schedule("a person talking") == [(0.0, "a person talking")]
    assert controls.prompt_schedule(["0:a person talking", "12.5: a person talking, nodding"]) == [
        (0.0, "a person talking"), (12.5, "a person talking, nodding")]
    assert controls.prompt_schedule([(0, "a"), (3, "b")]) == [(0.0, "a"), (3.0, "b")]
    for bad, says in [(["0:a", "abc:b"], "SECONDS:TEXT"), (["0:a", "5:b", "3:c"], "times must increase"),
                      (["2:a"], "must start at 0"), ([], "empty"), (["0:a", "-1:b"], ">= 0")]:
        with pytest.raises(InputError, match=says):
            controls.prompt_schedule(bad)
    # window k takes the prompt at its first frame; the first window after a change is half-half
    starts = [0, 8, 16, 24, 32]
    assert controls.window_prompts([(0.0, "a"), (0.6, "b")], starts, 25.0) == [
        (0, 0, 0.0), (0, 0, 0.0), (0, 1, 0.5), (1, 1, 0.0), (1, 1, 0.0)]


def test_voice_activity_finds_the_silence_and_rest_weights_ramp():
    clip = synthetic.render_clip(1_000_001, 6.0, size=(64, 64))
    audio = clip.audio.copy()
    audio[2 * 16000 : 4 * 16000] = 0.0
    active = controls.voice_activity(audio, 150, 25.0, 16000)
    assert not active[60:90].any()  # 2.4-3.6 s: inside the silence, beyond the 0.3 s hangover
    assert active[10:40].mean() > 0.9 and active[110:140].mean() > 0.9  # speech, syllable gaps included
    assert not controls.voice_activity(np.zeros(16000, np.float32), 25, 25.0, 16000).any()
    w = controls.rest_weights(active[None], 37)[0]
    assert w[0] == 0.0 and w.max() == 1.0 and set(np.unique(w)) <= {0.0, 0.5, 1.0}
    edge = np.flatnonzero(w > 0)[0]
    assert w[edge] == 0.5 and w[edge + 1] == 1.0  # one latent of ramp into the rest


def test_timeline_reads_names_numbers_and_rejects_unknown_speakers(tmp_path):
    path = tmp_path / "turns.txt"
    path.write_text("# who speaks\n0 1.5 1\n1.5 3 bob   # by file name\n")
    line = controls.read_timeline(str(path), 2, ["alice", "bob"])
    assert line == [(0.0, 1.5, 0), (1.5, 3.0, 1)]
    act = controls.timeline_activity(line, 2, 75, 25.0)
    assert act[0, :37].all() and not act[0, 38:].any() and act[1, 38:].all() and not act[1, :37].any()
    for text, says in [("0 1 3", "speaker '3' does not exist"), ("0 1", "START END SPEAKER"),
                       ("x 1 1", "must be numbers"), ("2 1 1", "START < END"), ("# nothing", "no 'START END")]:
        with pytest.raises(InputError, match=says):
            controls.read_timeline(text + "\n", 2, ["alice", "bob"])
    with pytest.raises(InputError, match="does not exist"):
        controls.read_timeline(str(tmp_path / "missing.txt"), 2)


def test_colour_anchor_holds_slow_drift_and_keeps_the_mouth_motion():
    from mi_jax.generation.colour_anchor import ColourAnchor

    rng = np.random.default_rng(0)
    base = rng.integers(60, 190, (32, 32, 3)).astype(np.float32)
    mouth = np.zeros((32, 32), bool)
    mouth[20:26, 10:22] = True
    t = np.arange(250)
    frames = np.repeat(base[None], len(t), 0) + (t / 10.0)[:, None, None, None] * np.array([1.0, -0.5, 0.3])
    frames[:, mouth] -= 40 * (np.sin(t / 2.0) > 0)[:, None, None]  # the mouth opens and closes fast
    frames = np.clip(frames, 0, 255).round().astype(np.uint8)
    anchor = ColourAnchor(frames[0], fps=25.0, exclude=mouth)
    out = np.concatenate([anchor(frames[i : i + 10]) for i in range(0, len(t), 10)])
    drift = lambda v: np.abs(v[-25:, ~mouth].astype(float).mean((0, 1)) - v[:25, ~mouth].astype(float).mean((0, 1)))
    assert drift(frames).max() > 20 and drift(out).max() < 3
    # the mouth's frame-to-frame change is the generated one (the offset moves < 1 unit a frame)
    step = lambda v: np.diff(v[:, mouth].astype(float).mean(-1), axis=0)
    assert np.abs(step(out) - step(frames)).max() < 1.5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_talk_inputs(tmp_path_factory.mktemp("controls_inputs"), 1_000_005, 2.2)


def _face_mask(seed=1_000_005):
    clip = synthetic.render_clip(seed, 0.2, size=(64, 64))
    m = np.zeros((64, 64), np.uint8)
    x0, y0, x1, y1 = np.round(clip.face_boxes[0, 0]).astype(int)
    m[y0:y1, x0:x1] = 255
    return m


def test_silence_is_valid_and_the_mouth_rests_on_the_portrait(tiny_run, inputs):
    """A track silent in its middle generates; in the silent latents the mouth cells are the
    portrait's latent exactly, elsewhere they are generated; without the rest they are not."""
    import soundfile as sf

    from mi_jax.pipeline import Pipeline, read_inputs

    audio, _ = sf.read(str(inputs / "voice.wav"), dtype="float32")
    audio[16000:] = 0.0  # silent from 1 s to the end (2.2 s)
    pipe = Pipeline.from_checkpoint(tiny_run)
    r = read_inputs(pipe.config, str(inputs / "portrait.png"), audio, masks=[_face_mask()])
    assert any("silent for" in n for n in r.notices) and r.mouths.sum() > 0
    ref = pipe.enc.encode_video(r.image[None])[0]  # [h, w, C]
    kw = dict(masks=[_face_mask()], steps=2, seed=1)
    got = np.concatenate(list(pipe.latents(str(inputs / "portrait.png"), audio, "a person talking", **kw)), 1)[0]
    free = np.concatenate(list(pipe.latents(str(inputs / "portrait.png"), audio, "a person talking", rest=False,
                                            **kw)), 1)[0]
    weights = controls.rest_weights(r.active[:1], got.shape[0])[0, 1:]  # per generated latent
    mouth = r.mouths[0] > 0
    full = np.flatnonzero(weights == 1.0)
    assert len(full) >= 3
    np.testing.assert_allclose(got[full][:, mouth], np.broadcast_to(ref[mouth], got[full][:, mouth].shape), atol=1e-5)
    assert np.abs(free[full][:, mouth] - ref[mouth]).max() > 0.1
    speaking = np.flatnonzero(weights == 0.0)
    assert np.abs(got[speaking][:, mouth] - ref[mouth]).max() > 0.1
    # all-silent audio is an idle head, not an error
    video = pipe.generate(str(inputs / "portrait.png"), np.zeros(16000, np.float32), seconds=1.0, **kw)
    assert len(video.frames) == 25


def test_prompt_schedule_changes_the_text_per_window(tiny_run, inputs):
    """Windows before the change equal the one-prompt run exactly; from the change on they differ."""
    from mi_jax.diffusion.sampler import window_frames
    from mi_jax.pipeline import Pipeline, sampler_config

    pipe = Pipeline.from_checkpoint(tiny_run)
    args = (str(inputs / "portrait.png"), str(inputs / "voice.wav"))
    one = list(pipe.latents(*args, "a person talking", steps=2, seed=3))
    sched = list(pipe.latents(*args, ["0:a person talking", "1:a person talking, nodding"], steps=2, seed=3))
    scfg = sampler_config(pipe.config, steps=2)
    first_new = next(k for k in range(len(one)) if window_frames(scfg, k)[0] / 25.0 >= 1.0)
    for k in range(first_new):
        np.testing.assert_array_equal(sched[k], one[k])  # the same jitted window function on the same inputs
    assert all(np.abs(sched[k] - one[k]).max() > 1e-4 for k in range(first_new, len(one)))


def test_timeline_mutes_the_listener_and_rests_their_mouth(tiny_run, inputs, tmp_path):
    from mi_jax.pipeline import Pipeline, read_inputs

    pipe = Pipeline.from_checkpoint(tiny_run)
    left, right = np.zeros((64, 64), np.uint8), np.zeros((64, 64), np.uint8)
    left[16:48, 4:30], right[16:48, 34:60] = 255, 255
    voice = str(inputs / "voice.wav")
    path = tmp_path / "turns.txt"
    path.write_text("0 1 1\n1 2.2 2\n")
    r = read_inputs(pipe.config, str(inputs / "portrait.png"), [voice, voice], masks=[left, right], timeline=str(path))
    assert r.active[0, :25].all() and not r.active[0, 26:].any() and r.active[1, 26:].all()
    assert np.abs(r.tracks[0][17000:]).max() == 0 and np.abs(r.tracks[1][:15000]).max() == 0
    assert np.abs(r.tracks[0][:15000]).max() > 0.05
    with pytest.raises(InputError, match="does not exist"):
        read_inputs(pipe.config, str(inputs / "portrait.png"), [voice, voice], masks=[left, right],
                    timeline="0 1 voice\n0 1 carol\n")
