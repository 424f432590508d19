"""`mi-jax app` (the web page) driven in a real headless Chromium: Debian's `chromium` package,
driven by the `playwright` Python package through `executable_path` (no browser is ever
downloaded; never run `playwright install`).

The app runs as a subprocess on a free local port with the tiny model: a portrait and a voice are
uploaded, Generate is pressed, the progress moves and frames show while the video is made, and
the page ends with a playable video of the right length; a broken image gets the CLI's message in
the page with no file left; two users queue and a stopped job leaves nothing.

Browser missing: the tests fail saying how to install it. `make test` installs it when it can
(root on Debian).
MI_JAX_APP_SCREENSHOT=PATH: where the screenshot of the finished page goes (for the README);
MI_JAX_APP_CHECKPOINT=RUN: the model the app serves instead of the tiny test run (e.g. demo/model,
whose video shows a face rather than the 30-step tiny model's noise).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import write_talk_inputs

ROOT = Path(__file__).resolve().parent.parent
INSTALL = ("install Debian's Chromium: `apt-get install -y chromium` (as root; `make test` does it when it "
           "can), or set MI_JAX_CHROMIUM=/path/to/chromium. Never `playwright install`: no browser is downloaded")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-quic", "--no-first-run"]
SECONDS = 2.0  # the voice; the video lasts as long (50 frames at 25 fps)


def _unavailable(message: str):
    """A missing piece fails the test, saying how to get it (a skipped browser test proves nothing)."""
    pytest.fail(message, pytrace=False)


def chromium_path() -> str:
    for candidate in (os.environ.get("MI_JAX_CHROMIUM"), "chromium", "chromium-browser", "/usr/bin/chromium"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    _unavailable(f"the browser tests need Chromium, which is not installed: {INSTALL}")


@dataclass
class App:
    url: str
    proc: subprocess.Popen
    log: Path
    folder: Path  # the app's temporary folder (uploads, outputs, Gradio's cache)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return write_talk_inputs(tmp_path_factory.mktemp("app_inputs"), 1_000_005, SECONDS)


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the browser tests need the playwright Python package: pip install -c constraints.txt "
                     "-e '.[test]'")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def checkpoint(request):
    return os.environ.get("MI_JAX_APP_CHECKPOINT") or request.getfixturevalue("tiny_run")


@pytest.fixture(scope="module")
def app(checkpoint, tmp_path_factory, browser):
    """`mi-jax app` on a free local port with the tiny model (a subprocess), stopped with SIGTERM."""
    import portpicker

    try:
        import gradio  # noqa: F401
    except ImportError:
        _unavailable("the app tests need Gradio: pip install -c constraints.txt -e '.[test]'")
    port = portpicker.pick_unused_port()
    tmp = tmp_path_factory.mktemp("app_tmp")
    log = tmp / "app.log"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    env.update(TMPDIR=str(tmp), JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(ROOT / ".cache" / "jax"),
               PYTHONUNBUFFERED="1")
    script = Path(sys.executable).with_name("mi-jax")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mi_jax.cli"]
    with open(log, "w") as out:
        proc = subprocess.Popen([*command, "app", "--checkpoint", checkpoint, "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 300
    while "Running on local URL" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"mi-jax app did not start:\n{log.read_text()}")
        time.sleep(0.5)
    folder = Path(re.search(r"uploads and outputs: (\S+)", log.read_text()).group(1))
    yield App(url, proc, log, folder)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert not folder.exists(), f"{folder} left behind after the app stopped"


@pytest.fixture
def page(browser, app):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    page.goto(app.url)
    page.wait_for_selector("#generate")
    yield page
    context.close()


def _fill(page, portrait, voice, *, prompt=None, seconds=None, steps=2, seed=None):
    page.locator("#portrait input[type=file]").set_input_files(str(portrait))
    page.wait_for_selector("#portrait img", state="attached", timeout=30_000)  # uploaded
    page.locator("#voice input[type=file]").set_input_files(str(voice))
    page.wait_for_selector("#voice [data-testid^='waveform']", state="attached", timeout=30_000)
    if prompt is not None:
        page.locator("#prompt textarea").fill(prompt)
    if seconds is not None:
        page.locator("#seconds input").fill(str(seconds))
    if seed is not None:
        page.locator("#seed input").fill(str(seed))
    page.locator("#steps input[type=number]").fill(str(steps))
    page.locator("#steps input[type=number]").press("Enter")


def _status(page) -> str:
    return page.locator("#status").inner_text()


def server_errors(log) -> list[str]:
    """The tracebacks in the app's log, but a browser that went away mid-request
    (`starlette.requests.ClientDisconnect`, logged by the ASGI server, which carries on)."""
    text = log.read_text()
    blocks = text.split("Traceback (most recent call last):")[1:]
    return [b for b in blocks if "starlette.requests.ClientDisconnect" not in b]


def _wait_status(page, pattern: str, timeout_s: float) -> str:
    page.wait_for_function("p => new RegExp(p).test(document.querySelector('#status').innerText)", arg=pattern,
                           timeout=timeout_s * 1000, polling=100)
    return _status(page)


# Every change of the status line, with whether a preview frame and the video were on the page then.
RECORD = """() => {
  window.__seen = [];
  const note = () => window.__seen.push({t: performance.now(), status: document.querySelector('#status').innerText,
    preview: !!document.querySelector('#preview img[src]'), video: !!document.querySelector('#video video[src]')});
  new MutationObserver(note).observe(document.body, {subtree: true, childList: true, characterData: true,
                                                     attributes: true, attributeFilter: ['src']});
}"""


def _leftovers(folder: Path) -> list[str]:
    """Files a job writes (its folder under runs/, the mp4, its temporary, the plot) anywhere in the app's folder."""
    jobs = [str(p) for p in (folder / "runs").iterdir()]
    outputs = [str(p) for p in folder.rglob("*") if p.suffix in (".mp4", ".tmp") or p.name.startswith("lip_sync")]
    return jobs + outputs


