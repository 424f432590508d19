"""`mi-jax serve` (mi_jax/serve.py): one model, several live streams over HTTP. The server runs
as a subprocess with the tiny model: two clients stream at once and both get every frame; a
third is refused while both run; a client that goes away mid-stream frees its stream. In
process (`LiveHub`): a stream's state is garbage once it is closed, a backlog past the buffer is
dropped and counted, an idle stream is closed, bad audio is told."""

import gc
import os
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import write_talk_inputs

ROOT = Path(__file__).resolve().parent.parent
SECONDS = 2.2  # 55 frames at 25 fps
CHUNK = 3200  # 0.2 s of 16 kHz audio per POST


@pytest.fixture(scope="module")
def talk(tmp_path_factory):
    folder = write_talk_inputs(tmp_path_factory.mktemp("serve_inputs"), 1_000_007, SECONDS)
    audio, rate = sf.read(os.path.join(folder, "voice.wav"), dtype="float32")
    assert rate == 16000
    return Path(folder) / "portrait.png", audio


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """`mi-jax serve` on a free local port with the tiny model, 2 stream slots; stopped with SIGTERM."""
    import portpicker

    port = portpicker.pick_unused_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"), PYTHONUNBUFFERED="1")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mi_jax.cli", "serve", "--checkpoint", tiny_run, "--port",
                                 str(port), "--max-streams", "2"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=str(ROOT))
    deadline = time.monotonic() + 240
    while "serving live streams" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mi-jax serve did not start:\n{log.read_text()}")
        time.sleep(0.3)
    time.sleep(0.5)  # the log line comes just before uvicorn binds
    yield f"http://127.0.0.1:{port}", log
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert "Traceback" not in log.read_text(), log.read_text()


def _open(http, url, portrait, **params):
    params = {"steps": 2, **params}
    r = http.post(f"{url}/streams", content=Path(portrait).read_bytes(), params=params)
    return r


def _client(url, portrait, audio, result, *, pace=1.0, seed=0):
    """Streams `audio` at `pace` x real time in 0.2 s POSTs while reading the frames."""
    import httpx

    from mi_jax.serve import decode_part

    with httpx.Client(timeout=120) as http:
        r = _open(http, url, portrait, seed=seed, pace=pace)
        assert r.status_code == 201, r.text
        info = result["info"] = r.json()
        sid = info["id"]

        def send():
            t0 = time.monotonic()
            for i in range(0, len(audio), CHUNK):
                wait = t0 + i / 16000 / pace - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                result.setdefault("sent_at", []).append(time.monotonic())
                ok = http.post(f"{url}/streams/{sid}/audio", content=audio[i : i + CHUNK].astype("<f4").tobytes())
                assert ok.status_code == 200, ok.text
            assert http.post(f"{url}/streams/{sid}/audio", params={"end": 1}).status_code == 200

        sender = threading.Thread(target=send)
        sender.start()
        lines = []
        with http.stream("GET", f"{url}/streams/{sid}/frames") as frames:
            for line in frames.iter_lines():
                if line:
                    lines.append((time.monotonic(), decode_part(line)))
        sender.join()
        result["lines"] = lines


def test_two_concurrent_streams_both_complete_and_a_third_is_refused(server, talk):
    import httpx

    url, _ = server
    portrait, audio = talk
    results = [{}, {}]
    clients = [threading.Thread(target=_client, args=(url, portrait, audio, results[i]), kwargs=dict(seed=i))
               for i in range(2)]
    for c in clients:
        c.start()
    deadline = time.monotonic() + 120
    while not all("info" in r for r in results) and time.monotonic() < deadline:
        time.sleep(0.05)
    with httpx.Client(timeout=60) as http:
        busy = _open(http, url, portrait)
        assert busy.status_code == 503 and "all 2 live streams" in busy.json()["error"], busy.text
    for c in clients:
        c.join(240)
    frames = []
    for r in results:
        assert r["info"]["fps"] == 25 and r["info"]["sample_rate"] == 16000, r["info"]
        parts = [d for _, d in r["lines"] if "pixels" in d]
        report = r["lines"][-1][1]["report"]
        video = np.concatenate([d["pixels"] for d in parts])
        assert video.shape == (55, r["info"]["height"], r["info"]["width"], 3), video.shape
        assert [d["start"] for d in parts] == list(np.cumsum([0] + [d["frames"] for d in parts[:-1]]))
        assert report["status"] == "ended" and report["frames"] == 55, report
        assert report["late"] == parts[-1]["late_total"] == sum(d["late"] for d in parts)  # every late frame told
        # frames came while the audio was still being sent
        assert r["lines"][0][0] < r["sent_at"][-1], (r["lines"][0][0], r["sent_at"][-1])
        frames.append(video)
    assert np.abs(frames[0].astype(int) - frames[1]).mean() > 0.5  # two streams, two seeds, not one shared
    with httpx.Client() as http:
        assert http.get(f"{url}/streams").json()["streams"] == []  # both freed


