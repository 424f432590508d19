"""The page's inputs: the bundled examples, the prompts the model knows, painted masks, and the
page's raw values turned into what `Studio.check` takes."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
from PIL import Image

from mi_jax.data import faces, synthetic
from mi_jax.data.inputs import InputError
from mi_jax.data.text_encoder import prompt_words
from mi_jax.demo import HELDOUT_SEED, demo_inputs

BUNDLED_VOICE_SECONDS = 10.0  # the bundled voice written when the checkpoint has none beside it


@dataclasses.dataclass
class Bundled:
    """The example inputs offered on the page: portrait image paths and a voice file path."""

    portraits: list[str]
    voice: str


def bundled_inputs(checkpoint: str, folder: str, size: tuple[int, int]) -> Bundled:
    """The portraits and the voice offered on the page, written to `folder`.

    The page serves nothing from elsewhere: the demo's `portrait.png` and `voice.wav` beside the
    checkpoint (as `mi-jax demo` reads them) are copied, or, when the checkpoint has none beside it,
    the same held-out identity and voice are written there (`demo.demo_inputs`); plus two more
    held-out identities of the synthetic world at the model's size.

    Args:
      checkpoint: the run folder the page serves.
      folder: where the files go (created if missing).
      size: `(height, width)` of the extra portraits.

    Returns:
      `Bundled` with three portrait paths and one voice path.
    """

    beside = os.path.dirname(os.path.abspath(checkpoint).rstrip("/"))
    os.makedirs(folder, exist_ok=True)
    portrait, voice = os.path.join(folder, "portrait.png"), os.path.join(folder, "voice.wav")
    if os.path.isfile(os.path.join(beside, "portrait.png")) and os.path.isfile(os.path.join(beside, "voice.wav")):
        shutil.copy(os.path.join(beside, "portrait.png"), portrait)
        shutil.copy(os.path.join(beside, "voice.wav"), voice)
    else:
        portrait, voice, _ = demo_inputs(folder, BUNDLED_VOICE_SECONDS)
    portraits = [portrait]
    for k in (1, 2):
        path = os.path.join(folder, f"portrait_{k}.png")
        Image.fromarray(synthetic.render_clip(HELDOUT_SEED + k, 0.2, size=size).frames[0]).save(path)
        portraits.append(path)
    return Bundled(portraits, voice)


def known_prompts(config) -> list[str]:
    """The neutral prompt and one per action of the synthetic world whose words the model saw in
    training (config `prepare.text_vocabulary`; every action when there is no vocabulary)."""

    vocabulary = {w.lower() for w in config.prepare.get("text_vocabulary", ())}
    prompts = [synthetic.prompt_for(a) for a in ("",) + tuple(synthetic.ACTIONS)]
    return [p for p in prompts if not vocabulary or set(prompt_words(p)) <= vocabulary]


def masks_from_drawing(value) -> list[np.ndarray]:
    """The mask painter's value -> one mask per speaker.

    Args:
      value: Gradio ImageEditor's value (numpy): a dict whose `layers` are RGBA `[H, W, 4]`
        arrays; red strokes are speaker 1, blue strokes speaker 2. None is nothing painted.

    Returns:
      uint8 `[H, W]` masks (255 = that speaker), speaker 1 first; [] when nothing is painted.

    Raises:
      InputError: speaker 2 is painted but speaker 1 is not.
    """

    layers = [np.asarray(x) for x in ((value or {}).get("layers") or []) if x is not None]
    layers = [x for x in layers if x.ndim == 3 and x.shape[-1] == 4]
    if not layers:
        return []
    rgba = np.stack(layers).astype(np.int16)  # [L, H, W, 4]
    painted = rgba[..., 3] > 0
    red = (painted & (rgba[..., 0] >= rgba[..., 2])).any(0)
    blue = (painted & (rgba[..., 2] > rgba[..., 0])).any(0)
    if blue.any() and not red.any():
        raise InputError("mask: speaker 2 (blue) is painted but speaker 1 (red) is not; paint both speakers")
    return [m.astype(np.uint8) * 255 for m in (red, blue) if m.any()]


def mouth_box(portrait: np.ndarray) -> tuple[np.ndarray, str]:
    """Where to measure the mouth for the lip-sync plot: the lower face of the face found in the
    portrait (`faces.detect_faces`, `faces.mouth_boxes`), else the lower face of a centred
    portrait (where the synthetic world's mouths are).

    Args:
      portrait: uint8 `[H, W, 3]`.

    Returns:
      The box `(x0, y0, x1, y1)` in pixels (float32 `[4]`) and how it was found, in words.
    """

    try:
        box = faces.mouth_boxes(faces.detect_faces(portrait[None], num_speakers=1))[0, 0]
        if np.all(np.isfinite(box)):
            return box, "the face found in the portrait"
    except ValueError:
        pass
    h, w = portrait.shape[:2]
    return np.array([0.33 * w, 0.52 * h, 0.67 * w, 0.78 * h], np.float32), "a centred face (none detected)"


@dataclasses.dataclass
class Checked:
    """A request whose inputs passed the CLI's checks."""

    portrait: str
    audio: str | list  # file paths, or for typed words the spoken track (float32 at the config's rate)
    prompt: str
    seconds: float | None
    masks: list | None
    seed: int
    steps: int | None
    image: np.ndarray  # the portrait as the model sees it
    frames: int
    notices: list[str]
    timeline: str | None = None  # a file of START END SPEAKER lines (mi_jax/generation/controls.py)
    colour_anchor: bool | None = None
    rest: bool = True


def page_prompt(text: str | None):
    """The prompt box: one prompt, or one 'SECONDS:TEXT' per line (a schedule).

    Returns:
      The stripped prompt (`""` for none), or the list of non-empty lines when there are several.
    """
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines if len(lines) > 1 else (lines[0] if lines else "")


def upload_path(value) -> str | None:
    """An upload as the page sends it without preprocessing (Gradio's FileData: a dict whose path
    is in the page's upload folder, checked there by Gradio) -> its path."""
    if isinstance(value, dict):
        return value.get("path")
    return value or None


def page_values(portrait, voice, prompt, seconds, seed, steps, voice2, mask_files, mask_drawing, timeline=None,
                colour_anchor=False, rest=True, *say) -> tuple:
    """The page's inputs, sent without preprocessing, as `Studio.check` takes them.

    Returns:
      The same twelve values in order, uploads as paths (None when empty), the mask files as a
      list of paths or None, the painted layers as `{"layers": [RGBA arrays]}`; then `say` as
      given (the Say box's text and its espeak-ng voice, when the page sends them).
    """

    layers = []
    for layer in (mask_drawing or {}).get("layers") or []:
        if upload_path(layer):
            with Image.open(upload_path(layer)) as im:
                layers.append(np.asarray(im.convert("RGBA")))
    files = [upload_path(f) for f in (mask_files or []) if upload_path(f)]
    return (upload_path(portrait), upload_path(voice), prompt, seconds, seed, steps, upload_path(voice2),
            files or None, {"layers": layers}, upload_path(timeline), colour_anchor, rest, *say)


def shown(message: str, values) -> str:
    """A message about uploads names them as the user did (their file name), not by the temporary
    path they were stored at; `values` are the page's values (paths, lists of paths)."""
    for p in sorted(_paths(values), key=len, reverse=True):
        message = message.replace(p, os.path.basename(p))
    return message


def notes(req: Checked, values) -> str:
    """The request's notices as the page shows them under the status line."""
    return "".join(f"\n\nnote: {shown(n, values)}" for n in req.notices)


def _paths(values) -> list[str]:
    out = []
    for v in values:
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += [x for x in v if isinstance(x, str)]
    return [p for p in out if p]