def test_a_broken_image_is_told_in_the_page_as_by_the_cli_and_leaves_nothing(app, page, inputs, tmp_path, capsys,
                                                                             checkpoint):
    from mi_jax.cli import main as cli

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert cli(["generate", "--checkpoint", checkpoint, "--portrait", str(broken), "--audio",
                str(inputs / "voice.wav"), "--out", str(tmp_path / "out.mp4")]) == 2
    told = capsys.readouterr().err.strip().replace(str(broken), "broken.png")
    assert told.startswith("error: portrait: broken.png is not a readable image"), told

    _fill(page, broken, inputs / "voice.wav")
    page.locator("#generate").click()
    shown = _wait_status(page, "not a readable image", 60)
    assert told in shown, (told, shown)  # the CLI's message, naming the file as uploaded
    time.sleep(1.0)  # nothing starts after it
    assert "window" not in _status(page) and page.locator("#video video").count() == 0
    assert not _leftovers(app.folder)
    assert not server_errors(app.log)


def test_users_queue_and_a_stopped_job_leaves_nothing(app, browser, page, inputs):
    """Two users: the second sees its place in the queue while the first generates, stops that
    waiting job (told at once) and asks again; Stop ends the first job (its partial files
    removed), the second user's new job starts (the stopped one did nothing), and stopping it
    leaves nothing. "Stopped" is the job's own last update: it stays (no update overtakes it)."""
    other = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
    try:
        other.goto(app.url)
        other.wait_for_selector("#generate")
        for p in (page, other):
            _fill(p, inputs / "portrait.png", inputs / "voice.wav", seconds=60)  # 60 s: hundreds of windows
        page.locator("#generate").click()
        _wait_status(page, r"window \d+/\d+", 300)  # compiled and running
        other.locator("#generate").click()
        queued = _wait_status(other, r"queue", 60)
        assert re.search(r"queue:?\s*1\s*/\s*1", queued), queued  # its place in the queue
        other.locator("#stop").click()  # stopped while it waits: told at once, its turn does nothing
        _wait_status(other, "Stopped", 10)
        other.locator("#generate").click()
        _wait_status(other, "Waiting for a turn", 60)  # checked again, queued behind the running job
        assert list((app.folder / "runs").iterdir()), "the running job has its folder"
        page.locator("#stop").click()
        _wait_status(page, "Stopped", 30)
        _wait_status(other, r"window \d+/\d+", 120)  # the next user's turn
        other.locator("#stop").click()
        _wait_status(other, "Stopped", 30)
        before = [_status(page), _status(other)]
        time.sleep(2.0)  # both stay stopped: no update overtakes "Stopped", no stopped request starts later
        assert [_status(page), _status(other)] == before, before
        assert page.locator("#video video").count() == 0 and other.locator("#video video").count() == 0
        deadline = time.monotonic() + 30
        while _leftovers(app.folder) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _leftovers(app.folder)
    finally:
        other.context.close()


