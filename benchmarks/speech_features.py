"""What the demo's audio features know of the mouth: a linear probe, random Wav2Vec2 against the
trained speech encoder, on held-out espeak-ng voices. Issue 30.

    python benchmarks/speech_features.py [--wav2vec2 demo/wav2vec2] [--train 60] [--heldout 10] [--seconds 6]

For each encoder (the demo config's `random:0` Wav2Vec2 and the folder given) the features are
computed as `prepare` computes them (`Encoders.audio_at_frames`: the same windows, normalisation
and interpolation to video-frame times, the layers of `prepare.audio_layers`). A ridge regression
(features of frames t-2 .. t+2, standardised, lambda 100) is fitted on `--train` espeak-ng clips
of the train split (train voices and sentences) and scored on `--heldout` clips of held-out
voices and sentences (seeds from `HELDOUT_SEED_START`): Pearson r of the prediction with the
truth's mouth height (all frames) and mouth width (frames open above 0.3, as `mi-jax eval
--voice espeak` scores the width). The DiT can only draw what its audio features carry: a width
the probe cannot find is one the model is unlikely to learn.

Prints one JSON line per encoder.
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
    ap.add_argument("--wav2vec2", default=os.path.join(ROOT, "demo", "wav2vec2"), help="a transformers Wav2Vec2 folder")
    ap.add_argument("--train", type=int, default=60, help="espeak-ng clips to fit the probe on (train split)")
    ap.add_argument("--heldout", type=int, default=10, help="held-out clips to score it on")
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--lam", type=float, default=100.0, help="ridge penalty")
    args = ap.parse_args(argv)
    if not os.path.exists(os.path.join(args.wav2vec2, "config.json")):
        ap.error(f"--wav2vec2 {args.wav2vec2}: no config.json; build it with `make demo-model` or pass a folder")
    for name, spec in (("random:0", "random:0"), ("trained", args.wav2vec2)):
        print(json.dumps(dict(encoder=name, **probe(spec, args.train, args.heldout, args.seconds, args.lam))), flush=True)
    return 0


def probe(wav2vec2: str, train: int, heldout: int, seconds: float, lam: float = 100.0) -> dict:
    """Held-out Pearson r of a ridge probe from `wav2vec2`'s features to the mouth's height and width."""
    from mi_jax.config_utils import load_config
    from mi_jax.data import synthetic
    from mi_jax.data.prepare import Encoders
    from mi_jax.eval.voices import OPEN  # the frames whose width `mi-jax eval --voice espeak` scores

    t0 = time.time()
    enc = Encoders(load_config(os.path.join(ROOT, "configs", "magicinfinite.py:demo,stage1"),
                               [f"prepare.wav2vec2={wav2vec2}"]))

    def data(seeds):
        xs, widths, heights = [], [], []
        for s in seeds:
            clip = synthetic.render_clip(int(s), seconds, size=(32, 32), voice="espeak")
            f = enc.audio_at_frames(clip.audio, clip.fps, len(clip.frames)).reshape(len(clip.frames), -1)
            pad = np.pad(f, ((2, 2), (0, 0)), mode="edge")
            xs.append(np.concatenate([pad[i : i + len(f)] for i in range(5)], 1))
            widths.append(clip.mouth_width[0])
            heights.append(clip.mouth_height[0])
        return np.concatenate(xs), np.concatenate(widths), np.concatenate(heights)

    x_train, w_train, h_train = data(range(train))
    x_held, w_held, h_held = data(range(synthetic.HELDOUT_SEED_START, synthetic.HELDOUT_SEED_START + heldout))
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a_train = np.c_[(x_train - mu) / sd, np.ones(len(x_train))]
    a_held = np.c_[(x_held - mu) / sd, np.ones(len(x_held))]
    gram = a_train.T @ a_train + lam * np.eye(a_train.shape[1])
    out = {}
    open_ = h_held > OPEN
    for name, y_train, y_held, keep in (("height", h_train, h_held, slice(None)), ("width", w_train, w_held, open_)):
        pred = a_held @ np.linalg.solve(gram, a_train.T @ y_train)
        out[f"{name}_r"] = round(float(np.corrcoef(pred[keep], y_held[keep])[0, 1]), 3)
    out.update(frames_train=len(x_train), frames_heldout=len(x_held), open_frames=int(open_.sum()),
               wall_seconds=round(time.time() - t0, 1))
    return out


if __name__ == "__main__":
    sys.exit(main())
