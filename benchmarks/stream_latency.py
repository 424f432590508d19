"""Live streaming latency: a voice spoken at real-time pace into the demo model, frames out as
each window finishes (`Pipeline.live`, mi_jax/live.py). Prints one JSON line.

    python benchmarks/stream_latency.py [--seconds 60] [--model demo/model] [--chunk-ms 20]

How it measures. The inputs are the demo's (`mi_jax.demo.demo_inputs`: a held-out synthetic
portrait, its face mask and a synthetic voice of `--seconds`), written to a temporary folder.
1. warm-up: one live stream over the first 3 s of the voice, as fast as it goes; everything
   compiles here (the window step, Wav2Vec2 on the live segment, the text and portrait
   encoders, the streaming VAE decoder): `compile_s` is its wall time, reported apart.
2. the measured stream: a source yields the voice in `--chunk-ms` chunks, each when its last
   sample has been "spoken" (it sleeps until then: a microphone at `--pace` x real time). The
   stream's clock starts when the first audio was spoken; a frame's latency is when it is
   yielded minus when its audio ended on that clock; it is late past the budget
   (`sample.stream_max_latency_s`, 1.0 s). `first_frame_s`: from the first audio to the first
   frame (the portrait, yielded with window 0's frames once 0.68 s + the lookahead of audio
   has arrived). `realtime_factor`: video seconds per second of compute (the time inside the
   stream not spent waiting for audio); >= 1 keeps up. `late_after_warmup` leaves out window
   0's frames.
3. memory: the process's resident set (VmRSS) read at every yielded part; `rss_start_mib` /
   `rss_end_mib` are its peaks over the first and the last 10 s of video. The consumer keeps
   only one frame a second of the first and the latest minute (bounded, whatever the length).
4. quality: the lip-sync correlation of the streamed frames (the voice's envelope against the
   mouth opening measured from the pixels, as `mi-jax demo` measures it) beside `generate`'s on
   the same voice (`--no-generate` skips it), since the live audio features differ from
   generate's (mi_jax/live.py); `colour_shift_de`: dE76 of the face's mean colour (the face
   mask's box) from the first to the last minute, one frame a second (`eval.metrics.colour_shift`).

The machine's load average is printed with the figures: timings on shared cores move with it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PROMPT = "a person talking"
COLOUR_WINDOW_S = 60.0


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def paced(audio: np.ndarray, chunk: int, rate: int, pace: float):
    """`audio` in chunks of `chunk` samples, each yielded once its last sample has been spoken."""
    start = time.monotonic()
    for a in range(0, len(audio), chunk):
        b = min(a + chunk, len(audio))
        wait = start + b / rate / pace - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        yield audio[a:b]


def mouth_box(size) -> np.ndarray:
    """The demo portrait's mouth box (the synthetic world's ground truth, as `mi-jax demo` uses)."""
    from mi_jax.data import synthetic
    from mi_jax.demo import HELDOUT_SEED

    return synthetic.render_clip(HELDOUT_SEED, 0.2, size=size).mouth_boxes[0, 0]


def mouth_open(frames: np.ndarray, box: np.ndarray) -> np.ndarray:
    from mi_jax.data import synthetic

    return synthetic.measure_mouth_open(frames, np.broadcast_to(box, (len(frames), 4)))


def lip_sync(mouth: np.ndarray, audio: np.ndarray, fps: float) -> float:
    from mi_jax.data import synthetic
    from mi_jax.eval.metrics import best_offset_correlation

    env = synthetic.mouth_envelope(audio, len(mouth), fps)
    return round(float(best_offset_correlation(env, mouth, 5)[0]), 3)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "demo", "model"))
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--chunk-ms", type=float, default=20.0, help="audio chunk size (a microphone's buffer)")
    ap.add_argument("--pace", type=float, default=1.0, help="speech speed: 1.0 = real time")
    ap.add_argument("--lookahead", type=float, default=None, help="seconds (default: the config's)")
    ap.add_argument("--no-generate", action="store_true", help="skip generate's lip sync for comparison")
    args = ap.parse_args(argv)

    import soundfile as sf

    from mi_jax.demo import demo_inputs
    from mi_jax.pipeline import Pipeline

    load_before = os.getloadavg()
    folder = tempfile.mkdtemp(prefix="stream_latency_")
    portrait, voice, mask = demo_inputs(folder, args.seconds)
    audio, rate = sf.read(voice, dtype="float32")
    audio = audio[: int(round(args.seconds * rate))]
    pipe = Pipeline.from_checkpoint(args.model)
    fps = float(pipe.config.prepare.fps)
    kw = dict(masks=[mask], lookahead_s=args.lookahead)

    t = time.monotonic()
    for _ in pipe.live(portrait, [audio[: 3 * rate]], PROMPT, pace=None, **kw):
        pass
    compile_s = time.monotonic() - t

    chunk = max(1, round(args.chunk_ms / 1000 * rate))
    stream = pipe.live(portrait, paced(audio, chunk, rate, args.pace), PROMPT, pace=args.pace, **kw)
    rss, mouth, box = [], [], None
    # for the colour shift one frame a second of the first and the latest minute (~1.5 MB at 64 px:
    # keeping every frame would add its own tens of MB to the memory figure)
    window, every = int(COLOUR_WINDOW_S), int(round(fps))
    first, last = [], collections.deque(maxlen=window)
    for part in stream:  # per part: memory, the mouth opening and the colour windows' frames
        rss.append((part.start / fps, _rss_mib()))
        box = mouth_box(part.frames.shape[1:3]) if box is None else box
        mouth.append(mouth_open(part.frames, box))
        for f in range(-part.start % every, len(part.frames), every):
            (first if len(first) < window else last).append(part.frames[f])
    report = stream.report()
    mouth = np.concatenate(mouth)
    seconds = len(mouth) / fps
    start = max(m for s, m in rss if s < 10.0)
    end = max(m for s, m in rss if s >= seconds - 10.0)
    result = dict(benchmark="stream_latency", seconds=report["seconds"], frames=report["frames"],
                  realtime_factor=report["realtime_factor"], compute_s=report["compute_s"],
                  first_frame_s=report["first_frame_s"], compile_s=round(compile_s, 2),
                  latency_p50_s=report["latency_p50_s"], latency_p95_s=report["latency_p95_s"],
                  latency_max_s=report["latency_max_s"], late=report["late"],
                  late_after_warmup=report["late_after_warmup"], max_latency_s=report["max_latency_s"],
                  lookahead_s=report["lookahead_s"], chunk_ms=args.chunk_ms, pace=args.pace,
                  rss_start_mib=round(start, 1), rss_end_mib=round(end, 1), rss_end_over_start=round(end / start, 3),
                  lip_sync_live=lip_sync(mouth, audio[: len(mouth) * rate // int(fps)], fps),
                  colour_shift_de=colour_shift_de(first, last, mask))
    if not args.no_generate:
        g = pipe.generate(portrait, audio, PROMPT, masks=[mask])
        result["lip_sync_generate"] = lip_sync(mouth_open(g.frames, box), g.audio, fps)
    result.update(load_before=[round(x, 2) for x in load_before],
                  load_after=[round(x, 2) for x in os.getloadavg()], cpus=os.cpu_count())
    print(json.dumps(result))
    return result


def colour_shift_de(first, last, mask: str) -> float:
    """dE76 between the mean face colour of the stream's first and last minute (a third each
    under two minutes), from one frame a second: `eval.metrics.colour_shift` over the bounding
    box of the face mask."""
    from PIL import Image

    from mi_jax.eval.metrics import colour_shift

    frames = np.stack(first + list(last))  # contiguous up to two minutes, else the first + the last minute
    ys, xs = np.nonzero(np.asarray(Image.open(mask).convert("L")) > 127)
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)
    shift = colour_shift(frames, 1.0, COLOUR_WINDOW_S, face_boxes=np.tile(box, (len(frames), 1)))
    return round(float(shift["delta_e"]), 3)


if __name__ == "__main__":
    main()
