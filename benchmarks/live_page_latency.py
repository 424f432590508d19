"""Audio-to-frame latency of the two streaming layers a live page can use, in Chromium, on this
machine: Gradio's own streaming (`gr.Audio(streaming=True)` chunks up, a generator's image
updates down: what the Live tab of `mi-jax app` uses) against fastrtc (WebRTC: the microphone as
an audio track up, a video track down).

    python benchmarks/live_page_latency.py --layer gradio --seconds 10
    python benchmarks/live_page_latency.py --layer fastrtc --fastrtc-python /tmp/frtc/bin/python

The layer alone is timed, with the same stand-in for the model in both: Chromium's fake
microphone plays a chirp (its frequency rises linearly, so any stretch of it says when it was
spoken); the server estimates, from the latest audio it got, the chirp time of its last sample,
and shows that time as a 16-bit barcode frame at once. The page decodes every frame it displays
(a canvas read per animation frame) and the latency of a frame is when it showed minus when its
audio was captured (capture start, taken when `getUserMedia` resolved, plus the chirp time).
The model's own latency (window + lookahead + compute, `benchmarks/stream_latency.py`) adds to
both layers alike. One JSON line per layer: frames decoded, p50 / p95 / max latency, frames per
second shown.

fastrtc 0.0.34 (its newest release) needs gradio<6 and this project uses Gradio 6, so fastrtc
runs from its own environment: `python -m venv /tmp/frtc && /tmp/frtc/bin/pip install
fastrtc==0.0.34 'gradio<6'` and `--fastrtc-python /tmp/frtc/bin/python` (the server half of
this script imports only numpy and the layer).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

RATE = 48000
F0, SLOPE = 300.0, 400.0  # chirp: F0 + SLOPE * t Hz (300 Hz -> 8.3 kHz over 20 s)
CHIRP_S = 20.0
WINDOW = 2048  # samples the server's estimate looks at (43 ms)
SIDE, BITS = 128, 16  # frame size; a 4 x 4 grid of black / white blocks
UNIT_S = 0.005  # the barcode counts chirp time in 5 ms steps


def chirp() -> np.ndarray:
    t = np.arange(int(CHIRP_S * RATE)) / RATE
    return (0.5 * np.sin(2 * np.pi * (F0 * t + 0.5 * SLOPE * t * t))).astype(np.float32)


def chirp_time(x: np.ndarray, rate: int) -> float | None:
    """The chirp time of the last sample of `x` (its peak frequency, interpolated), or None when quiet."""
    n = min(len(x), int(WINDOW * rate / RATE))
    if n < 256 or float(np.sqrt(np.mean(np.square(x[-n:])))) < 0.01:
        return None
    spectrum = np.abs(np.fft.rfft(x[-n:] * np.hanning(n)))
    k = int(np.argmax(spectrum[1:-1])) + 1
    a, b, c = np.log(spectrum[k - 1 : k + 2] + 1e-12)
    k += 0.5 * (a - c) / (a - 2 * b + c)  # quadratic peak interpolation
    f = k * rate / n
    return (f - F0) / SLOPE + 0.5 * n / rate  # the window's centre -> its last sample


def barcode(t: float) -> np.ndarray:
    """uint8 [SIDE, SIDE, 3]: `t / UNIT_S` as 16 black / white blocks, most significant first."""
    value = int(round(t / UNIT_S)) % (1 << BITS)
    bits = np.array([(value >> (BITS - 1 - i)) & 1 for i in range(BITS)], np.uint8).reshape(4, 4)
    return np.repeat(np.repeat(bits * 255, SIDE // 4, 0), SIDE // 4, 1)[..., None].repeat(3, 2)


class Estimate:
    """The latest audio (mono float) of one stream and the frame it gives."""

    def __init__(self):
        self.audio = np.zeros(0, np.float32)
        self.version = 0
        self.frame = barcode(0.0)

    def add(self, rate: int, samples: np.ndarray) -> None:
        x = np.asarray(samples)
        if x.ndim == 2:
            x = x.mean(axis=1) if x.shape[0] > x.shape[1] else x.mean(axis=0)
        if x.dtype.kind in "iu":
            x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
        self.audio = np.concatenate([self.audio, x.astype(np.float32)])[-4 * WINDOW :]
        t = chirp_time(self.audio, rate)
        if t is not None:
            self.frame = barcode(t)
            self.version += 1


# ----------------------------------------------------------------------------- servers


def serve_gradio(port: int, stream_every: float) -> None:
    """The Live tab's pattern: chunks every `stream_every` s to a stream event, frames from a generator."""
    import threading

    import gradio as gr

    estimates: dict[str, Estimate] = {}
    changed = threading.Condition()

    def push(chunk, request: gr.Request):
        if chunk is not None:
            with changed:
                estimates.setdefault(request.session_hash, Estimate()).add(*chunk)
                changed.notify_all()

    def watch(request: gr.Request):
        seen, end = -1, time.monotonic() + 120
        while time.monotonic() < end:
            with changed:
                changed.wait_for(lambda: estimates.get(request.session_hash, Estimate()).version != seen, timeout=1)
                e = estimates.get(request.session_hash)
            if e is not None and e.version != seen:
                seen = e.version
                yield e.frame

    with gr.Blocks() as page:
        mic = gr.Audio(sources=["microphone"], streaming=True, type="numpy", elem_id="mic")
        frame = gr.Image(elem_id="frame", format="png", interactive=False)
        mic.start_recording(lambda: None, None, None, queue=False).then(watch, None, [frame], concurrency_limit=4,
                                                                        concurrency_id="live")
        mic.stream(push, [mic], None, stream_every=stream_every, time_limit=None, concurrency_limit=None,
                   concurrency_id="audio")
    page.queue().launch(server_port=port, ssr_mode=False, prevent_thread_lock=False)


