"""The Gradio page: its layout (`layout`), what its events do (`Handlers`) and how they are
wired (`wire`). Imports Gradio, an optional extra: `serve` imports this module after it has
pointed Gradio's temporary folder at the app's own."""

import contextlib
import dataclasses
import time

import gradio as gr
import numpy as np

from mi_jax.app.inputs import notes, page_values, shown, upload_path
from mi_jax.app.jobs import STOPPED, Stops
from mi_jax.app.live import LiveHandlers, enlarged, live_tab, wire_live
from mi_jax.app.studio import Studio
from mi_jax.data.audio_io import AudioError
from mi_jax.data.inputs import InputError, load_portrait
from mi_jax.data.prepare import patch_grid
from mi_jax.serve import DEFAULT_MAX_STREAMS, LiveHub

PREVIEW_SIDE = 256  # the newest frame is shown about this large
PREVIEW_EVERY = 0.5  # seconds between preview frames at most
EDITOR_SIDE = 512  # the portrait is shown this large in the mask painter (the masks are resized back)
# offered for typed words (any espeak-ng voice may be typed in: mi_jax.data.speech.voices(), variants())
SAY_VOICES = ("en-us", "en-us+f3", "en-us+m3", "en-gb-x-rp", "en-gb-x-rp+f2", "fr", "de", "es")


def build_page(studio: Studio, hub: LiveHub | None = None) -> gr.Blocks:
    """The page's Gradio Blocks, not launched: the Generate tab and the Live tab.

    Args:
      studio: the loaded model the page's jobs run on.
      hub: the live streams' hub on `studio.pipe` (default: a new one, `DEFAULT_MAX_STREAMS` streams).

    Returns:
      `gr.Blocks`; the caller queues (`page.queue(default_concurrency_limit=1)`) and launches it.
    """
    hub = LiveHub(studio.pipe, max_streams=DEFAULT_MAX_STREAMS) if hub is None else hub
    with gr.Blocks(title="mi_jax: talking portrait", analytics_enabled=False,
                   delete_cache=(1800, 3600)) as page:
        _header(studio)
        with gr.Tabs():
            with gr.Tab("Generate", id="generate-tab"):
                controls = layout(studio)
            with gr.Tab("Live", id="live-tab", elem_id="live-tab"):
                live = live_tab(studio, hub.max_streams)
        wire(controls, Handlers(studio, Stops()))
        wire_live(live, LiveHandlers(studio, hub), page)
    return page


# ----------------------------------------------------------------------------- layout


@dataclasses.dataclass
class Controls:
    """The page's components: the inputs (in `Studio.check`'s order), the buttons and the outputs."""

    portrait: gr.Image
    voice: gr.Audio
    prompt: gr.Textbox
    seconds: gr.Number
    seed: gr.Number
    steps: gr.Slider
    voice2: gr.Audio
    mask_files: gr.File
    mask_drawing: gr.ImageEditor
    timeline: gr.File
    colour_anchor: gr.Checkbox
    rest: gr.Checkbox
    say: gr.Textbox
    say_voice: gr.Dropdown
    generate: gr.Button
    stop: gr.Button
    status: gr.Markdown
    preview: gr.Image
    video: gr.Video
    plot: gr.Image
    timing: gr.Markdown

    @property
    def inputs(self) -> list:
        return [self.portrait, self.voice, self.prompt, self.seconds, self.seed, self.steps, self.voice2,
                self.mask_files, self.mask_drawing, self.timeline, self.colour_anchor, self.rest, self.say,
                self.say_voice]

    @property
    def outputs(self) -> list:
        return [self.status, self.preview, self.video, self.plot, self.timing]


def _header(studio: Studio) -> None:
    gr.Markdown(f"## mi_jax: portrait + voice + prompt → talking video\n"
                f"Model `{studio.checkpoint}` ({studio.size[1]}x{studio.size[0]}, {studio.fps:g} fps). "
                "One generation at a time on this machine; others wait in the queue. "
                "Live: the face answers your microphone as you speak.")


def layout(studio: Studio) -> Controls:
    """The Generate tab's components, inside the current `gr.Tab`: the inputs on the left, the
    outputs on the right."""
    with gr.Row():
        with gr.Column():
            inputs = _input_column(studio)
        with gr.Column():
            outputs = _output_column()
    return Controls(**inputs, **outputs)


