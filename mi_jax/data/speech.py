"""Typed words -> speech, offline, with espeak-ng: audio plus each phoneme's time and viseme.

    from mi_jax.data import speech
    s = speech.speak("Hello, this is a test of the demo.", voice="en-us+f3")
    s.audio          # float32 mono at 16 kHz (the config's rate: `sample_rate=`)
    s.phonemes       # [Phoneme(start, end, ipa, viseme)], times in seconds from the audio's start

`mi-jax generate --say TEXT [--voice NAME]`, `Pipeline.generate(say=..., voice=...)` and the
page's "Say" box speak through here; the synthetic world's espeak-ng clips (`synthetic.render_clip(...,
voice="espeak")`) take their audio and their viseme truth from it.

**Licence: espeak-ng is GPL-3.0**, so it is an optional extra of this Apache-2.0 project (as
kokoro keeps it behind misaki): `pip install -e .[speech]` installs the `espeakng-loader` wheel,
which bundles the espeak-ng library and its data for every language (no system package, no
download). Without it every function here raises `SpeechError` naming that command.

The library is driven through its C API (speak_lib.h) with ctypes: `espeak_Initialize` in
AUDIO_OUTPUT_SYNCHRONOUS mode with phoneme events (IPA names), `espeak_SetSynthCallback`,
`espeak_SetVoiceByName`, `espeak_Synth`; the callback collects the 16-bit samples and the
events (`audio_position`, ms from the text's start). espeak-ng keeps global state, so calls are
serialised by a lock, and the library is loaded afresh for each call (a few ms): its wave
generator keeps state that would otherwise make a text sound slightly different after other
texts; so the same text, voice, rate and pitch give the same samples, whatever came before.
Audio is resampled from espeak-ng's 22050 Hz with soxr.

Visemes (`VISEMES`): each phoneme's mouth shape by its first IPA letter (stress and length marks
dropped): "open" /a/ (a ɑ æ ɐ ʌ ɒ), "wide" /i/ /e/ (i ɪ e ɛ ɨ ɯ), "round" /o/ /u/ (o ɔ u ʊ ɵ ø œ
y ʏ w), "closed" /m/ /b/ /p/, "neutral" for the other sounds (schwa, most consonants), "rest" for
pauses. `VISEME_SHAPES` gives each a (width, height) factor of the mouth: the synthetic world
renders and records it (mi_jax/data/synthetic.py).

Voices: `voices()` lists espeak-ng's languages ("en-us", "fr", ...), `variants()` its voice
variants; a voice is "LANGUAGE" or "LANGUAGE+VARIANT" ("en-us+f3"). `TRAIN_VOICES` and
`HELDOUT_VOICES` are disjoint, and so are their variants: the eval and the tests speak with
voices never trained on. `sentence(rng, split)` draws a sentence; "heldout" sentences use
words that "train" ones never do.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import threading
import unicodedata

import _ctypes
import numpy as np

from mi_jax.data.audio_io import SAMPLE_RATE
from mi_jax.data.inputs import InputError

INSTALL = "pip install -e .[speech]"
DEFAULT_VOICE = "en-us"
MAX_SECONDS = 120.0  # the longest speech `speak` returns (a generation of more: pass an audio file)
MAX_CHARS = 3000  # checked before synthesis: about 3 minutes of speech at espeak-ng's default rate

VISEMES = ("rest", "neutral", "open", "wide", "round", "closed")
# (width, height) factors of the mouth per viseme: width times the identity's mouth width, height
# times the opening the speech envelope gives (closed: shut whatever the loudness)
VISEME_SHAPES = {
    "rest": (1.0, 1.0),
    "neutral": (1.0, 0.8),
    "open": (1.0, 1.0),
    "wide": (1.3, 0.55),
    "round": (0.65, 0.9),
    "closed": (1.0, 0.0),
}
_OPEN, _WIDE, _ROUND, _CLOSED = set("aɑæɐʌɒɶä"), set("iɪeɛɨɯ"), set("oɔuʊɵøœyʏwɞʉ"), set("mbp")
_MARKS = set("ˈˌːˑ'-_")

# Disjoint voice lists, and disjoint variant sets: held-out voices are unseen in every part.
TRAIN_VOICES = (
    "en-us", "en-us+m1", "en-us+f1", "en-us+m3", "en-us+f3", "en+m2", "en+f2", "en-gb-x-rp+m4",
    "en-gb-scotland+f4", "en-029+m2", "en-us+klatt", "en+Alex", "en-us+Andy", "en+edward",
    "de+m3", "fr+f1", "es+m1", "it+f2", "nl+m4",
)
HELDOUT_VOICES = ("en-us+m7", "en-us+f5", "en-gb-x-rp+Annie", "en+max", "en-us+klatt4", "en-029+linda")

_SUBJECTS = ("the cat", "my brother", "a tall man", "our teacher", "the old woman", "your friend", "a small boy",
             "the farmer", "her mother", "the doctor")
_VERBS = ("sees", "wants", "paints", "buys", "moves", "keeps", "finds", "opens", "makes", "brings")
_OBJECTS = ("a blue boat", "the green map", "some warm bread", "a heavy box", "the big apple", "five red books",
            "a new phone", "the long rope", "my paper", "a cup of tea")
_PLACES = ("at home", "in the park", "by the sea", "on Monday", "before noon", "after the movie", "near the pool",
           "every morning")
_HELD_SUBJECTS = ("the pilot", "a quiet baby", "the mayor", "his uncle", "a young poet")
_HELD_OBJECTS = ("a purple umbrella", "the broken piano", "some fresh mango", "a paper moon", "the yellow bike")
_HELD_PLACES = ("beneath the bridge", "on a cool evening", "beside the museum", "during the storm")


class SpeechError(InputError):
    """Text that cannot be spoken, an unknown voice, or espeak-ng missing: the message says the fix."""


@dataclasses.dataclass(frozen=True)
class Phoneme:
    """One phoneme: `start` / `end` seconds from the audio's start, its IPA name, its viseme."""

    start: float
    end: float
    ipa: str
    viseme: str


