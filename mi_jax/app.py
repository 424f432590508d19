"""`mi-jax app`: a local web page for portrait + voice + prompt -> talking video (Gradio).

    pip install -e ".[app]"
    mi-jax app [--checkpoint demo/model] [--port 7860] [--host 127.0.0.1]

One model in memory (`Pipeline.from_checkpoint`, loaded once at start) and one generation at a
time: the page's queue runs one job and shows every other user their place in it. A job is
`Pipeline.stream` written by `Pipeline.write`, the same calls as `mi-jax generate`:

* the inputs are checked first, outside the queue and before any compute, by the CLI's own
  functions (`check_inputs`, `prompt_notices`), so the page shows the CLI's messages;
* the progress (windows done / total, the time left) and the newest frame show while the video
  is being made; the mp4 (with the voice) is written as the frames come, atomically;
* the long-video controls of `mi-jax generate`: a prompt schedule (one 'SECONDS:TEXT' per line
  of the prompt box), a timeline file, the colour anchor and the mouth rest (checkboxes);
* at the end: the video, the lip-sync plot (the voice's envelope against the mouth opening
  measured from the generated pixels, `mi_jax.eval.report.plot_lip_sync`) and the timing.

Stop: the job itself ends on it. Stop marks the session's job (`Stops`); the job sees the mark
after its next window, closes the stream (its files are removed) and sends "Stopped" as its last
update, so that message cannot be overtaken by an update the job sent before (a cancelled
job's updates already on their way did overwrite it). A job still waiting in the queue is told
at once and ends without compute when its turn comes.

Files: uploads, outputs and Gradio's cache live in one temporary folder, removed when the app
stops; a failed or stopped job removes what it wrote. The server listens on 127.0.0.1 only
unless `--host` says otherwise; no analytics, no share link, no web fonts.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time

import numpy as np
from PIL import Image

from mi_jax.convert.checkpoint import load_run_config
from mi_jax.data import faces, synthetic
from mi_jax.data.audio_io import AudioError
from mi_jax.data.controls import prompt_schedule
from mi_jax.data.inputs import InputError, load_portrait, prompt_notices
from mi_jax.data.text_encoder import prompt_words
from mi_jax.demo import HELDOUT_SEED, demo_inputs
from mi_jax.eval.metrics import best_offset_correlation
from mi_jax.eval.report import plot_lip_sync
from mi_jax.pipeline import Pipeline, check_inputs

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
BUNDLED_VOICE_SECONDS = 10.0  # the bundled voice written when the checkpoint has none beside it
PREVIEW_SIDE = 256  # the newest frame is shown about this large
PREVIEW_EVERY = 0.5  # seconds between preview frames at most
EDITOR_SIDE = 512  # the portrait is shown this large in the mask painter (the masks are resized back)
LOCAL_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page loads nothing from outside


class InstallError(RuntimeError):
    """The optional `app` extra is not installed."""


# ----------------------------------------------------------------------------- inputs


@dataclasses.dataclass
class Bundled:
    portraits: list[str]
    voice: str


def bundled_inputs(checkpoint: str, folder: str, size: tuple[int, int]) -> Bundled:
    """The portraits and the voice offered on the page, in `folder` (the page serves nothing from
    elsewhere): the demo's (`portrait.png`, `voice.wav` beside the checkpoint, as `mi-jax demo`
    reads them) copied, or, when the checkpoint has none beside it, the same held-out identity and
    voice written there (`demo.demo_inputs`); plus two more held-out identities of the synthetic
    world at the model's size."""

    beside = os.path.dirname(os.path.abspath(checkpoint).rstrip("/"))
    os.makedirs(folder, exist_ok=True)
    portrait, voice = os.path.join(folder, "portrait.png"), os.path.join(folder, "voice.wav")
    if os.path.isfile(os.path.join(beside, "portrait.png")) and os.path.isfile(os.path.join(beside, "voice.wav")):
        shutil.copy(os.path.join(beside, "portrait.png"), portrait)
        shutil.copy(os.path.join(beside, "voice.wav"), voice)
    else:
        portrait, voice, _ = demo_inputs(folder, BUNDLED_VOICE_SECONDS)
    portraits = [portrait]
    for k in (1, 2):
        path = os.path.join(folder, f"portrait_{k}.png")
        Image.fromarray(synthetic.render_clip(HELDOUT_SEED + k, 0.2, size=size).frames[0]).save(path)
        portraits.append(path)
    return Bundled(portraits, voice)