def _input_column(studio: Studio) -> dict:
    c = {}
    c["portrait"] = gr.Image(label="Portrait", type="filepath", sources=["upload"], elem_id="portrait", height=220)
    gr.Examples([[p] for p in studio.bundled.portraits], inputs=[c["portrait"]], label="Bundled portraits")
    c["voice"] = gr.Audio(label="Voice (upload or record)", sources=["upload", "microphone"], type="filepath",
                          elem_id="voice")
    gr.Examples([[studio.bundled.voice]], inputs=[c["voice"]], label="Bundled voice")
    with gr.Row():
        c["say"] = gr.Textbox(label="...or type what to say (spoken offline by espeak-ng when no voice is given)",
                              placeholder="Hello, this is a test of the demo.", elem_id="say", lines=2, scale=3)
        c["say_voice"] = gr.Dropdown(list(SAY_VOICES), value=SAY_VOICES[0], allow_custom_value=True,
                                     label="Voice for the words (espeak-ng)", elem_id="say-voice", scale=1)
    c["prompt"] = gr.Textbox(label="Prompt (one, or one 'SECONDS:TEXT' per line to change it over time)",
                             value=studio.prompts[0], elem_id="prompt", lines=1, max_lines=8)
    gr.Examples([[p] for p in studio.prompts], inputs=[c["prompt"]], label="Actions this model knows")
    with gr.Row():
        c["seconds"] = gr.Number(label="Length in seconds (0: the voice's length)", value=0, elem_id="seconds")
        c["seed"] = gr.Number(label="Seed", value=0, precision=0, elem_id="seed")
        c["steps"] = gr.Slider(1, max(50, studio.default_steps), value=studio.default_steps, step=1,
                               label="Sampler steps", elem_id="steps")
    with gr.Accordion("Second speaker (optional)", open=False):
        c["voice2"] = gr.Audio(label="Second speaker's voice", sources=["upload", "microphone"], type="filepath",
                               elem_id="voice2")
        c["mask_files"] = gr.File(label="Speaker masks: one image per speaker, speaker 1 first (white = that speaker)",
                                  file_count="multiple", file_types=["image"], type="filepath", elem_id="mask-files")
        c["mask_drawing"] = gr.ImageEditor(label="...or paint them on the portrait: red = speaker 1, blue = speaker 2",
                                           type="numpy", sources=[], layers=False,
                                           brush=gr.Brush(colors=["#ff0000", "#0000ff"], color_mode="fixed"),
                                           eraser=gr.Eraser(), format="png", elem_id="mask-drawing")
    with gr.Accordion("Long video (optional)", open=False):
        c["timeline"] = gr.File(label="Timeline: lines 'START END SPEAKER' (seconds; speaker 1 or 2); "
                                      "default: who speaks comes from the voices", file_types=[".txt"],
                                type="filepath", elem_id="timeline")
        with gr.Row():
            c["colour_anchor"] = gr.Checkbox(label="Hold the colour on the portrait's", value=False,
                                             elem_id="colour-anchor")
            c["rest"] = gr.Checkbox(label="Mouth rests in silence", value=True, elem_id="rest")
    with gr.Row():
        c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
        c["stop"] = gr.Button("Stop", variant="stop", elem_id="stop")
    return c


def _output_column() -> dict:
    return dict(
        status=gr.Markdown("Upload a portrait and a voice (or pick the bundled ones), then Generate.",
                           elem_id="status", min_height=48),
        preview=gr.Image(label="Preview: the newest frame while the video is made", interactive=False,
                         elem_id="preview", height=220, format="png"),
        video=gr.Video(label="Video (with the voice)", interactive=False, elem_id="video", height=220),
        plot=gr.Image(label="Lip sync", interactive=False, elem_id="lip-sync", format="png"),
        timing=gr.Markdown(elem_id="timing"),
    )


# ----------------------------------------------------------------------------- events


def wire(c: Controls, handlers: "Handlers") -> None:
    """Connects the page's events to `handlers`, inside the current `gr.Blocks`.

    Generate runs the checks queued but never behind a job (no concurrency limit: a bad input is
    told at once); a passed check sets `ticket`, whose change runs the job (one at a time). With
    preprocess=False the uploads reach the CLI's checks as the files they are (Gradio's own
    preprocessing opens images itself and fails on a broken one with a bare "Error").
    """
    ticket = gr.State(0)  # a new value (a checked request) starts a job
    c.generate.click(handlers.check, c.inputs, [c.status, ticket], concurrency_limit=None, concurrency_id="check",
                     show_progress="hidden", preprocess=False)
    ticket.change(handlers.run, c.inputs, c.outputs, show_progress_on=[c.status], concurrency_limit=1,
                  preprocess=False)
    c.stop.click(handlers.stop_job, None, [c.status], queue=False, show_progress="hidden")
    c.portrait.change(handlers.paint_on, [c.portrait], [c.mask_drawing], queue=False, show_progress="hidden",
                      preprocess=False)