def test_the_page_makes_a_talking_video_in_chromium(app, page, inputs, tmp_path):
    from mi_jax.data.video_io import probe, read_audio

    _fill(page, inputs / "portrait.png", inputs / "voice.wav", prompt="a person talking, nodding", seed=1)
    page.evaluate(RECORD)
    page.locator("#generate").click()
    done = _wait_status(page, "^Done", 300)
    assert "50 frames (2.0 s) with its audio" in done, done
    seen = page.evaluate("window.__seen")

    # the progress moved: windows done / total with the time left, counting up to the total
    counts = [tuple(map(int, m.groups())) for s in seen for m in [re.search(r"window (\d+)/(\d+), ", s["status"])] if m]
    assert len({c for c, _ in counts}) >= 3, [s["status"] for s in seen]
    assert [c for c, _ in counts] == sorted(c for c, _ in counts) and counts[-1][0] == counts[-1][1]
    assert any(re.search(r"window \d+/\d+, (~\d+ s|under a second) left", s["status"]) for s in seen)
    # frames showed while the video was being made, before it was finished
    assert any(s["preview"] and not s["video"] and "window" in s["status"] for s in seen)

    # a playable video of the right length, with its audio
    page.wait_for_function("() => { const v = document.querySelector('#video video'); return v && v.readyState >= 2 }",
                           timeout=30_000)
    played = page.evaluate("""async () => {
        const v = document.querySelector('#video video');
        v.muted = true;
        await v.play();
        await new Promise(r => setTimeout(r, 500));
        return {duration: v.duration, time: v.currentTime, error: v.error && v.error.code, width: v.videoWidth,
                height: v.videoHeight, src: v.currentSrc};
    }""")
    assert played["error"] is None and played["time"] > 0, played
    assert abs(played["duration"] - SECONDS) < 0.1 and (played["width"], played["height"]) == (64, 64), played
    mp4 = tmp_path / "talk.mp4"
    mp4.write_bytes(page.request.get(played["src"]).body())
    info = probe(str(mp4))
    assert info.num_frames == 50 and info.fps == 25
    assert abs(len(read_audio(str(mp4))) / 16000 - SECONDS) < 0.03

    # the lip-sync plot and the timing
    assert page.evaluate("() => document.querySelector('#lip-sync img').naturalWidth") > 100
    timing = page.locator("#timing").inner_text()
    assert re.search(r"2\.0 s of video \(50 frames, \d+ windows\) in [\d.]+ s", timing), timing
    assert "Lip sync: r = " in timing

    shot = os.environ.get("MI_JAX_APP_SCREENSHOT") or str(tmp_path / "app.png")
    os.makedirs(os.path.dirname(os.path.abspath(shot)), exist_ok=True)
    page.screenshot(path=shot, full_page=True)
    assert os.path.getsize(shot) > 10_000
    # the job's own folder is gone (the page serves its copies); nothing else left
    assert not list((app.folder / "runs").iterdir())
    assert not server_errors(app.log)
    assert not (ROOT / "mi_jax" / "app.pyi").exists()  # Gradio writes stubs beside component subclasses: none here


def test_a_second_speaker_with_masks_painted_on_the_portrait(app, page, inputs):
    """Two voices without masks: the CLI's message; with speaker 1 painted red and speaker 2 blue
    on the portrait (the mask painter), the video is made."""
    _fill(page, inputs / "portrait.png", inputs / "voice.wav")
    page.get_by_text("Second speaker (optional)").click()
    page.locator("#voice2 input[type=file]").set_input_files(str(inputs / "voice.wav"))
    page.wait_for_selector("#voice2 [data-testid^='waveform']", state="attached", timeout=30_000)
    page.locator("#generate").click()
    assert "error: 2 audio tracks but no --mask" in _wait_status(page, "no --mask", 60)

    painter = page.locator("#mask-drawing")
    painter.scroll_into_view_if_needed()
    page.wait_for_function("() => document.querySelectorAll('#mask-drawing canvas').length > 0")
    painter.locator("button[aria-label='Brush']").click()
    box = painter.locator("canvas").first.bounding_box()

    def paint(x0, x1):  # a few strokes across the canvas's middle band, top to bottom
        for k in range(4):
            y = box["y"] + box["height"] * (0.2 + 0.2 * k)
            page.mouse.move(box["x"] + box["width"] * x0, y)
            page.mouse.down()
            page.mouse.move(box["x"] + box["width"] * x1, y, steps=3)
            page.mouse.up()

    paint(0.35, 0.48)  # red: the first colour
    painter.locator("button[aria-label='Color']").click()
    painter.locator("[style*='0, 0, 255'], [style*='0000ff'], [style*='0000FF']").first.click()
    page.keyboard.press("Escape")
    paint(0.52, 0.62)  # blue
    page.locator("#generate").click()
    done = _wait_status(page, "^(Done|error: (?!2 audio tracks but no))", 300)
    assert done.startswith("Done: 50 frames") and "no face found" not in done, done  # the painted masks were used
    assert not list((app.folder / "runs").iterdir())


