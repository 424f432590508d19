"""Quality metrics of generated talking-head videos against the synthetic world's ground truth
(`mi_jax.data.synthetic`). Plain numpy (+ OpenCV for sub-pixel crops); no model weights.

A generated video is uint8 frames [T, H, W, 3] at the truth's fps, made from a truth clip's
portrait (its first frame) and audio. Every metric is also measured on the truth's own
rendering with the same code, so a result reads as a fraction of the renderer's.

Where the face is: the generated head need not follow the truth's motion, so by default
(`box_mode="track"`) the truth's frame-0 face / mouth boxes are moved by the head's measured
displacement: the centre of mass of the head silhouette (pixels whose colour differs from the
background's, estimated per row from the frame's leftmost and rightmost columns; see
`head_centres`), relative to the video's first frame (which the sampler conditions on the portrait).
`box_mode="truth"` uses the truth's per-frame boxes instead (exact only for videos that follow
the driving motion, e.g. the renderer's). The eye band box follows the head the same way. Either
way the mouth and eye boxes are enlarged by `box_margin` (default 10 %) of their size on each side,
to absorb tracking error; the face box is not.

Metrics (per video; `evaluate` adds the renderer's values and a summary over videos):

1. Lip sync: the audio envelope (`synthetic.mouth_envelope`: per-frame RMS, [1, 2, 1] / 4
   smoothed) against `synthetic.measure_mouth_open` in the mouth box; the Pearson correlation at
   the best offset in [-max_offset, max_offset] frames. Offset k > 0: the mouth moves k frames
   after the audio. Optionally a SyncNet confidence from a user-supplied callable.
2. Identity: per frame, 1 - mean |crop - reference crop| / 255 over the face ellipse without
   the mouth box, crops resampled to CROP x CROP pixels; drift = relative drop of its mean from
   the first to the last window (`identity_drift`).
3. Face detail: mean luma gradient magnitude in the eye band box (`eye_detail`); a blurred or
   eyeless face has almost none, unlike identity similarity, which such a face still scores ~0.9.
4. Colour shift: dE76 between the mean CIE Lab colour of the face region in the first and the
   last window (`colour_shift`).
5. Window seams: mean |frame difference| at given boundary frames / the same elsewhere.
6. Text control: variance of the head centre's vertical / horizontal motion.
7. Two-speaker routing: each mouth's correlation with its own stream minus the other's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from mi_jax.data import synthetic
from mi_jax.data.video_io import read_video

CROP = 32  # identity crops are resampled to CROP x CROP pixels
BOX_MODES = ("track", "truth")

# SyncNet hook: (frames uint8 [T, H, W, 3], audio float32 [N], fps, sample_rate, face_boxes [T, 4]) -> confidence
SyncNetFn = Callable[..., float]


@dataclass(frozen=True)
class Truth:
    """Ground truth of the clip that drove a generation (S speakers, T frames, N samples).

    frames: uint8 [T, H, W, 3], the renderer's video (frames[0] is the portrait);
    speaker_audio: float32 [S, N]; face_boxes, mouth_boxes, eye_boxes: float32 [S, T, 4]
    (x0, y0, x1, y1). eye_boxes is None for folders saved before clips had them (no face detail)."""

    frames: np.ndarray
    speaker_audio: np.ndarray
    face_boxes: np.ndarray
    mouth_boxes: np.ndarray
    eye_boxes: np.ndarray | None
    actions: tuple[str, ...]
    prompt: str
    seed: int
    fps: float
    sample_rate: int
    name: str

    @classmethod
    def from_clip(cls, clip: synthetic.Clip, name: str | None = None) -> Truth:
        """The truth of a synthetic clip (default name from its seed and prompt)."""
        return cls(clip.frames, clip.speaker_audio, clip.face_boxes, clip.mouth_boxes, clip.eye_boxes,
                   tuple(clip.actions), clip.prompt, clip.seed, clip.fps, clip.sample_rate,
                   name or _default_name(clip.seed, clip.prompt))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Truth:
        """A folder written by `synthetic.Clip.save` (frames decoded from its clip.mp4)."""
        meta, arrays = synthetic.load_truth(folder)
        frames = read_video(os.path.join(folder, "clip.mp4"), meta["fps"]).frames
        return cls(frames, arrays["speaker_audio"], arrays["face_boxes"], arrays["mouth_boxes"],
                   arrays.get("eye_boxes"), tuple(meta["actions"]), meta["prompt"], meta["seed"], meta["fps"],
                   meta["sample_rate"], os.path.basename(os.path.normpath(folder)))

    @property
    def speakers(self) -> int:
        """The number of speakers (audio tracks)."""
        return len(self.speaker_audio)


def _default_name(seed: int, prompt: str) -> str:
    slug = "_".join(prompt.lower().split())[:40]
    return f"seed_{seed}" + (f"_{slug}" if slug else "")


# ----------------------------------------------------------------------------- basics


def _check_frames(frames, what: str = "frames") -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{what} must be uint8 [T, H, W, 3] RGB, got {frames.dtype} {frames.shape}; convert "
                         "floats in [0, 1] with `(np.clip(x, 0, 1) * 255).round().astype(np.uint8)`.")
    return frames


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two [T] series; 0.0 when either is constant (nothing co-varies)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    a, b = a - a.mean(), b - b.mean()
    norm = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / norm if norm > 1e-12 else 0.0


def best_offset_correlation(envelope: np.ndarray, mouth: np.ndarray, max_offset: int = 5) -> tuple[float, int]:
    """The lip-sync correlation: the best Pearson correlation over small lags, and that lag.

    Args:
      envelope: the audio envelope per video frame, `[T]`.
      mouth: the mouth opening per video frame, `[T]`.
      max_offset: lags k in [-max_offset, max_offset] frames are searched (default 5), over the
        overlapping frames only.

    Returns:
      `(correlation, k)`: the highest correlation of envelope[t] with mouth[t + k] and its k;
      ties go to the smaller |k|. k > 0 means the mouth moves k frames after the audio.

    Raises:
      ValueError: inputs that are not both `[T]`, or `max_offset` outside [0, T - 3].
    """
    envelope, mouth = np.asarray(envelope), np.asarray(mouth)
    if envelope.shape != mouth.shape or envelope.ndim != 1:
        raise ValueError(f"envelope and mouth must both be [T], got {envelope.shape} and {mouth.shape}.")
    if int(max_offset) != max_offset or not 0 <= max_offset <= len(envelope) - 3:
        raise ValueError(f"max_offset must be an integer in [0, T - 3] = [0, {len(envelope) - 3}], got "
                         f"{max_offset}; use a smaller offset or a longer video.")
    best, best_k = -math.inf, 0
    for k in sorted(range(-max_offset, max_offset + 1), key=lambda k: (abs(k), k)):
        n = len(envelope) - abs(k)
        r = pearson(envelope[:n], mouth[k:]) if k >= 0 else pearson(envelope[-k:], mouth[:n])
        if r > best:
            best, best_k = r, k
    return best, best_k


def audio_envelope(audio: np.ndarray, num_frames: int, fps: float, sample_rate: int) -> np.ndarray:
    """float32 [num_frames] in [0, 1] from audio float [N]: `synthetic.mouth_envelope`, the very
    function that drives the renderer's mouths, so the renderer scores ~1 by construction."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [N], got shape {audio.shape}; pass one speaker's stream.")
    return synthetic.mouth_envelope(audio, num_frames, fps, sample_rate)


