"""Generation cost at 10 s, 40 s and 160 s of video on the tiny config, end to end (portrait.png +
voice.wav on disk -> mp4 on disk): wall time per generated second and peak memory, each
length side by side with its ratio to the first (10 s) row.

    python benchmarks/generate_long.py [--lengths 10 40 160] [--steps 2] [--repeats 2]

Goal: per-second cost flat within +-15% and peak memory within +10% from 10 s to 160 s.

How it measures. The parent writes the inputs (one portrait, one voice wav per length) and
runs each length in a fresh Python process, which:
1. builds the pipeline (a randomly initialised tiny model: speed and memory do not depend on
   the weights);
2. cold call: one warm-up generate of a 2 s clip to an mp4, timed; this is where everything
   compiles (the window step, Wav2Vec2's fixed chunk, the portrait encoder, every shape of
   the streaming VAE decoder), once for every later length: a user generating several videos
   pays it once. The table's `cold s` column is this first call's wall time;
3. measured call: `pipe.write(out, pipe.stream(portrait.png, voice.wav, prompt))`, i.e. reading
   and checking the inputs, face masks, text / portrait / audio encoders, every window, the
   streaming decoder and H.264 + AAC encoding into the mp4, timed from the call to the closed
   file (compilation excluded by step 2; the `compiles` column counts XLA compilations
   during this call, expected 0). It runs until at least `--repeats` calls and `--budget`
   seconds of calls (default 2 and 30 s: ~15 calls at 10 s, 2 at 160 s) and the table shows
   the mean cost per video second over them: the same measuring effort at every length. On
   these 2 shared cores one 10 s call varies by +-12% from call to call (2.08-2.60 s in one
   process), so a fastest-of-2 at 10 s against one 160 s call (which averages over 35 s)
   decided the ratio by luck; the fastest call is printed too. `CPU s / video s` is the
   process's CPU time (all threads) per video second, printed beside it;
4. peak memory of the first `--repeats` measured calls (the same number at every length):
   before them, the process hands freed heap back to the OS
   (`release_free_heap`, glibc's malloc_trim, as the pipeline does at every call and every 2 s:
   otherwise what compilation freed but malloc kept, which varies by +-100 MiB from run to
   run, would set the peak) and resets its RSS high-water mark (`echo 5 >
   /proc/self/clear_refs`, Linux); after the calls it reads VmHWM from /proc/self/status. On
   CPU every device buffer is host memory, so this peak covers the parameters, encoders,
   activations, decoder state, the input audio and the writer. The
   `life MiB` column is the process's whole-life peak (ru_maxrss before the reset, or after
   the call if higher), which also holds compilation. Without clear_refs (not Linux) the
   whole-life peak is used for both.
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
PROMPT = "a person talking"


def _vm_hwm_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(seconds: float, steps: int, repeats: int, budget: float, inputs: str, out: str) -> dict:
    import jax
    from flax import linen as nn

    from mi_jax.config_utils import load_config
    from mi_jax.data.video_io import probe
    from mi_jax.models import DiT, example_inputs
    from mi_jax.pipeline import Pipeline, release_free_heap

    config = load_config(os.path.join(ROOT, "configs", "magicinfinite.py:tiny,stage2"), [f"sample.steps={steps}"])
    model = DiT(config.model)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), **example_inputs(model.config, frames=3)))["params"]
    pipe = Pipeline(config, params)
    portrait = os.path.join(inputs, "portrait.png")

    def generate(wav: str) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        pipe.write(out, pipe.stream(portrait, wav, PROMPT))
        return time.perf_counter() - t0, time.process_time() - c0

    cold, _ = generate(os.path.join(inputs, "voice_warmup.wav"))
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, duration, **_: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        else None)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the reset below resets this too
    release_free_heap()
    reset = _reset_peak()
    # equal measuring effort per length: calls until `budget` seconds of them (at least `repeats`);
    # the peak is read after the first `repeats` calls, the same number for every length
    calls, peak = [], None
    while len(calls) < repeats or sum(w for w, _ in calls) < budget:
        calls.append(generate(os.path.join(inputs, f"voice_{seconds:g}.wav")))
        if len(calls) == repeats:
            peak = _vm_hwm_mib() if reset else None
    wall, cpu = (sum(x) / len(calls) for x in zip(*calls))
    life = max(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    info = probe(out)
    return {"seconds": seconds, "wall_s": wall, "s_per_video_second": wall / seconds, "cold_s": cold,
            "cpu_per_video_second": cpu / seconds, "calls": len(calls),
            "fastest_s_per_video_second": min(w for w, _ in calls) / seconds,
            "compiles": len(compiles), "peak_mib": peak if reset else life, "life_mib": life,
            "frames": info.num_frames, "expected_frames": round(seconds * 25)}


def write_inputs(folder: str, lengths) -> None:
    import numpy as np
    import soundfile as sf
    from PIL import Image

    from mi_jax.data import synthetic

    Image.fromarray(synthetic.render_clip(1_000_000, 0.2, size=(64, 64)).frames[0]).save(
        os.path.join(folder, "portrait.png"))
    for name, sec in [("warmup", 2.0)] + [(f"{s:g}", s) for s in lengths]:
        rng = np.random.default_rng(0)
        audio = synthetic.speech_audio(rng, int(sec * 16000), 140.0, synthetic.speaking_turns(rng, sec, 1)[0])
        sf.write(os.path.join(folder, f"voice_{name}.wav"), audio, 16000)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=float, nargs="+", default=[10, 40, 160])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="measured calls per length, at least")
    ap.add_argument("--budget", type=float, default=30.0,
                    help="seconds of measured calls per length, at least (more calls for short videos)")
    ap.add_argument("--child", type=float, default=None)
    ap.add_argument("--inputs", default=None)
    args = ap.parse_args()
    if args.child is not None:
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(child(args.child, args.steps, args.repeats, args.budget, args.inputs, os.path.join(d, "out.mp4"))))
        return
    load_start = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as inputs:
        write_inputs(inputs, args.lengths)
        for seconds in args.lengths:
            res = subprocess.run([sys.executable, __file__, "--child", str(seconds), "--steps", str(args.steps),
                                  "--repeats", str(args.repeats), "--budget", str(args.budget), "--inputs", inputs],
                                 capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
            if res.returncode:
                sys.exit(f"child for {seconds} s failed:\n{res.stderr[-3000:]}")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"end-to-end generation (files in, mp4 out), tiny config, {args.steps} steps x 3 CFG branches, CPU, "
          f"mean of >= {args.repeats} calls and >= {args.budget:g} s of calls per length after one warm-up call; load average {load_start[0]:.1f} at start, "
          f"{os.getloadavg()[0]:.1f} at end")
    print(f"{'video s':>8} {'frames':>7} {'calls':>6} {'cold s':>7} {'wall s':>8} {'s / video s':>12} {'ratio':>6} {'fastest':>8} "
          f"{'CPU s / video s':>16} {'ratio':>6} {'compiles':>9} {'peak MiB':>9} {'ratio':>6} {'life MiB':>9}")
    for r in rows:
        assert r["frames"] == r["expected_frames"], r
        print(f"{r['seconds']:8.0f} {r['frames']:7d} {r['calls']:6d} {r['cold_s']:7.1f} {r['wall_s']:8.1f} "
              f"{r['s_per_video_second']:12.3f} {r['s_per_video_second'] / base['s_per_video_second']:6.2f} "
              f"{r['fastest_s_per_video_second']:8.3f} "
              f"{r['cpu_per_video_second']:16.3f} {r['cpu_per_video_second'] / base['cpu_per_video_second']:6.2f} "
              f"{r['compiles']:9d} {r['peak_mib']:9.0f} {r['peak_mib'] / base['peak_mib']:6.2f} {r['life_mib']:9.0f}")
    cost = max(abs(r["s_per_video_second"] / base["s_per_video_second"] - 1) for r in rows)
    mem = max(r["peak_mib"] / base["peak_mib"] - 1 for r in rows)
    print(f"per-second cost within +-15%: {cost <= 0.15} ({cost:+.1%} max); "
          f"peak memory within +10%: {mem <= 0.10} ({mem:+.1%} max)")


if __name__ == "__main__":
    main()
