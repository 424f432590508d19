"""`serve`: loads the model and serves the page until interrupted."""

from __future__ import annotations

import importlib.util
import os
import signal
import tempfile

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
LOCAL_FONTS = ["ui-sans-serif", "system-ui", "sans-serif"]  # no web fonts: the page loads nothing from outside


class InstallError(RuntimeError):
    """The optional `app` extra is not installed."""


def serve(checkpoint: str = "demo/model", *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, log=print) -> int:
    """Loads the model and serves the page until interrupted (Ctrl-C or SIGTERM).

    Every upload and output goes to a temporary folder removed on the way out.

    Args:
      checkpoint: the run folder to serve (default `demo/model`).
      host: the address to listen on (default 127.0.0.1, this machine only).
      port: the port (default 7860).
      log: where start-up lines go (default `print`).

    Returns:
      0, the exit status, once the server has stopped.

    Raises:
      InstallError: Gradio (the `app` extra) is not installed.
    """
    if importlib.util.find_spec("gradio") is None:
        raise InstallError("`mi-jax app` needs Gradio, an optional extra: pip install -e '.[app]' "
                           "(or pip install -c constraints.txt -e '.[app]')")
    with tempfile.TemporaryDirectory(prefix="mi_jax_app_") as root:
        # before Gradio is imported: its uploads and cache go into this folder
        os.environ["GRADIO_TEMP_DIR"] = os.path.join(root, "gradio")
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
        import gradio as gr  # local: an optional extra, and read after GRADIO_TEMP_DIR is set

        from mi_jax.app.page import build_page  # imports Gradio
        from mi_jax.app.studio import Studio
        from mi_jax.serve import DEFAULT_MAX_STREAMS, LiveHub

        studio = Studio(checkpoint, root, log=log)
        hub = LiveHub(studio.pipe, max_streams=DEFAULT_MAX_STREAMS, log=log)
        # before the page opens: a live stream's first frames must not wait for the compiler
        log(f"compiled the live stream's steps in {hub.warm_up(studio.bundled.portraits[0]):.1f} s")
        page = build_page(studio, hub)
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
            hub.close_all()
            page.close()
    return 0


def _interrupt(signum, frame):
    raise KeyboardInterrupt
