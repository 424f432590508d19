"""User inputs for generation, checked before any compilation: the portrait, speaker masks,
the prompt's words.

Every problem raises `InputError` naming the input, the problem and the fix; fixable ones
(RGBA / greyscale / CMYK / palette images, sizes off the patch grid) are converted and reported
in `notices`, which the CLI prints.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from mi_jax.data import faces, synthetic
from mi_jax.data.text_encoder import prompt_words, unknown_words
from mi_jax.models.vae import SPATIAL_FACTOR

MIN_SIDE = 32
GRID = 2 * SPATIAL_FACTOR  # the default patch grid: the released VAE's 8x times the DiT's 2x2 patch


class InputError(ValueError):
    """A user input cannot be used; the message says which, why, and what to do."""


def _open_image(image, what: str):

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            if arr.dtype.kind == "f" and arr.size and 0.0 <= float(arr.min()) and float(arr.max()) <= 1.0:
                arr = (arr * 255).round().astype(np.uint8)
            else:
                raise InputError(f"{what}: array of dtype {arr.dtype}; pass uint8 RGB [H, W, 3] or floats in [0, 1]")
        if arr.ndim not in (2, 3):
            raise InputError(f"{what}: array of shape {arr.shape}; pass an image [H, W, 3] (or [H, W] greyscale)")
        return Image.fromarray(arr)
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise InputError(f"{what}: {path} does not exist (or is not a file); check the path")
    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{what}: {path} is not a readable image ({e}); use a PNG or JPEG") from None
    return img


def load_portrait(image, size: tuple[int, int] | None = None, grid: int = GRID) -> tuple[np.ndarray, list[str]]:
    """Portrait -> uint8 RGB `[H, W, 3]` and notices.

    size: (height, width) to produce (centre-cropped to its aspect ratio, then resized); None
    keeps the image's size rounded down to a multiple of `grid`, the latent patch grid in pixels
    (the VAE's spatial factor x the DiT's patch size: 16 for the released 8x VAE and patch 2, 8
    for a 4x VAE).
    """

    notices: list[str] = []
    img = _open_image(image, "portrait")
    if img.mode != "RGB":
        if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
            background = Image.new("RGB", img.size, (255, 255, 255))
            background.paste(img.convert("RGBA"), mask=img.convert("RGBA").split()[-1])
            notices.append(f"portrait: {img.mode} image composited on white and converted to RGB")
            img = background
        else:
            notices.append(f"portrait: {img.mode} image converted to RGB")
            img = img.convert("RGB")
    w, h = img.size
    if min(w, h) < MIN_SIDE:
        raise InputError(f"portrait: {w}x{h} is too small; use an image of at least {MIN_SIDE}x{MIN_SIDE} pixels")
    if size is None:
        th, tw = (h // grid) * grid, (w // grid) * grid
        if (th, tw) != (h, w):
            notices.append(f"portrait: {w}x{h} is not a multiple of {grid}; cropped to {tw}x{th}")
    else:
        th, tw = size
        if th % grid or tw % grid:
            rh, rw = max(grid, round(th / grid) * grid), max(grid, round(tw / grid) * grid)
            notices.append(f"size {tw}x{th} is not a multiple of {grid}; rounded to {rw}x{rh}")
            th, tw = rh, rw
    scale = max(th / h, tw / w)
    ch, cw = min(h, round(th / scale)), min(w, round(tw / scale))
    y0, x0 = (h - ch) // 2, (w - cw) // 2
    img = img.crop((x0, y0, x0 + cw, y0 + ch))
    if img.size != (tw, th):
        img = img.resize((tw, th), Image.BICUBIC)
    return np.asarray(img, np.uint8), notices


def speaker_masks(masks, speakers: int, height: int, width: int, portrait: np.ndarray,
                  spatial: int = SPATIAL_FACTOR) -> tuple[np.ndarray, list[str]]:
    """Per-speaker masks at latent resolution `[S, H/f, W/f]` in [0, 1] (f = `spatial`, the
    VAE's spatial factor).

    masks: None (one speaker: the face found in the portrait, else the whole frame) or one
    image per speaker (white = that speaker's region)."""
    face, _, notices = speaker_regions(masks, speakers, height, width, portrait, spatial)
    return face, notices


def speaker_regions(masks, speakers: int, height: int, width: int, portrait: np.ndarray,
                    spatial: int = SPATIAL_FACTOR) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """`speaker_masks`, and each speaker's mouth region at latent resolution `[S, H/f, W/f]`
    (float 0 / 1; all zero when no face was found)."""

    notices: list[str] = []
    if masks is None or len(masks) == 0:
        if speakers > 1:
            raise InputError(f"{speakers} audio tracks but no --mask: give one mask image per speaker "
                             "(white where that speaker is)")
        try:
            boxes = faces.detect_faces(portrait[None], num_speakers=1)
            fm = faces.masks_from_boxes(boxes, 1, height, width, spatial=spatial)
            return fm.face[:, 0].astype(np.float32), fm.mouth[:, 0].astype(np.float32), notices
        except ValueError:
            notices.append("no face found in the portrait: audio acts on the whole frame (pass --mask to choose)")
            shape = (1, height // spatial, width // spatial)
            return np.ones(shape, np.float32), np.zeros(shape, np.float32), notices
    if len(masks) != speakers:
        raise InputError(f"{len(masks)} mask(s) for {speakers} audio track(s): give exactly one mask per --audio, "
                         "in the same order")
    try:
        fm = faces.masks_from_images(list(masks), 1, height, width, spatial=spatial)
    except ValueError as e:
        raise InputError(f"mask: {e}") from None
    return fm.face[:, 0].astype(np.float32), fm.mouth[:, 0].astype(np.float32), notices


def prompt_notices(prompt: str, vocabulary) -> list[str]:
    """A notice naming the words of `prompt` the model never saw in training (not in
    `vocabulary`, config `prepare.text_vocabulary`), which will have no effect, and the
    synthetic world's actions it does know; [] when every word is known or `vocabulary` is
    empty (no check: e.g. the real text encoder, which knows English)."""

    if not isinstance(prompt, str):
        return []  # not a prompt at all: the text encoder raises, naming the fix
    vocabulary = {w.lower() for w in vocabulary}
    unknown = unknown_words(prompt, vocabulary)
    if not unknown:
        return []
    quoted = ", ".join(f'"{w}"' for w in unknown)
    seen = (f"the word {quoted}; it will" if len(unknown) == 1 else f"the words {quoted}; they will")
    known = [a for a in synthetic.ACTIONS if set(prompt_words(a)) <= vocabulary]
    if known:
        hint = f'Known actions: {", ".join(known)} (e.g. "{synthetic.prompt_for(known[0])}")'
    else:
        hint = "Words it knows: " + ", ".join(sorted(vocabulary))
    return [f"prompt: the model has never seen {seen} have no effect. {hint}"]
