"""Live streams served from one loaded model: `LiveHub` (in process; the page's Live tab uses it)
and `mi-jax serve` (the same hub over HTTP).

    hub = LiveHub(Pipeline.from_checkpoint("demo/model"), max_streams=2)
    session = hub.open("portrait.png", "a person talking")     # checked now; nothing computed
    session.feed(samples, 48000)          # any rate, mono or [n, channels]; from any thread
    for part in session.parts():          # mi_jax.live.LiveFrames, as each window finishes
        show(part.frames)
    session.end()                         # from the feeding side: the audio is over
    print(session.report())               # the stream's report + audio waiting / dropped

Why a hub: the model (and its compiled window step) is loaded once and shared; every stream
keeps only its own state (its audio tape, the sampler's carry, the decoder's state), and that
state is dropped when the stream ends, is closed, or its client goes away.

Falling behind is said, never hidden: frames later than their budget are counted per part and in
the report (`Pipeline.live`), the audio a client sent that the model has not read yet is reported
as `behind_s`, and audio past `max_buffer_s` of backlog is dropped and counted (`dropped_s`).
A stream whose client sends no audio and reads no frames for `idle_s` is closed.

HTTP (`mi-jax serve`, `make_app`), for any client:

    POST   /streams?prompt=&seed=&steps=&pace=   body: the portrait (PNG/JPEG bytes) -> 201 {id, fps, ...}
    POST   /streams/{id}/audio?rate=16000[&end=1] body: float32 little-endian mono samples
    GET    /streams/{id}/frames   newline-delimited JSON, one line per part as it is made:
           {start, frames, height, width, data (base64 uint8 [frames, H, W, 3]), late, late_total,
            latency_max_s, behind_s, dropped_s[, warning]}, then {"report": {...}} or {"error": "..."}
    DELETE /streams/{id}          closes it -> its report
    GET    /streams               the open streams' reports (and the last finished ones')
A client whose frames request goes away (the connection closes) frees its stream at once.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import itertools
import json
import queue
import threading
import time
import warnings
import weakref

import numpy as np

from mi_jax.data.inputs import InputError

DEFAULT_MAX_STREAMS = 2  # concurrent streams per model (each one needs a real-time share of the machine)
MAX_BUFFER_S = 10.0  # audio a stream may hold unread before newer audio is dropped (and counted)
IDLE_S = 30.0  # a stream with no audio and no reader for this long is closed


class ServerBusy(RuntimeError):
    """Every stream slot of the hub is taken."""


class StreamNotFound(KeyError):
    """No open stream has this id (it ended, was closed or never existed)."""


class StreamClosed(Exception):
    """The stream was closed (by its client, a disconnect, the idle timeout or the server)."""


_END, _CLOSE = object(), object()


def mono_float(samples, rate: int, channels_last: bool = True) -> np.ndarray:
    """Audio from a client -> float32 mono samples in [-1, 1].

    Args:
      samples: `[n]` or `[n, channels]` (channels_last) samples: float in [-1, 1] or integer PCM.
      rate: their sample rate in Hz (checked here; resampled by the session).
      channels_last: whether a 2-D array is `[n, channels]` (Gradio's layout) rather than `[channels, n]`.

    Returns:
      float32 `[n]`.

    Raises:
      InputError: not 1-D or 2-D, or a non-positive rate, naming the fix.
    """
    x = np.asarray(samples)
    if not int(rate) > 0:
        raise InputError(f"audio: sample rate {rate}; pass the rate of the samples in Hz (e.g. 48000)")
    if x.ndim == 2:
        x = x.mean(axis=1 if channels_last else 0)
    elif x.ndim != 1:
        raise InputError(f"audio: shape {x.shape}; pass samples [n] or [n, channels]")
    if x.dtype.kind in "iu":
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    return np.asarray(x, np.float32)


class LiveSession:
    """One live stream of a `LiveHub`: audio fed by its client, frames read by its viewer.

    `feed` and `end` may be called from any thread while one reader iterates `parts()`.
    """

    def __init__(self, hub: "LiveHub", key: str | None):
        self.id, self.key, self.hub = "", key, hub
        self.stream = None  # mi_jax.live.LiveStream reading `_source()`, set by the hub
        self.rate = hub.sample_rate
        self._ended = False
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._queued = 0  # samples fed and not yet read by the stream
        self.dropped = 0  # samples dropped because the backlog passed max_buffer_s
        self.status = "open"  # open -> reading -> ended | closed: <reason> | failed: <message>
        self._resamplers: dict[int, object] = {}
        self.touched = self.fed = time.monotonic()
        self.warning: str | None = None

    # ------------------------------------------------------------------ the client's side

    def feed(self, samples, rate: int | None = None) -> dict:
        """Queues audio for the stream (resampled to the model's rate when `rate` differs).

        Args:
          samples: `[n]` or `[n, channels]` samples, float in [-1, 1] or integer PCM.
          rate: their sample rate in Hz (default: the model's).

        Returns:
          `{"behind_s": audio waiting for the model, "dropped_s": audio dropped so far}`.

        Raises:
          StreamClosed: the stream was closed or its audio already ended.
          InputError: the samples cannot be read as audio (naming the fix).
        """
        rate = self.rate if rate is None else int(rate)
        x = mono_float(samples, rate)
        with self._lock:
            self._check_open()
        if rate != self.rate:
            if rate not in self._resamplers:
                import soxr

                self._resamplers[rate] = soxr.ResampleStream(rate, self.rate, 1, dtype="float32")
            x = self._resamplers[rate].resample_chunk(x)
        with self._lock:
            self._check_open()
            self.touched = self.fed = time.monotonic()
            if (self._queued + len(x)) / self.rate > self.hub.max_buffer_s:
                self.dropped += len(x)  # the model is behind by more than the buffer: said, not hidden
                self.warning = (f"behind: {self._queued / self.rate:.1f} s of audio not yet animated; "
                                f"{self.dropped / self.rate:.1f} s dropped")
            elif len(x):
                self._queued += len(x)
                self._inbox.put(x)
            return self._backlog()

    def end(self, quiet_s: float = 0.0) -> None:
        """The audio is over: the stream animates what it has and finishes.

        Args:
          quiet_s: end only once no audio was fed for this long (in a background thread): for
            sources whose last chunks may come after their stop signal (a browser's recorder).
        """
        if quiet_s > 0:
            def later():
                while (left := self.fed + quiet_s - time.monotonic()) > 0:
                    time.sleep(left)
                self.end()

            threading.Thread(target=later, name=f"mi-jax-live-end-{self.id}", daemon=True).start()
            return
        with self._lock:
            if not self._ended:
                self._ended = True
                self._inbox.put(_END)

    def close(self, reason: str = "closed by the client") -> None:
        """Stops the stream and frees its state (the reader gets `StreamClosed` or ends)."""
        self.hub._drop(self, f"closed: {reason}")

    # ------------------------------------------------------------------ the viewer's side

    def parts(self):
        """The stream's `LiveFrames` as each window finishes; ends when the audio has ended and
        every frame is out, or when the stream is closed. The stream is removed from the hub
        when this generator finishes, fails or is closed.

        Raises:
          InputError: bad audio, said before any compute (see `Pipeline.live`).
          RuntimeError: a second reader.
        """
        with self._lock:
            if self.status != "open":
                raise RuntimeError(f"stream {self.id}: already {self.status}; one reader per stream")
            self.status = "reading"
        try:
            for part in self.stream:
                self.touched = time.monotonic()
                yield part
            self.hub._drop(self, "ended")
        except StreamClosed:
            return
        except Exception as e:
            self.hub._drop(self, f"failed: {e}")
            raise
        finally:
            if self.hub.get(self.id, None) is self:  # the reader went away mid-stream
                self.hub._drop(self, "closed: the reader went away")

    def report(self) -> dict:
        """The stream's report (`LiveStream.report`) with its id, status and audio backlog."""
        with self._lock:
            backlog = self._backlog()
        return dict(id=self.id, status=self.status, **backlog, **self.stream.report())

    # ------------------------------------------------------------------ inside

    def _check_open(self) -> None:
        """Raises `StreamClosed` once the stream was closed or its audio ended (holding `_lock`)."""
        if self.status.startswith(("closed", "ended", "failed")) or self._ended:
            raise StreamClosed(f"stream {self.id}: {self.status if not self._ended else 'its audio ended'}")

    def _backlog(self) -> dict:
        return dict(behind_s=round(self._queued / self.rate, 3), dropped_s=round(self.dropped / self.rate, 3))

    def _source(self):
        """The stream's audio: what the client fed, until it ends or the stream is closed."""
        while True:
            try:
                item = self._inbox.get(timeout=self.hub.idle_s)
            except queue.Empty:
                self.hub._drop(self, f"closed: no audio for {self.hub.idle_s:g} s")
                raise StreamClosed(self.status) from None
            if item is _CLOSE:
                raise StreamClosed(self.status)
            if item is _END:
                with self._lock:
                    pending = [r.resample_chunk(np.zeros(0, np.float32), last=True) for r in self._resamplers.values()]
                for tail in pending:
                    if len(tail):
                        yield tail
                return
            with self._lock:
                self._queued -= len(item)
            yield item


class LiveHub:
    """One loaded model serving several live streams.

    Args:
      pipe: the loaded `Pipeline` every stream shares.
      max_streams: streams open at once (default `DEFAULT_MAX_STREAMS`); `open` past it raises
        `ServerBusy`.
      max_buffer_s: unread audio a stream may hold; newer audio is dropped and counted.
      idle_s: a stream with no audio and no reader for this long is closed.
      log: called with one line when a stream ends or is closed (default: nothing).

    Raises:
      ValueError: a setting out of range.
    """

    def __init__(self, pipe, *, max_streams: int = DEFAULT_MAX_STREAMS, max_buffer_s: float = MAX_BUFFER_S,
                 idle_s: float = IDLE_S, log=None):
        if max_streams < 1 or max_buffer_s <= 0 or idle_s <= 0:
            raise ValueError(f"max_streams={max_streams}, max_buffer_s={max_buffer_s}, idle_s={idle_s}: "
                             "use at least 1 stream and positive seconds")
        self.pipe, self.max_streams, self.max_buffer_s, self.idle_s = pipe, max_streams, max_buffer_s, idle_s
        self.log = log
        config = pipe.config.prepare
        self.fps, self.sample_rate = float(config.fps), int(config.sample_rate)
        self._sessions: dict[str, LiveSession] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.finished: list[dict] = []  # reports of the last streams that ended or were closed
        self._closer = _Closer(self)

    def open(self, portrait, prompt: str = "", *, key: str | None = None, seed: int = 0, steps: int | None = None,
             pace: float | None = 1.0, lookahead_s: float | None = None,
             max_latency_s: float | None = None) -> LiveSession:
        """Opens a stream: the portrait, prompt and settings are checked now; nothing is computed.

        Args:
          portrait: an image path, a PIL image or uint8 `[H, W, 3]`.
          prompt: the text prompt.
          key: an owner (e.g. a page session): its previous stream, if any, is closed first.
          seed: the noise seed, as `Pipeline.live`'s.
          steps: sampler steps (default: the config's).
          pace: 1.0 when the audio comes as it is spoken (the latency clock); None: no clock.
          lookahead_s: audio read past a window's frames (default: the config's).
          max_latency_s: a frame later than this after its audio is late (default: the config's).

        Returns:
          The `LiveSession`.

        Raises:
          InputError: a bad portrait, prompt or setting (the CLI's message).
          ServerBusy: `max_streams` streams are open; names how to get a slot.
        """
        if key is not None:
            for s in [s for s in self.sessions() if s.key == key]:
                s.close("the same client opened a new stream")
        self._reap()
        session = LiveSession(self, key)
        session.stream = self.pipe.live(portrait, session._source(), prompt, seed=seed, steps=steps, pace=pace,
                                        lookahead_s=lookahead_s, max_latency_s=max_latency_s)
        with self._lock:
            if len(self._sessions) >= self.max_streams:
                raise ServerBusy(f"all {self.max_streams} live streams of this server are in use; try again when one "
                                 "ends (or start the server with a larger --max-streams, if the machine keeps up)")
            session.id = f"s{next(self._ids)}"
            self._sessions[session.id] = session
        return session

    def warm_up(self, portrait=None, steps: int | None = None) -> float:
        """Compiles what a stream runs (the window step, the decoder) on one second of silence,
        so that the first client's first frame does not wait for the compiler.

        Args:
          portrait: an image as `open` takes; default a mid-grey one of the model's size.
          steps: the sampler steps clients will use (default: the config's).

        Returns:
          The seconds it took.
        """
        t0 = time.monotonic()
        if portrait is None:
            p = self.pipe.config.prepare
            portrait = np.full((int(p.height), int(p.width), 3), 128, np.uint8)
        silence = np.zeros(self.sample_rate, np.float32)
        with warnings.catch_warnings():  # no face in a grey image: said by a notice, irrelevant here
            warnings.simplefilter("ignore")
            for _ in self.pipe.live(portrait, [silence], steps=steps, pace=None):
                pass
        return time.monotonic() - t0

    def get(self, sid: str, default=StreamNotFound) -> LiveSession:
        """The open stream `sid`.

        Raises:
          StreamNotFound: no open stream has that id (and no default was given).
        """
        with self._lock:
            found = self._sessions.get(sid)
        if found is None:
            if default is StreamNotFound:
                raise StreamNotFound(f"no open live stream {sid!r} (it ended, was closed or timed out)")
            return default
        return found

    def sessions(self) -> list[LiveSession]:
        """The open streams."""
        with self._lock:
            return list(self._sessions.values())

    def reports(self) -> list[dict]:
        """The open streams' reports."""
        self._reap()
        return [s.report() for s in self.sessions()]

    def close_all(self) -> None:
        """Closes every stream (the server is stopping)."""
        for s in self.sessions():
            s.close("the server stopped")
        self._closer.stop()

    def _drop(self, session: LiveSession, status: str) -> None:
        """Removes `session` (freeing its state) and wakes its reader; the first status stays."""
        with self._lock:
            if self._sessions.get(session.id) is not session:
                return
            del self._sessions[session.id]
        with session._lock:
            session.status = status
        session._inbox.put(_CLOSE)
        report = session.report()
        self.finished = (self.finished + [report])[-16:]
        if self.log is not None:
            self.log(f"live stream {session.id} {status}: {report['frames']} frames, {report['late']} late, "
                     f"p95 {report['latency_p95_s']} s, {report['dropped_s']} s of audio dropped")

    def _reap(self) -> None:
        """Closes streams idle past `idle_s` (no reader and no audio)."""
        now = time.monotonic()
        for s in self.sessions():
            if s.status == "open" and now - s.touched > self.idle_s:
                s.close(f"no audio and no reader for {self.idle_s:g} s")


class _Closer:
    """A daemon thread that reaps idle streams every few seconds (holding the hub weakly)."""

    def __init__(self, hub: LiveHub):
        self._stop = threading.Event()
        ref = weakref.ref(hub)
        period = min(5.0, hub.idle_s / 2)

        def loop():
            while not self._stop.wait(period):
                h = ref()
                if h is None:
                    return
                h._reap()
                del h

        threading.Thread(target=loop, name="mi-jax-live-reaper", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()


# ----------------------------------------------------------------------------- HTTP


def encode_part(part, session: LiveSession) -> bytes:
    """One `LiveFrames` -> a JSON line (frames as base64 uint8), with the stream's lateness and backlog."""
    n, h, w, _ = part.frames.shape
    report = session.report()
    line = dict(start=int(part.start), frames=int(n), height=int(h), width=int(w),
                data=base64.b64encode(np.ascontiguousarray(part.frames, np.uint8).tobytes()).decode("ascii"),
                late=int(part.late), late_total=report["late"],
                latency_max_s=None if not np.isfinite(part.latency).any() else round(float(np.nanmax(part.latency)), 4),
                behind_s=report["behind_s"], dropped_s=report["dropped_s"])
    if part.late:
        line["warning"] = (f"{part.late} frame(s) later than {session.stream.max_latency_s:g} s after their audio: "
                           "the stream is behind real time")
    if session.warning:
        line["warning"] = session.warning
    return (json.dumps(line) + "\n").encode()


def decode_part(line: bytes | str) -> dict:
    """A JSON line of `GET /streams/{id}/frames` -> the dict, with `frames` as uint8 `[n, H, W, 3]`."""
    d = json.loads(line)
    if "data" in d:
        d["pixels"] = np.frombuffer(base64.b64decode(d.pop("data")), np.uint8).reshape(d["frames"], d["height"],
                                                                                        d["width"], 3)
    return d


def make_app(hub: LiveHub):
    """The HTTP API of the module docstring over `hub`, as a Starlette app (Starlette comes with
    the `app` extra's Gradio).

    Returns:
      `starlette.applications.Starlette`.
    """
    import anyio
    from PIL import Image, UnidentifiedImageError
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    def error(status: int, message: str):
        return JSONResponse({"error": message}, status_code=status)

    def number(request, name, kind, default):
        value = request.query_params.get(name)
        if value in (None, ""):
            return default
        if value.lower() == "none":
            return None
        try:
            return kind(value)
        except ValueError:
            raise InputError(f"{name}={value!r}: pass a number") from None

    async def open_stream(request: Request):
        body = await request.body()
        try:
            try:
                portrait = Image.open(io.BytesIO(body))
                portrait.load()
            except (UnidentifiedImageError, OSError) as e:
                raise InputError(f"portrait: the request body ({len(body)} bytes) is not a readable image ({e}); "
                                 "POST the PNG or JPEG file's bytes") from None
            session = await anyio.to_thread.run_sync(lambda: hub.open(
                portrait, request.query_params.get("prompt", ""), seed=number(request, "seed", int, 0),
                steps=number(request, "steps", int, None), pace=number(request, "pace", float, 1.0),
                lookahead_s=number(request, "lookahead_s", float, None),
                max_latency_s=number(request, "max_latency_s", float, None)))
        except InputError as e:
            return error(400, str(e))
        except ServerBusy as e:
            return error(503, str(e))
        s = session.stream
        return JSONResponse(dict(id=session.id, fps=s.fps, sample_rate=s.sample_rate, height=int(s.image.shape[0]),
                                 width=int(s.image.shape[1]), lookahead_s=s.lookahead_s,
                                 max_latency_s=s.max_latency_s, notices=s.notices), status_code=201)

    async def audio(request: Request):
        try:
            session = hub.get(request.path_params["sid"])
            body = await request.body()
            if len(body) % 4:
                raise InputError(f"audio: {len(body)} bytes is not a whole number of float32 samples; POST "
                                 "little-endian float32 mono samples")
            rate = number(request, "rate", int, None)
            backlog = session.feed(np.frombuffer(body, "<f4"), rate) if body else session._backlog()
            if request.query_params.get("end") in ("1", "true"):
                session.end()
        except StreamNotFound as e:
            return error(404, str(e.args[0]))
        except StreamClosed as e:
            return error(409, str(e))
        except InputError as e:
            return error(400, str(e))
        if backlog["dropped_s"]:
            return JSONResponse(dict(backlog, warning=session.warning), status_code=429)
        return JSONResponse(backlog)

    async def frames(request: Request):
        try:
            session = hub.get(request.path_params["sid"])
        except StreamNotFound as e:
            return error(404, str(e.args[0]))
        if session.status != "open":
            return error(409, f"stream {session.id} is already {session.status}; one reader per stream")
        parts = session.parts()
        done = object()

        async def body():
            try:
                while True:
                    try:
                        part = await anyio.to_thread.run_sync(next, parts, done, abandon_on_cancel=True)
                    except InputError as e:
                        yield (json.dumps({"error": str(e)}) + "\n").encode()
                        return
                    if part is done:
                        yield (json.dumps({"report": session.report()}) + "\n").encode()
                        return
                    yield encode_part(part, session)
            finally:  # the client went away, or the stream ended: its state goes
                session.close("the client disconnected")

        return _Disconnectable(body(), media_type="application/x-ndjson")

    async def close(request: Request):
        try:
            session = hub.get(request.path_params["sid"])
        except StreamNotFound as e:
            return error(404, str(e.args[0]))
        session.close("closed by the client")
        return JSONResponse(session.report())

    async def streams(request: Request):
        return JSONResponse(dict(streams=hub.reports(), max_streams=hub.max_streams, finished=hub.finished))

    class _Disconnectable(StreamingResponse):
        """Streams while watching for the client's disconnect, so a gone client is noticed even
        while no frame is being sent (then the body is cancelled and its stream freed)."""

        async def __call__(self, scope, receive, send):
            async with anyio.create_task_group() as group:
                async def watch():
                    await self.listen_for_disconnect(receive)
                    group.cancel_scope.cancel()

                group.start_soon(watch)
                try:
                    await self.stream_response(send)
                except OSError:
                    pass
                group.cancel_scope.cancel()

    return Starlette(routes=[
        Route("/streams", open_stream, methods=["POST"]),
        Route("/streams", streams, methods=["GET"]),
        Route("/streams/{sid}/audio", audio, methods=["POST"]),
        Route("/streams/{sid}/frames", frames, methods=["GET"]),
        Route("/streams/{sid}", close, methods=["DELETE"]),
    ])


@dataclasses.dataclass
class ServeSettings:
    """`mi-jax serve`'s settings."""

    checkpoint: str = "demo/model"
    host: str = "127.0.0.1"
    port: int = 7861
    max_streams: int = DEFAULT_MAX_STREAMS


def serve(settings: ServeSettings, log=print) -> int:
    """Loads the model once and serves live streams over HTTP until interrupted (Ctrl-C, SIGTERM).

    Args:
      settings: checkpoint, address and stream slots.
      log: where start-up lines go.

    Returns:
      0 once the server stopped.

    Raises:
      mi_jax.app.InstallError: Starlette / uvicorn (the `app` extra) are not installed.
      CheckpointError: the checkpoint holds no finished run.
    """
    import importlib.util

    from mi_jax.app.server import InstallError

    if importlib.util.find_spec("uvicorn") is None or importlib.util.find_spec("starlette") is None:
        raise InstallError("`mi-jax serve` needs the `app` extra (Starlette and uvicorn come with Gradio): "
                           "pip install -c constraints.txt -e '.[app]'")
    import uvicorn

    from mi_jax.pipeline import Pipeline

    t0 = time.monotonic()
    pipe = Pipeline.from_checkpoint(settings.checkpoint)
    hub = LiveHub(pipe, max_streams=settings.max_streams, log=log)
    log(f"loaded {settings.checkpoint} in {time.monotonic() - t0:.1f} s; up to {settings.max_streams} live streams")
    log(f"compiled the stream's steps in {hub.warm_up():.1f} s")
    log(f"serving live streams on http://{settings.host}:{settings.port}/streams (see mi_jax/serve.py)")
    try:
        uvicorn.run(make_app(hub), host=settings.host, port=settings.port, log_level="warning")
    finally:
        hub.close_all()
    return 0