def known_prompts(config) -> list[str]:
    """The neutral prompt and one per action of the synthetic world whose words the model saw in
    training (config `prepare.text_vocabulary`; every action when there is no vocabulary)."""

    vocabulary = {w.lower() for w in config.prepare.get("text_vocabulary", ())}
    prompts = [synthetic.prompt_for(a) for a in ("",) + tuple(synthetic.ACTIONS)]
    return [p for p in prompts if not vocabulary or set(prompt_words(p)) <= vocabulary]


def masks_from_drawing(value) -> list[np.ndarray]:
    """The mask painter's value (Gradio ImageEditor, numpy) -> one uint8 mask per speaker
    (255 = that speaker): red strokes are speaker 1, blue strokes speaker 2. [] when nothing
    is painted."""

    layers = [np.asarray(x) for x in ((value or {}).get("layers") or []) if x is not None]
    layers = [x for x in layers if x.ndim == 3 and x.shape[-1] == 4]
    if not layers:
        return []
    rgba = np.stack(layers).astype(np.int16)  # [L, H, W, 4]
    painted = rgba[..., 3] > 0
    red = (painted & (rgba[..., 0] >= rgba[..., 2])).any(0)
    blue = (painted & (rgba[..., 2] > rgba[..., 0])).any(0)
    if blue.any() and not red.any():
        raise InputError("mask: speaker 2 (blue) is painted but speaker 1 (red) is not; paint both speakers")
    return [m.astype(np.uint8) * 255 for m in (red, blue) if m.any()]


def mouth_box(portrait: np.ndarray) -> tuple[np.ndarray, str]:
    """Where to measure the mouth for the lip-sync plot: the lower face of the face found in the
    portrait (`faces.detect_faces`, `faces.mouth_boxes`), else the lower face of a centred
    portrait (where the synthetic world's mouths are). Returns the box (x0, y0, x1, y1) in
    pixels and how it was found."""

    try:
        box = faces.mouth_boxes(faces.detect_faces(portrait[None], num_speakers=1))[0, 0]
        if np.all(np.isfinite(box)):
            return box, "the face found in the portrait"
    except ValueError:
        pass
    h, w = portrait.shape[:2]
    return np.array([0.33 * w, 0.52 * h, 0.67 * w, 0.78 * h], np.float32), "a centred face (none detected)"


@dataclasses.dataclass
class Checked:
    """A request whose inputs passed the CLI's checks."""

    portrait: str
    audio: str | list[str]
    prompt: str
    seconds: float | None
    masks: list | None
    seed: int
    steps: int | None
    image: np.ndarray  # the portrait as the model sees it
    frames: int
    notices: list[str]
    timeline: str | None = None  # a file of START END SPEAKER lines (mi_jax/data/controls.py)
    colour_anchor: bool | None = None
    rest: bool = True


