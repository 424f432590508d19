"""Generation end to end on the tiny config: the mp4's frames, fps and audio; every bad input
fails clearly before anything is compiled, leaving no output file."""

import os

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from conftest import write_talk_inputs
from mi_jax.cli import main as cli
from mi_jax.data.video_io import probe, read_audio


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_talk_inputs(tmp_path_factory.mktemp("gen_inputs"), 1_000_005, 2.2)


def test_generate_writes_mp4_with_audio(tiny_run, inputs, tmp_path):
    out = tmp_path / "talk.mp4"
    code = cli(["generate", "--checkpoint", tiny_run, "--portrait", str(inputs / "portrait.png"),
                "--audio", str(inputs / "voice.wav"), "--prompt", "a person talking", "--out", str(out),
                "--steps", "2", "--seed", "1"])
    assert code == 0 and out.exists()
    info = probe(str(out))
    assert info.fps == 25 and info.num_frames == 55 and (info.width, info.height) == (64, 64)
    audio = read_audio(str(out))
    assert abs(len(audio) / 16000 - 2.2) < 0.03  # the audio stream lasts as long as the input audio
    assert [n for n in os.listdir(tmp_path)] == ["talk.mp4"]  # no temporary left behind


def _bad_cases(inputs, tmp_path):
    rgba = tmp_path / "rgba.png"
    Image.fromarray(np.zeros((64, 64, 4), np.uint8)).save(rgba)
    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tiny)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000, np.float32), 16000)
    nan = tmp_path / "nan.wav"
    sf.write(nan, np.full(16000, np.nan, np.float32), 16000, subtype="FLOAT")
    short = tmp_path / "short.wav"
    sf.write(short, np.random.default_rng(0).standard_normal(100).astype(np.float32) * 0.1, 16000)
    timeline = tmp_path / "turns.txt"
    timeline.write_text("0 1 1\n1 2 3\n")
    mask = tmp_path / "mask.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(mask)
    portrait, voice = str(inputs / "portrait.png"), str(inputs / "voice.wav")
    return [
        (["--portrait", str(broken), "--audio", voice], "not a readable image"),
        (["--portrait", str(tmp_path / "missing.png"), "--audio", voice], "does not exist"),
        (["--portrait", str(tiny), "--audio", voice], "too small"),
        (["--portrait", portrait, "--audio", str(tmp_path / "missing.wav")], "missing.wav"),
        (["--portrait", portrait, "--audio", str(silent), "--reject-silence"], "silen"),
        (["--portrait", portrait, "--audio", voice, "--prompt", "0:a person talking", "--prompt", "abc:nodding"],
         "SECONDS:TEXT"),
        (["--portrait", portrait, "--audio", voice, "--prompt", "0:a person talking", "--prompt",
          "0:a person talking, nodding"], "times must increase"),
        (["--portrait", portrait, "--audio", voice, "--timeline", str(timeline)], "speaker '3' does not exist"),
        (["--portrait", portrait, "--audio", str(nan)], "NaN"),
        (["--portrait", portrait, "--audio", str(short)], "shorter than one"),
        (["--portrait", portrait, "--audio", voice, "--audio", voice], "mask"),
        (["--portrait", portrait, "--audio", voice, "--mask", str(mask), "--mask", str(mask)], "2 mask"),
    ], rgba


def test_bad_inputs_fail_clearly_and_leave_nothing(tiny_run, inputs, tmp_path, capsys):
    cases, rgba = _bad_cases(inputs, tmp_path)
    for extra, pattern in cases:
        out = tmp_path / "out.mp4"
        code = cli(["generate", "--checkpoint", tiny_run, "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2, (extra, err)
        assert pattern.lower() in err.lower(), (extra, err)
        assert not out.exists()


def test_fixable_inputs_are_converted_with_a_notice(tiny_run, inputs, tmp_path):
    from mi_jax.pipeline import check_inputs
    from mi_jax.convert.checkpoint import load_run_config

    config = load_run_config(tiny_run)
    cases, rgba = _bad_cases(inputs, tmp_path)
    grey = Image.open(inputs / "portrait.png").convert("L")
    cmyk = Image.open(inputs / "portrait.png").convert("CMYK")
    for image, word in [(str(rgba), "RGBA"), (grey, "L image"), (cmyk, "CMYK")]:
        img, tracks, masks, frames, notices = check_inputs(config, image, str(inputs / "voice.wav"))
        assert img.shape == (64, 64, 3) and any(word in n for n in notices), notices
    img, *_, notices = check_inputs(config, str(inputs / "portrait.png"), str(inputs / "voice.wav"), size=(70, 50))
    assert img.shape == (64, 48, 3) and any("rounded" in n for n in notices)
    *_, frames, _ = check_inputs(config, str(inputs / "portrait.png"), str(inputs / "voice.wav"), seconds=1.0)
    assert frames == 25


def test_a_new_length_compiles_nothing_and_audio_streams_per_window(tiny_run, inputs):
    """After one call, another length (other window count, other end of the VAE stream) needs no
    new executable: every shape in the loop is fixed. Each window's audio features, built from
    Wav2Vec2 chunks as the windows advance, equal slicing the whole clip's features."""
    import jax

    from mi_jax.diffusion.sampler import pad_audio_states, window_audio
    from mi_jax.pipeline import Pipeline, _AudioWindows, check_inputs, sampler_config

    pipe = Pipeline.from_checkpoint(tiny_run)
    args = (str(inputs / "portrait.png"), str(inputs / "voice.wav"), "a person talking")
    assert len(pipe.generate(*args, seconds=1.2, steps=2).frames) == 30  # 9 latents: the stream ends on 1
    compiled = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        video = pipe.generate(*args, seconds=2.0, steps=2)  # 14 latents: the stream ends on 0
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert len(video.frames) == 50 and compiled == []

    config, scfg = pipe.config, sampler_config(pipe.config)
    _, tracks, _, frames, _ = check_inputs(config, *args[:2], seconds=2.0)
    windows = _AudioWindows(pipe.enc, tracks, scfg, frames, 25.0)
    whole = np.concatenate(list(pipe.enc.audio_frame_chunks(tracks[0], 25.0)))[:frames][None, None]
    expected = np.asarray(window_audio(pad_audio_states(whole, scfg.audio_frames(scfg.num_windows(frames))), scfg,
                                      scfg.num_windows(frames)))
    got = np.stack([windows.window(k) for k in range(scfg.num_windows(frames))])
    np.testing.assert_array_equal(got, expected)  # slices and pads of the same encoder outputs: no arithmetic
    assert np.abs(got).max() > 0


def test_writing_is_repeatable(tmp_path):
    """The same frames and audio give the same mp4, byte for byte (so runs can be compared)."""
    from mi_jax.pipeline import Generation

    rng = np.random.default_rng(0)
    # smooth content: PyAV's implicit colour conversion in `encode` gave differing files for it
    frames = np.clip(np.cumsum(rng.integers(-3, 4, (12, 64, 64, 3)), axis=2) + 128, 0, 255).astype(np.uint8)
    video = Generation(frames, rng.uniform(-0.5, 0.5, 7680).astype(np.float32), 25.0)
    files = [open(video.save(str(tmp_path / f"{i}.mp4")), "rb").read() for i in range(4)]
    assert files[0] and all(f == files[0] for f in files)