@dataclasses.dataclass
class Speech:
    """`speak`'s result: float32 mono `audio` at `sample_rate`, the phonemes in time order, the
    words as `(start seconds, text)`, and the text and voice spoken."""

    audio: np.ndarray
    sample_rate: int
    phonemes: list[Phoneme]
    words: list[tuple[float, str]]
    text: str
    voice: str

    @property
    def seconds(self) -> float:
        """The audio's length in seconds."""
        return len(self.audio) / self.sample_rate


# ----------------------------------------------------------------------------- espeak-ng via ctypes


class _Id(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):  # espeak_EVENT (speak_lib.h)
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", _Id)]


class _Voice(ctypes.Structure):  # espeak_VOICE
    _fields_ = [("name", ctypes.c_char_p), ("languages", ctypes.c_char_p), ("identifier", ctypes.c_char_p),
                ("gender", ctypes.c_ubyte), ("age", ctypes.c_ubyte), ("variant", ctypes.c_ubyte),
                ("xx1", ctypes.c_ubyte), ("score", ctypes.c_int), ("spare", ctypes.c_void_p)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))
_SYNCHRONOUS = 2  # AUDIO_OUTPUT_SYNCHRONOUS
_PHONEME_EVENTS, _PHONEME_IPA, _DONT_EXIT = 0x0001, 0x0002, 0x8000
_EVENT_WORD, _EVENT_PHONEME = 1, 7
_RATE, _PITCH = 1, 3  # espeak_PARAMETER
_CHARS_UTF8, _POS_CHARACTER = 1, 1

_lock = threading.Lock()
_cache: dict = {}  # the voice and variant lists


def available() -> bool:
    """Whether the `speech` extra (espeakng-loader) is installed."""
    try:
        import espeakng_loader  # noqa: F401
    except ImportError:
        return False
    return True


def _loader():
    try:
        import espeakng_loader
    except ImportError:
        raise SpeechError(f"speaking text needs espeak-ng (GPL-3, an optional extra): {INSTALL}") from None
    return espeakng_loader


@contextlib.contextmanager
def _engine():
    """The library freshly loaded and initialised (with the lock held), unloaded after: espeak-ng's
    wave generator keeps state in static variables that `espeak_Terminate` does not reset, so
    without a fresh load the same text would sound slightly different after other texts. A load
    and initialisation take a few milliseconds. Yields {lib, rate, sink, data}."""
    loader = _loader()
    with _lock:
        lib = ctypes.CDLL(loader.get_library_path())
        try:
            yield _initialise(lib, loader.get_data_path())
        finally:
            lib.espeak_Terminate()
            _ctypes.dlclose(lib._handle)


