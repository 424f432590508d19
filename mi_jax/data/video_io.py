"""Video files: decode mp4 / mov / webm / mkv to RGB frames, read their audio track, and write
H.264 + AAC mp4 files atomically.

Decoding and encoding are FFmpeg through PyAV (`av`, whose wheels bundle FFmpeg with libx264,
AAC, VP8/VP9 and Opus), so any container and codec FFmpeg reads works; the four above are the
ones tested.

Frame-rate resampling (`read_video(path, fps=...)`) is nearest-frame by timestamps: the source
spans `duration = t_last - t_first + 1 / source_fps` seconds and becomes
`floor(duration * fps)` output frames (at least 1); output frame j is the source frame whose
presentation time (relative to the first frame) is nearest to `j / fps`, the earlier one on a
tie. Frames are never blended, so no ghosting; 30 -> 25 fps drops every sixth frame, 25 -> 30
repeats every fifth.

Audio (`read_audio`) is decoded, averaged to mono (like `audio_io.load_audio`), aligned to the
container's time zero (a track that starts late is padded with leading silence) and resampled
with libsoxr (`audio_io.resample`). A file without an audio track is an error unless
`allow_missing=True`, which returns None instead. `read_clip` gives both for training: frames
at the model's fps and the audio from the first frame on, fitted to exactly those frames.

`write_video` writes to a temporary file in the destination folder and renames it into place
(`os.replace`, atomic on POSIX), so the destination is either the complete old file or the
complete new one, never a partial file, also when encoding fails or is interrupted.
"""

from __future__ import annotations

import itertools
import math
import numbers
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple

import av
import numpy as np

from mi_jax.data.audio_io import FPS, SAMPLE_RATE, fit_to_frames, resample, samples_for_frames

VIDEO_EXTENSIONS = (".mp4", ".mov", ".webm", ".mkv")


class VideoError(ValueError):
    """The video cannot be used as asked; the message names the file, the problem and the fix."""


class Video(NamedTuple):
    """Decoded video. frames: uint8 [T, H, W, 3] RGB; fps: frames per second; timestamps:
    float64 [T], seconds of each frame from the first one (`j / fps` after resampling); start:
    seconds of the first frame on the container's timeline (where `read_audio`'s sample 0 is 0 s)."""

    frames: np.ndarray
    fps: float
    timestamps: np.ndarray
    start: float = 0.0


@dataclass(frozen=True)
class VideoInfo:
    """Container metadata, read without decoding. `num_frames` is the container's count (0 when
    the format does not store one, e.g. mkv / webm); `duration` is in seconds (0 when unknown)."""

    path: str
    width: int
    height: int
    fps: float
    num_frames: int
    duration: float
    video_codec: str
    audio_codec: str | None
    audio_sample_rate: int | None

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None


def _rational(fps: float) -> Fraction:
    # exact rational rate, so 30000/1001 (29.97) gives exact pts arithmetic in the encoder
    if not (isinstance(fps, numbers.Real) and math.isfinite(fps) and fps > 0):
        raise VideoError(f"fps must be a positive finite number, got {fps!r}.")
    return Fraction(float(fps)).limit_denominator(10_000)


