"""The VAE alone, through the pipeline's own path, on held-out ground-truth clips.

    python benchmarks/vae_regime.py [--vae demo/vae] [--clips 6] [--seconds 4] [--variant demo] [--speakers 2]

Per held-out synthetic clip (seeds from 1,000,000, never trained on): the portrait (frame 0)
and the whole clip are encoded as `prepare` encodes them (`Encoders.encode_video`: one
`VAEStream` pass), the latents [portrait, clip latents 1..] are decoded by the pipeline's
streaming decoder (`_FrameDecoder`, the tiles generation decodes with: the config variant's
`prepare.vae_tiling`), and the frames are
scored against the renderer's own frames of the same clip:

* lip sync: Pearson correlation of the voice envelope with the mouth opening measured from
  pixels, best offset within +-5 frames (the offset is printed: > 0 the mouth lags);
* face detail: edge energy of the eye band (`eval.metrics.eye_detail`), reconstructed / renderer;
  per clip (the clips cycle through the training prompts: neutral, nodding, shaking head, ...),
  and split into the frames a latent ends on (frame 4k: what a per-frame latent codes) and the
  three between them (what the decoder has to draw from two latents);
* latent steps: `eval.metrics.seam_score` at the first frame of every latent (frames 5, 9, ...):
  the change into a new latent over the change inside one. The renderer's is about 1; a VAE that
  holds each latent's 4 frames and jumps to the next scores high, and every window seam of
  generation falls on such a boundary.

For contrast the same clips are also run through the regimes the old demo mixed: the VAE on
5-frame chunks and on one single pass over the clip. Prints a table and the pass / fail of the
goals (lip sync >= 0.65 at |offset| <= 2, face detail >= 0.8 x the renderer's).

`--speakers 2`: two-speaker clips (each face in its half of the frame, taking turns), every
figure per speaker against that speaker's own voice and boxes: what a two-speaker model could at
best draw through this VAE.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vae", default=os.path.join(ROOT, "demo", "vae"))
    ap.add_argument("--clips", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--json", default="", help="also write the figures here")
    ap.add_argument("--speakers", type=int, default=1, choices=(1, 2), help="faces per clip (2: turns)")
    ap.add_argument("--variant", default="demo", help="configs/magicinfinite.py variant whose prepare.vae_tiling "
                    "the pipeline path uses (demo: 5-frame tiles; tiny: diffusers' 17)")
    args = ap.parse_args(argv)
    print(json.dumps(measure(args.vae, args.clips, args.seconds, args.json, args.variant, args.speakers), indent=1))
    return 0


def measure(vae: str, clips: int = 6, seconds: float = 4.0, out: str = "", variant: str = "demo",
            speakers: int = 1) -> dict:
    from mi_jax.config_utils import load_config
    from mi_jax.data import synthetic
    from mi_jax.data.prepare import Encoders
    from mi_jax.eval.metrics import best_offset_correlation, eye_detail, seam_score
    from mi_jax.models.vae import TEMPORAL_FACTOR
    from mi_jax.pipeline import _to_uint8, vae_round_trip

    # the demo config: its VAE tiling (prepare.vae_tiling) is the stream the pipeline runs
    cfg = load_config(os.path.join(ROOT, "configs", f"magicinfinite.py:{variant},stage1"), [f"prepare.vae={vae!r}"])
    cfg.model.in_channels = cfg.model.out_channels = _latent_channels(vae)
    enc = Encoders(cfg)
    vae_model, params = enc.vae_stream.vae, enc.vae_params
    size = (int(cfg.prepare.height), int(cfg.prepare.width))
    single = jax.jit(lambda p, v: vae_model.apply({"params": p}, vae_model.apply({"params": p}, v, method="encode")[0],
                                                  method="decode"))

    def chunks_of(frames, n):  # the VAE on separate n-frame clips (the old training regime)
        out = [frames[:1]]
        for s in range(0, len(frames) - n + 1, n - 1):
            out.append(np.asarray(_to_uint8(single(params, _unit(frames[s : s + n]))))[1:])
        return np.concatenate(out)

    regimes = {"pipeline (VAEStream tiles)": lambda f: vae_round_trip(enc, f), "5-frame chunks": lambda f: chunks_of(f, 5),
               "single pass": lambda f: np.asarray(_to_uint8(single(params, _unit(f))))}
    rows = {name: [] for name in ["renderer", *regimes]}
    steps = {name: [] for name in rows}
    t0 = time.time()
    for i in range(clips):
        clip = synthetic.render_clip(synthetic.HELDOUT_SEED_START + i, seconds, size=size,
                                     prompt=synthetic.TRAINING_PROMPTS[i % len(synthetic.TRAINING_PROMPTS)],
                                     speakers=speakers)
        n = 1 + TEMPORAL_FACTOR * ((len(clip.frames) - 1) // TEMPORAL_FACTOR)  # whole latents
        truth = clip.frames[:n]
        voices = clip.audio[None] if speakers == 1 else clip.speaker_audio
        videos = {name: fn(truth)[:n] for name, fn in [("renderer", lambda f: f), *regimes.items()]}
        for name, video in videos.items():
            steps[name].append(seam_score(video, range(1 + TEMPORAL_FACTOR, n, TEMPORAL_FACTOR)))
        for s in range(speakers):
            env = synthetic.mouth_envelope(voices[s], n, clip.fps)
            base = eye_detail(truth, clip.eye_boxes[s, :n])
            own = np.arange(n) % TEMPORAL_FACTOR == 0  # frame 0 and every latent's last frame (4k)
            for name, video in videos.items():
                mouth = synthetic.measure_mouth_open(video, clip.mouth_boxes[s, :n])
                corr, offset = best_offset_correlation(env, mouth, 5)
                d = eye_detail(video, clip.eye_boxes[s, :n])
                rows[name].append((float(corr), int(offset), float(d.mean() / base.mean()),
                                   float(d[own].mean() / base[own].mean()), float(d[~own].mean() / base[~own].mean())))
    summary = {}
    for name, r in rows.items():
        corr, off, det, det_own, det_between = (np.array(v) for v in zip(*r))
        summary[name] = {"lip_sync": round(float(corr.mean()), 3), "offsets": off.tolist(),
                         "face_detail": round(float(det.mean()), 3), "face_detail_per_clip": det.round(3).tolist(),
                         "face_detail_own_frames": round(float(det_own.mean()), 3),
                         "face_detail_between_frames": round(float(det_between.mean()), 3),
                         "latent_steps": round(float(np.mean(steps[name])), 2)}
    p = summary["pipeline (VAEStream tiles)"]
    summary["goals"] = {
        "lip_sync >= 0.65 at |offset| <= 2": bool(p["lip_sync"] >= 0.65 and max(map(abs, p["offsets"])) <= 2),
        "face_detail >= 0.8 x renderer": bool(p["face_detail"] >= 0.8),
    }
    summary["vae"], summary["clips"], summary["seconds"], summary["speakers"] = vae, clips, seconds, speakers
    summary["wall_seconds"] = round(time.time() - t0, 1)
    if out:
        with open(out, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _latent_channels(vae: str) -> int:
    with open(os.path.join(vae, "config.json")) as f:
        return int(json.load(f)["latent_channels"])


def _unit(frames):
    return jnp.asarray(frames, jnp.float32)[None] / 127.5 - 1.0


if __name__ == "__main__":
    sys.exit(main())
