"""Video I/O: write -> read round trips (pixels, fps, audio), fps resampling, mov / mkv / webm
decoding, every error path, and the atomic write. Each test writes its own small files (64x64,
about two seconds), the foreign containers directly with PyAV."""

import os
from fractions import Fraction

import av
import numpy as np
import pytest

from mi_jax.data.video_io import (
    VideoError,
    nearest_frame_indices,
    probe,
    read_audio,
    read_clip,
    read_video,
    write_video,
)

# Thresholds for the lossy round trip of `moving_scene`. Luma (what H.264 at crf 18 preserves)
# measures ~43 dB here; 38 dB is still visually identical and leaves room for encoder versions.
# RGB PSNR is capped at ~32 dB by yuv420p's half-resolution chroma alone (a pure RGB -> yuv420p
# -> RGB conversion of this saturated scene measures 32.2 dB), so RGB only has to clear 29 dB.
MIN_LUMA_PSNR_DB = 38.0
MIN_RGB_PSNR_DB = 29.0


def moving_scene(num_frames, height=64, width=64):
    """uint8 [T, H, W, 3]: colour gradients plus a disc moving across, like a simple real video."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    t = np.arange(num_frames, dtype=np.float32)[:, None, None]
    cx = 12 + 40 * t / max(num_frames - 1, 1)
    disc = ((x - cx) ** 2 + (y - 32) ** 2) < 100
    r = np.broadcast_to(60 + 2.5 * x, disc.shape)
    g = np.broadcast_to(40 + 2.5 * y, disc.shape)
    b = 120 + 60 * np.sin(t / 5 + x / 20)
    frames = np.stack([np.where(disc, 230, r), np.where(disc, 200, g), np.where(disc, 40, b)], axis=-1)
    return frames.round().astype(np.uint8)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def luma_psnr(a, b):
    bt601 = np.array([0.299, 0.587, 0.114])
    return psnr(a.astype(np.float64) @ bt601, b.astype(np.float64) @ bt601)


def assert_close_pixels(decoded, original, min_luma=MIN_LUMA_PSNR_DB):
    assert luma_psnr(decoded, original) > min_luma
    assert psnr(decoded, original) > MIN_RGB_PSNR_DB


def sine(freq, seconds, rate=16000, amp=0.5):
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(audio, rate):
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return np.fft.rfftfreq(len(audio), 1 / rate)[np.argmax(spectrum)]


def index_frames(num_frames, step=4):
    """Flat frames whose grey level encodes the index (step levels apart, so H.264 can't blur it)."""
    return np.repeat((np.arange(num_frames) * step).astype(np.uint8), 64 * 64 * 3).reshape(num_frames, 64, 64, 3)


def write_with_pyav(path, fmt, video_codec, audio_codec=None, num_frames=40, fps=25, audio_rate=16000, video=True):
    """Writes `path` directly with PyAV (other containers / codecs than write_video's mp4)."""
    frames = moving_scene(num_frames)
    with av.open(str(path), "w", format=fmt) as container:
        vs = container.add_stream(video_codec, rate=Fraction(fps)) if video else None
        if vs is not None:
            vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
        a_stream = container.add_stream(audio_codec, rate=audio_rate, layout="mono") if audio_codec else None
        if a_stream is not None:
            audio = sine(440, max(num_frames, 25) / fps, audio_rate)
            frame = av.AudioFrame.from_ndarray(audio[None], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = audio_rate, 0
            container.mux(a_stream.encode(frame))
            container.mux(a_stream.encode())
        if vs is not None and num_frames:
            for i, image in enumerate(frames):
                picture = av.VideoFrame.from_ndarray(image, format="rgb24")
                picture.pts = i
                container.mux(vs.encode(picture))
        if vs is not None:
            container.mux(vs.encode())
    return frames


def test_round_trip_shape_fps_pixels(tmp_path):
    frames = moving_scene(50)
    path = tmp_path / "clip.mp4"
    write_video(path, frames, 25)
    video = read_video(path)
    assert video.frames.shape == frames.shape and video.frames.dtype == np.uint8
    assert video.fps == 25.0
    np.testing.assert_allclose(video.timestamps, np.arange(50) / 25, atol=1e-6)
    assert_close_pixels(video.frames, frames)
    info = probe(path)
    assert (info.width, info.height, info.fps, info.num_frames) == (64, 64, 25.0, 50)
    assert info.video_codec == "h264" and not info.has_audio


def test_non_integer_fps_and_streamed_frames(tmp_path):
    path = tmp_path / "ntsc.mp4"
    frames = moving_scene(30)
    write_video(path, iter(frames), 30000 / 1001)  # a generator: frames are streamed
    video = read_video(path)
    assert len(video.frames) == 30 and abs(video.fps - 29.97) < 0.01
    assert_close_pixels(video.frames, frames)


def test_audio_round_trip(tmp_path):
    path = tmp_path / "tone.mp4"
    audio = sine(440, 2.0)
    write_video(path, moving_scene(50), 25, audio, 16000)
    assert probe(path).audio_codec == "aac"
    decoded = read_audio(path, 16000)
    assert decoded.dtype == np.float32 and decoded.ndim == 1
    assert abs(len(decoded) - len(audio)) <= 160  # within 10 ms
    assert abs(peak_hz(decoded, 16000) - 440) < 2
    rms_in, rms_out = np.sqrt(np.mean(audio**2)), np.sqrt(np.mean(decoded**2))
    assert abs(rms_out / rms_in - 1) < 0.1
    # another requested rate resamples (soxr): same tone, proportionally more samples
    wide = read_audio(path, 44100)
    assert abs(len(wide) - 2.0 * 44100) <= 441 and abs(peak_hz(wide, 44100) - 440) < 2


def test_audio_stays_in_sync(tmp_path):
    # clicks at known times must come back at the same sample (AAC priming must be compensated)
    audio = np.zeros(32000, np.float32)
    clicks = [4000, 16000, 27000]
    for c in clicks:
        audio[c : c + 160] = np.sin(2 * np.pi * 1000 * np.arange(160) / 16000)
    path = tmp_path / "sync.mp4"
    write_video(path, moving_scene(50), 25, audio)
    decoded = read_audio(path)
    loud = np.flatnonzero(np.abs(decoded) > 0.3)
    onsets = [loud[0]] + [b for a, b in zip(loud[:-1], loud[1:]) if b - a > 1000]
    assert len(onsets) == 3
    assert all(abs(o - c) <= 16 for o, c in zip(onsets, clicks))  # within 1 ms


def test_audio_is_fitted_to_the_video_length(tmp_path):
    path = tmp_path / "long_audio.mp4"
    write_video(path, moving_scene(25), 25, sine(300, 3.0))  # 1 s of video, 3 s of audio
    video, audio = read_clip(path, fps=25, sample_rate=16000)
    assert len(video.frames) == 25 and audio.shape == (16000,)
    assert abs(len(read_audio(path)) - 16000) <= 160


def test_read_clip_aligns_audio_to_a_late_first_frame(tmp_path):
    # mkv whose first video frame is at 0.2 s while the audio starts at 0 s; a click at 0.6 s
    path = tmp_path / "late.mkv"
    audio = np.zeros(32000, np.float32)
    audio[9600:9760] = np.sin(2 * np.pi * 1000 * np.arange(160) / 16000)
    with av.open(str(path), "w", format="matroska") as container:
        vs = container.add_stream("libx264", rate=Fraction(25))
        vs.width, vs.height, vs.pix_fmt = 64, 64, "yuv420p"
        a_stream = container.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(audio[None], format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 16000, 0
        container.mux(a_stream.encode(frame))
        container.mux(a_stream.encode())
        for i, image in enumerate(index_frames(40)):
            picture = av.VideoFrame.from_ndarray(image, format="rgb24")
            picture.pts = i + 5
            container.mux(vs.encode(picture))
        container.mux(vs.encode())
    video, clip_audio = read_clip(path)
    assert abs(video.start - 0.2) < 1e-6 and video.timestamps[0] == 0.0 and len(video.frames) == 40
    assert clip_audio.shape == (25600,)
    onset = np.flatnonzero(np.abs(clip_audio) > 0.3)[0]
    assert abs(onset - 6400) <= 16  # 0.4 s after the first frame


@pytest.mark.parametrize("source_fps, target_fps", [(30, 25), (25, 30), (25, 12.5)])
def test_fps_resampling_nearest_frame(tmp_path, source_fps, target_fps):
    frames = index_frames(60)
    path = tmp_path / "index.mp4"
    write_video(path, frames, source_fps)
    video = read_video(path, fps=target_fps)
    expected_count = int(60 * target_fps / source_fps)
    assert video.frames.shape == (expected_count, 64, 64, 3) and video.fps == target_fps
    got = np.round(video.frames[:, 32, 32, 0] / 4).astype(int)
    # nearest source frame to j / target_fps, ties (25 -> 30 has them) to the earlier frame
    expected = np.ceil(np.arange(expected_count) * source_fps / target_fps - 0.5 - 1e-9).astype(int)
    np.testing.assert_array_equal(got, np.minimum(expected, 59))  # integer frame indices
    # integer frame indices
    np.testing.assert_array_equal(nearest_frame_indices(np.arange(60) / source_fps, target_fps, source_fps), got)


def test_nearest_frame_indices_variable_rate():
    # a stall (frame 2 shown for 0.1 s) repeats it; ties go to the earlier frame
    times = np.array([0.0, 0.04, 0.08, 0.18, 0.22])
    # integer frame indices
    np.testing.assert_array_equal(nearest_frame_indices(times, 50, 25), [0, 0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4, 4])
    assert len(nearest_frame_indices(times, 25, 25)) == 6


def test_max_frames(tmp_path):
    path = tmp_path / "clip.mp4"
    write_video(path, index_frames(20), 25)
    assert len(read_video(path, max_frames=7).frames) == 7
    assert len(read_video(path, fps=50, max_frames=9).frames) == 9
    assert len(read_video(path, fps=100, max_frames=30).frames) == 30  # counts output frames


@pytest.mark.parametrize(
    "ext, fmt, video_codec, audio_codec, audio_rate",
    [
        ("mov", "mov", "libx264", "aac", 16000),
        ("mkv", "matroska", "libx264", "aac", 16000),
        ("webm", "webm", "libvpx-vp9", "libopus", 48000),
        ("webm", "webm", "libvpx", "libopus", 48000),  # VP8
    ],
)
def test_other_containers_decode(tmp_path, ext, fmt, video_codec, audio_codec, audio_rate):
    path = tmp_path / f"clip_{video_codec}.{ext}"
    frames = write_with_pyav(path, fmt, video_codec, audio_codec, audio_rate=audio_rate)
    video = read_video(path)
    assert video.frames.shape == frames.shape and video.fps == 25.0
    assert_close_pixels(video.frames, frames, min_luma=30.0)  # VP8/VP9 at default bitrates: lossier
    assert len(read_video(path, fps=12.5).frames) == 20
    audio = read_audio(path, 16000)
    assert abs(len(audio) - 1.6 * 16000) <= 0.02 * 16000  # opus / aac framing: within 20 ms
    assert abs(peak_hz(audio, 16000) - 440) < 2


def test_error_missing_file_and_folder(tmp_path):
    with pytest.raises(VideoError, match=r"missing\.mp4: does not exist"):
        read_video(tmp_path / "missing.mp4")
    with pytest.raises(VideoError, match="is a folder"):
        read_audio(tmp_path)
    with pytest.raises(VideoError, match="does not exist; create it"):
        write_video(tmp_path / "no" / "such" / "dir.mp4", index_frames(2), 25)


@pytest.mark.parametrize("content", [b"", b"this is not a video\n" * 50, bytes(range(256)) * 40])
def test_error_undecodable(tmp_path, content):
    path = tmp_path / "broken.mp4"
    path.write_bytes(content)
    for read in (read_video, read_audio, probe):
        with pytest.raises(VideoError, match=r"broken\.mp4: cannot be decoded as a video.*Re-download"):
            read(path)


def test_error_truncated(tmp_path):
    path = tmp_path / "cut.mp4"
    write_video(path, moving_scene(50), 25)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    # moov is at the front (faststart): the header parses, the frames run out or break
    try:
        video = read_video(path)
    except VideoError as e:
        assert "cut.mp4" in str(e) and ("corrupt" in str(e) or "zero decodable" in str(e))
    else:
        assert len(video.frames) < 50


def test_error_no_video_stream(tmp_path):
    path = tmp_path / "voice.mp4"
    write_with_pyav(path, "mp4", None, "aac", video=False)
    with pytest.raises(VideoError, match=r"voice\.mp4: has no video stream \(streams: audio\).*load_audio"):
        read_video(path)
    assert len(read_audio(path)) > 0  # the audio of an audio-only file is still readable


def test_error_zero_frames(tmp_path):
    path = tmp_path / "empty_video.mkv"
    write_with_pyav(path, "matroska", "libx264", "aac", num_frames=0)
    assert probe(path).width == 64
    with pytest.raises(VideoError, match=r"empty_video\.mkv: the video stream contains zero decodable frames"):
        read_video(path)


def test_no_audio_track_is_explicit(tmp_path):
    path = tmp_path / "silent.mp4"
    write_video(path, index_frames(5), 25)
    with pytest.raises(VideoError, match=r"silent\.mp4: has no audio track.*allow_missing=True"):
        read_audio(path)
    assert read_audio(path, allow_missing=True) is None
    video, audio = read_clip(path, allow_missing_audio=True)
    assert audio is None and len(video.frames) == 5


def test_write_rejects_bad_input(tmp_path):
    path = tmp_path / "bad.mp4"
    with pytest.raises(VideoError, match=r"odd.*pad_odd=True"):
        write_video(path, np.zeros((3, 63, 64, 3), np.uint8), 25)
    with pytest.raises(VideoError, match="uint8"):
        write_video(path, np.zeros((3, 64, 64, 3), np.float32), 25)
    with pytest.raises(VideoError, match="no frames"):
        write_video(path, np.zeros((0, 64, 64, 3), np.uint8), 25)
    with pytest.raises(VideoError, match="frame 1 has shape"):
        write_video(path, [np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32, 3), np.uint8)], 25)
    with pytest.raises(VideoError, match="NaN"):
        write_video(path, index_frames(3), 25, np.full(1000, np.nan, np.float32))
    with pytest.raises(VideoError, match="fps"):
        write_video(path, index_frames(3), 0)
    assert os.listdir(tmp_path) == []


def test_write_pads_odd_sizes_when_asked(tmp_path):
    path = tmp_path / "odd.mp4"
    frames = moving_scene(10, height=63, width=61)
    write_video(path, frames, 25, pad_odd=True)
    video = read_video(path)
    assert video.frames.shape == (10, 64, 62, 3)
    assert_close_pixels(video.frames[:, :63, :61], frames)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    def frames_then_crash():
        yield from moving_scene(10)
        raise RuntimeError("renderer crashed")

    path = tmp_path / "out.mp4"
    with pytest.raises(RuntimeError, match="renderer crashed"):
        write_video(path, frames_then_crash(), 25, sine(440, 1.0))
    assert os.listdir(tmp_path) == []  # neither the destination nor a temporary file

    # a failed overwrite keeps the previous complete file untouched
    write_video(path, index_frames(5), 25)
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        write_video(path, frames_then_crash(), 25)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["out.mp4"]
    assert len(read_video(path).frames) == 5


def test_atomic_write_interrupted(tmp_path, monkeypatch):
    # a failure inside the muxer itself (e.g. disk full) behaves the same
    path = tmp_path / "out.mp4"
    real_mux = av.container.OutputContainer.mux
    calls = []

    def failing_mux(self, packets):
        calls.append(1)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        return real_mux(self, packets)

    monkeypatch.setattr(av.container.OutputContainer, "mux", failing_mux)
    with pytest.raises(OSError, match="No space left"):
        write_video(path, moving_scene(20), 25)
    assert os.listdir(tmp_path) == []