def test_a_client_that_disconnects_frees_its_stream(server, talk):
    import httpx

    url, _ = server
    portrait, audio = talk
    with httpx.Client(timeout=60) as http:
        sid = _open(http, url, portrait, pace="none").json()["id"]
        http.post(f"{url}/streams/{sid}/audio", content=audio[:16000].astype("<f4").tobytes())
        with http.stream("GET", f"{url}/streams/{sid}/frames") as frames:
            lines = frames.iter_lines()  # held: closing it would close the connection
            first = next(line for line in lines if line)
            assert '"frames"' in first
            listed = http.get(f"{url}/streams").json()
            assert len(listed["streams"]) == 1, listed["finished"]
            [s] = listed["streams"]
            assert s["id"] == sid and s["status"] == "reading", s
        # the connection closed with no audio end: the server notices and drops the stream
        deadline = time.monotonic() + 15
        while http.get(f"{url}/streams").json()["streams"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert http.get(f"{url}/streams").json()["streams"] == []
        gone = http.post(f"{url}/streams/{sid}/audio", content=audio[:3200].astype("<f4").tobytes())
        assert gone.status_code == 404 and "no open live stream" in gone.json()["error"], gone.text
        # bad requests are told with the fix
        bad = http.post(f"{url}/streams", content=b"not an image")
        assert bad.status_code == 400 and "not a readable image" in bad.json()["error"], bad.text
        sid = _open(http, url, portrait).json()["id"]
        odd = http.post(f"{url}/streams/{sid}/audio", content=b"abc")
        assert odd.status_code == 400 and "float32" in odd.json()["error"], odd.text
        assert http.delete(f"{url}/streams/{sid}").json()["status"] == "closed: closed by the client"
        assert http.get(f"{url}/streams").json()["streams"] == []
        # audio too short for one frame: the reader is told (the pipeline's message), nothing computed
        sid = _open(http, url, portrait).json()["id"]
        http.post(f"{url}/streams/{sid}/audio", content=audio[:100].astype("<f4").tobytes(), params={"end": 1})
        told = http.get(f"{url}/streams/{sid}/frames").text.strip().splitlines()
        assert len(told) == 1 and "shorter than one video frame" in told[0], told
        assert http.get(f"{url}/streams").json()["finished"][-1]["status"].startswith("failed: audio")


# ----------------------------------------------------------------------------- in process


@pytest.fixture(scope="module")
def pipe(tiny_run):
    from mi_jax.pipeline import Pipeline

    return Pipeline.from_checkpoint(tiny_run)


def test_a_closed_stream_leaves_no_state_and_a_backlog_is_counted(pipe, talk):
    from mi_jax.data.inputs import InputError
    from mi_jax.serve import LiveHub, StreamClosed, StreamNotFound

    portrait, audio = talk
    hub = LiveHub(pipe, max_streams=1, max_buffer_s=1.0, idle_s=30.0)
    session = hub.open(str(portrait), steps=2, pace=None, key="page-a")
    # 48 kHz stereo int16, as a browser sends it: resampled to the model's rate
    import soxr

    stereo = (np.repeat(soxr.resample(audio[:16000], 16000, 48000)[:, None], 2, 1) * 20000).astype(np.int16)
    backlog = session.feed(stereo, 48000)
    assert 0.95 < backlog["behind_s"] <= 1.0 and backlog["dropped_s"] == 0, backlog
    backlog = session.feed(audio[16000:19200])  # past the 1 s buffer: dropped, counted, said
    assert backlog["dropped_s"] == 0.2 and "behind" in session.warning, (backlog, session.warning)
    reader = session.parts()
    first = next(reader)
    assert first.start == 0 and len(first.frames) > 0
    assert session.report()["behind_s"] < 1.0  # the stream read its audio
    refs = [weakref.ref(session), weakref.ref(session.stream)]
    reader.close()  # the viewer went away
    with pytest.raises(StreamNotFound):
        hub.get(session.id)
    assert hub.finished[-1]["status"] == "closed: the reader went away"
    with pytest.raises(StreamClosed):
        session.feed(audio[:100])
    del session, reader, first
    gc.collect()
    assert [r() for r in refs] == [None, None]  # nothing holds the stream's state

    again = hub.open(str(portrait), steps=2, key="page-a")  # one slot: the first is gone
    replaced = hub.open(str(portrait), steps=2, key="page-a")  # the same page again: replaces its stream
    assert hub.sessions() == [replaced] and again.status.startswith("closed: the same client")
    with pytest.raises(InputError, match="shape"):
        replaced.feed(np.zeros((2, 2, 2), np.float32))
    replaced.close()
    assert hub.sessions() == []


def test_an_idle_stream_is_closed(pipe, talk):
    from mi_jax.serve import LiveHub

    portrait, _ = talk
    hub = LiveHub(pipe, idle_s=0.3)
    session = hub.open(str(portrait), steps=2)
    deadline = time.monotonic() + 5
    while hub.sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.sessions() == [] and session.status.startswith("closed: no audio and no reader"), session.status
    with pytest.raises(ValueError, match="max_streams"):
        LiveHub(pipe, max_streams=0)