# ----------------------------------------------------------------------------- head tracking


def head_centres(frames: np.ndarray, panels: int = 1) -> np.ndarray:
    """float64 [P, T, 2] (x, y): centre of mass of the head silhouette in each of `panels` equal
    vertical strips of the frame (one per speaker, as synthetic lays them out).

    Silhouette weight = clip((|rgb - background| - 25) / 30, 0, 1): the synthetic world keeps
    skin >= 90 RGB units from the background, and codec noise is far below 25. The background
    is the per-row median over all frames of the first and last columns (a row gradient stays
    exact; a head touching an edge in a few frames is outvoted)."""
    frames = _check_frames(frames)
    t, h, w, _ = frames.shape
    background = np.median(frames[:, :, [0, -1]].astype(np.float32), axis=(0, 2))  # [H, 3]
    ys, out = np.arange(h, dtype=np.float64) + 0.5, np.zeros((panels, t, 2))
    for p in range(panels):
        x0, x1 = round(p * w / panels), round((p + 1) * w / panels)
        xs = np.arange(x0, x1, dtype=np.float64) + 0.5
        for s in range(0, t, 64):  # chunks bound the float temporaries
            d = np.linalg.norm(frames[s : s + 64, :, x0:x1].astype(np.float32) - background[:, None], axis=-1)
            weight = np.clip((d - 25.0) / 30.0, 0.0, 1.0).astype(np.float64)  # [t, H, Wp]
            mass = np.maximum(weight.sum((1, 2)), 1e-9)
            out[p, s : s + 64, 0] = weight.sum(1) @ xs / mass
            out[p, s : s + 64, 1] = weight.sum(2) @ ys / mass
    return out


def enlarge(boxes: np.ndarray, margin: float) -> np.ndarray:
    """boxes [..., 4] (x0, y0, x1, y1) grown by `margin` x their width / height on each side."""
    boxes = np.asarray(boxes, np.float64)
    pad = margin * (boxes[..., 2:] - boxes[..., :2])
    return np.concatenate([boxes[..., :2] - pad, boxes[..., 2:] + pad], axis=-1)