def _open(path: str | os.PathLike):
    """Opens `path` for reading; VideoError for a missing file or one FFmpeg cannot parse."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "is a folder" if os.path.isdir(path) else "does not exist"
        raise VideoError(f"{path}: {what}. Pass the path of a video file ({', '.join(VIDEO_EXTENSIONS)}).")
    try:
        return av.open(path)
    except av.FFmpegError as e:
        raise VideoError(
            f"{path}: cannot be decoded as a video ({e.strerror or e}); the file is corrupt, truncated "
            "or not a video. Re-download or re-export it, or check it with `ffprobe`."
        ) from None


def _video_stream(container, path: str):
    if not container.streams.video:
        kinds = sorted({s.type for s in container.streams}) or ["none"]
        raise VideoError(
            f"{path}: has no video stream (streams: {', '.join(kinds)}). Pass a file with video; "
            "an audio-only file goes to `audio_io.load_audio` instead."
        )
    return container.streams.video[0]


def _stream_fps(stream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def probe(path: str | os.PathLike) -> VideoInfo:
    """Reads the container metadata of the first video stream and the first audio stream."""
    path = os.fspath(path)
    with _open(path) as container:
        video = _video_stream(container, path)
        audio = container.streams.audio[0] if container.streams.audio else None
        return VideoInfo(
            path=path,
            width=video.codec_context.width,
            height=video.codec_context.height,
            fps=_stream_fps(video),
            num_frames=int(video.frames or 0),
            duration=float(container.duration or 0) / 1_000_000,  # AV_TIME_BASE is microseconds
            video_codec=video.codec_context.name,
            audio_codec=audio.codec_context.name if audio is not None else None,
            audio_sample_rate=audio.codec_context.sample_rate if audio is not None else None,
        )


def _decoded_frames(container, stream, path: str) -> Iterator[tuple[float | None, np.ndarray]]:
    """(presentation time in seconds or None, uint8 [H, W, 3] RGB) per decoded frame."""
    count = 0
    try:
        for frame in container.decode(stream):
            count += 1
            yield frame.time, frame.to_ndarray(format="rgb24")
    except av.FFmpegError as e:
        raise VideoError(
            f"{path}: decoding failed after {count} frames ({e.strerror or e}); the file is corrupt or "
            "truncated. Re-download or re-export it."
        ) from None


def _nearest_select(decoded, fps: float, source_fps: float) -> Iterator[np.ndarray]:
    """Streams the nearest-timestamp selection described in the module docstring, holding one
    source frame at a time (downsampling a long 60 fps video never keeps the dropped frames)."""
    step = 1.0 / fps
    prev_time = prev = t0 = None
    j = 0
    for i, (time, image) in enumerate(decoded):
        time = i / source_fps if time is None else time
        if t0 is None:
            t0 = time
        time -= t0
        if prev is not None:
            # output time j*step goes to `prev` while it is at least as close as this frame; the
            # tolerance makes exact ties (25 -> 30 fps has them) go to the earlier frame despite
            # float rounding of the timestamps
            while j * step - prev_time <= time - j * step + 1e-9:
                yield prev
                j += 1
        prev_time, prev = time, image
    if prev is None:
        return
    # the last source frame lasts one source frame period
    total = max(1, math.floor((prev_time + 1.0 / source_fps) * fps + 1e-6))
    while j < total:
        yield prev
        j += 1


def nearest_frame_indices(timestamps: np.ndarray, fps: float, source_fps: float) -> np.ndarray:
    """Source frame index of each output frame under the module docstring's nearest-frame rule.

    timestamps: [N] seconds of the source frames (increasing). Returns int64 [M]."""
    timestamps = np.asarray(timestamps, np.float64)
    chosen = _nearest_select(((t, i) for i, t in enumerate(timestamps)), fps, source_fps)
    return np.fromiter(chosen, np.int64)


def read_video(path: str | os.PathLike, fps: float | None = None, *, max_frames: int | None = None) -> Video:
    """Decodes the first video stream of `path` to uint8 RGB frames [T, H, W, 3].

    fps: None keeps every decoded frame (and reports the stream's average rate); a number
    resamples to that rate (module docstring). max_frames: stop after that many output frames.
    Raises VideoError for a missing, corrupt or truncated file, no video stream, or no frames.
    """
    path = os.fspath(path)
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        source_fps = _stream_fps(stream)
        decoded = _decoded_frames(container, stream, path)
        first = next(decoded, None)
        if first is None:
            raise VideoError(
                f"{path}: the video stream contains zero decodable frames. Re-export the video; check it "
                "with `ffprobe -count_frames`."
            )
        start = first[0] or 0.0
        decoded = itertools.chain([first], decoded)
        if fps is None:
            times, frames = [], []
            for time, image in itertools.islice(decoded, max_frames):
                times.append(len(times) / (source_fps or 1.0) if time is None else time - start)
                frames.append(image)
            timestamps = np.asarray(times, np.float64)
            if not source_fps and len(times) > 1:
                source_fps = 1.0 / float(np.median(np.diff(timestamps)))
            out_fps = source_fps or 1.0
        else:
            out_fps = float(_rational(fps))
            if not source_fps:
                raise VideoError(f"{path}: the video stream has no frame rate, so it cannot be resampled; re-mux it.")
            frames = list(itertools.islice(_nearest_select(decoded, out_fps, source_fps), max_frames))
            timestamps = np.arange(len(frames)) / out_fps
    return Video(np.stack(frames), float(out_fps), timestamps, float(start))


def read_audio(
    path: str | os.PathLike, sample_rate: int = SAMPLE_RATE, *, allow_missing: bool = False
) -> np.ndarray | None:
    """Reads the first audio track of a video (or audio) file as mono float32 [samples] at
    `sample_rate`, sample 0 at the container's time zero. Not loudness-normalised.

    No audio track: VideoError, or None with `allow_missing=True`. Raises VideoError for a
    missing / corrupt file or an audio track with no samples."""
    path = os.fspath(path)
    with _open(path) as container:
        if not container.streams.audio:
            if allow_missing:
                return None
            raise VideoError(
                f"{path}: has no audio track. Supply the audio separately (e.g. a wav via "
                "`audio_io.load_audio`), or pass allow_missing=True to get None."
            )
        stream = container.streams.audio[0]
        # planar float keeps the channel layout, so channels are averaged exactly as load_audio does
        to_float = av.AudioResampler(format="fltp")
        chunks, start, rate = [], None, None
        try:
            for frame in container.decode(stream):
                if start is None:
                    start, rate = frame.time or 0.0, frame.sample_rate
                chunks.extend(f.to_ndarray() for f in to_float.resample(frame))
        except av.FFmpegError as e:
            raise VideoError(
                f"{path}: decoding the audio track failed ({e.strerror or e}); the file is corrupt or "
                "truncated. Re-download or re-export it."
            ) from None
        duration = float(stream.duration * stream.time_base) if stream.duration else None
    if not chunks or sum(c.shape[1] for c in chunks) == 0:
        raise VideoError(f"{path}: the audio track contains no samples. Re-export the file with its audio.")
    audio = np.concatenate(chunks, axis=1).mean(axis=0)
    offset = round(start * rate)
    audio = np.pad(audio, (offset, 0)) if offset > 0 else audio[-offset:]
    if duration is not None:
        # AAC pads its last frame to 1024 samples; the container records the true length
        audio = audio[: max(1, round((duration + max(start, 0.0)) * rate))]
    return np.ascontiguousarray(resample(audio, rate, sample_rate), dtype=np.float32)


def read_clip(
    path: str | os.PathLike,
    fps: float = FPS,
    sample_rate: int = SAMPLE_RATE,
    *,
    allow_missing_audio: bool = False,
) -> tuple[Video, np.ndarray | None]:
    """Frames resampled to `fps` and the audio track from the first frame's time on, fitted
    (`audio_io.fit_to_frames`: cut, or padded with silence) to exactly the samples those frames
    span. Audio is None only when the file has none and `allow_missing_audio=True`."""
    video = read_video(path, fps)
    audio = read_audio(path, sample_rate, allow_missing=allow_missing_audio)
    if audio is not None:
        # a video starting late: the audio before its first frame is dropped (or silence added)
        skip = round(video.start * sample_rate)
        audio = audio[skip:] if skip > 0 else np.pad(audio, (-skip, 0))
        audio = fit_to_frames(audio, len(video.frames), video.fps, sample_rate)
    return video, audio


def _check_frame(frame, shape, path: str, index: int) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
        raise VideoError(
            f"{path}: frame {index} is {frame.dtype} {frame.shape}; write_video needs uint8 [H, W, 3] RGB "
            "frames (convert floats in [0, 1] with `(np.clip(x, 0, 1) * 255).round().astype(np.uint8)`)."
        )
    if shape is not None and frame.shape != shape:
        raise VideoError(
            f"{path}: frame {index} has shape {frame.shape}, the first frame {shape}; all frames must match."
        )
    return frame


def _even(frame: np.ndarray, pad_odd: bool, path: str) -> np.ndarray:
    h, w = frame.shape[:2]
    if h % 2 == 0 and w % 2 == 0:
        return frame
    if not pad_odd:
        raise VideoError(
            f"{path}: frame size {h}x{w} (HxW) is odd; H.264 in yuv420p needs even sizes. Crop or resize "
            "the frames to even sizes, or pass pad_odd=True to repeat the last row / column."
        )
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray | Iterable[np.ndarray],
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = SAMPLE_RATE,
    *,
    crf: int = 18,
    preset: str = "medium",
    pad_odd: bool = False,
) -> None:
    """Encodes H.264 (yuv420p) video with optional AAC mono audio into an mp4 at `path`, atomically.

    frames: uint8 [T, H, W, 3] RGB, or an iterable of uint8 [H, W, 3] frames (streamed, never
    stacked in memory). H and W must be even unless `pad_odd=True`. audio: float [samples] at
    `sample_rate`, in [-1, 1] (values outside are clipped); it is cut, or padded with silence, to
    the samples the frames span (`audio_io.fit_to_frames`). crf / preset: libx264 quality (lower
    crf = better; 18 is visually near-lossless) and speed.
    """
    path = os.fspath(path)
    rate = _rational(fps)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise VideoError(f"{path}: the folder {folder} does not exist; create it first.")
    if audio is not None:
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1 or audio.size == 0:
            raise VideoError(
                f"{path}: audio must be mono float [samples] with at least one sample, got shape {audio.shape}."
            )
        if not np.all(np.isfinite(audio)):
            raise VideoError(f"{path}: the audio contains NaN or Inf samples; fix the audio before writing.")
        # clipped to [-1, 1] per frame in `_encode_audio`, not copied whole (long videos)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    container = None
    try:
        container = av.open(tmp, "w", format="mp4", options={"movflags": "+faststart"})
        video = audio_stream = None
        shape = None
        count = 0
        for count, frame in enumerate(frames, start=1):
            frame = _check_frame(frame, shape, path, count - 1)
            if video is None:
                shape = frame.shape
                h, w = _even(frame, pad_odd, path).shape[:2]
                video = container.add_stream("libx264", rate=rate, options={"crf": str(crf), "preset": preset})
                video.width, video.height, video.pix_fmt = w, h, "yuv420p"
                if audio is not None:
                    audio_stream = container.add_stream("aac", rate=sample_rate, layout="mono")
            # converted here, not by the encoder: PyAV's implicit rgb24 -> yuv420p conversion inside
            # `encode` is not repeatable (the same frames gave different files), this one is
            picture = av.VideoFrame.from_ndarray(_even(frame, pad_odd, path), format="rgb24").reformat(format="yuv420p")
            picture.pts = count - 1
            container.mux(video.encode(picture))
            if audio_stream is not None:
                # this frame's slice of audio, so the two streams interleave in the file
                begin = samples_for_frames(count - 1, fps, sample_rate)
                end = samples_for_frames(count, fps, sample_rate)
                _encode_audio(container, audio_stream, audio[begin:end], begin, end, sample_rate)
        if video is None:
            raise VideoError(f"{path}: no frames given; write_video needs at least one frame.")
        container.mux(video.encode())
        if audio_stream is not None:
            container.mux(audio_stream.encode())
        container.close()
        container = None
        os.replace(tmp, path)
    except av.FFmpegError as e:
        raise VideoError(f"{path}: encoding failed ({e.strerror or e}). Nothing was written.") from e
    finally:
        if container is not None:
            try:
                container.close()
            except Exception:  # the original error matters, not a second one from closing a broken file
                pass
        if os.path.exists(tmp):
            os.unlink(tmp)


def _encode_audio(container, stream, chunk: np.ndarray, begin: int, end: int, sample_rate: int) -> None:
    if end <= begin:
        return
    chunk = np.pad(np.clip(chunk, -1.0, 1.0), (0, end - begin - len(chunk)))  # audio shorter than the video: silence
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk[None]), format="fltp", layout="mono")
    frame.sample_rate, frame.pts = sample_rate, begin
    container.mux(stream.encode(frame))