def page_prompt(text: str | None):
    """The prompt box: one prompt, or one 'SECONDS:TEXT' per line (a schedule)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines if len(lines) > 1 else (lines[0] if lines else "")


def _shown(message: str, paths) -> str:
    """A message about uploads names them as the user did (their file name), not by the temporary
    path they were stored at."""
    for p in sorted((p for p in paths if isinstance(p, str) and p), key=len, reverse=True):
        message = message.replace(p, os.path.basename(p))
    return message


# ----------------------------------------------------------------------------- the model


STOPPED = "Stopped: the job was cancelled and its files removed."


class Stops:
    """The page's jobs per session and the stops asked of them, shared by the server's threads.

    Keyed by session and kept on the server: a job learns which request it is by order (the
    queue runs a session's jobs in the order their checks passed), not from a `gr.State`, which a
    queued job reads when its turn comes (by then the session may have asked again).
    `queued(session)` when a request passes its checks; `start(session)` when the next job
    begins -> its handle, or None if it was stopped while it waited; `stop(session)` marks the
    session's running job and its waiting ones -> "running" (the job ends itself after its
    window and says so), "queued" (only waiting ones: they end without compute) or None;
    `stopped(job)` is asked by the job after every window; `end(session, job)` when it ends."""

    def __init__(self):
        self._lock = threading.Lock()
        self._waiting: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self._running: dict[str, dict] = {}

    def queued(self, session: str) -> None:
        with self._lock:
            self._waiting[session].append({"stopped": False})

    def start(self, session: str) -> dict | None:
        with self._lock:
            waiting = self._waiting[session]
            job = waiting.popleft() if waiting else {"stopped": False}
            if not waiting:
                del self._waiting[session]
            if job["stopped"]:
                return None
            self._running[session] = job
            return job

    def stop(self, session: str) -> str | None:
        with self._lock:
            was = None
            for job in self._waiting.get(session, ()):
                job["stopped"], was = True, "queued"
            if session in self._running:
                self._running[session]["stopped"], was = True, "running"
            return was

    def stopped(self, job: dict) -> bool:
        with self._lock:
            return job["stopped"]

    def end(self, session: str, job: dict) -> None:
        with self._lock:
            if self._running.get(session) is job:
                del self._running[session]


class Studio:
    """The loaded model and the page's jobs. `workdir`: a temporary folder of the app's own."""

    def __init__(self, checkpoint: str, workdir: str, *, log=print):

        self.checkpoint = checkpoint
        self.config = load_run_config(checkpoint)
        self.runs = os.path.join(workdir, "runs")  # one folder per job, removed when it fails or ends
        os.makedirs(self.runs, exist_ok=True)
        p = self.config.prepare
        self.size = (int(p.height), int(p.width))
        self.fps, self.sample_rate = float(p.fps), int(p.sample_rate)
        self.bundled_folder = os.path.join(workdir, "bundled")
        self.bundled = bundled_inputs(checkpoint, self.bundled_folder, self.size)
        self.prompts = known_prompts(self.config)
        t0 = time.monotonic()
        self.pipe = Pipeline.from_checkpoint(checkpoint)  # the CLI's loading; one model for every user
        self.load_seconds = time.monotonic() - t0
        log(f"loaded {checkpoint} in {self.load_seconds:.1f} s")
        self._lock = threading.Lock()  # one generation at a time (the queue runs one job; this makes sure)

    @property
    def default_steps(self) -> int:
        return int(self.config.sample.steps)

    def check(self, portrait, voice, prompt, seconds=None, seed=0, steps=None, voice2=None, mask_files=None,
              mask_drawing=None, timeline=None, colour_anchor=None, rest=True) -> Checked:
        """Every input checked as `mi-jax generate` checks it, nothing computed; raises the CLI's
        `InputError` / `AudioError`."""

        if not portrait:
            raise InputError("portrait: upload an image or pick one of the bundled portraits")
        if not voice:
            raise InputError("voice: upload or record a voice, or pick the bundled one")
        prompt = page_prompt(prompt) if isinstance(prompt, str) or prompt is None else prompt
        seconds = None if seconds in (None, "", 0) else float(seconds)  # 0 / empty: the voice's length
        if seed is None or float(seed) != int(seed) or not -(2**31) <= int(seed) < 2**31:
            raise InputError(f"seed={seed}: use a whole number between {-(2**31)} and {2**31 - 1}")
        if steps is not None and (float(steps) != int(steps) or int(steps) < 1):
            raise InputError(f"steps={steps}: use a whole number of sampler steps, at least 1")
        audio = [voice, voice2] if voice2 else voice
        masks = list(mask_files or []) or masks_from_drawing(mask_drawing) or None
        image, _, _, frames, notices = check_inputs(self.config, portrait, audio, seconds=seconds, masks=masks,
                                                    prompt=prompt, timeline=timeline or None)

        vocabulary = self.config.prepare.get("text_vocabulary", ())
        notices = notices + [n for _, text in prompt_schedule(prompt) for n in prompt_notices(text, vocabulary)]
        return Checked(portrait, audio, prompt, seconds, masks, int(seed), None if steps is None else int(steps),
                       image, frames, notices, timeline or None, colour_anchor, bool(rest))

    def run(self, req: Checked, on_window=None):
        """Generates `req`: yields `("frames", chunk)` as frames are made, then `("done",
        {video, plot, ...})`. The mp4 is written while the frames come (`Pipeline.write` in a
        thread). The job's folder is removed when the generator ends: copy the files before asking
        for more; closing it early (a cancelled job) or an error removes it at once.
        `on_window(done, total)`: progress after every window."""

        folder = tempfile.mkdtemp(prefix="job-", dir=self.runs)
        video_path, plot_path = os.path.join(folder, "talk.mp4"), os.path.join(folder, "lip_sync.png")
        feed: queue.Queue = queue.Queue()
        written: dict = {}
        writer = chunks = None
        t0 = time.monotonic()
        times: list[float] = []

        def windows(done, total):
            times.append(time.monotonic())
            if on_window is not None:
                on_window(done, total)

        try:
            with self._lock:
                chunks = self.pipe.stream(req.portrait, req.audio, req.prompt, seconds=req.seconds, masks=req.masks,
                                          seed=req.seed, steps=req.steps, progress=windows, timeline=req.timeline,
                                          colour_anchor=req.colour_anchor, rest=req.rest)
                first = next(chunks)  # the inputs are read and checked again here, as by the CLI
                writer = threading.Thread(target=self._write, args=(video_path, feed, written), daemon=True)
                writer.start()  # after the first chunk: `pipe.last_audio` is this job's voice
                box, found = mouth_box(req.image)
                boxes = lambda n: np.broadcast_to(box, (n, 4))  # noqa: E731
                mouth, frames = [], 0
                for chunk in _chain(first, chunks):
                    feed.put(chunk)
                    mouth.append(synthetic.measure_mouth_open(chunk, boxes(len(chunk))))
                    frames += len(chunk)
                    yield "frames", chunk
                feed.put(_END)
                writer.join()
                if "error" in written:
                    raise written["error"]
                audio = self.pipe.last_audio
                mouth = np.concatenate(mouth)
                envelope = synthetic.mouth_envelope(audio, frames, self.fps, self.sample_rate)
                plot = corr = None
                if frames >= 3:
                    corr, _ = best_offset_correlation(envelope, mouth, min(5, frames - 3))
                    plot = plot_lip_sync(envelope, mouth, self.fps, plot_path)
                wall = time.monotonic() - t0
            yield "done", dict(video=video_path, plot=plot, frames=frames, seconds=frames / self.fps, wall=wall,
                               windows=len(times), first_window=(times[0] - t0) if times else None,
                               per_window=((times[-1] - times[0]) / (len(times) - 1)) if len(times) > 1 else None,
                               lip_sync=None if corr is None else float(corr), mouth_at=found,
                               notices=list(self.pipe.notices))
        finally:
            if chunks is not None:
                chunks.close()
            if writer is not None and writer.is_alive():
                feed.put(_ABORT)  # the writer stops and removes its temporary file
                writer.join()
            # an unfinished job's files go at once; a finished one's when the generator is resumed
            # after its last item, by when the page has copied them into its cache
            shutil.rmtree(folder, ignore_errors=True)

    def _write(self, path: str, feed: queue.Queue, written: dict) -> None:
        def frames():
            while True:
                item = feed.get()
                if item is _END:
                    return
                if item is _ABORT:
                    raise _Aborted()
                yield item

        try:
            written["path"] = self.pipe.write(path, frames())
        except BaseException as e:  # noqa: BLE001 - handed to the job, which raises it
            written["error"] = e


_END, _ABORT = object(), object()


class _Aborted(Exception):
    pass


def _chain(first, rest):
    yield first
    yield from rest


# ----------------------------------------------------------------------------- the page


def _eta(times: list[float], start: float, done: int, total: int) -> str:
    if done >= total:
        return "finishing the video"
    if done <= 1:
        per = (times[-1] - start) / max(done, 1)  # the first window compiles too: an upper bound
    else:
        per = (times[-1] - times[0]) / (done - 1)
    left = per * (total - done)
    return f"~{left:.0f} s left" if left >= 1 else "under a second left"


def build_page(studio: Studio):
    """The Gradio Blocks of the page (not launched)."""
    import gradio as gr  # local: an optional extra (pip install -e ".[app]")

    steps_max = max(50, studio.default_steps)
    with gr.Blocks(title="mi_jax: talking portrait", analytics_enabled=False,
                   delete_cache=(1800, 3600)) as page:
        gr.Markdown(f"## mi_jax: portrait + voice + prompt → talking video\n"
                    f"Model `{studio.checkpoint}` ({studio.size[1]}x{studio.size[0]}, {studio.fps:g} fps). "
                    "One generation at a time on this machine; others wait in the queue.")
        with gr.Row():
            with gr.Column():
                portrait = gr.Image(label="Portrait", type="filepath", sources=["upload"], elem_id="portrait",
                                    height=220)
                gr.Examples([[p] for p in studio.bundled.portraits], inputs=[portrait], label="Bundled portraits")
                voice = gr.Audio(label="Voice (upload or record)", sources=["upload", "microphone"], type="filepath",
                                 elem_id="voice")
                gr.Examples([[studio.bundled.voice]], inputs=[voice], label="Bundled voice")
                prompt = gr.Textbox(label="Prompt (one, or one 'SECONDS:TEXT' per line to change it over time)",
                                    value=studio.prompts[0], elem_id="prompt", lines=1, max_lines=8)
                gr.Examples([[p] for p in studio.prompts], inputs=[prompt], label="Actions this model knows")
                with gr.Row():
                    seconds = gr.Number(label="Length in seconds (0: the voice's length)", value=0,
                                        elem_id="seconds")
                    seed = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
                    steps = gr.Slider(1, steps_max, value=studio.default_steps, step=1, label="Sampler steps",
                                      elem_id="steps")
                with gr.Accordion("Second speaker (optional)", open=False):
                    voice2 = gr.Audio(label="Second speaker's voice", sources=["upload", "microphone"],
                                      type="filepath", elem_id="voice2")
                    mask_files = gr.File(label="Speaker masks: one image per speaker, speaker 1 first "
                                               "(white = that speaker)", file_count="multiple", file_types=["image"],
                                         type="filepath", elem_id="mask-files")
                    mask_drawing = gr.ImageEditor(label="...or paint them on the portrait: red = speaker 1, "
                                                        "blue = speaker 2", type="numpy", sources=[], layers=False,
                                                  brush=gr.Brush(colors=["#ff0000", "#0000ff"], color_mode="fixed"),
                                                  eraser=gr.Eraser(), format="png", elem_id="mask-drawing")
                with gr.Accordion("Long video (optional)", open=False):
                    timeline = gr.File(label="Timeline: lines 'START END SPEAKER' (seconds; speaker 1 or 2); "
                                             "default: who speaks comes from the voices", file_types=[".txt"],
                                       type="filepath", elem_id="timeline")
                    with gr.Row():
                        colour_anchor = gr.Checkbox(label="Hold the colour on the portrait's", value=False,
                                                    elem_id="colour-anchor")
                        rest = gr.Checkbox(label="Mouth rests in silence", value=True, elem_id="rest")
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column():
                status = gr.Markdown("Upload a portrait and a voice (or pick the bundled ones), then Generate.",
                                     elem_id="status", min_height=48)
                preview = gr.Image(label="Preview: the newest frame while the video is made", interactive=False,
                                   elem_id="preview", height=220, format="png")
                video = gr.Video(label="Video (with the voice)", interactive=False, elem_id="video", height=220)
                plot = gr.Image(label="Lip sync", interactive=False, elem_id="lip-sync", format="png")
                timing = gr.Markdown(elem_id="timing")

        inputs = [portrait, voice, prompt, seconds, seed, steps, voice2, mask_files, mask_drawing, timeline,
                  colour_anchor, rest]
        ticket = gr.State(0)  # a new value (a checked request) starts a job
        stops = Stops()

        def problem(e: Exception, values) -> str:
            return _shown(f"error: {e}", _paths(values))

        def check(request: gr.Request, *values):
            """Outside the queue, before any compute: the CLI's checks and messages."""
            values = _uploaded(*values)
            try:
                req = studio.check(*values)
            except (InputError, AudioError, FileNotFoundError) as e:
                return problem(e, values), gr.skip()
            stops.queued(request.session_hash)
            return (f"Inputs checked: {req.frames} frames ({req.frames / studio.fps:.1f} s). Waiting for a turn…"
                    + _notes(req, values)), time.monotonic_ns()

        def run(request: gr.Request, *values):
            handle = stops.start(request.session_hash)
            if handle is None:  # stopped while it waited (Stop said so): no compute, nothing shown
                yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
            try:
                yield from job(handle, values)
            finally:
                stops.end(request.session_hash, handle)

        def job(handle, values):
            values = _uploaded(*values)
            try:
                req = studio.check(*values)  # again: the job runs on what the page holds now
            except (InputError, AudioError, FileNotFoundError) as e:
                yield problem(e, values), None, None, None, ""
                return
            notes = _notes(req, values)
            state = {"done": 0, "total": None, "shown": -1.0}
            times: list[float] = []
            start = time.monotonic()

            def on_window(done, total):
                times.append(time.monotonic())
                state.update(done=done, total=total)

            def line():
                if not state["total"]:
                    return "Starting (the first window also compiles the model for these settings)…"
                done, total = state["done"], state["total"]
                return f"window {done}/{total}, {_eta(times, start, done, total)}"

            yield line() + notes, None, None, None, ""
            stopped = False
            try:
                with contextlib.closing(studio.run(req, on_window)) as work:  # closing removes its files
                    for kind, item in work:
                        if stops.stopped(handle):
                            stopped = True
                            break
                        if kind == "frames":
                            frame = gr.skip()
                            if time.monotonic() - state["shown"] >= PREVIEW_EVERY:  # each one is a file to send
                                state["shown"] = time.monotonic()
                                frame = _enlarged(item[-1], PREVIEW_SIDE)
                            yield line() + notes, frame, gr.skip(), gr.skip(), gr.skip()
                        else:
                            yield (f"Done: {item['frames']} frames ({item['seconds']:.1f} s) with its audio.{notes}",
                                   gr.skip(), item["video"], item["plot"], _timing(item, studio))
            except (InputError, AudioError) as e:
                yield problem(e, values), None, None, None, ""
            if stopped:  # after the files went; the job's last update, so nothing overtakes it
                yield STOPPED, gr.skip(), gr.skip(), gr.skip(), gr.skip()

        def stop_job(request: gr.Request):
            """A running job ends itself after its window and says so; a waiting one is told here."""
            return STOPPED if stops.stop(request.session_hash) == "queued" else gr.skip()

        # Gradio hands the request to a parameter annotated gr.Request; this module's annotations
        # are strings (postponed) naming `gr`, which is imported here, not where Gradio resolves them
        for fn in (check, run, stop_job):
            fn.__annotations__["request"] = gr.Request

        # queued, but never behind a job (no concurrency limit): a bad input is told at once
        # preprocess=False: the uploads reach the CLI's checks as the files they are (Gradio's own
        # preprocessing opens images itself and fails on a broken one with a bare "Error")
        generate.click(check, inputs, [status, ticket], concurrency_limit=None, concurrency_id="check",
                       show_progress="hidden", preprocess=False)
        ticket.change(run, inputs, [status, preview, video, plot, timing], show_progress_on=[status],
                      concurrency_limit=1, preprocess=False)
        stop.click(stop_job, None, [status], queue=False, show_progress="hidden")

        def paint_on(value):
            """The mask painter shows the portrait as the model sees it, enlarged."""
            path = _path(value)
            if not path:
                return None
            try:
                image, _ = load_portrait(path, studio.size)
            except (InputError, OSError):
                return None
            return _enlarged(image, EDITOR_SIDE)

        portrait.change(paint_on, [portrait], [mask_drawing], queue=False, show_progress="hidden", preprocess=False)
    return page


