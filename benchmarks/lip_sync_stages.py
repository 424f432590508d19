"""Where a model's lip sync is lost, stage by stage, on `mi-jax eval`'s held-out clips.

    python benchmarks/lip_sync_stages.py [--checkpoint demo/model] [--clips 3] [--seconds 30]

Per clip (`eval.controls.heldout_generation`: clip i of the eval, its prompt and audio mask), the
same lip-sync measure (`eval.metrics.measure`: voice envelope against the mouth opening read from
pixels in the tracked mouth box, best offset within +-5 frames) on three videos of the same
frames and voice:

* renderer        the synthetic world's own frames (the measure's ceiling, ~0.99);
* vae round trip  those frames through the checkpoint's VAE exactly as training and generation
                  see them (`pipeline.vae_round_trip`): what a perfect DiT could show at best;
* generated       the model's video from the first frame, the voice and the prompt.

Also per video: the mouth box's mean opening and its spread, and the head's vertical / horizontal
motion ratio (text control). A drop from "vae round trip" to "generated" is the DiT's and the
sampler's; from "renderer" to "vae round trip", the VAE's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=os.path.join(ROOT, "demo", "model"))
    ap.add_argument("--clips", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--json", default="", help="also write the figures here")
    args = ap.parse_args(argv)
    rows = measure(args.checkpoint, args.clips, args.seconds)
    print(f"{'clip':<28}{'stage':<16}{'lip sync':>9}{'offset':>7}{'mouth mean':>11}{'spread':>8}{'v / h':>8}")
    for r in rows:
        print(f"{r['clip']:<28}{r['stage']:<16}{r['lip_sync']:>9.3f}{r['offset']:>+7d}{r['mouth_mean']:>11.3f}"
              f"{r['mouth_std']:>8.3f}{r['motion_ratio']:>8.2f}")
    for stage in ("renderer", "vae round trip", "generated"):
        mean = np.mean([r["lip_sync"] for r in rows if r["stage"] == stage])
        print(f"mean {stage}: {mean:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def measure(checkpoint: str, clips: int = 3, seconds: float = 30.0) -> list[dict]:
    from mi_jax.eval import metrics
    from mi_jax.eval.controls import heldout_generation
    from mi_jax.models.vae import TEMPORAL_FACTOR
    from mi_jax.pipeline import Pipeline, vae_round_trip

    pipe = Pipeline.from_checkpoint(checkpoint)
    rows = []
    for i in range(clips):
        t0 = time.time()
        generated, clip, _ = heldout_generation(pipe, i, seconds)
        truth = metrics.Truth.from_clip(clip)
        n = 1 + TEMPORAL_FACTOR * ((len(clip.frames) - 1) // TEMPORAL_FACTOR)  # whole latents for the VAE's round trip
        for stage, frames in (("renderer", clip.frames), ("vae round trip", vae_round_trip(pipe.enc, clip.frames[:n])),
                              ("generated", generated)):
            r = metrics.measure(frames, truth)
            mouth = np.asarray(r["mouth_series"][0])
            rows.append(dict(clip=truth.name, stage=stage, lip_sync=round(r["lip_sync"][0]["correlation"], 4),
                             offset=int(r["lip_sync"][0]["offset"]), mouth_mean=round(float(mouth.mean()), 4),
                             mouth_std=round(float(mouth.std()), 4), motion_ratio=round(r["motion"]["ratio"], 3),
                             clip_seconds=round(time.time() - t0, 1)))  # the clip's wall time so far
    return rows


if __name__ == "__main__":
    sys.exit(main())