def tracked_boxes(box0: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """[T, 4]: box0 [4] moved by the head's displacement centres [T, 2] - centres[0]."""
    shift = np.asarray(centres, np.float64) - centres[0]
    return np.asarray(box0, np.float64)[None] + np.concatenate([shift, shift], axis=1)


def head_motion(centres: np.ndarray) -> dict:
    """Variance (px^2) of the head centre's vertical and horizontal motion from centres [T, 2]
    (or [P, T, 2], averaged over heads), and their ratio: > 1 for nodding, < 1 for shaking."""
    c = np.asarray(centres, np.float64).reshape(-1, np.shape(centres)[-2], 2)
    vertical, horizontal = float(c[..., 1].var(axis=1).mean()), float(c[..., 0].var(axis=1).mean())
    return {"vertical_var": vertical, "horizontal_var": horizontal, "ratio": vertical / max(horizontal, 1e-9)}


# ----------------------------------------------------------------------------- metrics


def mouth_opening(frames: np.ndarray, mouth_boxes: np.ndarray) -> np.ndarray:
    """float32 [T]: `synthetic.measure_mouth_open` (dark-interior fraction of the box) of frames
    uint8 [T, H, W, 3] in mouth_boxes [T, 4]; monotone in the opening, compare by correlation."""
    return synthetic.measure_mouth_open(_check_frames(frames), mouth_boxes)


def identity_similarity(frames: np.ndarray, reference: np.ndarray, face_boxes: np.ndarray,
                        reference_face_box: np.ndarray, mouth_box: np.ndarray) -> np.ndarray:
    """float32 [T] in [0, 1]: 1 - mean |crop_t - ref| / 255 over the face ellipse inscribed in the
    box, without the mouth. frames uint8 [T, H, W, 3], reference uint8 [H, W, 3] (the portrait),
    face_boxes [T, 4] in frames, reference_face_box [4] and mouth_box [4] in the reference."""
    frames = _check_frames(frames)
    reference = _check_frames(np.asarray(reference)[None], "reference")[0]
    ref = _crop(reference, reference_face_box)
    u = (np.arange(CROP) + 0.5) / CROP  # crop coordinates in [0, 1]
    inside = ((u[None] - 0.5) ** 2 + (u[:, None] - 0.5) ** 2) <= 0.25  # the inscribed ellipse
    fx0, fy0, fx1, fy1 = np.asarray(reference_face_box, np.float64)
    mx0, my0, mx1, my1 = np.asarray(mouth_box, np.float64)
    in_mouth = ((u[None] >= (mx0 - fx0) / (fx1 - fx0)) & (u[None] <= (mx1 - fx0) / (fx1 - fx0))
                & (u[:, None] >= (my0 - fy0) / (fy1 - fy0)) & (u[:, None] <= (my1 - fy0) / (fy1 - fy0)))
    keep = inside & ~in_mouth
    if not keep.any():
        raise ValueError("the mouth box covers the whole face box; check that the boxes are (x0, y0, x1, y1).")
    out = np.empty(len(frames), np.float32)
    for t, box in enumerate(np.asarray(face_boxes, np.float64)):
        out[t] = 1.0 - np.abs(_crop(frames[t], box) - ref)[keep].mean() / 255.0
    return out


def _crop(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """float32 [CROP, CROP, 3]: the box (continuous coords, pixel j covering [j, j + 1)) resampled
    bilinearly, after a blur against aliasing when it shrinks; borders replicate."""
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = (x1 - x0) / CROP, (y1 - y0) / CROP
    if sx <= 0 or sy <= 0:
        raise ValueError(f"empty box {box}: boxes are (x0, y0, x1, y1) with x1 > x0 and y1 > y0.")
    image = image.astype(np.float32)
    if max(sx, sy) > 1.5:
        image = cv2.GaussianBlur(image, (0, 0), sigmaX=0.5 * sx, sigmaY=0.5 * sy)
    # output pixel u's centre (u + 0.5) maps to x0 + (u + 0.5) sx; OpenCV puts pixel j's centre at j
    m = np.array([[sx, 0, x0 + 0.5 * sx - 0.5], [0, sy, y0 + 0.5 * sy - 0.5]], np.float64)
    return cv2.warpAffine(image, m, (CROP, CROP), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_REPLICATE)


def identity_drift(similarity: np.ndarray, fps: float, window_s: float = 60.0) -> dict:
    """Relative drop of the mean identity similarity from the first to the last window.

    Args:
      similarity: `identity_similarity`'s `[T]`, T >= 2.
      fps: frames per second.
      window_s: the window in seconds (default 60), used when the video spans at least three
        of them (the first and last minute of a 3-minute video); else the first / last 20 % of
        the frames.

    Returns:
      A dict with `drift` = (first - last) / first (0 = none, 0.1 = 10 % lower at the end), the
      two means and the window in frames.

    Raises:
      ValueError: `similarity` is not `[T]` with T >= 2.
    """
    similarity = np.asarray(similarity, np.float64)
    if similarity.ndim != 1 or len(similarity) < 2:
        raise ValueError(f"similarity must be [T] with T >= 2, got shape {similarity.shape}.")
    window = round(window_s * fps)
    if len(similarity) < 3 * window:
        window = max(1, round(0.2 * len(similarity)))
    first, last = float(similarity[:window].mean()), float(similarity[-window:].mean())
    return {"first": first, "last": last, "drift": (first - last) / max(first, 1e-9), "window_frames": window}


def eye_detail(frames: np.ndarray, eye_boxes: np.ndarray) -> np.ndarray:
    """float32 [T]: the mean gradient magnitude of luma (0-255 units per pixel) inside each frame's
    eye band box: forward differences along both axes, sqrt(dx^2 + dy^2), over the box's pixels
    (pixel j counts when it overlaps [x0, x1)). frames uint8 [T, H, W, 3], eye_boxes [T, 4]
    (x0, y0, x1, y1). Sharp eyes, lids and brows give strong edges; a blurred or eyeless face
    little. A box less than 2 x 2 pixels inside the frame scores 0."""
    frames = _check_frames(frames)
    boxes = np.asarray(eye_boxes, np.float64)
    if boxes.shape != (len(frames), 4):
        raise ValueError(f"eye_boxes must be [T, 4] (x0, y0, x1, y1) for T = {len(frames)} frames, got shape "
                         f"{boxes.shape}.")
    out = np.zeros(len(frames), np.float32)
    for t, box in enumerate(boxes):
        pixels = synthetic.box_pixels(frames[t], box)
        if min(pixels.shape[:2]) < 2:
            continue
        luma = pixels.astype(np.float32) @ synthetic.LUMA
        dx, dy = np.diff(luma, axis=1)[:-1], np.diff(luma, axis=0)[:, :-1]
        out[t] = np.sqrt(dx * dx + dy * dy).mean()
    return out


# sRGB (D65) -> CIE XYZ, and the D65 white point (IEC 61966-2-1 / CIE 15)
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]])
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """float64 [..., 3] CIE L*a*b* (D65 white, L in [0, 100]) of uint8 sRGB [..., 3]: the sRGB
    transfer curve undone, XYZ by the sRGB matrix, then the CIE 1976 formula."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim < 1 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must be uint8 [..., 3], got {rgb.dtype} {rgb.shape}.")
    c = np.arange(256) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)[rgb]  # lookup per channel
    xyz = linear @ (_RGB_TO_XYZ.T / _D65_WHITE)  # divided by the white point's
    delta = 6.0 / 29.0
    f = np.where(xyz > delta**3, np.cbrt(xyz), xyz / (3 * delta**2) + 4.0 / 29.0)
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])],
                    axis=-1)


def portrait_colour(frames: np.ndarray, portrait: np.ndarray, fps: float, window_s: float = 1.0) -> dict:
    """How far the video's colours start from the portrait's: dE76 between the mean CIE Lab colour
    of the whole portrait and of the video's first `window_s` seconds (whole frames).

    Why: `colour_shift` compares a video with itself, so a model (or VAE) that redraws every
    frame in another colour from the first frame on passes it; the portrait is what the user
    gave. The whole frame, because a background drawn in another colour is seen at once.

    Args:
      frames: uint8 `[T, H, W, 3]`.
      portrait: uint8 `[H, W, 3]`, the same size as the frames.
      fps: frames per second.
      window_s: the opening window in seconds (default 1).

    Returns:
      `{"delta_e", "portrait", "video"}` (mean L, a, b of each).

    Raises:
      ValueError: a portrait of another size, or non-positive fps / window.
    """
    frames = _check_frames(frames)
    portrait = np.asarray(portrait)
    if portrait.shape != frames.shape[1:]:
        raise ValueError(f"portrait is {portrait.shape}, the frames {frames.shape[1:]}; resize the portrait to the "
                         "video's size first.")
    if not fps > 0 or not window_s > 0:
        raise ValueError(f"fps and window_s must be positive, got fps={fps}, window_s={window_s}.")
    n = max(1, min(len(frames), round(window_s * fps)))
    video = srgb_to_lab(frames[:n]).mean(axis=(0, 1, 2))
    ref = srgb_to_lab(portrait[None])[0].mean(axis=(0, 1))
    return {"delta_e": float(np.linalg.norm(video - ref)), "portrait": ref.tolist(), "video": video.tolist()}


def colour_shift(frames: np.ndarray, fps: float, window_s: float = 60.0,
                 face_boxes: np.ndarray | None = None) -> dict:
    """Mean colour shift from the first to the last window: dE76 (Euclidean distance in CIE Lab)
    between the mean Lab colours of the two windows.

    The region is the face, because a face sliding to another colour is the failure that
    matters and the background around it would dilute it. Frames where no pixel falls in the
    region are skipped.

    Args:
      frames: uint8 `[T, H, W, 3]`, T >= 2.
      fps: frames per second.
      window_s: the window in seconds (default 60), used when the video spans at least two of
        them (the first and last minute); else the first / last third.
      face_boxes: `[T, 4]` or `[S, T, 4]` (every speaker's) boxes whose inscribed ellipses
        (pixel centres inside) are the region, as `measure` passes them; None (default): the
        whole frame.

    Returns:
      `{"delta_e", "first", "last" (mean L, a, b), "window_frames", "region" ("face" or "frame")}`.

    Raises:
      ValueError: non-positive fps or window, fewer than 2 frames, boxes of the wrong shape, or
        no face pixel in the first or the last window.
    """
    frames = _check_frames(frames)
    if not fps > 0 or not window_s > 0:
        raise ValueError(f"fps and window_s must be positive, got fps={fps}, window_s={window_s}.")
    t, h, w, _ = frames.shape
    if t < 2:
        raise ValueError(f"colour_shift needs at least 2 frames, got {t}.")
    boxes = None
    if face_boxes is not None:
        boxes = np.asarray(face_boxes, np.float64)
        boxes = boxes[None] if boxes.ndim == 2 else boxes
        if boxes.ndim != 3 or boxes.shape[1:] != (t, 4):
            raise ValueError(f"face_boxes must be [T, 4] or [S, T, 4] (x0, y0, x1, y1) for T = {t} frames, got "
                             f"shape {np.shape(face_boxes)}.")
    window = round(window_s * fps)
    if t < 2 * window:
        window = max(1, t // 3)
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    means = np.full((t, 3), np.nan)
    for s in range(0, t, 64):  # chunks bound the float temporaries
        lab = srgb_to_lab(frames[s : s + 64])  # [t, H, W, 3]
        if boxes is None:
            means[s : s + 64] = lab.mean(axis=(1, 2))
            continue
        b = boxes[:, s : s + 64, :, None, None]  # [S, t, 4, 1, 1]
        centre_x, centre_y = (b[:, :, 0] + b[:, :, 2]) / 2, (b[:, :, 1] + b[:, :, 3]) / 2
        half_w = np.maximum((b[:, :, 2] - b[:, :, 0]) / 2, 1e-9)
        half_h = np.maximum((b[:, :, 3] - b[:, :, 1]) / 2, 1e-9)
        inside = (((xs[None] - centre_x) / half_w) ** 2 + ((ys[:, None] - centre_y) / half_h) ** 2 <= 1).any(0)
        count = inside.sum((1, 2))  # [t]
        total = np.einsum("thw,thwc->tc", inside.astype(np.float64), lab)
        means[s : s + 64][count > 0] = total[count > 0] / count[count > 0, None]
    first, last = means[:window], means[-window:]
    first, last = first[np.isfinite(first[:, 0])], last[np.isfinite(last[:, 0])]
    if not len(first) or not len(last):
        raise ValueError("no face pixels in the first or the last window: the face boxes lie outside the frame.")
    first, last = first.mean(axis=0), last.mean(axis=0)
    return {"delta_e": float(np.linalg.norm(last - first)), "first": first.tolist(), "last": last.tolist(),
            "window_frames": window, "region": "frame" if boxes is None else "face"}


def seam_score(frames: np.ndarray, boundaries: Sequence[int]) -> float:
    """How much the frames jump where sampler windows meet, relative to elsewhere.

    Args:
      frames: uint8 `[T, H, W, 3]`.
      boundaries: the first frame of each new sampler window, in [1, T - 1].

    Returns:
      Mean |frame b - frame b-1| over the boundary frames b divided by the mean over all other
      consecutive pairs: 1.0 = seamless, > 1 = visible jumps. A video with no change scores 1.0.

    Raises:
      ValueError: a boundary outside [1, T - 1].
    """
    frames = _check_frames(frames)
    b = np.unique(np.asarray(list(boundaries), np.int64))
    if b.size == 0 or b.min() < 1 or b.max() > len(frames) - 1 or b.size >= len(frames) - 1:
        raise ValueError(f"boundaries must be frame indices in [1, T - 1] = [1, {len(frames) - 1}] (the first "
                         f"frame of each new window), not all of them; got {list(boundaries)[:10]}.")
    diff = _frame_changes(frames)
    at = np.zeros(len(diff), bool)
    at[b - 1] = True  # diff[t - 1] compares frames t and t - 1
    seam, elsewhere = float(diff[at].mean()), float(diff[~at].mean())
    if elsewhere == 0:
        return 1.0 if seam == 0 else math.inf
    return seam / elsewhere


def _frame_changes(frames: np.ndarray) -> np.ndarray:
    """float [T - 1]: mean |frame t - frame t-1| for t = 1 .. T - 1 (uint8 frames [T, H, W, 3])."""
    return np.array([np.abs(frames[t].astype(np.int16) - frames[t - 1]).mean() for t in range(1, len(frames))])


def seam_over_latents(frames: np.ndarray, boundaries: Sequence[int], frames_per_latent: int) -> float | None:
    """The window seams against the VAE's own latent boundaries: mean |frame b - frame b-1| over
    the window boundaries b divided by the same over the other latent boundaries (frames 1 +
    k x frames_per_latent of a causal VAE: frame 0 alone, then frames_per_latent per latent).
    About 1: the windows join as well as the latents inside one window do, so what `seam_score`
    still sees is the decoder's change from latent to latent, not the sampler's; above 1: the
    windows add a jump of their own. None when no other latent boundary is in the video."""
    frames = _check_frames(frames)
    seams = {int(b) for b in boundaries if 1 <= b < len(frames)}
    others = [b for b in range(1 + frames_per_latent, len(frames), frames_per_latent) if b not in seams]
    if not seams or not others:
        return None
    diff = _frame_changes(frames)  # diff[b - 1]: the change into frame b
    seam, other = diff[sorted(b - 1 for b in seams)].mean(), diff[[b - 1 for b in others]].mean()
    if other == 0:
        return 1.0 if seam == 0 else math.inf
    return float(seam / other)


def routing(mouths: np.ndarray, envelopes: np.ndarray, max_offset: int = 5) -> dict:
    """Two-speaker routing: does each mouth follow its own voice rather than the other's?

    Args:
      mouths: measured mouth openings `[2, T]`.
      envelopes: each speaker's own audio envelope `[2, T]`.
      max_offset: lip-sync lags searched, +- frames (default 5).

    Returns:
      `{"correlations": [S, S] (mouth s vs stream r, best offset), "margins": [S] (own - other)}`.

    Raises:
      ValueError: inputs that are not both `[2, T]`.
    """
    mouths, envelopes = np.asarray(mouths), np.asarray(envelopes)
    if mouths.shape != envelopes.shape or mouths.ndim != 2 or len(mouths) != 2:
        raise ValueError(f"routing needs mouths and envelopes of shape [2, T], got {mouths.shape} and "
                         f"{envelopes.shape}.")
    corr = [[best_offset_correlation(envelopes[r], mouths[s], max_offset)[0] for r in range(2)] for s in range(2)]
    return {"correlations": corr, "margins": [corr[s][s] - corr[s][1 - s] for s in range(2)]}


# ----------------------------------------------------------------------------- one video


def measure(frames: np.ndarray, truth: Truth, speaker_audio: np.ndarray | None = None, *,
            max_offset: int = 5, box_mode: str = "track", box_margin: float = 0.1,
            drift_window_s: float = 60.0, boundaries: Sequence[int] | None = None,
            syncnet: SyncNetFn | None = None, frames_per_latent: int | None = None) -> dict:
    """Every metric of one video against its truth.

    Boxes are rescaled when the video's size differs from the truth's, and face detail is then
    expressed per truth pixel (x the scale), so it stays comparable with the renderer's.

    Args:
      frames: uint8 `[T, H, W, 3]` at `truth.fps` (T may differ from the truth's: the shorter
        length is used).
      truth: the clip's ground truth (`Truth`).
      speaker_audio: the driving audio, float `[S, N]` or `[N]` (default None: the truth's).
      max_offset: lip-sync lags searched, +- frames (default 5).
      box_mode: "track" (default: the truth's frame-0 boxes moved by the head's measured motion)
        or the truth's own boxes per frame (see the module docstring).
      box_margin: growth of the face boxes (default 0.1).
      drift_window_s: the window of `identity_drift` and `colour_shift` (default 60 s).
      boundaries: the first frame of every sampler window after the first, for the seam score
        (default None: no seam score).
      syncnet: an optional SyncNet-style scorer (see `evaluate`).
      frames_per_latent: the VAE's frames per latent; with boundaries it adds `seam_over_latents`.

    Returns:
      Plain floats / lists (JSON-ready), including the series the report plots; "face_detail" is
      the mean of `eye_detail` over frames and speakers (None when the truth has no eye boxes),
      "colour_shift" `colour_shift`'s dict for every speaker's face.
    """
    if box_mode not in BOX_MODES:
        raise ValueError(f"box_mode must be one of {BOX_MODES}, got {box_mode!r}.")
    frames = _check_frames(frames)
    audio = np.atleast_2d(np.asarray(truth.speaker_audio if speaker_audio is None else speaker_audio, np.float32))
    if len(audio) != truth.speakers:
        raise ValueError(f"speaker_audio has {len(audio)} streams but the truth has {truth.speakers} speakers; "
                         "pass one stream per speaker, [S, N].")
    t = min(len(frames), len(truth.frames))
    if t < 2 * max_offset + 3:
        raise ValueError(f"{t} frames is too short to measure lip sync at offsets up to {max_offset}; "
                         f"use at least {2 * max_offset + 3} frames.")
    frames = frames[:t]
    h, w = frames.shape[1:3]
    truth_h, truth_w = truth.frames.shape[1:3]
    scale = np.array([w / truth_w, h / truth_h] * 2)  # boxes follow a video made at another size
    face_boxes, mouth_boxes = truth.face_boxes[:, :t] * scale, truth.mouth_boxes[:, :t] * scale
    eye_boxes = None if truth.eye_boxes is None else truth.eye_boxes[:, :t] * scale
    reference = truth.frames[0]
    if reference.shape[:2] != (h, w):
        reference = cv2.resize(reference, (w, h), interpolation=cv2.INTER_AREA)
    centres = head_centres(frames, truth.speakers)

    out = {"num_frames": t, "lip_sync": [], "identity_series": [], "mouth_series": [], "envelope_series": []}
    def follow(boxes, s):  # speaker s's boxes [T, 4] in this video, per box_mode
        return tracked_boxes(boxes[s, 0], centres[s]) if box_mode == "track" else boxes[s]

    envelopes, mouths, sims, details, faces = [], [], [], [], []
    for s in range(truth.speakers):
        mouth_s, face_s = enlarge(follow(mouth_boxes, s), box_margin), follow(face_boxes, s)
        if eye_boxes is not None:
            details.append(eye_detail(frames, enlarge(follow(eye_boxes, s), box_margin)))
        faces.append(face_s)
        env = audio_envelope(audio[s], t, truth.fps, truth.sample_rate)
        mouth = mouth_opening(frames, mouth_s)
        corr, offset = best_offset_correlation(env, mouth, max_offset)
        lip = {"correlation": corr, "offset": offset}
        if syncnet is not None:
            confidence = float(syncnet(frames=frames, audio=audio[s], fps=truth.fps,
                                       sample_rate=truth.sample_rate, face_boxes=face_s))
            if not math.isfinite(confidence):
                raise ValueError(f"the syncnet callable returned {confidence}; it must return a finite float.")
            lip["syncnet_confidence"] = confidence
        out["lip_sync"].append(lip)
        envelopes.append(env)
        mouths.append(mouth)
        sims.append(identity_similarity(frames, reference, face_s, face_boxes[s, 0], mouth_boxes[s, 0]))
    similarity = np.mean(sims, axis=0)
    out["identity"] = identity_drift(similarity, truth.fps, drift_window_s)
    # per truth pixel: a gradient per video pixel shrinks as the video is upscaled
    out["face_detail"] = float(np.mean(details) * math.sqrt(scale[0] * scale[1])) if details else None
    out["colour_shift"] = colour_shift(frames, truth.fps, drift_window_s, np.stack(faces))
    out["portrait_colour"] = portrait_colour(frames, reference, truth.fps)
    out["motion"] = head_motion(centres)
    out["routing"] = routing(np.stack(mouths), np.stack(envelopes), max_offset) if truth.speakers == 2 else None
    out["seam"] = None if boundaries is None else seam_score(frames, [b for b in boundaries if b < t])
    out["seam_over_latents"] = (None if boundaries is None or not frames_per_latent
                                else seam_over_latents(frames, boundaries, frames_per_latent))
    out["envelope_series"] = [e.tolist() for e in envelopes]
    out["mouth_series"] = [m.tolist() for m in mouths]
    out["identity_series"] = similarity.tolist()
    return out


# ----------------------------------------------------------------------------- many videos


def _as_truth(truth) -> Truth:
    if isinstance(truth, Truth):
        return truth
    if isinstance(truth, synthetic.Clip):
        return Truth.from_clip(truth)
    if isinstance(truth, (str, os.PathLike)):
        return Truth.load(truth)
    raise ValueError(f"a truth must be a metrics.Truth, a synthetic.Clip or a folder written by Clip.save, "
                     f"got {type(truth).__name__}.")


def _aligned(values, n: int, what: str) -> list:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"{what} has {len(values)} entries for {n} videos; give one per video (None to skip).")
    return values


def evaluate(videos: Sequence, truths: Sequence, *, boundaries: Sequence | None = None,
             audios: Sequence | None = None, max_offset: int = 5, box_mode: str = "track",
             box_margin: float = 0.1, drift_window_s: float = 60.0, syncnet: SyncNetFn | None = None,
             frames_per_latent: int | None = None) -> dict:
    """Measures generated videos against the truths that drove them, and the truths' own renderings.

    Args:
      videos: per video, uint8 frames `[T, H, W, 3]` at the truth's fps, or a video file (decoded
        and resampled to the truth's fps).
      truths: per video, a `Truth`, a `synthetic.Clip`, or a folder written by `Clip.save`.
      boundaries: per video, the first frame index of every sampler window after the first (the
        caller computes them from the sampler's layout), or None for no seam score (default).
      audios: per video, the driving audio float `[S, N]` (or `[N]` for one speaker); default
        None: the truth's speaker_audio (e.g. pass unrelated audio to check that it scores low).
      max_offset: lip-sync offsets searched, +- frames (default 5).
      box_mode: see `measure` (default "track").
      box_margin: see `measure` (default 0.1).
      drift_window_s: the window of `identity_drift` and `colour_shift` (default 60 s).
      syncnet: an optional SyncNet-style scorer, called as `syncnet(frames=uint8 [T, H, W, 3],
        audio=float32 [N], fps=float, sample_rate=int, face_boxes=float [T, 4])` -> float
        confidence per speaker. No SyncNet weights ship with mi_jax, so without a user-supplied
        scorer no confidence is reported (nothing is approximated in its place).
      frames_per_latent: the VAE's frames per latent; with boundaries it adds `seam_over_latents`.

    Returns:
      `{"videos": [per video: name, seed, prompt, actions, speakers, fps, "video": measure(...),
      "truth": measure(...) of the truth's rendering], "summary": summarize(...), "settings"}`:
      plain JSON-ready values, the input of `report.write_report`.

    Raises:
      ValueError: no videos, lists of different lengths, or frames that are not uint8
        `[T, H, W, 3]`.
    """
    videos = list(videos)
    truths = _aligned(truths, len(videos), "truths")
    if not videos:
        raise ValueError("no videos to evaluate; pass at least one video with its truth.")
    settings = {"max_offset": max_offset, "box_mode": box_mode, "box_margin": box_margin,
                "drift_window_s": drift_window_s, "syncnet": syncnet is not None}
    records = []
    for video, truth, bounds, audio in zip(videos, truths, _aligned(boundaries, len(videos), "boundaries"),
                                           _aligned(audios, len(videos), "audios")):
        truth = _as_truth(truth)
        if isinstance(video, (str, os.PathLike)):
            video = read_video(video, truth.fps).frames
        kw = dict(max_offset=max_offset, box_mode=box_mode, box_margin=box_margin, drift_window_s=drift_window_s,
                  boundaries=bounds, syncnet=syncnet, frames_per_latent=frames_per_latent)
        records.append({
            "name": truth.name, "seed": truth.seed, "prompt": truth.prompt, "actions": list(truth.actions),
            "speakers": truth.speakers, "fps": truth.fps,
            "video": measure(video, truth, audio, **kw),
            "truth": measure(truth.frames, truth, **kw),
        })
    return {"videos": records, "summary": summarize(records), "settings": settings}


def _ratio(value, truth):
    return value / truth if value is not None and truth is not None and abs(truth) > 1e-9 else None


def summarize(records: list[dict]) -> dict:
    """Means over videos (and speakers) of each metric, for the generated videos ("value") and
    the renderer ("truth"), with value / truth ("ratio") where that is meaningful:
    lip_sync (correlation; "offsets": every video's and speaker's best offset), syncnet (when
    measured), face_detail (eye band edge energy; videos whose truth has eye boxes),
    identity_drift and colour_shift (dE76) (mean; "worst" = max, "truth_worst" the renderer's),
    seam (videos with boundaries), seam_over_latents (when measured), text_control (per group "nodding" / "shaking head" / "neutral":
    the geometric mean of vertical / horizontal motion variance), routing (smallest margin)."""
    def mean_of(side, get):
        values = [v for r in records for v in get(r[side])]
        return float(np.mean(values)) if values else None

    out = {}
    for key, get in (("lip_sync", lambda m: [s["correlation"] for s in m["lip_sync"]]),
                     ("syncnet", lambda m: [s["syncnet_confidence"] for s in m["lip_sync"]
                                            if "syncnet_confidence" in s]),
                     ("face_detail", lambda m: [m["face_detail"]] if m["face_detail"] is not None else []),
                     ("seam", lambda m: [m["seam"]] if m["seam"] is not None else []),
                     ("seam_over_latents", lambda m: [m["seam_over_latents"]]
                      if m.get("seam_over_latents") is not None else [])):
        value, truth = mean_of("video", get), mean_of("truth", get)
        out[key] = None if value is None else {"value": value, "truth": truth, "ratio": _ratio(value, truth)}
    if out["lip_sync"] is not None:
        out["lip_sync"]["offsets"] = [s["offset"] for r in records for s in r["video"]["lip_sync"]]
    drifts = [r["video"]["identity"]["drift"] for r in records]
    # the renderer drifts ~0, so drift / renderer's drift would only amplify noise: no ratio
    out["identity_drift"] = {"value": float(np.mean(drifts)), "worst": float(np.max(drifts)), "ratio": None,
                             "truth": float(np.mean([r["truth"]["identity"]["drift"] for r in records]))}
    for key in ("colour_shift", "portrait_colour"):  # dE76 per video: mean and worst, no ratio (the renderer's ~0)
        video, truth = ([r[side][key]["delta_e"] for r in records] for side in ("video", "truth"))
        out[key] = {"value": float(np.mean(video)), "worst": float(np.max(video)), "ratio": None,
                    "truth": float(np.mean(truth)), "truth_worst": float(np.max(truth))}
    groups = {"nodding": lambda a: "nodding" in a, "shaking head": lambda a: "shaking head" in a,
              "neutral": lambda a: not a}
    out["text_control"] = {}
    for group, member in groups.items():
        chosen = [r for r in records if member(r["actions"])]
        if chosen:
            value, truth = (float(np.exp(np.mean([np.log(max(r[side]["motion"]["ratio"], 1e-12)) for r in chosen])))
                            for side in ("video", "truth"))
            out["text_control"][group] = {"value": value, "truth": truth, "ratio": _ratio(value, truth),
                                          "videos": len(chosen)}
    pairs = [r for r in records if r["video"]["routing"] is not None]
    out["routing"] = None
    if pairs:
        value, truth = (float(min(min(r[side]["routing"]["margins"]) for r in pairs)) for side in ("video", "truth"))
        out["routing"] = {"value": value, "truth": truth, "ratio": _ratio(value, truth), "videos": len(pairs)}
    return out