def _initialise(lib, data: str) -> dict:
    """Initialises a loaded library: synchronous output with phoneme events; a callback collects
    the samples and the events into the returned dict's `sink`."""
    lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
    lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                 ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
    lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
    lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_Voice))
    rate = lib.espeak_Initialize(_SYNCHRONOUS, 0, data.encode(), _PHONEME_EVENTS | _PHONEME_IPA | _DONT_EXIT)
    if rate <= 0:
        raise SpeechError(f"espeak-ng did not start (data at {data}); reinstall it: {INSTALL}")
    sink: dict = {"samples": [], "events": []}

    def collect(wav, n, events):
        if n > 0 and wav:
            sink["samples"].append(np.ctypeslib.as_array(wav, (n,)).copy())
        i = 0
        while events[i].type != 0:  # espeakEVENT_LIST_TERMINATED
            e = events[i]
            if e.type == _EVENT_PHONEME:
                name = bytes(e.id.string).split(b"\0")[0].decode("utf-8", "ignore")
                sink["events"].append((e.type, e.audio_position / 1000.0, name))
            elif e.type == _EVENT_WORD:
                sink["events"].append((e.type, e.audio_position / 1000.0, (e.text_position, e.length)))
            i += 1
        return 0

    callback = _CALLBACK(collect)  # referenced by the returned dict while the library lives
    lib.espeak_SetSynthCallback(callback)
    return dict(lib=lib, rate=rate, sink=sink, callback=callback, data=data)


def voices() -> tuple[str, ...]:
    """espeak-ng's languages (voice file names, lower case: "en-us", "fr", "cmn", ...), sorted."""
    if "voices" not in _cache:
        with _engine() as eng:
            listed = eng["lib"].espeak_ListVoices(None)
            names, i = set(), 0
            while listed[i]:
                names.add(os.path.basename(listed[i].contents.identifier.decode()).lower())
                i += 1
        _cache["voices"] = tuple(sorted(names))
    return _cache["voices"]


def variants() -> tuple[str, ...]:
    """espeak-ng's voice variants ("m1", "f3", "klatt", "Annie", ...): `LANGUAGE+VARIANT`."""
    if "variants" not in _cache:
        _cache["variants"] = tuple(sorted(os.listdir(os.path.join(_loader().get_data_path(), "voices", "!v"))))
    return _cache["variants"]


def check_voice(voice: str) -> str:
    """`voice` if espeak-ng has it ("LANGUAGE" or "LANGUAGE+VARIANT"), else `SpeechError`
    listing valid ones."""
    name = str(voice or "").strip()
    language, _, variant = name.partition("+")
    known = voices()
    if language.lower() not in known:
        raise SpeechError(f"voice {voice!r}: espeak-ng has no language {language!r}; use one of "
                          f"{', '.join(('en-us', 'en', 'en-gb-x-rp', 'fr', 'de', 'es'))} ... "
                          f"({len(known)} in all: mi_jax.data.speech.voices()), optionally + a variant such as "
                          "'en-us+f3'")
    if variant and variant not in variants():
        raise SpeechError(f"voice {voice!r}: espeak-ng has no variant {variant!r}; use one of m1 .. m8, f1 .. f5, "
                          f"klatt, Annie, ... (mi_jax.data.speech.variants()), e.g. '{language}+f3'")
    return language.lower() + (f"+{variant}" if variant else "")


def check_text(text) -> str:
    """The text stripped, or `SpeechError` when it is empty, has no letter or digit, or is longer
    than `MAX_CHARS`."""
    if not isinstance(text, str) or not text.strip():
        raise SpeechError("say: the text is empty; type the words the avatar should say (or give an audio file)")
    text = unicodedata.normalize("NFC", text.strip())
    if not any(unicodedata.category(c)[0] in "LN" for c in text):
        raise SpeechError(f"say: {text[:40]!r} has no words to speak (no letters or digits); type words")
    if len(text) > MAX_CHARS:
        raise SpeechError(f"say: the text has {len(text)} characters, over the limit of {MAX_CHARS} (about "
                          f"{MAX_SECONDS:.0f} s of speech); shorten it, or record it and pass the audio file")
    return text


def viseme_of(ipa: str) -> str:
    """The viseme (one of `VISEMES`) of an IPA phoneme name; "" is a pause ("rest")."""
    letters = [c for c in unicodedata.normalize("NFD", ipa) if c not in _MARKS and not unicodedata.combining(c)]
    if not letters:
        return "rest"
    c = letters[0]
    if c in _CLOSED:
        return "closed"
    if c in _OPEN:
        return "open"
    if c in _WIDE:
        return "wide"
    if c in _ROUND:
        return "round"
    return "neutral"


