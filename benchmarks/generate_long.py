"""Streaming generation cost at 10 s, 40 s and 160 s of video on the tiny config: wall time per
generated second (compilation excluded) and peak memory (the
process's max RSS), each length in a fresh process, printed side by side with their ratios.

    python benchmarks/generate_long.py [--lengths 10 40 160] [--steps 2]

The goal: per-second cost flat within +-15% and peak memory within +10% from 10 s to 160 s
(the streaming generator keeps one window, the VAE stream state and the video writer). Each
child first generates a 2 s clip so that compilation is not counted.
Uses a randomly initialised tiny model: speed and memory do not depend on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def one(seconds: float, steps: int, out: str) -> dict:
    import jax
    import numpy as np
    from flax import linen as nn

    from mi_jax.config_utils import load_config
    from mi_jax.data import synthetic
    from mi_jax.data.video_io import write_video
    from mi_jax.models import DiT, example_inputs
    from mi_jax.pipeline import Pipeline

    config = load_config(os.path.join(ROOT, "configs", "magicinfinite.py:tiny,stage2"),
                         [f"sample.steps={steps}"])
    model = DiT(config.model)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), **example_inputs(model.config, frames=3)))["params"]
    pipe = Pipeline(config, params)
    portrait = synthetic.render_clip(1_000_000, 0.2, size=(64, 64)).frames[0]
    rng = np.random.default_rng(0)

    def voice(sec):
        return synthetic.speech_audio(rng, int(sec * 16000), 140.0, synthetic.speaking_turns(rng, sec, 1)[0])

    # warm-up: a short clip compiles the window step and every streaming-decoder step
    write_video(out, (f for chunk in pipe.stream(portrait, voice(2.0), "a person talking") for f in chunk), 25.0)
    audio = voice(seconds)
    t_start = time.perf_counter()
    frames = pipe.stream(portrait, audio, "a person talking")
    write_video(out, (f for chunk in frames for f in chunk), 25.0, audio=audio)
    wall = time.perf_counter() - t_start
    return {"seconds": seconds, "wall_s": wall, "s_per_video_second": wall / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=float, nargs="+", default=[10, 40, 160])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--child", type=float, default=None)
    args = ap.parse_args()
    if args.child is not None:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(one(args.child, args.steps, os.path.join(d, "out.mp4"))))
        return
    rows = []
    for seconds in args.lengths:
        out = subprocess.run([sys.executable, __file__, "--child", str(seconds), "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"streaming generation, tiny config, {args.steps} steps x CFG branches, CPU")
    print(f"{'video s':>8} {'wall s':>8} {'s / video s':>12} {'ratio':>6} {'peak RSS MiB':>13} {'ratio':>6}")
    for r in rows:
        print(f"{r['seconds']:8.0f} {r['wall_s']:8.1f} {r['s_per_video_second']:12.3f} "
              f"{r['s_per_video_second'] / base['s_per_video_second']:6.2f} {r['peak_rss_mib']:13.0f} "
              f"{r['peak_rss_mib'] / base['peak_rss_mib']:6.2f}")
    cost = max(abs(r["s_per_video_second"] / base["s_per_video_second"] - 1) for r in rows)
    mem = max(r["peak_rss_mib"] / base["peak_rss_mib"] - 1 for r in rows)
    print(f"per-second cost within +-15%: {cost <= 0.15} ({cost:+.1%} max); peak memory within +10%: {mem <= 0.10} ({mem:+.1%} max)")


if __name__ == "__main__":
    main()
