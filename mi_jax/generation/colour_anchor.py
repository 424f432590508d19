"""Colour anchor: keeps a long video's colour on the portrait's.

Sliding-window generation can let the colour creep over minutes (each window continues from
the last one's latents, so a small bias per window adds up). The anchor measures every decoded
frame's mean colour outside the mouth region, compares it with the portrait's over the same
pixels, and adds the difference, smoothed over `time_constant_s` (an exponential moving
average, so blinks, mouth motion and head motion within a second are not followed), to every
pixel of the frame. It is one offset per frame, the same for every pixel: what moves inside the
frame, the mouth included, moves exactly as generated; only slow global colour is held. The
anchor runs on the frames as they stream out (constant memory), in uint8 RGB.

The idea is the classic mean-colour transfer (Reinhard et al., "Color Transfer between
Images", 2001) reduced to its first moment and applied against drift over time.
"""

from __future__ import annotations

import numpy as np

from mi_jax.generation.controls import dilate


class ColourAnchor:
    """`anchor(chunk)`: uint8 `[n, H, W, 3]` -> the same frames held on the reference's colour.

    reference: uint8 `[H, W, 3]` (the portrait); exclude: bool `[H, W]` pixels left out of the
    statistics (the mouth regions) or None; fps: frames per second of the stream."""

    def __init__(self, reference: np.ndarray, fps: float, exclude: np.ndarray | None = None,
                 time_constant_s: float = 1.0):
        if reference.ndim != 3 or reference.shape[-1] != 3:
            raise ValueError(f"reference must be [H, W, 3], got {reference.shape}")
        keep = np.ones(reference.shape[:2], bool) if exclude is None else ~np.asarray(exclude, bool)
        if not keep.any():
            keep = np.ones(reference.shape[:2], bool)
        self.keep = keep
        self.target = reference[keep].astype(np.float64).mean(0)  # [3]
        self.alpha = 1.0 - np.exp(-1.0 / max(time_constant_s * fps, 1e-9))
        self.offset = np.zeros(3)

    def __call__(self, chunk: np.ndarray) -> np.ndarray:
        out = np.empty_like(chunk)
        for i, frame in enumerate(chunk):
            error = self.target - frame[self.keep].astype(np.float64).mean(0)
            self.offset += self.alpha * (error - self.offset)
            out[i] = np.clip(frame.astype(np.float32) + self.offset.astype(np.float32), 0, 255).round()
        return out


def mouth_pixels(mouths: np.ndarray, height: int, width: int) -> np.ndarray:
    """bool `[H, W]`: the union of the speakers' mouth regions `[S, h, w]` (latent resolution)
    at pixel resolution, one latent cell wider on every side (the decoder spreads each cell)."""

    any_mouth = np.asarray(mouths).max(0) > 0  # [h, w]
    grown = dilate(dilate(any_mouth, 1).T, 1).T
    fy, fx = height // grown.shape[0], width // grown.shape[1]
    return np.repeat(np.repeat(grown, fy, axis=0), fx, axis=1)
