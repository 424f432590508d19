"""The page's Live tab: talk into the microphone (or play a voice file) and watch the face answer
as you speak. Imports Gradio (the `app` extra).

Each page session has at most one live stream on the app's `LiveHub` (mi_jax/serve.py), the
same model the Generate tab uses. The microphone is Gradio's streaming `gr.Audio`: its recorder
sends a chunk every `STREAM_EVERY` seconds (`Handlers.push` feeds it to the stream), and a
generator (`Handlers.watch`) shows the newest frame of each window as soon as it is decoded, with
the stream's latency and its late frames: a stream behind real time says so on the page. A
closed or reloaded tab closes its stream (`unload`), as do Stop and a new recording.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import gradio as gr
import numpy as np

from mi_jax.app.inputs import upload_path
from mi_jax.data.audio_io import AudioError, load_audio
from mi_jax.data.inputs import InputError
from mi_jax.pipeline import spoken
from mi_jax.serve import LiveHub, ServerBusy, StreamClosed

STREAM_EVERY = 0.1  # seconds of microphone audio per chunk the page sends (benchmarks/live_page_latency.py)
FEED_CHUNK_S = 0.1  # a played file is fed in chunks of this many seconds, at real-time pace
LIVE_SIDE = 256  # the live frame is shown about this large
LAST_CHUNKS_S = 0.5  # after Stop on the recorder, its last chunks may still arrive for this long


@dataclasses.dataclass
class LiveControls:
    """The Live tab's components."""

    portrait: gr.Image
    prompt: gr.Textbox
    steps: gr.Slider
    seed: gr.Number
    mic: gr.Audio
    file: gr.Audio
    say: gr.Textbox
    play: gr.Button
    stop: gr.Button
    frame: gr.Image
    status: gr.Markdown
    heard: gr.Audio

    @property
    def settings(self) -> list:
        return [self.portrait, self.prompt, self.steps, self.seed]


def live_tab(studio, max_streams: int) -> LiveControls:
    """The Live tab's components, inside the current `gr.Tab`."""
    gr.Markdown("Talk into the microphone (Record) or play a voice file: the face answers as you speak, "
                f"about {studio.fps:g} frames per second of audio, a window at a time. Up to {max_streams} "
                "live streams at once on this machine; a stream behind real time says so below.")
    with gr.Row():
        with gr.Column():
            portrait = gr.Image(label="Portrait", type="filepath", sources=["upload"], elem_id="live-portrait",
                                height=220)
            gr.Examples([[p] for p in studio.bundled.portraits], inputs=[portrait], label="Bundled portraits")
            prompt = gr.Textbox(label="Prompt", value=studio.prompts[0], elem_id="live-prompt")
            with gr.Row():
                steps = gr.Slider(1, max(50, studio.default_steps), value=studio.default_steps, step=1,
                                  label="Sampler steps (fewer: lower latency)", elem_id="live-steps")
                seed = gr.Number(label="Seed", value=0, precision=0, elem_id="live-seed")
            mic = gr.Audio(label="Talk: Record starts the live stream, Stop ends it", sources=["microphone"],
                           streaming=True, type="numpy", elem_id="live-mic")
            file = gr.Audio(label="...or a voice file to play live", sources=["upload"], type="filepath",
                            elem_id="live-file")
            say = gr.Textbox(label="...or words to say live (espeak-ng, when no file is given)", lines=1,
                             placeholder="Hello, I answer as the words are spoken.", elem_id="live-say")
            with gr.Row():
                play = gr.Button("Play the file (or say the words) live", variant="primary", elem_id="live-play")
                stop = gr.Button("Stop", variant="stop", elem_id="live-stop")
        with gr.Column():
            status = gr.Markdown("Pick a portrait, then Record (or play a file).", elem_id="live-status",
                                 min_height=48)
            frame = gr.Image(label="Live", interactive=False, elem_id="live-frame", height=300, format="png")
            heard = gr.Audio(label="The file, as the stream hears it", interactive=False, autoplay=True,
                             elem_id="live-heard")
    return LiveControls(portrait, prompt, steps, seed, mic, file, say, play, stop, frame, status, heard)


def wire_live(c: LiveControls, handlers: "LiveHandlers", page: gr.Blocks) -> None:
    """Connects the Live tab's events, inside the current `gr.Blocks`.

    Record opens the session's stream (outside the queue: at once) and then runs its viewer; the
    recorder's chunks go to `push` (never queued behind a job); Stop on the recorder ends the
    audio, and the viewer finishes the frames and shows the report.
    """
    slots = dict(concurrency_limit=handlers.hub.max_streams, concurrency_id="live")
    opened = c.mic.start_recording(handlers.start, c.settings, [c.status], queue=False, show_progress="hidden",
                                   preprocess=False)
    opened.then(handlers.watch, None, [c.frame, c.status], show_progress="hidden", **slots)
    c.mic.stream(handlers.push, [c.mic], None, stream_every=STREAM_EVERY, time_limit=None,
                 concurrency_limit=None, concurrency_id="live-audio", show_progress="hidden")
    c.mic.stop_recording(handlers.end, None, None, queue=False, show_progress="hidden")
    c.play.click(handlers.play, [*c.settings, c.file, c.say], [c.frame, c.status, c.heard], show_progress="hidden",
                 preprocess=False, **slots)
    c.stop.click(handlers.stop, None, [c.status], queue=False, show_progress="hidden")
    page.unload(handlers.unload)


