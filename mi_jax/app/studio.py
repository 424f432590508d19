"""The loaded model and the page's jobs: checks a request as `mi-jax generate` does and runs it
as `Pipeline.stream` written by `Pipeline.write`."""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time

import numpy as np

from mi_jax.app.inputs import Checked, bundled_inputs, known_prompts, masks_from_drawing, mouth_box, page_prompt
from mi_jax.convert.checkpoint import load_run_config
from mi_jax.data import synthetic
from mi_jax.generation.controls import prompt_schedule
from mi_jax.data.inputs import InputError, prompt_notices
from mi_jax.eval.metrics import best_offset_correlation
from mi_jax.eval.report import plot_lip_sync
from mi_jax.pipeline import Pipeline, check_inputs, spoken


class Studio:
    """The loaded model and the page's jobs; one generation at a time.

    Args:
      checkpoint: a run folder (`Pipeline.from_checkpoint` loads it once, for every user).
      workdir: a temporary folder of the app's own: the bundled inputs and one folder per job.
      log: where the load time is reported (default `print`).

    Raises:
      CheckpointError: `checkpoint` holds no finished checkpoint.
    """

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
        """The sampler steps of the checkpoint's config."""
        return int(self.config.sample.steps)

    def check(self, portrait, voice, prompt, seconds=None, seed=0, steps=None, voice2=None, mask_files=None,
              mask_drawing=None, timeline=None, colour_anchor=None, rest=True, say=None, say_voice=None) -> Checked:
        """Every input checked as `mi-jax generate` checks it; nothing computed.

        Args:
          portrait: the portrait's file path.
          voice: the voice's file path.
          prompt: one prompt, the prompt box's text (one 'SECONDS:TEXT' per line) or a schedule.
          seconds: video length (None, "" or 0: the voice's).
          seed: a whole number in int32 (default 0).
          steps: sampler steps (default None: the config's).
          voice2: a second speaker's voice path (default None).
          mask_files: mask image paths, one per speaker (default None).
          mask_drawing: the mask painter's value, used when there are no files (default None).
          timeline: a START END SPEAKER file path (default None).
          colour_anchor: None (default: the pipeline's default) or a bool.
          rest: the mouth rests in silence (default True).
          say: words to speak with espeak-ng when there is no voice file (default None;
            mi_jax/data/speech.py, `pip install -e .[speech]`).
          say_voice: the espeak-ng voice for `say` (default None: "en-us").

        Returns:
          `Checked`, with the portrait as the model sees it, the frame count and the notices.

        Raises:
          InputError: the CLI's message for a missing, broken or unusable input.
          AudioError: the CLI's message for an unreadable or unusable voice.
          FileNotFoundError: an input path that does not exist.
        """

        if not portrait:
            raise InputError("portrait: upload an image or pick one of the bundled portraits")
        typed = say if isinstance(say, str) and say.strip() else None
        said_notice = []
        if voice and typed:
            said_notice = ["say: a voice file is given, so the typed words are not spoken (clear the voice to "
                           "speak them)"]
        elif typed:
            voice = spoken(self.config, typed, say_voice).audio  # as the CLI's --say
        if voice is None or (isinstance(voice, str) and not voice):
            raise InputError("voice: upload or record a voice, pick the bundled one, or type words to say")
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
        notices = notices + said_notice + [n for _, text in prompt_schedule(prompt)
                                           for n in prompt_notices(text, vocabulary)]
        return Checked(portrait, audio, prompt, seconds, masks, int(seed), None if steps is None else int(steps),
                       image, frames, notices, timeline or None, colour_anchor, bool(rest))

    def run(self, req: Checked, on_window=None):
        """Generates `req`, writing the mp4 while the frames come (`Pipeline.write` in a thread).

        The job's folder is removed when the generator ends: copy the files before asking for
        more; closing it early (a cancelled job) or an error removes it at once.

        Args:
          req: a request from `check`.
          on_window: called as `on_window(done, total)` after every window, or None.

        Yields:
          `("frames", uint8 [n, H, W, 3])` as frames are made, then `("done", dict)` with `video`
          and `plot` paths, `frames`, `seconds`, `wall`, `windows`, `first_window`, `per_window`,
          `lip_sync`, `mouth_at` and `notices`.

        Raises:
          InputError: the inputs fail the pipeline's checks.
          AudioError: a voice fails the pipeline's checks.
        """

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