def serve_fastrtc(port: int) -> None:
    """fastrtc's audio-video send-receive stream: microphone track in, video track out."""
    from fastrtc import AudioVideoStreamHandler, Stream

    class Handler(AudioVideoStreamHandler):
        def __init__(self):
            super().__init__(input_sample_rate=RATE, output_sample_rate=RATE)
            self.estimate = Estimate()

        def receive(self, frame):
            rate, samples = frame
            self.estimate.add(rate, samples)

        def emit(self):
            return None

        def video_receive(self, frame):
            pass

        def video_emit(self):
            return self.estimate.frame

        def copy(self):
            return Handler()

    stream = Stream(Handler(), modality="audio-video", mode="send-receive")
    stream.ui.launch(server_port=port, ssr_mode=False)


# ----------------------------------------------------------------------------- the browser

INIT = """(() => {
  window.__gum = [];
  const gum = navigator.mediaDevices.getUserMedia.bind(navigator.mediaDevices);
  navigator.mediaDevices.getUserMedia = async (c) => { const s = await gum(c);
    if (c && c.audio) window.__gum.push(performance.now()); return s; };
  window.__shown = [];
  const canvas = document.createElement('canvas'); canvas.width = 4; canvas.height = 4;
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  let last = -1;
  const read = () => {
    const el = document.querySelector(window.__target || '#frame img');
    if (el && (el.naturalWidth || el.videoWidth)) {
      try {
        ctx.drawImage(el, 0, 0, 4, 4);
        const px = ctx.getImageData(0, 0, 4, 4).data;
        let v = 0; for (let i = 0; i < 16; i++) v = v * 2 + (px[4 * i] > 127 ? 1 : 0);
        if (v !== last) { last = v; window.__shown.push([performance.now(), v]); }
      } catch (e) {}
    }
    requestAnimationFrame(read);
  };
  requestAnimationFrame(read);
})()"""