def speak(text: str, voice: str = DEFAULT_VOICE, *, sample_rate: int = SAMPLE_RATE, rate: int | None = None,
          pitch: int | None = None, max_seconds: float = MAX_SECONDS) -> Speech:
    """Speaks `text` with espeak-ng.

    Args:
      text: the words (any language espeak-ng reads; punctuation sets the pauses).
      voice: "LANGUAGE" or "LANGUAGE+VARIANT" (default "en-us"; `voices()`, `variants()`).
      sample_rate: the returned audio's rate (default 16000, the models').
      rate: words per minute, 80 .. 450 (default None: the voice's, about 175).
      pitch: base pitch 0 .. 100 (default None: the voice's, 50).
      max_seconds: the longest speech accepted (default `MAX_SECONDS`).

    Returns:
      `Speech`: float32 mono audio peak-normalised to 0.9 (or less), the phonemes (times in
      seconds, rate-independent), the words.

    Raises:
      SpeechError: espeak-ng missing (names `pip install -e .[speech]`), empty text, text with
        nothing to speak, an unknown voice, speech longer than `max_seconds`.
    """
    text = check_text(text)
    voice = check_voice(voice)
    if rate is not None and not 80 <= rate <= 450:
        raise SpeechError(f"rate={rate}: use 80 .. 450 words per minute")
    if pitch is not None and not 0 <= pitch <= 100:
        raise SpeechError(f"pitch={pitch}: use 0 .. 100")
    data = text.encode("utf-8")
    with _engine() as eng:
        lib, sink = eng["lib"], eng["sink"]
        if lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise SpeechError(f"voice {voice!r}: espeak-ng could not load it; try 'en-us'")
        lib.espeak_SetParameter(_RATE, int(rate or 175), 0)
        lib.espeak_SetParameter(_PITCH, int(50 if pitch is None else pitch), 0)
        err = lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        samples = np.concatenate(sink["samples"]) if sink["samples"] else np.zeros(0, np.int16)
        events = list(sink["events"])
        espeak_rate = eng["rate"]
    if err != 0:
        raise SpeechError(f"say: espeak-ng failed on the text (error {err}); simplify it")
    seconds = len(samples) / espeak_rate
    phones = [(t, name) for kind, t, name in events if kind == _EVENT_PHONEME]
    if not any(viseme_of(name) != "rest" for _, name in phones) or not np.any(samples):
        raise SpeechError(f"say: {text[:40]!r} has nothing espeak-ng can speak (no phonemes); type words")
    if seconds > max_seconds:
        raise SpeechError(f"say: the text takes {seconds:.1f} s to speak, over the limit of {max_seconds:.0f} s; "
                          "shorten it, or record it and pass the audio file")
    words = []
    for kind, t, (pos, length) in ((k, t, v) for k, t, v in events if k == _EVENT_WORD):
        chars = data.decode("utf-8", "ignore")  # text_position counts characters from 1
        words.append((float(t), chars[max(pos - 1, 0) : max(pos - 1, 0) + length]))
    audio = samples.astype(np.float32) / 32768.0
    if sample_rate != espeak_rate:
        import soxr

        audio = soxr.resample(audio, espeak_rate, sample_rate).astype(np.float32)
    top = float(np.max(np.abs(audio)))
    if top > 0.9:
        audio *= 0.9 / top
    length = len(audio) / sample_rate  # after resampling: the phonemes end inside the audio
    phonemes = []
    for k, (t, name) in enumerate(phones):
        end = min(phones[k + 1][0] if k + 1 < len(phones) else length, length)
        if end > t:
            phonemes.append(Phoneme(float(t), float(end), name, viseme_of(name)))
    return Speech(audio, int(sample_rate), phonemes, words, text, voice)


def sentence(rng: np.random.Generator, split: str = "train") -> str:
    """A seeded English sentence ("The farmer buys a heavy box by the sea."); "heldout" ones use
    subjects, objects and places that "train" ones never do."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    held = split == "heldout"
    subjects, objects, places = ((_HELD_SUBJECTS, _HELD_OBJECTS, _HELD_PLACES) if held
                                 else (_SUBJECTS, _OBJECTS, _PLACES))
    pick = lambda xs: xs[int(rng.integers(len(xs)))]  # noqa: E731
    words = f"{pick(subjects)} {pick(_VERBS)} {pick(objects)}"
    if rng.uniform() < 0.6:
        words += f" {pick(places)}"
    return words[0].upper() + words[1:] + pick((".", ".", "!", "?"))


def frame_visemes(phonemes: list[Phoneme], num_frames: int, fps: float) -> np.ndarray:
    """int8 `[num_frames]`: per video frame, the index in `VISEMES` of the phoneme that overlaps the
    frame's time `[t / fps, (t + 1) / fps)` most ("rest" where none does)."""
    out = np.zeros(num_frames, np.int8)
    best = np.zeros(num_frames)
    for p in phonemes:
        first, last = int(np.floor(p.start * fps)), int(np.ceil(p.end * fps))
        for t in range(max(first, 0), min(last, num_frames)):
            overlap = min(p.end, (t + 1) / fps) - max(p.start, t / fps)
            if overlap > best[t]:
                best[t], out[t] = overlap, VISEMES.index(p.viseme)
    return out