def _path(value) -> str | None:
    """An upload as the page sends it without preprocessing (Gradio's FileData: a dict whose path
    is in the page's upload folder, checked there by Gradio) -> its path."""
    if isinstance(value, dict):
        return value.get("path")
    return value or None


def _uploaded(portrait, voice, prompt, seconds, seed, steps, voice2, mask_files, mask_drawing, timeline=None,
              colour_anchor=False, rest=True) -> tuple:
    """The page's inputs, sent without preprocessing, as `Studio.check` takes them: uploads as
    paths, the painted layers as RGBA arrays."""

    layers = []
    for layer in (mask_drawing or {}).get("layers") or []:
        if _path(layer):
            with Image.open(_path(layer)) as im:
                layers.append(np.asarray(im.convert("RGBA")))
    files = [_path(f) for f in (mask_files or []) if _path(f)]
    return (_path(portrait), _path(voice), prompt, seconds, seed, steps, _path(voice2), files or None,
            {"layers": layers}, _path(timeline), colour_anchor, rest)


def _enlarged(image: np.ndarray, side: int) -> np.ndarray:
    """A small image repeated pixel by pixel to about `side` pixels (sharp, not blurred)."""
    k = max(1, side // max(image.shape[:2]))
    return np.repeat(np.repeat(image, k, axis=0), k, axis=1)


def _notes(req: Checked, values) -> str:
    return "".join(f"\n\nnote: {_shown(n, _paths(values))}" for n in req.notices)


def _paths(values) -> list[str]:
    out = []
    for v in values:
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, (list, tuple)):
            out += [x for x in v if isinstance(x, str)]
    return out