def measure(layer: str, url: str, wav: str, seconds: float) -> dict:
    from playwright.sync_api import sync_playwright

    flags = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream",
             "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
             "--autoplay-policy=no-user-gesture-required"]
    chromium = os.environ.get("MI_JAX_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=flags)
        page = browser.new_context(viewport={"width": 1280, "height": 1000},
                                   permissions=["microphone", "camera"]).new_page()
        page.add_init_script(INIT)
        page.goto(url)
        if layer == "gradio":
            page.wait_for_selector("#mic .record-button", timeout=60_000)
            page.locator("#mic .record-button").click()
        else:
            page.evaluate("window.__target = 'video'")  # the local preview until the remote stream replaces it
            page.wait_for_selector("button:has-text('Record')", timeout=60_000)
            # dispatched: Gradio's footer overlaps the button in a small window
            page.wait_for_load_state("networkidle")
            page.wait_for_timeout(2000)  # a click before the component is ready is lost
            page.locator("button").filter(has_text="Record").first.dispatch_event("click")
            page.wait_for_function("() => Array.from(document.querySelectorAll('video')).some(v => v.srcObject && "
                                   "v.srcObject.getTracks().some(t => t.label.startsWith('remote')))",
                                   timeout=60_000)  # the server's video track arrived
        page.wait_for_timeout(seconds * 1000)
        gum, shown = page.evaluate("window.__gum"), page.evaluate("window.__shown")
        browser.close()
    if not gum or not shown:
        raise RuntimeError(f"{layer}: no capture ({len(gum)}) or no frames decoded ({len(shown)})")
    start = gum[-1]
    lat = np.array([(t - start) / 1000 - v * UNIT_S for t, v in shown if v > 0])
    lat = lat[lat > -0.5]  # a frame from before this capture (the file loops)
    if not len(lat):
        raise RuntimeError(f"{layer}: no frame decoded after the capture began (capture {gum}, shown {shown[:8]})")
    span = (shown[-1][0] - shown[0][0]) / 1000
    return dict(layer=layer, frames=int(len(lat)), latency_p50_s=round(float(np.percentile(lat, 50)), 3),
                latency_p95_s=round(float(np.percentile(lat, 95)), 3), latency_min_s=round(float(lat.min()), 3),
                latency_max_s=round(float(lat.max()), 3), frames_per_s=round(len(shown) / max(span, 1e-9), 1),
                seconds=seconds)


def run(layer: str, python: str, seconds: float, stream_every: float) -> dict:
    import portpicker
    import soundfile as sf

    port = portpicker.pick_unused_port()
    with tempfile.TemporaryDirectory(prefix="live_latency_") as tmp:
        wav = os.path.join(tmp, "chirp.wav")
        sf.write(wav, chirp(), RATE, subtype="PCM_16")
        log = open(os.path.join(tmp, "server.log"), "w")
        env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
        server = subprocess.Popen([python, os.path.abspath(__file__), "--serve", layer, "--port", str(port),
                                   "--stream-every", str(stream_every)],
                                  stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            url = f"http://127.0.0.1:{port}/"
            deadline = time.monotonic() + 120
            while "Running on local URL" not in open(log.name).read():
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the {layer} server did not start:\n{open(log.name).read()[-3000:]}")
                time.sleep(0.2)
            return dict(measure(layer, url, wav, seconds), **({"stream_every": stream_every} if layer == "gradio" else {}))
        finally:
            server.terminate()
            server.wait(30)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", choices=("gradio", "fastrtc", "both"), default="both")
    ap.add_argument("--seconds", type=float, default=10.0, help="seconds of streaming per layer (< 20)")
    ap.add_argument("--fastrtc-python", default=sys.executable,
                    help="a Python with fastrtc and gradio<6 installed (see the docstring)")
    ap.add_argument("--stream-every", type=float, default=0.1,
                    help="gradio: seconds of microphone audio per chunk sent (the Live tab's STREAM_EVERY)")
    ap.add_argument("--serve", choices=("gradio", "fastrtc"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        if args.serve == "gradio":
            serve_gradio(args.port, args.stream_every)
        else:
            serve_fastrtc(args.port)
        return 0
    if not 0 < args.seconds < CHIRP_S - 2:
        ap.error(f"--seconds {args.seconds}: use 1 to {CHIRP_S - 2:g} (the chirp lasts {CHIRP_S:g} s, then loops)")
    layers = ("gradio", "fastrtc") if args.layer == "both" else (args.layer,)
    for layer in layers:
        python = args.fastrtc_python if layer == "fastrtc" else sys.executable
        print(json.dumps(run(layer, python, args.seconds, args.stream_every)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
