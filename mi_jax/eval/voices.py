"""`mi-jax eval --voice espeak|both`: the model driven by real speech (espeak-ng) on held-out clips,
scored beside the synthetic voice.

The speech clips are the synthetic world's espeak-ng clips (`synthetic.render_clip(...,
voice="espeak")`, needs `pip install -e .[speech]`): held-out seeds, so voices
(`speech.HELDOUT_VOICES`), variants and sentence words never trained on. Each is generated as
`mi-jax eval`'s synthetic clips are (`controls.heldout_generation`: the clip's first frame, its
audio, the face box as the audio mask, the same prompts and seeds) and scored by
`metrics.evaluate` (lip sync against the renderer's, identity, ...), plus the viseme shape:

* viseme shape: the mouth's width and height measured from the generated pixels
  (`synthetic.measure_mouth_shape` in the tracked mouth box) against the truth's `mouth_width`
  (frames whose truth opening is over `OPEN`, where a width is visible) and `mouth_height` (all
  frames), Pearson correlations; "shape" is their mean. The renderer scores ~1.

`write_voices` writes one report per voice (`report.write_report`) and `voices.md` /
`voices.json` side by side: lip sync per voice, espeak-ng's as a fraction of the synthetic
voice's, and the viseme shape, with the issue's thresholds (`check_voices`).
"""

from __future__ import annotations

import json
import os

import numpy as np

from mi_jax.data import synthetic
from mi_jax.eval import metrics
from mi_jax.eval.controls import EVAL_ACTIONS, _windows_starts, face_masks, heldout_generation
from mi_jax.eval.report import check, write_report

VOICE_CHOICES = ("synthetic", "espeak", "both")
OPEN = 0.3  # truth opening over which the mouth's width is scored
MIN_SHAPE = 0.5  # viseme shape correlation to pass
MIN_OF_SYNTHETIC = 0.85  # espeak-ng lip sync as a fraction of the synthetic voice's, to pass


def heldout_speech_generation(pipe, index: int, seconds: float):
    """`heldout_generation` with the held-out clip's voice espeak-ng speech: returns `(frames,
    clip, boundaries)`; the clip has the viseme truth."""
    action = EVAL_ACTIONS[index % len(EVAL_ACTIONS)]
    clip = synthetic.render_clip(synthetic.HELDOUT_SEED_START + index, seconds,
                                 size=(pipe.config.prepare.height, pipe.config.prepare.width), prompt=action,
                                 voice="espeak")
    masks = face_masks(clip, *clip.frames.shape[1:3], float(pipe.config.prepare.face_margin))
    video = pipe.generate(clip.frames[0], clip.audio, synthetic.prompt_for(action), seed=index, masks=masks)
    return video.frames, clip, _windows_starts(pipe.config.sample, len(video.frames))


def viseme_scores(frames: np.ndarray, clip: synthetic.Clip, box_margin: float = 0.1) -> dict:
    """The viseme shape of `frames` (uint8 `[T, H, W, 3]`, any size) against an espeak-ng clip's
    truth (module docstring).

    Returns:
      `{"width", "height", "shape", "open_frames"}`: means over speakers of the width
      correlation (None when fewer than 3 frames are open), the height correlation, their mean,
      and the number of open frames.

    Raises:
      ValueError: a clip without a viseme truth (not `voice="espeak"`).
    """
    if clip.mouth_width is None:
        raise ValueError("the clip has no viseme truth: render it with voice='espeak'")
    frames = np.asarray(frames)
    t = min(len(frames), len(clip.frames))
    frames = frames[:t]
    h, w = frames.shape[1:3]
    scale = np.array([w / clip.frames.shape[2], h / clip.frames.shape[1]] * 2)
    centres = metrics.head_centres(frames, len(clip.speaker_audio))
    widths, heights, opened = [], [], 0
    for s in range(len(clip.speaker_audio)):
        box = metrics.enlarge(metrics.tracked_boxes(clip.mouth_boxes[s, 0] * scale, centres[s]), box_margin)
        shape = synthetic.measure_mouth_shape(frames, box)
        true_w, true_h = clip.mouth_width[s, :t], clip.mouth_height[s, :t]
        open_ = true_h > OPEN
        opened += int(open_.sum())
        if open_.sum() >= 3:
            widths.append(metrics.pearson(shape[open_, 0], true_w[open_]))
        heights.append(metrics.pearson(shape[:, 1], true_h))
    width = float(np.mean(widths)) if widths else None
    height = float(np.mean(heights))
    return {"width": width, "height": height, "shape": height if width is None else (width + height) / 2,
            "open_frames": opened}


