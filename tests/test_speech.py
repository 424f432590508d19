"""Typed words -> speech (mi_jax/data/speech.py, espeak-ng through its C API) and the synthetic
world's espeak-ng clips: phoneme events against the audio's energy, the viseme truth against the
phoneme events, disjoint training / held-out voices, bad inputs told before any compute with
nothing written, and `mi-jax generate --say` writing an mp4 with its audio."""

import json
import os
import re
import sys

import numpy as np
import pytest

from conftest import write_talk_inputs
from mi_jax.data import speech, synthetic

SENTENCE = "Hello, this is a test of the demo. Mama made papa a big map, okay?"


def _rms(audio, sr, t0, t1):
    x = audio[int(t0 * sr) : int(t1 * sr)]
    return float(np.sqrt(np.mean(np.square(x)))) if len(x) else 0.0


@pytest.mark.parametrize("voice", ["en-us", "en-us+f5", "fr+f1"])
def test_phoneme_events_line_up_with_the_audio_energy(voice):
    s = speech.speak(SENTENCE, voice)
    assert s.sample_rate == 16000 and s.audio.dtype == np.float32 and s.audio.ndim == 1
    assert 2.0 < s.seconds < 8.0 and 0.05 < np.abs(s.audio).max() <= 0.9
    starts = [p.start for p in s.phonemes]
    assert starts == sorted(starts) and all(p.end > p.start for p in s.phonemes)
    assert s.phonemes[-1].end <= s.seconds + 1e-6
    sr, a = s.sample_rate, s.audio
    vowels = [_rms(a, sr, p.start, p.end) for p in s.phonemes if p.viseme in ("open", "wide", "round")]
    pauses = [_rms(a, sr, p.start, p.end) for p in s.phonemes if p.viseme == "rest" and p.end - p.start > 0.05]
    assert len(vowels) >= 8 and pauses, [p.ipa for p in s.phonemes]
    assert np.mean(vowels) > 20 * np.mean(pauses), (np.mean(vowels), np.mean(pauses))  # sound in phonemes, not pauses
    # the sound starts where the first phoneme does and ends where the last one does (10 ms frames)
    hop = sr // 100
    energy = np.sqrt(np.convolve(np.square(a), np.ones(hop) / hop, "same"))
    loud = np.flatnonzero(energy > 0.05 * energy.max()) / sr
    spoken = [p for p in s.phonemes if p.viseme != "rest"]
    assert abs(loud[0] - spoken[0].start) < 0.08 and abs(loud[-1] - spoken[-1].end) < 0.08  # 2 frames
    # every vowel is voiced: louder than the quietest tenth of the audio
    assert min(vowels) > np.percentile(energy, 10)
    # words: in order, from the text
    assert [w for _, w in s.words][:4] == ["Hello", "this", "is", "a"]


def test_the_same_words_give_the_same_samples_whatever_came_before():
    first = speech.speak("Hi, Bob.", "en-us+m3")
    speech.speak("Other words in another voice.", "fr+f2", rate=300, pitch=90)
    again = speech.speak("Hi, Bob.", "en-us+m3")
    assert np.array_equal(first.audio, again.audio) and first.phonemes == again.phonemes
    a = synthetic.render_clip(7, 2.0, voice="espeak")
    b = synthetic.render_clip(7, 2.0, voice="espeak")
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio) and a.speech == b.speech


def test_visemes_of_phonemes():
    assert [speech.viseme_of(x) for x in ("ˈɑː", "æ", "i", "ˌɛ", "oʊ", "uː", "m", "b", "p", "s", "ə", "")] == [
        "open", "open", "wide", "wide", "round", "round", "closed", "closed", "closed", "neutral", "neutral", "rest"]
    s = speech.speak("Mama, bob, pip.", "en-us")
    assert [p.viseme for p in s.phonemes if p.ipa in ("m", "b", "p")] and all(
        p.viseme == "closed" for p in s.phonemes if p.ipa in ("m", "b", "p"))
    frames = speech.frame_visemes(s.phonemes, int(s.seconds * 25), 25.0)
    for p in s.phonemes:  # a phoneme covering a whole frame is that frame's viseme
        first, last = int(np.ceil(p.start * 25)), int(np.floor(p.end * 25)) - 1
        for t in range(first, min(last + 1, len(frames))):
            assert speech.VISEMES[frames[t]] == p.viseme, (p, t)