class Handlers:
    """What the page's events do, on `studio`'s model, with `stops` as the session's stop book.
    Gradio passes the request to the parameter annotated `gr.Request`."""

    def __init__(self, studio: Studio, stops: Stops):
        self.studio, self.stops = studio, stops

    def check(self, request: gr.Request, *values):
        """Generate: outside the queue, before any compute, the CLI's checks and messages; a passed
        check queues the job (a new `ticket`)."""
        values = page_values(*values)
        try:
            req = self.studio.check(*values)
        except (InputError, AudioError, FileNotFoundError) as e:
            return shown(f"error: {e}", values), gr.skip()
        self.stops.queued(request.session_hash)
        return (f"Inputs checked: {req.frames} frames ({req.frames / self.studio.fps:.1f} s). Waiting for a turn…"
                + notes(req, values)), time.monotonic_ns()

    def run(self, request: gr.Request, *values):
        """The job, when its turn comes; nothing when it was stopped while it waited."""
        handle = self.stops.start(request.session_hash)
        if handle is None:  # stopped while it waited (Stop said so): no compute, nothing shown
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        try:
            yield from self._job(handle, values)
        finally:
            self.stops.end(request.session_hash, handle)

    def _job(self, handle, values):
        values = page_values(*values)
        try:
            req = self.studio.check(*values)  # again: the job runs on what the page holds now
        except (InputError, AudioError, FileNotFoundError) as e:
            yield shown(f"error: {e}", values), None, None, None, ""
            return
        note = notes(req, values)
        progress = _Progress()
        yield progress.line() + note, None, None, None, ""
        stopped = False
        try:
            with contextlib.closing(self.studio.run(req, progress.on_window)) as work:  # closing removes its files
                for kind, item in work:
                    if self.stops.stopped(handle):
                        stopped = True
                        break
                    if kind == "frames":
                        yield progress.line() + note, progress.preview(item), gr.skip(), gr.skip(), gr.skip()
                    else:
                        yield (f"Done: {item['frames']} frames ({item['seconds']:.1f} s) with its audio.{note}",
                               gr.skip(), item["video"], item["plot"], _timing(item, self.studio))
        except (InputError, AudioError) as e:
            yield shown(f"error: {e}", values), None, None, None, ""
        if stopped:  # after the files went; the job's last update, so nothing overtakes it
            yield STOPPED, gr.skip(), gr.skip(), gr.skip(), gr.skip()

    def stop_job(self, request: gr.Request):
        """Stop: a running job ends itself after its window and says so; a waiting one is told here."""
        return STOPPED if self.stops.stop(request.session_hash) == "queued" else gr.skip()

    def paint_on(self, value):
        """The mask painter shows the portrait as the model sees it, enlarged."""
        path = upload_path(value)
        if not path:
            return None
        try:
            image, _ = load_portrait(path, self.studio.size, grid=patch_grid(self.studio.config))
        except (InputError, OSError):
            return None
        return enlarged(image, EDITOR_SIDE)


class _Progress:
    """A job's status line (windows done, the time left) and its preview frames."""

    def __init__(self):
        self.done, self.total, self.shown = 0, None, -1.0
        self.times: list[float] = []
        self.start = time.monotonic()

    def on_window(self, done, total):
        self.times.append(time.monotonic())
        self.done, self.total = done, total

    def line(self) -> str:
        if not self.total:
            return "Starting (the first window also compiles the model for these settings)…"
        return f"window {self.done}/{self.total}, {_eta(self.times, self.start, self.done, self.total)}"

    def preview(self, chunk: np.ndarray):
        """The chunk's last frame enlarged, at most every PREVIEW_EVERY seconds (each is a file to send)."""
        if time.monotonic() - self.shown < PREVIEW_EVERY:
            return gr.skip()
        self.shown = time.monotonic()
        return enlarged(chunk[-1], PREVIEW_SIDE)


def _eta(times: list[float], start: float, done: int, total: int) -> str:
    if done >= total:
        return "finishing the video"
    if done <= 1:
        per = (times[-1] - start) / max(done, 1)  # the first window compiles too: an upper bound
    else:
        per = (times[-1] - times[0]) / (done - 1)
    left = per * (total - done)
    return f"~{left:.0f} s left" if left >= 1 else "under a second left"


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