def evaluate_voice(pipe, voice: str, clips: int, seconds: float) -> dict:
    """`metrics.evaluate` on `clips` held-out clips of `seconds` with `voice` ("synthetic" or
    "espeak"); espeak-ng results add "visemes": per video `{"video", "truth"}` viseme scores and
    their means over videos in the summary."""
    if voice not in ("synthetic", "espeak"):
        raise ValueError(f"voice must be 'synthetic' or 'espeak', got {voice!r}")
    make = heldout_generation if voice == "synthetic" else heldout_speech_generation
    videos, truths, bounds = [], [], []
    for i in range(clips):
        frames, clip, seams = make(pipe, i, seconds)
        videos.append(frames)
        truths.append(clip)
        bounds.append(seams)
    results = metrics.evaluate(videos, truths, boundaries=bounds,
                               frames_per_latent=pipe.vae_stream.config.temporal_factor)
    results["voice"] = voice
    if voice == "espeak":
        per = [{"video": viseme_scores(v, c), "truth": viseme_scores(c.frames, c),
                "voice": c.speech[0]["voice"], "sentences": [s for _, s in c.speech[0]["sentences"]]}
               for v, c in zip(videos, truths)]
        for record, p in zip(results["videos"], per):
            record["visemes"] = p
        results["summary"]["visemes"] = {key: {side: _mean([p[side][key] for p in per]) for side in ("video", "truth")}
                                         for key in ("width", "height", "shape")}
    return results


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def check_voices(by_voice: dict) -> list[dict]:
    """Rows `{metric, voice, value, threshold, passed}` comparing the voices: each voice's lip
    sync (value, renderer's ratio, offsets), espeak-ng's lip sync as a fraction of the synthetic
    voice's (>= `MIN_OF_SYNTHETIC`), and the viseme shape (>= `MIN_SHAPE`)."""
    rows = []
    lips = {}
    for voice, results in by_voice.items():
        lip = results["summary"]["lip_sync"]
        lips[voice] = lip["value"]
        passed = next((r["passed"] for r in check(results) if r["metric"] == "lip-sync correlation"), None)
        rows.append({"metric": "lip-sync correlation", "voice": voice, "value": lip["value"], "renderer": lip["truth"],
                     "ratio": lip["ratio"], "offsets": lip["offsets"],
                     "threshold": ">= 0.6 x the renderer's, every offset within +-2 frames", "passed": passed})
    if "synthetic" in lips and "espeak" in lips:
        fraction = lips["espeak"] / lips["synthetic"] if lips["synthetic"] else None
        rows.append({"metric": "espeak-ng lip sync / synthetic voice's", "voice": "espeak", "value": fraction,
                     "threshold": f">= {MIN_OF_SYNTHETIC}",
                     "passed": fraction is not None and fraction >= MIN_OF_SYNTHETIC})
    if "espeak" in by_voice:
        v = by_voice["espeak"]["summary"]["visemes"]
        for key in ("width", "height", "shape"):
            rows.append({"metric": f"viseme {key} correlation", "voice": "espeak", "value": v[key]["video"],
                         "renderer": v[key]["truth"], "threshold": f">= {MIN_SHAPE}" if key == "shape" else "",
                         "passed": (v[key]["video"] is not None and v[key]["video"] >= MIN_SHAPE)
                         if key == "shape" else None})
    return rows


def write_voices(by_voice: dict, out: str) -> str:
    """Writes `out/<voice>/` (`report.write_report` per voice), `out/voices.json` (the rows of
    `check_voices` and each voice's results) and `out/voices.md`; returns voices.md's path."""
    os.makedirs(out, exist_ok=True)
    for voice, results in by_voice.items():
        write_report(results, os.path.join(out, voice))
    rows = check_voices(by_voice)
    with open(os.path.join(out, "voices.json"), "w") as f:
        json.dump({"rows": rows, "results": by_voice}, f, indent=1)
    fmt = lambda x: "—" if x is None else (f"{x:.3f}" if isinstance(x, float) else str(x))  # noqa: E731
    lines = ["# Lip sync by voice", "",
             "Held-out clips driven by the synthetic voice and by espeak-ng speech (unseen voices and "
             "sentences); per voice report in its folder.", "",
             "| metric | voice | value | renderer | threshold | result |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['voice']} | {fmt(r['value'])} | {fmt(r.get('renderer'))} | "
                     f"{r['threshold'] or '—'} | {'—' if r['passed'] is None else ('pass' if r['passed'] else 'FAIL')} |")
    if "espeak" in by_voice:
        lines += ["", "Speech clips: " + "; ".join(f"{v['name']}: {v['visemes']['voice']} "
                                                   f"(\"{(v['visemes']['sentences'] or [''])[0]}\" ...)"
                                                   for v in by_voice["espeak"]["videos"])]
    path = os.path.join(out, "voices.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path