def test_heldout_voices_and_sentences_are_never_trained_on():
    train, held = set(speech.TRAIN_VOICES), set(speech.HELDOUT_VOICES)
    assert train and held and not train & held
    variant = lambda v: v.partition("+")[2] or "default"  # noqa: E731
    assert not {variant(v) for v in train} & {variant(v) for v in held}  # unseen variants, not just names
    for v in train | held:  # every listed voice speaks
        assert speech.check_voice(v) == v.lower().partition("+")[0] + ("+" + v.partition("+")[2] if "+" in v else "")
        assert speech.speak("Hello there.", v).seconds > 0.3
    rng_a, rng_b = np.random.default_rng(0), np.random.default_rng(0)
    a = [speech.sentence(rng_a) for _ in range(200)]
    assert a == [speech.sentence(rng_b) for _ in range(200)]  # seeded
    h = [speech.sentence(np.random.default_rng(k), "heldout") for k in range(200)]
    words = lambda ss: {w.strip(".!?").lower() for s in ss for w in s.split()}  # noqa: E731
    nouns = (words(h) - words(a)) & words(speech._HELD_OBJECTS + speech._HELD_SUBJECTS)
    assert not set(a) & set(h) and nouns  # held-out sentences use words the training ones never do
    # the world picks its voices by split
    for seed, pool in ((3, train), (synthetic.HELDOUT_SEED_START + 3, held)):
        clip = synthetic.render_clip(seed, 1.0, voice="espeak")
        assert clip.speech[0]["voice"] in pool


@pytest.mark.parametrize("text,voice,pattern", [
    ("", "en-us", "empty"),
    ("   \n\t ", "en-us", "empty"),
    ("?! ... --", "en-us", "no words"),
    ("Hello", "klingon", "no language 'klingon'"),
    ("Hello", "en-us+nobody", "no variant 'nobody'"),
    ("word " * 700, "en-us", "over the limit"),  # under MAX_CHARS, over MAX_SECONDS of speech
    ("x" * (speech.MAX_CHARS + 1), "en-us", "over the limit"),
])
def test_bad_text_or_voice_is_a_clear_error(text, voice, pattern):
    with pytest.raises(speech.SpeechError, match=pattern) as e:
        speech.speak(text, voice)
    assert isinstance(e.value, ValueError)  # an InputError: the CLI and the page show it as is
    if "voice" in pattern or "variant" in pattern or "language" in pattern:
        assert "en-us" in str(e.value)  # valid voices are named


def test_without_the_extra_the_error_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    monkeypatch.setattr(speech, "_cache", {})
    assert not speech.available()
    with pytest.raises(speech.SpeechError, match=r"pip install -e \.\[speech\]"):
        speech.speak("Hello")


def test_the_worlds_viseme_truth_follows_espeak_phoneme_events(tmp_path):
    clip = synthetic.render_clip(synthetic.HELDOUT_SEED_START + 11, 6.0, size=(96, 96), voice="espeak")
    t = clip.frames.shape[0]
    assert clip.visemes.shape == clip.mouth_width.shape == clip.mouth_height.shape == (1, t)
    info = clip.speech[0]
    assert info["voice"] in speech.HELDOUT_VOICES and info["sentences"]
    phonemes = [speech.Phoneme(a, b, ipa, speech.viseme_of(ipa)) for a, b, ipa in info["phonemes"]]
    # every phoneme covering a whole frame is that frame's viseme in the truth
    covered = 0
    for p in phonemes:
        for f in range(int(np.ceil(p.start * clip.fps)), min(int(np.floor(p.end * clip.fps)), t)):
            assert speech.VISEMES[clip.visemes[0, f]] == p.viseme, (p, f)
            covered += 1
    assert covered > 0.4 * t
    # the same phonemes spoken alone give the same events (the world records espeak-ng's own)
    first = info["sentences"][0]
    alone = speech.speak(first[1], info["voice"], rate=info["rate"], pitch=info["pitch"])
    got = [(round(p.start - first[0], 3), p.ipa) for p in phonemes if p.start < first[0] + alone.seconds - 0.05]
    want = [(round(p.start, 3), p.ipa) for p in alone.phonemes][: len(got)]
    assert len(got) > 5 and [ipa for _, ipa in got] == [ipa for _, ipa in want]
    assert max(abs(a - b) for (a, _), (b, _) in zip(got, want)) < 2e-3
    # the truth's shape: closed frames shut, wide frames wider than round ones
    by = lambda name: clip.visemes[0] == speech.VISEMES.index(name)  # noqa: E731
    w, h = clip.mouth_width[0], clip.mouth_height[0]
    assert by("closed").any() and h[by("closed")].mean() < 0.5 * h[by("open")].mean()
    assert w[by("wide")].mean() > w[by("round")].mean() + 0.3
    # and the rendered pixels show it: width and height measured in the frames follow the truth
    shape = synthetic.measure_mouth_shape(clip.frames, clip.mouth_boxes[0])
    open_ = h > 0.3
    assert np.corrcoef(shape[open_, 0], w[open_])[0, 1] > 0.8
    assert np.corrcoef(shape[:, 1], h)[0, 1] > 0.8
    # saved: the truth arrays and the speech in meta.json
    clip.save(tmp_path / "clip")
    meta, truth = synthetic.load_truth(tmp_path / "clip")
    assert meta["voice"] == "espeak" and meta["speech"][0]["voice"] == info["voice"]
    assert np.array_equal(truth["visemes"], clip.visemes) and np.array_equal(truth["mouth_height"], h[None])
    json.dumps(meta)
    # the default voice's clips carry none of it
    plain = synthetic.render_clip(5, 1.0)
    assert plain.visemes is None and plain.speech is None and "voice" not in plain.metadata()