class LiveHandlers:
    """What the Live tab's events do, on `hub`; each page session (`request.session_hash`) owns
    at most one stream."""

    def __init__(self, studio, hub: LiveHub):
        self.studio, self.hub = studio, hub

    # ------------------------------------------------------------------ opening and closing

    def _open(self, request: gr.Request, portrait, prompt, steps, seed):
        path = upload_path(portrait)
        if not path:
            raise InputError("portrait: upload one or pick a bundled portrait before recording")
        if seed is None or float(seed) != int(seed):
            raise InputError(f"seed={seed}: use a whole number")
        return self.hub.open(path, prompt or "", key=request.session_hash, seed=int(seed),
                             steps=None if steps is None else int(steps))

    def start(self, request: gr.Request, portrait, prompt, steps, seed):
        """Record: opens the session's stream (its previous one is closed); the settings are
        checked now, before any compute."""
        try:
            self._open(request, portrait, prompt, steps, seed)
        except (InputError, ServerBusy) as e:
            return f"error: {e}"
        return "Listening: the face starts once the first window's audio is in…"

    def push(self, request: gr.Request, chunk):
        """A microphone chunk `(rate, samples)` goes to the session's stream (none open: dropped)."""
        session = self._session(request)
        if session is None or chunk is None:
            return
        rate, samples = chunk
        try:
            session.feed(samples, int(rate))
        except StreamClosed:
            pass

    def end(self, request: gr.Request):
        """Stop on the recorder: the audio is over; the viewer finishes the frames."""
        session = self._session(request)
        if session is not None:
            session.end(quiet_s=LAST_CHUNKS_S)

    def stop(self, request: gr.Request):
        """Stop: closes the session's stream at once (its viewer ends)."""
        session = self._session(request)
        if session is None:
            return gr.skip()
        session.close("stopped on the page")
        return "Stopped."

    def unload(self, request: gr.Request):
        """The tab was closed or reloaded: its stream and its state go."""
        session = self._session(request)
        if session is not None:
            session.close("the page was closed")

    def _session(self, request: gr.Request):
        return next((s for s in self.hub.sessions() if s.key == request.session_hash), None)

    # ------------------------------------------------------------------ showing

    def watch(self, request: gr.Request):
        """The viewer (after `start`): the newest frame of each window as it is decoded, with the latency."""
        session = self._session(request)
        if session is None:  # `start` opened no stream (its error is shown) or it was stopped already
            yield gr.skip(), gr.skip()
            return
        yield from self._show(session)

    def play(self, request: gr.Request, portrait, prompt, steps, seed, voice, say=None):
        """Play the file (or the typed words, spoken by espeak-ng) live: fed at real-time pace
        while the frames are shown."""
        path = upload_path(voice)
        typed = say.strip() if isinstance(say, str) else ""
        try:
            if path:
                audio = load_audio(path, self.studio.sample_rate, allow_silence=True, fps=self.studio.fps)
                heard = path
            elif typed:
                audio = spoken(self.studio.config, typed).audio  # InputError: no espeak-ng, unspeakable text
                heard = (self.studio.sample_rate, audio)
            else:
                raise InputError("voice file: upload one, type words to say, or record with the microphone")
            session = self._open(request, portrait, prompt, steps, seed)
        except (InputError, AudioError, ServerBusy) as e:
            yield gr.skip(), f"error: {e}", gr.skip()
            return
        feeder = threading.Thread(target=_feed_in_real_time, args=(session, audio, self.studio.sample_rate),
                                  name=f"mi-jax-live-feed-{session.id}", daemon=True)
        feeder.start()
        yield gr.skip(), "Playing live…", heard
        for frame, status in self._show(session):
            yield frame, status, gr.skip()

    def _show(self, session):
        try:
            for part in session.parts():
                yield enlarged(part.frames[-1], LIVE_SIDE), _line(part, session)
        except (InputError, RuntimeError) as e:  # bad audio; a stream closed before its viewer began
            yield gr.skip(), f"error: {e}"
            return
        report = session.report()
        if report["status"] != "ended":
            yield gr.skip(), f"Stream {report['status']}. {_summary(report)}"
            return
        yield gr.skip(), f"Done: {_summary(report)}"


def _feed_in_real_time(session, audio: np.ndarray, rate: int) -> None:
    """Feeds `audio` to `session` in `FEED_CHUNK_S` chunks as if spoken now, then ends it."""
    step = max(1, round(FEED_CHUNK_S * rate))
    t0 = time.monotonic()
    try:
        for i in range(0, len(audio), step):
            wait = t0 + i / rate - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            session.feed(audio[i : i + step])
        session.end()
    except StreamClosed:
        pass


def _line(part, session) -> str:
    frame = part.start + len(part.frames) - 1
    latency = part.latency[-1]
    text = f"Live: frame {frame} ({(frame + 1) / session.stream.fps:.1f} s)"
    if np.isfinite(latency):
        text += f", {latency:.2f} s after its audio"
    report = session.report()
    if report["late"]:
        text += (f". Behind real time: {report['late']} frame(s) later than {session.stream.max_latency_s:g} s "
                 "after their audio")
    if report["dropped_s"]:
        text += f"; {report['dropped_s']:.1f} s of audio dropped (the model could not keep up)"
    return text + "."


def _summary(report: dict) -> str:
    text = f"{report['frames']} frames ({report['seconds']:.1f} s), {report['late']} late"
    if report["latency_p50_s"] is not None:
        text += f"; audio to frame p50 {report['latency_p50_s']:.2f} s, p95 {report['latency_p95_s']:.2f} s"
    if report["dropped_s"]:
        text += f"; {report['dropped_s']:.1f} s of audio dropped"
    return text + "."


def enlarged(image: np.ndarray, side: int) -> np.ndarray:
    """A small image repeated pixel by pixel to about `side` pixels (sharp, not blurred)."""
    k = max(1, side // max(image.shape[:2]))
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1)
