"""Audio loading: formats, mono, resampling, loudness, length fitting and every error path.
Each test writes its own small files with soundfile (libsndfile encodes mp3 and ogg here)."""

import math
import warnings

import numpy as np
import pytest
import soundfile as sf

from mi_jax.data.audio_io import (
    AudioError,
    SilentAudioWarning,
    dbfs,
    fit_to_frames,
    frames_for_audio,
    load_audio,
    normalize_loudness,
    samples_for_frames,
    zero_mean_unit_var,
)


def sine(freq, seconds, rate, amp=0.5, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def peak_hz(audio, rate):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)]


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_formats_decode(tmp_path, ext):
    path = tmp_path / f"tone.{ext}"
    sf.write(path, sine(440, 1.0, 16000), 16000)
    audio = load_audio(path, normalize=None)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - 16000) <= 1152  # lossy codecs may add up to one mp3 frame
    assert abs(peak_hz(audio, 16000) - 440) <= 1.0
    assert abs(dbfs(audio) - dbfs(sine(440, 1.0, 16000))) < 0.5


def test_resample_keeps_frequency_and_removes_out_of_band(tmp_path):
    rate = 44100
    sf.write(tmp_path / "a.wav", sine(440, 1.0, rate), rate, subtype="FLOAT")
    audio = load_audio(tmp_path / "a.wav", normalize=None)
    assert len(audio) == 16000
    assert abs(peak_hz(audio, 16000) - 440) <= 1.0
    # 10 kHz is above the 8 kHz Nyquist limit of 16 kHz: a band-limited resampler drops it
    # instead of folding it down to 6 kHz
    sf.write(tmp_path / "b.wav", sine(10000, 1.0, rate), rate, subtype="FLOAT")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SilentAudioWarning)  # only the filter's edge ringing is left
        high = load_audio(tmp_path / "b.wav", normalize=None, allow_silence=True)
    assert len(high) == 16000 and dbfs(high[800:-800]) < -80


def test_stereo_mixed_to_mono(tmp_path):
    stereo = np.stack([sine(440, 0.5, 16000), np.zeros(8000, np.float32)], axis=1)
    sf.write(tmp_path / "s.wav", stereo, 16000, subtype="FLOAT")
    audio = load_audio(tmp_path / "s.wav", normalize=None)
    np.testing.assert_allclose(audio, stereo.mean(axis=1), atol=1e-6)


def test_loudness_normalisation(tmp_path):
    sf.write(tmp_path / "quiet.wav", sine(300, 1.0, 16000, amp=0.01), 16000)
    rms = load_audio(tmp_path / "quiet.wav")
    assert abs(dbfs(rms) + 20.0) < 0.01
    assert abs(dbfs(load_audio(tmp_path / "quiet.wav", target_dbfs=-30.0)) + 30.0) < 0.01
    peak = load_audio(tmp_path / "quiet.wav", normalize="peak")
    assert abs(20 * math.log10(np.abs(peak).max()) + 1.0) < 0.01
    # a lone click: reaching -20 dBFS RMS would clip it, so the gain stops at full scale
    click = np.zeros(16000, np.float32)
    click[100] = 0.1
    out = normalize_loudness(click, "rms")
    assert np.isclose(np.abs(out).max(), 1.0) and dbfs(out) < -20
    with pytest.raises(ValueError, match="'rms', 'peak' or None"):
        normalize_loudness(click, "lufs")


def test_fit_to_frames_and_frame_count():
    audio = np.ones(16000, np.float32)  # 1 s at 16 kHz = 25 frames at 25 fps (640 samples each)
    assert frames_for_audio(audio) == 25
    assert frames_for_audio(audio[:-1]) == 24
    cut = fit_to_frames(audio, 10)
    assert len(cut) == 6400 and np.all(cut == 1)
    padded = fit_to_frames(audio, 30)
    assert len(padded) == 19200 and np.all(padded[16000:] == 0) and np.all(padded[:16000] == 1)
    # NTSC rate: fractional samples per frame round up, so the frame count survives the round trip
    fps = 30000 / 1001
    for n in (1, 2, 3, 29, 30, 1001):
        assert frames_for_audio(fit_to_frames(audio, n, fps=fps), fps=fps) == n
    assert samples_for_frames(1, fps) == 534
    with pytest.raises(AudioError, match="shorter than one video frame"):
        frames_for_audio(audio[:639])
    with pytest.raises(ValueError, match="num_frames"):
        fit_to_frames(audio, 0)


def test_zero_mean_unit_var_matches_transformers():
    from transformers import Wav2Vec2FeatureExtractor

    audio = sine(200, 0.5, 16000, amp=0.3) + 0.1
    ref = Wav2Vec2FeatureExtractor(do_normalize=True)(audio, sampling_rate=16000).input_values[0]
    np.testing.assert_allclose(zero_mean_unit_var(audio), ref, atol=1e-5)


def test_missing_and_undecodable_files(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.wav: does not exist\. Pass the path of an audio file"):
        load_audio(tmp_path / "nope.wav")
    with pytest.raises(AudioError, match="is a folder"):
        load_audio(tmp_path)
    (tmp_path / "junk.wav").write_bytes(b"RIFF" + bytes(range(256)) * 4)
    with pytest.raises(AudioError, match=r"junk\.wav: cannot be decoded as audio .*`ffmpeg -i"):
        load_audio(tmp_path / "junk.wav")


def test_empty_file(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError, match=r"empty\.wav: contains no samples"):
        load_audio(tmp_path / "empty.wav")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_samples(tmp_path, bad):
    audio = sine(440, 0.5, 16000)
    audio[[10, 20]] = bad
    sf.write(tmp_path / "bad.wav", audio, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match=r"bad\.wav: 2 of 8000 samples are NaN or Inf.*Re-export"):
        load_audio(tmp_path / "bad.wav")


def test_silence_is_an_error_unless_allowed(tmp_path):
    sf.write(tmp_path / "quiet.wav", np.zeros(16000, np.float32), 16000)
    with pytest.raises(AudioError, match=r"quiet\.wav: the audio is silent.*allow_silence=True"):
        load_audio(tmp_path / "quiet.wav")
    with pytest.warns(SilentAudioWarning, match="Loaded as is"):
        audio = load_audio(tmp_path / "quiet.wav", allow_silence=True)
    assert len(audio) == 16000 and not np.any(audio)
    # just above the threshold is speech-level enough to load, without any warning
    sf.write(tmp_path / "soft.wav", sine(440, 1.0, 16000, amp=0.003), 16000, subtype="FLOAT")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert abs(dbfs(load_audio(tmp_path / "soft.wav")) + 20) < 0.01


def test_shorter_than_one_frame(tmp_path):
    sf.write(tmp_path / "blip.wav", sine(440, 0.03, 16000), 16000)  # 30 ms < 40 ms
    with pytest.raises(AudioError, match=r"blip\.wav: 30\.0 ms of audio is shorter than one video frame at 25"):
        load_audio(tmp_path / "blip.wav")
    assert len(load_audio(tmp_path / "blip.wav", fps=50)) == 480  # 20 ms frames are fine