def test_pipeline_say_arguments_are_checked_before_any_compute():
    from mi_jax.config_utils import load_config
    from mi_jax.data.inputs import InputError
    from mi_jax.pipeline import spoken_audio

    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "magicinfinite.py:tiny,stage1"))
    track = spoken_audio(config, say="Hello there.", voice="en-us+f3")
    assert track.dtype == np.float32 and track.ndim == 1 and len(track) > 8000
    for kw, pattern in [(dict(), "give an audio track, or text"), (dict(audio="x.wav", say="hi"), "not both"),
                        (dict(audio="x.wav", voice="en-us"), "voice"), (dict(say=" "), "empty"),
                        (dict(say="hi", voice="xx"), "no language")]:
        with pytest.raises(InputError, match=pattern):
            spoken_audio(config, **kw)


@pytest.fixture(scope="module")
def talk_inputs(tmp_path_factory):
    return write_talk_inputs(tmp_path_factory.mktemp("say_inputs"), 1_000_005, 0.4)


def test_bad_say_inputs_fail_before_the_model_loads(tiny_run, talk_inputs, tmp_path, capsys, monkeypatch):
    from mi_jax import pipeline
    from mi_jax.cli import main as cli

    def no_model(*a, **k):
        raise AssertionError("the model was loaded for a bad input")

    monkeypatch.setattr(pipeline.Pipeline, "from_checkpoint", no_model)
    portrait, voice = str(talk_inputs / "portrait.png"), str(talk_inputs / "voice.wav")
    for extra, pattern in [
        (["--say", ""], "empty"),
        (["--say", "   "], "empty"),
        (["--say", "?!"], "no words"),
        (["--say", "Hello", "--voice", "klingon"], "no language 'klingon'"),
        (["--say", "word " * 700], "over the limit"),
        (["--say", "Hello", "--audio", voice], "not both"),
        (["--audio", voice, "--voice", "en-us"], "--voice goes with --say"),
        ([], "--say"),
    ]:
        out = tmp_path / "out.mp4"
        code = cli(["generate", "--checkpoint", tiny_run, "--portrait", portrait, "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2 and pattern.lower() in err.lower(), (extra, err)
        assert not out.exists() and os.listdir(tmp_path) == []


def test_generate_say_writes_an_mp4_with_the_spoken_audio(tiny_run, talk_inputs, tmp_path, capsys):
    from mi_jax.cli import main as cli
    from mi_jax.data.video_io import probe, read_audio

    out = tmp_path / "said.mp4"
    text = "Hi, Bob."
    code = cli(["generate", "--checkpoint", tiny_run, "--portrait", str(talk_inputs / "portrait.png"), "--say", text,
                "--voice", "en-us+f3", "--out", str(out), "--steps", "1"])
    printed = capsys.readouterr()
    err = printed.err
    assert code == 0 and out.exists(), err
    assert re.search(r"lip sync: r = -?[\d.]+ at [+-]\d+ frames", printed.out), printed.out
    said = speech.speak(text, "en-us+f3")
    info = probe(str(out))
    assert info.fps == 25 and abs(info.num_frames / 25 - said.seconds) < 0.05
    audio = read_audio(str(out))
    assert abs(len(audio) / 16000 - said.seconds) < 0.05  # the spoken words are the mp4's audio stream
    frames = info.num_frames  # AAC shifts samples a little: compare the loudness per frame
    env = [synthetic.mouth_envelope(a, frames) for a in (audio, said.audio)]
    assert np.corrcoef(*env)[0, 1] > 0.9
    assert "said 2 words" in err and os.listdir(tmp_path) == ["said.mp4"]


def test_pipeline_generate_say_animates_the_spoken_words(tiny_run, talk_inputs, tmp_path):
    from mi_jax.data.audio_io import normalize_loudness
    from mi_jax.data.video_io import read_audio
    from mi_jax.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(tiny_run)
    video = pipe.generate(str(talk_inputs / "portrait.png"), say="Hi, Bob.", voice="en-us+m3", steps=1)
    said = speech.speak("Hi, Bob.", "en-us+m3")
    said.audio = normalize_loudness(said.audio, "rms")  # as a file's audio is read
    n = min(len(video.audio), len(said.audio))  # fitted to whole frames: cut or padded with silence
    assert np.array_equal(video.audio[:n], said.audio[:n]) and abs(video.seconds - said.seconds) < 0.05
    video.save(str(tmp_path / "x.mp4"))
    assert abs(len(read_audio(str(tmp_path / "x.mp4"))) / 16000 - said.seconds) < 0.05


def test_viseme_shape_scores_the_renderer_high_and_a_still_mouth_low():
    from mi_jax.eval.voices import viseme_scores

    clip = synthetic.render_clip(synthetic.HELDOUT_SEED_START + 2, 6.0, voice="espeak")
    good = viseme_scores(clip.frames, clip)
    assert good["width"] > 0.8 and good["height"] > 0.8 and good["open_frames"] > 10, good
    still = viseme_scores(np.repeat(clip.frames[:1], len(clip.frames), 0), clip)
    assert abs(still["shape"]) < 0.2, still
    with pytest.raises(ValueError, match="voice='espeak'"):
        viseme_scores(clip.frames, synthetic.render_clip(3, 1.0))


def test_eval_voice_both_reports_espeak_beside_the_synthetic_voice(tiny_run, tmp_path, capsys):
    from mi_jax.cli import main as cli

    out = tmp_path / "eval"
    code = cli(["eval", "--checkpoint", tiny_run, "--out", str(out), "--voice", "both", "--clips", "1",
                "--seconds", "1.2"])
    printed = capsys.readouterr().out
    assert code in (0, 1), printed  # the 30-step model may fail the thresholds; the report is written either way
    for name in ("voices.md", "voices.json", "synthetic/report.md", "espeak/report.md"):
        assert (out / name).exists(), name
    rows = json.loads((out / "voices.json").read_text())["rows"]
    metrics = {(r["metric"], r["voice"]) for r in rows}
    assert {("lip-sync correlation", "synthetic"), ("lip-sync correlation", "espeak"),
            ("espeak-ng lip sync / synthetic voice's", "espeak"), ("viseme shape correlation", "espeak")} <= metrics
    shape = next(r for r in rows if r["metric"] == "viseme shape correlation")
    assert shape["renderer"] > 0.8  # the renderer's own frames follow the viseme truth
    assert "viseme shape correlation" in printed and "espeak" in (out / "voices.md").read_text()


def test_mixed_clips_prepare_into_a_store(tmp_path):
    """`mi-jax synth --voice mixed` (the synthetic voice and espeak-ng speech in turn, every 6
    seeds) writes clips that `prepare` takes as it takes the synthetic ones."""
    from mi_jax.config_utils import load_config
    from mi_jax.data.prepare import prepare

    folders = synthetic.write_clips(str(tmp_path / "clips"), 2, 1.2, seed_start=5, voice="mixed")
    voices = [json.load(open(os.path.join(f, "meta.json"))).get("voice", "synthetic") for f in folders]
    assert voices == ["synthetic", "espeak"]  # seeds 5 and 6: prompts 5 and 0, the voice turns at seed 6
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "magicinfinite.py:tiny,stage1"))
    report = prepare(config, str(tmp_path / "clips"), str(tmp_path / "store"), progress=False)
    assert report["clips"] == 2 and not report["skipped"], report