def test_the_app_listens_on_localhost_only(app):
    import psutil

    listening = [c.laddr for c in psutil.Process(app.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_page_helpers():
    """Without a browser: the prompts offered, the painted masks, the default address."""
    from mi_jax.app import known_prompts, masks_from_drawing
    from mi_jax.cli import build_parser
    from mi_jax.config_utils import load_config
    from mi_jax.data.inputs import InputError

    config = load_config(str(ROOT / "configs" / "magicinfinite.py:tiny,stage1"))
    assert known_prompts(config) == ["a person talking", "a person talking, nodding", "a person talking, shaking head",
                                     "a person talking, smiling", "a person talking, looking left",
                                     "a person talking, looking right"]
    layer = np.zeros((8, 8, 4), np.uint8)
    assert masks_from_drawing(None) == [] and masks_from_drawing({"layers": [layer]}) == []
    layer[:, :4] = (255, 0, 0, 255)  # speaker 1 in red on the left
    layer[:, 6:] = (0, 0, 255, 255)  # speaker 2 in blue on the right
    one, two = masks_from_drawing({"background": None, "layers": [layer], "composite": None})
    assert one[:, :4].all() and not one[:, 4:].any() and two[:, 6:].all() and not two[:, :6].any()
    with pytest.raises(InputError, match="speaker 1"):
        masks_from_drawing({"layers": [np.where(layer[..., 2:3] > 0, layer, 0)]})
    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.checkpoint) == ("127.0.0.1", 7860, "demo/model")
    from mi_jax.app import page_prompt, page_values

    # the prompt box: one prompt, or a schedule of 'SECONDS:TEXT' lines; the long-video options pass through
    assert page_prompt("a person talking") == "a person talking" and page_prompt(None) == ""
    assert page_prompt("0:a person talking\n\n30:a person talking, nodding\n") == [
        "0:a person talking", "30:a person talking, nodding"]
    assert page_values("p.png", "v.wav", "x", 0, 0, 2, None, None, None, {"path": "t.txt"}, False, True)[-3:] == (
        "t.txt", False, True)


def test_stops_a_waiting_job_before_it_starts_and_a_running_one_after_its_window():
    """The page's stop book (without a browser): jobs start in the order their checks passed; a job
    stopped while it waits never starts; a running one is told after its window; other sessions
    are untouched."""
    from mi_jax.app import Stops

    stops = Stops()
    stops.queued("a")
    stops.queued("b")
    first = stops.start("a")
    assert first is not None and not stops.stopped(first)
    assert stops.stop("b") == "queued" and stops.start("b") is None  # its turn: it ends without compute
    stops.queued("a")  # a asks again while its first job runs
    assert stops.stop("a") == "running" and stops.stopped(first)  # the running one ends itself, saying so
    assert stops.start("a") is None  # and the one waiting behind it never starts
    stops.end("a", first)
    stops.queued("a")
    second = stops.start("a")
    assert second is not None and not stops.stopped(second)  # a new request after the stop runs
    assert stops.stop("c") is None  # nothing of that session to stop


# ----------------------------------------------------------------------------- typed words and the microphone


def _portrait_only(page, portrait, steps=1):
    page.locator("#portrait input[type=file]").set_input_files(str(portrait))
    page.wait_for_selector("#portrait img", state="attached", timeout=30_000)
    page.locator("#steps input[type=number]").fill(str(steps))
    page.locator("#steps input[type=number]").press("Enter")


def _played(page) -> dict:
    """Plays the page's video (muted, as a test may) for half a second: its duration, position, size, source."""
    page.wait_for_function("() => { const v = document.querySelector('#video video'); return v && v.readyState >= 2 }",
                           timeout=30_000)
    return page.evaluate("""async () => {
        const v = document.querySelector('#video video');
        v.muted = true;
        await v.play();
        await new Promise(r => setTimeout(r, 500));
        return {duration: v.duration, time: v.currentTime, error: v.error && v.error.code, src: v.currentSrc};
    }""")


def test_typed_words_are_spoken_and_animated_in_chromium(app, page, inputs, tmp_path):
    """The Say box with no voice file: the words are spoken by espeak-ng in the chosen voice, the
    video lasts as long as the speech and plays with it as its audio; an unknown voice gets the
    CLI's message before any compute."""
    from mi_jax.data import speech, synthetic
    from mi_jax.data.video_io import probe, read_audio

    text, voice = "Hello, this is a test.", "en-us+f3"
    said = speech.speak(text, voice)
    _portrait_only(page, inputs / "portrait.png")
    page.locator("#say textarea").fill(text)
    page.locator("#say-voice input").fill(voice)
    page.locator("#say-voice input").press("Enter")
    page.locator("#generate").click()
    done = _wait_status(page, "^(Done|error)", 300)
    m = re.match(r"Done: (\d+) frames", done)
    assert m and abs(int(m.group(1)) - said.seconds * 25) <= 1, (done, said.seconds)
    played = _played(page)
    assert played["error"] is None and played["time"] > 0 and abs(played["duration"] - said.seconds) < 0.1, played
    mp4 = tmp_path / "said.mp4"
    mp4.write_bytes(page.request.get(played["src"]).body())
    info, audio = probe(str(mp4)), read_audio(str(mp4))
    assert abs(len(audio) / 16000 - said.seconds) < 0.05
    env = [synthetic.mouth_envelope(a, info.num_frames) for a in (audio, said.audio)]
    assert np.corrcoef(*env)[0, 1] > 0.9  # the spoken words are the video's audio
    page.locator("#say-voice input").fill("nosuchvoice")
    page.locator("#say-voice input").press("Enter")
    page.locator("#generate").click()
    told = _wait_status(page, "^error", 60)
    assert "no language 'nosuchvoice'" in told and "en-us" in told, told
    assert not list((app.folder / "runs").iterdir()) and not server_errors(app.log)


def test_a_recording_from_the_microphone_is_animated(app, browser, inputs, tmp_path):
    """Chromium's fake microphone plays a spoken sentence (a wav file); the page records it with
    its Record / Stop buttons and generates from the recording: the video lasts as long as the
    recording and its audio is speech."""
    import soundfile as sf
    import soxr

    from mi_jax.data import speech
    from mi_jax.data.video_io import probe, read_audio

    said = speech.speak("Hello, this is a test of the microphone.", "en-us")
    wav = tmp_path / "mic.wav"
    pause = np.zeros(48000 // 2, np.float32)
    sf.write(wav, np.concatenate([pause, soxr.resample(said.audio, 16000, 48000), pause]), 48000, subtype="PCM_16")
    mic = browser.browser_type.launch(executable_path=chromium_path(), args=CHROMIUM_FLAGS + [
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}"])
    try:
        page = mic.new_context(viewport={"width": 1280, "height": 1000}, permissions=["microphone"]).new_page()
        page.goto(app.url)
        page.wait_for_selector("#generate")
        _portrait_only(page, inputs / "portrait.png")
        page.locator("#voice button[aria-label='Record audio']").click()
        t0 = time.monotonic()
        page.locator("#voice .record-button").click()
        t1 = time.monotonic()
        time.sleep(3.0)
        t2 = time.monotonic()
        # the recording becomes the voice once it is uploaded: Generate before that finds no voice
        with page.expect_response(lambda r: "/upload" in r.url and r.request.method == "POST", timeout=60_000):
            page.locator("#voice .stop-button").click()
            t3 = time.monotonic()
        # the recording lasts from the Record click to the Stop click: bounded by when those clicks
        # started and returned (a loaded machine delays them), with 0.5 s for the recorder to start
        shortest, longest = t2 - t1 - 0.5, t3 - t0 + 0.5
        page.wait_for_selector("#voice [data-testid='waveform-controls']", state="attached", timeout=30_000)
        page.locator("#generate").click()
        done = _wait_status(page, "^(Done|error)", 300)
        m = re.match(r"Done: (\d+) frames \(([\d.]+) s\)", done)
        assert m and shortest <= float(m.group(2)) <= longest, (done, shortest, longest)  # the time recorded
        played = _played(page)
        assert played["error"] is None and played["time"] > 0, played
        mp4 = tmp_path / "recorded.mp4"
        mp4.write_bytes(page.request.get(played["src"]).body())
        audio = read_audio(str(mp4))
        assert probe(str(mp4)).num_frames == int(m.group(1))
        rms = np.sqrt(np.convolve(np.square(audio), np.ones(800) / 800, "valid"))  # 50 ms
        assert rms.max() > 0.05 and (rms > 0.1 * rms.max()).mean() > 0.3, rms.max()  # speech heard, not silence
    finally:
        mic.close()
    assert not list((app.folder / "runs").iterdir()) and not server_errors(app.log)