def _timing(item: dict, studio: Studio) -> str:
    parts = [f"**{item['seconds']:.1f} s of video** ({item['frames']} frames, {item['windows']} windows) "
             f"in **{item['wall']:.1f} s**"]
    if item["first_window"] is not None:
        parts.append(f"first window {item['first_window']:.1f} s (with compiling, when the settings are new)")
    if item["per_window"] is not None:
        parts.append(f"then {item['per_window']:.2f} s per window")
    parts.append(f"model loaded in {studio.load_seconds:.1f} s at start")
    text = "; ".join(parts) + "."
    if item["lip_sync"] is not None:
        text += f" Lip sync: r = {item['lip_sync']:.2f}, the mouth measured at {item['mouth_at']}."
    return text


# ----------------------------------------------------------------------------- serving


def serve(checkpoint: str = "demo/model", *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log=print) -> int:
    """Loads the model and serves the page until interrupted (Ctrl-C or SIGTERM); every upload
    and output goes to a temporary folder removed on the way out."""
    if importlib.util.find_spec("gradio") is None:
        raise InstallError("`mi-jax app` needs Gradio, an optional extra: pip install -e '.[app]' "
                           "(or pip install -c constraints.txt -e '.[app]')")
    with tempfile.TemporaryDirectory(prefix="mi_jax_app_") as root:
        # before Gradio is imported: its uploads and cache go into this folder
        os.environ["GRADIO_TEMP_DIR"] = os.path.join(root, "gradio")
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        import gradio as gr  # local: an optional extra, and read after GRADIO_TEMP_DIR is set

        studio = Studio(checkpoint, root, log=log)
        page = build_page(studio)
        page.queue(default_concurrency_limit=1)
        previous = signal.signal(signal.SIGTERM, _interrupt)  # a stop by SIGTERM also removes the folder
        try:
            log(f"uploads and outputs: {root} (removed when the app stops)")
            page.launch(server_name=host, server_port=port, share=False, inbrowser=False, show_error=True,
                        ssr_mode=False, max_file_size="200mb", allowed_paths=[studio.bundled_folder],
                        theme=gr.themes.Default(font=LOCAL_FONTS, font_mono=["ui-monospace", "monospace"]))
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            page.close()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":  # pragma: no cover
    sys.exit(serve(*sys.argv[1:2]))
