"""Face-region masks for the audio cross-attention and the face-weighted loss.

Sources, one mask set per speaker (S speakers):
  * `masks_from_video`:  OpenCV's Haar cascade (haarcascade_frontalface_default.xml, shipped in
    the opencv-python-headless wheel) finds faces per frame; S tracks are kept, ordered left to right.
  * `masks_from_boxes`:  user boxes, one for all frames or one per frame.
  * `masks_from_images`: one mask image (e.g. PNG) per speaker, resized to the video.

Boxes are float (x0, y0, x1, y1) in pixels of the W x H video, right/bottom exclusive; a pixel
(row i, col j) is inside when its centre (j + 0.5, i + 0.5) is. Missing detections are NaN.

Box pipeline (per speaker): fill detection gaps by linear interpolation (`max_gap` bounds the gap
length filled; longer ones stay empty) -> moving average of the coordinates over `smooth_window`
frames -> mouth box = the lower `mouth_height` of the face box, `mouth_width` of its width, centred
-> face box dilated by `margin` x its size per side, clipped to the image.

Latent resolution (HunyuanVideo VAE: 4x time with the first frame alone, f x f pixels per cell:
`spatial`, the VAE config's `spatial_factor`, 8 for the released VAE, 4 for a
`spatial_compression_ratio=4` one): latent frame 0 = video frame 0, latent frame k >= 1 = video
frames 4k-3 .. 4k, so T_lat = 1 + (T - 1) // 4 (video frames past 4 (T_lat - 1) are ignored; 4 is
`temporal_factor`, the only one diffusers' HunyuanVideo decoder supports). A latent cell's
coverage is the fraction of its 4 (or 1) x f x f video pixels inside the region; the cell is in the mask when coverage > 0 and
>= `min_coverage` (default 0: any pixel). With `exclusive=True` a cell claimed by several
speakers goes to the one covering most of it, so speaker masks never overlap; mouth masks are
always kept inside their speaker's face mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from PIL import Image

from mi_jax.models.vae import SPATIAL_FACTOR as SPATIAL
from mi_jax.models.vae import TEMPORAL_FACTOR as TEMPORAL


@dataclass(frozen=True)
class FaceMasks:
    """Per-speaker masks at latent resolution, and the pixel boxes they came from."""

    face: np.ndarray  # [S, T_lat, H/f, W/f] bool (f: the VAE's spatial factor)
    mouth: np.ndarray  # [S, T_lat, H/f, W/f] bool, inside `face`
    face_coverage: np.ndarray  # [S, T_lat, H/f, W/f] float32 in [0, 1], before `exclusive`
    boxes: np.ndarray  # [T, S, 4] float32 dilated face boxes (NaN: no face in that frame)
    mouth_boxes: np.ndarray  # [T, S, 4] float32


def latent_num_frames(num_frames: int) -> int:
    return 1 + (num_frames - 1) // TEMPORAL


def latent_frame_groups(num_frames: int) -> list[slice]:
    """Video frames behind each latent frame: [0:1], [1:5], [5:9], ..."""
    rest = range(1, latent_num_frames(num_frames))
    return [slice(0, 1)] + [slice(TEMPORAL * (k - 1) + 1, TEMPORAL * k + 1) for k in rest]


def _check_video_size(num_frames: int, height: int, width: int, spatial: int = SPATIAL) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames={num_frames}; need at least one frame.")
    if spatial < 1:
        raise ValueError(f"spatial={spatial}: the VAE's spatial factor (pixels per latent cell side) must be >= 1.")
    if height % spatial or width % spatial or height < spatial or width < spatial:
        raise ValueError(f"video size {width}x{height} (WxH) must be a positive multiple of {spatial} "
                         "(the VAE's spatial factor); crop or resize the video first.")


# --------------------------------------------------------------------------------------------
# Detection
# --------------------------------------------------------------------------------------------


def detect_faces(frames: np.ndarray, *, num_speakers: int = 1, min_face: float = 0.08, scale_factor: float = 1.1,
                 min_neighbors: int = 5, max_side: int = 640, equalize: bool = False,
                 cascade: str = "haarcascade_frontalface_default.xml") -> np.ndarray:
    """Haar-cascade face boxes, tracked over time.

    frames: uint8 [T, H, W, 3] RGB (or [T, H, W] gray). min_face: smallest face side, as a fraction
    of min(H, W). Frames are downscaled to `max_side` for speed; boxes come back in full pixels.
    equalize: histogram-equalise each frame first (helps dim footage; off by default because on
    frames with large flat areas it exaggerates noise and makes detections flicker).
    Returns [T, S, 4] float32 boxes, NaN where a speaker was not found. Speakers are ordered left
    to right in the first frame showing S faces and followed by nearest centre.
    """
    frames = np.asarray(frames)
    bad_shape = frames.ndim not in (3, 4) or (frames.ndim == 4 and frames.shape[-1] != 3) or len(frames) == 0
    if bad_shape or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 [T, H, W, 3] RGB or [T, H, W] gray, got {frames.dtype} {frames.shape}.")
    if num_speakers < 1:
        raise ValueError(f"num_speakers={num_speakers} must be >= 1.")
    path = os.path.join(cv2.data.haarcascades, cascade)
    detector = cv2.CascadeClassifier(path)
    if detector.empty():
        raise ValueError(f"cannot load the Haar cascade {path}; install opencv-python-headless 4.x (5.x ships none).")
    T, H, W = frames.shape[:3]
    scale = min(1.0, max_side / max(H, W))
    min_px = max(1, int(round(min_face * min(H, W) * scale)))
    per_frame = []
    for frame in frames:
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame
        if scale < 1:
            gray = cv2.resize(gray, (round(W * scale), round(H * scale)), interpolation=cv2.INTER_AREA)
        found = detector.detectMultiScale(cv2.equalizeHist(gray) if equalize else gray, scaleFactor=scale_factor,
                                          minNeighbors=min_neighbors, minSize=(min_px, min_px))
        xywh = np.asarray(found, np.float32).reshape(-1, 4) / scale
        per_frame.append(np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1))
    counts = [len(d) for d in per_frame]
    if max(counts) == 0:
        raise ValueError(f"no face detected in any of the {T} frames; pass boxes=(x0, y0, x1, y1) in pixels "
                         "(masks_from_boxes) or mask images (masks_from_images).")
    if max(counts) < num_speakers:
        raise ValueError(f"expected {num_speakers} faces but no frame shows more than {max(counts)}; "
                         "pass one box per speaker (masks_from_boxes) or mask images (masks_from_images).")
    return _track(per_frame, num_speakers)


def _track(per_frame: list[np.ndarray], num_speakers: int) -> np.ndarray:
    """Per-frame detections [N_t, 4] -> [T, S, 4] tracks (NaN where unmatched)."""
    T = len(per_frame)
    anchor = next(t for t, d in enumerate(per_frame) if len(d) >= num_speakers)
    dets = per_frame[anchor]
    area = (dets[:, 2] - dets[:, 0]) * (dets[:, 3] - dets[:, 1])
    chosen = dets[np.argsort(-area, kind="stable")[:num_speakers]]
    tracks = np.full((T, num_speakers, 4), np.nan, np.float32)
    tracks[anchor] = chosen[np.argsort(chosen[:, 0] + chosen[:, 2], kind="stable")]
    for order in (range(anchor + 1, T), range(anchor - 1, -1, -1)):
        last = tracks[anchor].copy()
        for t in order:
            tracks[t] = _match(last, per_frame[t])
            seen = ~np.isnan(tracks[t, :, 0])
            last[seen] = tracks[t, seen]
    return tracks


def _match(last: np.ndarray, dets: np.ndarray) -> np.ndarray:
    """Greedy nearest-centre assignment of detections [N, 4] to tracks' last boxes [S, 4].

    A detection farther than one face size from a track is a different face (or a false hit)."""
    out = np.full_like(last, np.nan)
    if len(dets) == 0:
        return out
    centre = lambda b: (b[:, :2] + b[:, 2:]) / 2  # noqa: E731
    dist = np.linalg.norm(centre(last)[:, None] - centre(dets)[None], axis=-1)
    gate = np.maximum(last[:, 2] - last[:, 0], last[:, 3] - last[:, 1])[:, None]
    used_s, used_d = set(), set()
    for flat in np.argsort(dist, axis=None, kind="stable"):
        s, d = np.unravel_index(flat, dist.shape)
        if dist[s, d] <= gate[s, 0] and s not in used_s and d not in used_d:
            out[s] = dets[d]
            used_s.add(s)
            used_d.add(d)
    return out


# --------------------------------------------------------------------------------------------
# Boxes over time
# --------------------------------------------------------------------------------------------


def as_box_track(boxes, num_frames: int, height: int, width: int) -> np.ndarray:
    """User boxes -> validated [T, S, 4] float32.

    boxes: [4] (one face, all frames), [S, 4] (one box per speaker, all frames) or [T, S, 4]
    (per frame; NaN rows mark frames without that face). A box may overhang the image border by
    up to a quarter of its size (faces cut by the frame edge) and is clipped later; a box farther
    out is an error: usually normalised or (x, y, w, h) coordinates.
    """
    b = np.asarray(boxes, np.float32)
    if b.ndim == 1:
        b = b[None]
    if b.ndim == 2:
        b = np.broadcast_to(b[None], (num_frames,) + b.shape)
    if b.ndim != 3 or b.shape[-1] != 4 or b.shape[0] != num_frames or b.shape[1] < 1:
        raise ValueError(f"boxes of shape {np.shape(boxes)}: expected [4], [S, 4] or [T={num_frames}, S, 4] "
                         "as (x0, y0, x1, y1) pixels.")
    nan = np.isnan(b)
    if (nan.any(-1) != nan.all(-1)).any() or np.isinf(b).any():
        raise ValueError("boxes must be finite, or all four coordinates NaN for a frame without the face.")
    valid = ~nan[..., 0]
    for t, s in zip(*np.nonzero(valid)):
        x0, y0, x1, y1 = b[t, s]
        where = f"box {b[t, s].tolist()} (frame {t}, speaker {s})"
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"{where} has x1 <= x0 or y1 <= y0; boxes are (x0, y0, x1, y1), not (x, y, w, h).")
        slack_x, slack_y = 0.25 * (x1 - x0), 0.25 * (y1 - y0)
        if x0 < -slack_x or y0 < -slack_y or x1 > width + slack_x or y1 > height + slack_y:
            raise ValueError(f"{where} is outside the {width}x{height} (WxH) image; boxes are pixels, so scale "
                             "normalised [0, 1] boxes by (W, H, W, H).")
    return np.ascontiguousarray(b)


def fill_gaps(boxes: np.ndarray, max_gap: int | None = None) -> np.ndarray:
    """[T, S, 4] with NaN frames -> gaps interpolated linearly; leading / trailing gaps take the
    nearest box. Gaps longer than `max_gap` frames stay NaN. A speaker never seen is an error."""
    out = boxes.astype(np.float32, copy=True)
    t = np.arange(len(boxes))
    for s in range(boxes.shape[1]):
        seen = ~np.isnan(boxes[:, s, 0])
        if not seen.any():
            raise ValueError(f"speaker {s} has no box in any frame; pass boxes for it.")
        filled = np.stack([np.interp(t, t[seen], boxes[seen, s, c]) for c in range(4)], axis=-1)
        if max_gap is not None:
            # length of the NaN run each frame belongs to
            run_id = np.cumsum(seen)
            run_len = np.bincount(run_id[~seen], minlength=run_id.max() + 1)[run_id]
            filled[~seen & (run_len > max_gap)] = np.nan
        out[:, s] = filled
    return out


def smooth_boxes(boxes: np.ndarray, window: int = 5) -> np.ndarray:
    """Centred moving average of [T, S, 4] box coordinates over `window` frames (NaN frames are
    skipped and stay NaN; the window shrinks at the ends). window=1 is the identity."""
    _check_options(smooth_window=window)
    seen = ~np.isnan(boxes)
    vals = np.where(seen, boxes, 0).astype(np.float64)
    r = window // 2
    pad = lambda x: np.pad(x, [(r + 1, r)] + [(0, 0)] * (x.ndim - 1))  # noqa: E731
    csum_v, csum_n = np.cumsum(pad(vals), 0), np.cumsum(pad(seen.astype(np.float64)), 0)
    total = csum_v[window:] - csum_v[:-window]
    count = csum_n[window:] - csum_n[:-window]
    return np.where(seen, total / np.maximum(count, 1), np.nan).astype(np.float32)


def mouth_boxes(boxes: np.ndarray, height_frac: float = 0.4, width_frac: float = 0.6) -> np.ndarray:
    """Lower-face boxes: the bottom `height_frac` of each box, `width_frac` of its width, centred."""
    _check_options(mouth_height=height_frac, mouth_width=width_frac)
    x0, y0, x1, y1 = np.moveaxis(boxes, -1, 0)
    cx, half_w = (x0 + x1) / 2, width_frac * (x1 - x0) / 2
    return np.stack([cx - half_w, y1 - height_frac * (y1 - y0), cx + half_w, y1], axis=-1).astype(np.float32)


def dilate_boxes(boxes: np.ndarray, margin: float, height: int, width: int) -> np.ndarray:
    """Grow each side by `margin` x the box's width / height, then clip to the image."""
    _check_options(margin=margin)
    x0, y0, x1, y1 = np.moveaxis(boxes, -1, 0)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    return np.stack([np.clip(x0 - dx, 0, width), np.clip(y0 - dy, 0, height),
                     np.clip(x1 + dx, 0, width), np.clip(y1 + dy, 0, height)], axis=-1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Boxes -> masks
# --------------------------------------------------------------------------------------------


def _pixel_span(lo: np.ndarray, hi: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel index range [a, b) whose centres lie in [lo, hi); NaN -> empty."""
    a = np.clip(np.ceil(np.nan_to_num(lo, nan=0.0) - 0.5), 0, size).astype(np.int64)
    b = np.clip(np.ceil(np.nan_to_num(hi, nan=0.0) - 0.5), 0, size).astype(np.int64)
    b = np.where(np.isnan(lo) | np.isnan(hi), a, b)
    return a, np.maximum(a, b)


def pixel_masks(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """[T, S, 4] boxes -> [S, T, H, W] bool pixel masks."""
    xa, xb = _pixel_span(boxes[..., 0], boxes[..., 2], width)
    ya, yb = _pixel_span(boxes[..., 1], boxes[..., 3], height)
    cols, rows = np.arange(width), np.arange(height)
    in_x = (cols >= xa[..., None]) & (cols < xb[..., None])  # [T, S, W]
    in_y = (rows >= ya[..., None]) & (rows < yb[..., None])  # [T, S, H]
    return np.transpose(in_y[..., :, None] & in_x[..., None, :], (1, 0, 2, 3))


def box_coverage(boxes: np.ndarray, height: int, width: int, spatial: int = SPATIAL) -> np.ndarray:
    """[T, S, 4] boxes -> [S, T, H/f, W/f] float32: fraction of each f x f cell inside the box
    (f = `spatial`, the VAE's spatial factor).

    Exactly the f x f block mean of `pixel_masks`, computed per axis without the pixel masks."""
    def per_axis(lo, hi, size):
        a, b = _pixel_span(lo, hi, size)
        start = np.arange(0, size, spatial)
        return np.clip(np.minimum(b[..., None], start + spatial) - np.maximum(a[..., None], start), 0, spatial)

    cx = per_axis(boxes[..., 0], boxes[..., 2], width)  # [T, S, W/f]
    cy = per_axis(boxes[..., 1], boxes[..., 3], height)  # [T, S, H/f]
    cov = cy[..., :, None] * cx[..., None, :] / float(spatial * spatial)
    return np.transpose(cov, (1, 0, 2, 3)).astype(np.float32)


def temporal_pool(coverage: np.ndarray) -> np.ndarray:
    """[S, T, h, w] per-frame coverage -> [S, T_lat, h, w]: mean over each latent frame's video frames."""
    return np.stack([coverage[:, g].mean(1) for g in latent_frame_groups(coverage.shape[1])], axis=1)


def _threshold(coverage: np.ndarray, min_coverage: float) -> np.ndarray:
    return (coverage > 0) & (coverage >= min_coverage)


def _exclusive(masks: np.ndarray, coverage: np.ndarray) -> np.ndarray:
    """Give every cell claimed by several speakers to the one covering most of it (ties: lowest index)."""
    owner = np.argmax(np.where(masks, coverage, -1.0), axis=0)
    return masks & (np.arange(len(masks))[:, None, None, None] == owner[None])


def _check_options(margin=0.0, smooth_window=1, max_gap=None, min_coverage=0.0, mouth_height=0.4,
                   mouth_width=0.6) -> None:
    # checked up front so that a typo fails before face detection, not after
    if margin < 0:
        raise ValueError(f"margin={margin} must be >= 0.")
    if smooth_window < 1 or smooth_window % 2 == 0:
        raise ValueError(f"smooth_window={smooth_window} must be a positive odd number of frames.")
    if max_gap is not None and max_gap < 0:
        raise ValueError(f"max_gap={max_gap} must be >= 0 (or None: fill every gap).")
    if not 0 <= min_coverage <= 1:
        raise ValueError(f"min_coverage={min_coverage} must be in [0, 1].")
    if not (0 < mouth_height <= 1 and 0 < mouth_width <= 1):
        raise ValueError(f"mouth_height={mouth_height} and mouth_width={mouth_width} must be in (0, 1].")


def _finish(face_cov, mouth_cov, boxes, mouth, min_coverage, exclusive) -> FaceMasks:
    face = _threshold(face_cov, min_coverage)
    if exclusive:
        face = _exclusive(face, face_cov)
    mouth_mask = _threshold(mouth_cov, min_coverage) & face
    return FaceMasks(face, mouth_mask, face_cov.astype(np.float32), boxes.astype(np.float32), mouth.astype(np.float32))


def masks_from_boxes(boxes, num_frames: int, height: int, width: int, *, margin: float = 0.15,
                     smooth_window: int = 5, max_gap: int | None = None, min_coverage: float = 0.0,
                     exclusive: bool = True, mouth_height: float = 0.4, mouth_width: float = 0.6,
                     spatial: int = SPATIAL) -> FaceMasks:
    """Face and mouth masks [S, T_lat, H/f, W/f] from boxes (see `as_box_track` for the shapes);
    f = `spatial`, the VAE's `spatial_factor` (pixels per latent cell side)."""
    _check_options(margin, smooth_window, max_gap, min_coverage, mouth_height, mouth_width)
    _check_video_size(num_frames, height, width, spatial)
    track = as_box_track(boxes, num_frames, height, width)
    return _masks_from_track(track, height, width, margin, smooth_window, max_gap, min_coverage, exclusive,
                             mouth_height, mouth_width, spatial)


def _masks_from_track(track, height, width, margin, smooth_window, max_gap, min_coverage, exclusive,
                      mouth_height, mouth_width, spatial=SPATIAL) -> FaceMasks:
    smooth = smooth_boxes(fill_gaps(track, max_gap), smooth_window)
    mouth = np.clip(mouth_boxes(smooth, mouth_height, mouth_width), 0, [width, height, width, height])
    face = dilate_boxes(smooth, margin, height, width)
    face_cov = temporal_pool(box_coverage(face, height, width, spatial))
    mouth_cov = temporal_pool(box_coverage(mouth, height, width, spatial))
    return _finish(face_cov, mouth_cov, face, mouth, min_coverage, exclusive)


def masks_from_video(frames: np.ndarray, *, num_speakers: int = 1, detector_kwargs: dict | None = None,
                     margin: float = 0.15, smooth_window: int = 5, max_gap: int | None = None,
                     min_coverage: float = 0.0, exclusive: bool = True, mouth_height: float = 0.4,
                     mouth_width: float = 0.6, spatial: int = SPATIAL) -> FaceMasks:
    """Detect faces in uint8 frames [T, H, W, 3] (`detect_faces`), then mask as `masks_from_boxes`."""
    frames = np.asarray(frames)
    if frames.ndim < 3:
        raise ValueError(f"frames must be [T, H, W, 3], got shape {frames.shape}.")
    T, H, W = frames.shape[:3]
    _check_options(margin, smooth_window, max_gap, min_coverage, mouth_height, mouth_width)
    _check_video_size(T, H, W, spatial)
    track = detect_faces(frames, num_speakers=num_speakers, **(detector_kwargs or {}))
    return _masks_from_track(track, H, W, margin, smooth_window, max_gap, min_coverage, exclusive,
                             mouth_height, mouth_width, spatial)


# --------------------------------------------------------------------------------------------
# Mask images
# --------------------------------------------------------------------------------------------


def _load_mask(image, index: int, height: int, width: int) -> np.ndarray:
    """Path or array [h, w] / [h, w, C] -> bool [H, W] (resized when the aspect ratio matches)."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise ValueError(f"mask image {index}: no file {os.fspath(image)!r}.")
        with Image.open(image) as im:
            arr = np.asarray(im)
    else:
        arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (1, 2, 3, 4):
        alpha = arr[..., -1] if arr.shape[-1] in (2, 4) else None
        colour = arr[..., : 3 if arr.shape[-1] >= 3 else 1].max(-1)
        # a transparent background with a painted region: the alpha channel is the mask
        arr = alpha if alpha is not None and alpha.min() != alpha.max() else colour
    if arr.ndim != 2 or min(arr.shape) < 1:
        raise ValueError(f"mask image {index} has shape {np.shape(image)}; expected [h, w] or [h, w, 1|2|3|4].")
    full = 255.0 if arr.dtype == np.uint8 else 65535.0 if arr.dtype == np.uint16 else 1.0
    soft = arr.astype(np.float32) / full
    h, w = soft.shape
    if (h, w) != (height, width):
        if abs(w / h - width / height) > 0.01 * width / height:
            raise ValueError(f"mask image {index} is {w}x{h} (WxH) but the video is {width}x{height}: aspect ratios "
                             "differ, so it cannot be resized; crop or pad the mask to the video's framing.")
        soft = np.asarray(Image.fromarray(soft).resize((width, height), Image.Resampling.BOX))
    mask = soft >= 0.5
    if not mask.any():
        raise ValueError(f"mask image {index} is empty (no pixel >= 50% of full scale); paint the face region white.")
    return mask


def masks_from_images(images: Sequence, num_frames: int, height: int, width: int, *, min_coverage: float = 0.0,
                      exclusive: bool = True, mouth_height: float = 0.4, mouth_width: float = 0.6,
                      spatial: int = SPATIAL) -> FaceMasks:
    """One mask image per speaker (path or array; white = face), the same for every frame, pooled
    to latent cells of `spatial` x `spatial` pixels (the VAE's `spatial_factor`).

    Images of another size are resized if their aspect ratio matches the video's. The mouth mask is
    the mask inside the lower-face box of its bounding box (see `mouth_boxes`). `boxes` holds the
    bounding boxes of the masks (no margin is added: the painted region is taken as is).
    """
    _check_options(min_coverage=min_coverage, mouth_height=mouth_height, mouth_width=mouth_width)
    _check_video_size(num_frames, height, width, spatial)
    if isinstance(images, (str, os.PathLike, np.ndarray)) or len(images) == 0:
        raise ValueError("images must be a non-empty list with one mask image per speaker.")
    masks = np.stack([_load_mask(im, i, height, width) for i, im in enumerate(images)])  # [S, H, W]
    boxes = np.stack([_bbox(m) for m in masks])  # [S, 4]
    mouth = mouth_boxes(boxes, mouth_height, mouth_width)
    mouth_px = masks & pixel_masks(mouth[None], height, width)[:, 0]
    pool = lambda m: m.reshape(len(m), height // spatial, spatial, width // spatial, spatial).mean((2, 4))  # noqa: E731
    T_lat = latent_num_frames(num_frames)
    repeat = lambda c: np.repeat(c[:, None], T_lat, axis=1).astype(np.float32)  # noqa: E731
    tile = lambda b: np.broadcast_to(b[None], (num_frames,) + b.shape)  # noqa: E731
    return _finish(repeat(pool(masks)), repeat(pool(mouth_px)), tile(boxes), tile(mouth), min_coverage, exclusive)


def box_mask_images(boxes, height: int, width: int, *, margin: float = 0.15) -> list[np.ndarray]:
    """One uint8 mask image per speaker (255 = face) from face boxes [S, 4] (x0, y0, x1, y1),
    grown by `margin` as `masks_from_boxes` grows them for training (`prepare.face_margin`):
    given to generation (`masks=`), they gate the audio over the face region the model was
    trained with, for a portrait whose face box is known but that the detector misses."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    grown = dilate_boxes(boxes, margin, height, width)
    return [(m[0] * 255).astype(np.uint8) for m in pixel_masks(grown[None], height, width)]


def _bbox(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float32)
