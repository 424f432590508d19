"""Scores the long-video controls (mi_jax/generation/controls.py, colour_anchor.py) on a model:
prompt schedule, silence, two-speaker turns, colour anchor. Inputs are held-out synthetic clips
(seeds from `synthetic.HELDOUT_SEED_START`), so every figure has its ground truth; the speaker
masks are the truth's face boxes (as a user paints them), the metrics `mi_jax.eval.metrics`'.

    python -m mi_jax.eval.controls --checkpoint demo/model --check schedule --seconds 60
    python -m mi_jax.eval.controls --checkpoint demo/model --check silence --seconds 20 --gap 10
    python -m mi_jax.eval.controls --checkpoint demo/model --check turns --seconds 30
    python -m mi_jax.eval.controls --checkpoint demo/model --check anchor --seconds 180

Each prints one JSON object (the control's figures, next to the same run without the control
where that comparison is the point).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from mi_jax.data import faces, synthetic
from mi_jax.eval import metrics
from mi_jax.models.vae import TEMPORAL_FACTOR
from mi_jax.pipeline import Pipeline


def face_masks(clip, height: int, width: int, margin: float = 0.15) -> list[np.ndarray]:
    """One uint8 mask per speaker: its face box in the clip's first frame, grown as training's."""
    return faces.box_mask_images(clip.face_boxes[:, 0], height, width, margin=margin)


def _mouth(frames, clip, s=0, margin=0.1):
    centres = metrics.head_centres(frames, len(clip.speaker_audio))[s]
    box = metrics.enlarge(metrics.tracked_boxes(clip.mouth_boxes[s, 0], centres), margin)
    return metrics.mouth_opening(frames, box)


def _windows_starts(scfg, frames):
    """The first frame of every sampler window after the first (the seams), for `frames` frames."""
    step = TEMPORAL_FACTOR * (scfg.window - 1 - scfg.overlap)
    return list(range(1 + TEMPORAL_FACTOR * (scfg.window - 1), frames, step))


EVAL_ACTIONS = ("", "nodding", "shaking head")  # `mi-jax eval`'s clips cycle through these prompts


def heldout_generation(pipe: Pipeline, index: int, seconds: float):
    """`mi-jax eval`'s video number `index`, generated.

    The held-out clip `HELDOUT_SEED_START + index` prompted with `EVAL_ACTIONS[index % 3]` as a
    user phrases it, generated from its first frame and voice with the face region as the audio
    mask (as training gated the audio: prepare's truth boxes grown by `prepare.face_margin`; the
    face detector misses these 64x64 faces).

    Args:
      pipe: the model (`Pipeline`).
      index: which held-out clip.
      seconds: the video's length.

    Returns:
      `(frames, clip, boundaries)`: uint8 `[T, H, W, 3]`, the clip (its truth), and the first
      frame of every sampler window after the first (for the seam score).
    """
    action = EVAL_ACTIONS[index % len(EVAL_ACTIONS)]
    clip = synthetic.render_clip(synthetic.HELDOUT_SEED_START + index, seconds,
                                 size=(pipe.config.prepare.height, pipe.config.prepare.width), prompt=action)
    masks = face_masks(clip, *clip.frames.shape[1:3], float(pipe.config.prepare.face_margin))
    video = pipe.generate(clip.frames[0], clip.audio, synthetic.prompt_for(action), seed=index, masks=masks)
    return video.frames, clip, _windows_starts(pipe.config.sample, len(video.frames))


def check_schedule(pipe, seconds: float, switch: float, seed: int) -> dict:
    """The prompt schedule: 'a person talking' -> 'a person talking, nodding' at `switch` s.

    Args:
      pipe: the model (`Pipeline`).
      seconds: the video's length.
      switch: when the prompt changes, in seconds.
      seed: the noise seed.

    Returns:
      Head motion per half and the seam score at the switch (the window boundaries within 1 s of
      it), as a JSON-ready dict.
    """
    p = pipe.config.prepare
    clip = synthetic.render_clip(synthetic.HELDOUT_SEED_START + seed, seconds, size=(p.height, p.width))
    schedule = [(0.0, synthetic.prompt_for("")), (switch, synthetic.prompt_for("nodding"))]
    video = pipe.generate(clip.frames[0], clip.audio, schedule, seed=seed, masks=face_masks(clip, p.height, p.width, p.face_margin))
    frames = video.frames
    cut = round(switch * p.fps)
    c = metrics.head_centres(frames)[0]
    first, second = metrics.head_motion(c[:cut]), metrics.head_motion(c[cut:])
    near = [b for b in _windows_starts(pipe.config.sample, len(frames)) if abs(b - cut) <= p.fps]
    return {"seconds": seconds, "switch_s": switch, "vertical_var_first": first["vertical_var"],
            "vertical_var_second": second["vertical_var"],
            "vertical_ratio_second_over_first": second["vertical_var"] / max(first["vertical_var"], 1e-9),
            "seam_at_switch": metrics.seam_score(frames, near),
            "seam_all": metrics.seam_score(frames, _windows_starts(pipe.config.sample, len(frames)))}


def check_silence(pipe, seconds: float, gap: float, seed: int, rest: bool = True) -> dict:
    """The mouth rest: a voice with `gap` s of digital silence in the middle.

    Args:
      pipe: the model (`Pipeline`).
      seconds: the video's length.
      gap: the silence in seconds.
      seed: the noise seed.
      rest: generate with the mouth rest (default True; False for the comparison).

    Returns:
      Mouth opening, identity and face detail in the silence vs the talking parts, as a
      JSON-ready dict.
    """
    p = pipe.config.prepare
    clip = synthetic.render_clip(synthetic.HELDOUT_SEED_START + seed, seconds, size=(p.height, p.width))
    audio = clip.audio.copy()
    lo, hi = (seconds - gap) / 2, (seconds + gap) / 2
    audio[round(lo * p.sample_rate) : round(hi * p.sample_rate)] = 0.0
    video = pipe.generate(clip.frames[0], audio, synthetic.prompt_for(""), seed=seed, rest=rest,
                          masks=face_masks(clip, p.height, p.width, p.face_margin))
    frames = video.frames
    t = np.arange(len(frames)) / p.fps
    # a margin of 0.5 s each side: the mouth closes and opens around the silence's edges
    silent, talking = (t >= lo + 0.5) & (t < hi - 0.5), (t < lo - 0.5) | (t >= hi + 0.5)
    # the opening above the portrait's closed mouth (the measure reads ~0.03 on closed lips)
    closed = float(_mouth(clip.frames[:1], clip)[0])
    mouth = _mouth(frames, clip)
    above = np.maximum(mouth - closed, 0.0)
    centres = metrics.head_centres(frames)[0]
    face = metrics.tracked_boxes(clip.face_boxes[0, 0], centres)
    sim = metrics.identity_similarity(frames, clip.frames[0], face, clip.face_boxes[0, 0], clip.mouth_boxes[0, 0])
    eyes = metrics.eye_detail(frames, metrics.enlarge(metrics.tracked_boxes(clip.eye_boxes[0, 0], centres), 0.1))
    env = metrics.audio_envelope(audio, len(frames), p.fps, p.sample_rate)
    return {"seconds": seconds, "silence_s": [lo, hi], "rest": rest,
            "mouth_silence": float(mouth[silent].mean()), "mouth_talking": float(mouth[talking].mean()),
            "mouth_ratio": float(mouth[silent].mean() / max(mouth[talking].mean(), 1e-9)),
            "portrait_mouth": closed, "opening_silence": float(above[silent].mean()),
            "opening_talking": float(above[talking].mean()),
            "opening_ratio": float(above[silent].mean() / max(above[talking].mean(), 1e-9)),
            "identity_silence": float(sim[silent].mean()), "identity_talking": float(sim[talking].mean()),
            "face_detail_silence": float(eyes[silent].mean()), "face_detail_talking": float(eyes[talking].mean()),
            "lip_sync_talking": metrics.best_offset_correlation(env[talking], mouth[talking])[0]}


def check_turns(pipe, seconds: float, seed: int, rest: bool = True) -> dict:
    """Two speakers taking turns (the synthetic world's `speaking_turns`).

    Args:
      pipe: the model (`Pipeline`).
      seconds: the video's length.
      seed: the noise seed.
      rest: generate with the mouth rest (default True).

    Returns:
      Routing margins and each mouth's opening outside its own turns vs inside them, as a
      JSON-ready dict.
    """
    p = pipe.config.prepare
    clip = synthetic.render_clip(synthetic.HELDOUT_SEED_START + seed, seconds, size=(p.height, p.width), speakers=2)
    tracks = [a for a in clip.speaker_audio]
    video = pipe.generate(clip.frames[0], tracks, synthetic.prompt_for(""), seed=seed, rest=rest,
                          masks=face_masks(clip, p.height, p.width, p.face_margin))
    frames = video.frames
    envs = np.stack([metrics.audio_envelope(a, len(frames), p.fps, p.sample_rate) for a in tracks])
    mouths = np.stack([_mouth(frames, clip, s) for s in range(2)])
    closed = [float(_mouth(clip.frames[:1], clip, s)[0]) for s in range(2)]
    routing = metrics.routing(mouths, envs)
    turns = synthetic.speaking_turns(np.random.default_rng([clip.seed, 2]), len(clip.frames) / p.fps, 2)
    t = np.arange(len(frames)) / p.fps
    out = {"seconds": seconds, "rest": rest, "routing_margins": routing["margins"],
           "correlations": routing["correlations"], "listening_over_talking": []}
    for s in range(2):
        own = np.zeros(len(frames), bool)
        for a, b in turns[s]:
            own |= (t >= a) & (t < b)
        above = np.maximum(mouths[s] - closed[s], 0.0)  # the opening above the portrait's
        out["listening_over_talking"].append(float(above[~own].mean() / max(above[own].mean(), 1e-9)))
        out.setdefault("opening_talking", []).append(float(above[own].mean()))
    return out


def check_anchor(pipe, seconds: float, seed: int) -> dict:
    """The same long video with and without the colour anchor.

    Args:
      pipe: the model (`Pipeline`).
      seconds: the video's length.
      seed: the noise seed.

    Returns:
      Colour shift first vs last minute (dE76 over the face) and lip sync, with and without the
      anchor, as a JSON-ready dict.
    """
    p = pipe.config.prepare
    clip = synthetic.render_clip(synthetic.HELDOUT_SEED_START + seed, seconds, size=(p.height, p.width))
    truth = metrics.Truth.from_clip(clip)
    out = {"seconds": seconds}
    for anchor in (False, True):
        video = pipe.generate(clip.frames[0], clip.audio, synthetic.prompt_for(""), seed=seed, colour_anchor=anchor,
                              masks=face_masks(clip, p.height, p.width, p.face_margin))
        m = metrics.measure(video.frames, truth)
        key = "anchor" if anchor else "none"
        out[key] = {"colour_shift_dE": m["colour_shift"]["delta_e"], "lip_sync": m["lip_sync"][0]["correlation"],
                    "lip_sync_offset": m["lip_sync"][0]["offset"], "identity_drift": m["identity"]["drift"]}
    return out


def main(argv=None) -> int:
    """`python -m mi_jax.eval.controls`: runs one check and prints its JSON; returns 0."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="demo/model")
    ap.add_argument("--check", choices=("schedule", "silence", "turns", "anchor"), required=True)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--gap", type=float, default=10.0, help="silence: seconds of silence in the middle")
    ap.add_argument("--switch", type=float, default=None, help="schedule: the change's time (default: half way)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-rest", action="store_true", help="silence / turns: without the mouth rest")
    args = ap.parse_args(argv)
    pipe = Pipeline.from_checkpoint(args.checkpoint)
    if args.check == "schedule":
        out = check_schedule(pipe, args.seconds, args.switch or args.seconds / 2, args.seed)
    elif args.check == "silence":
        out = check_silence(pipe, args.seconds, args.gap, args.seed, rest=not args.no_rest)
    elif args.check == "turns":
        out = check_turns(pipe, args.seconds, args.seed, rest=not args.no_rest)
    else:
        out = check_anchor(pipe, args.seconds, args.seed)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
