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
* typed words: with no voice file, the Say box's text is spoken by espeak-ng in the chosen voice
  (`mi-jax generate --say`; the `speech` extra, mi_jax/data/speech.py) and animated;
* the long-video controls of `mi-jax generate`: a prompt schedule (one 'SECONDS:TEXT' per line
  of the prompt box), a timeline file, the colour anchor and the mouth rest (checkboxes);
* at the end: the video, the lip-sync plot (the voice's envelope against the mouth opening
  measured from the generated pixels, `mi_jax.eval.report.plot_lip_sync`) and the timing.

Stop: the job itself ends on it. Stop marks the session's job (`Stops`); the job sees the mark
after its next window, closes the stream (its files are removed) and sends "Stopped" as its last
update, so no update it sent before can overtake that message. A job still waiting in the queue
is told at once and ends without compute when its turn comes.

Files: uploads, outputs and Gradio's cache live in one temporary folder, removed when the app
stops; a failed or stopped job removes what it wrote. The server listens on 127.0.0.1 only
unless `--host` says otherwise; no analytics, no share link, no web fonts.

The Live tab: the microphone (or a voice file, or typed words) streams into `Pipeline.live` on
the app's `mi_jax.serve.LiveHub` and the face answers as the audio comes (docs/live.md).

Modules: `inputs` (the page's inputs: bundled examples, painted masks, checked requests),
`jobs` (the queue's stop book), `studio` (the loaded model; checks and runs a job), `page` (the
Gradio page: layout and event handlers; imports Gradio), `live` (the Live tab; imports Gradio),
`server` (`serve`).
"""

from mi_jax.app.inputs import (Bundled, Checked, bundled_inputs, known_prompts, masks_from_drawing, mouth_box,
                               page_prompt, page_values)
from mi_jax.app.jobs import STOPPED, Stops
from mi_jax.app.server import DEFAULT_HOST, DEFAULT_PORT, InstallError, serve
from mi_jax.app.studio import Studio

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "STOPPED", "Bundled", "Checked", "InstallError", "Stops", "Studio",
           "bundled_inputs", "known_prompts", "masks_from_drawing", "mouth_box", "page_prompt", "page_values",
           "serve"]
