"""The synthetic talking-head world: determinism, shapes, audio-driven mouths (ground truth and
measured from pixels), prompt actions, two-speaker scenes, masks, splits, speed, and Clip.save
read back through video_io / audio_io. Clips are small (64x64 or 128x128, a few seconds)."""

import dataclasses
import json
import time

import numpy as np
import pytest

from mi_jax.data.audio_io import load_audio
from mi_jax.data.synthetic import (
    ACTIONS,
    HELDOUT_SEED_START,
    Identity,
    box_pixels,
    load_truth,
    measure_mouth_open,
    mouth_envelope,
    parse_actions,
    render_clip,
    split,
)
from mi_jax.data.video_io import probe, read_audio, read_video


def frame_rms(audio, samples_per_frame=640):
    """Plain per-frame RMS (25 fps at 16 kHz), computed independently of synthetic.py."""
    usable = len(audio) // samples_per_frame * samples_per_frame
    return np.sqrt(np.mean(audio[:usable].reshape(-1, samples_per_frame) ** 2, axis=1))


def corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def box_centres(boxes):
    """[T, 4] boxes -> ([T] x centres, [T] y centres)."""
    return (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2


@pytest.fixture(scope="module")
def two_speakers():
    return render_clip(11, 8.0, size=(64, 128), speakers=2)


def test_shapes_and_ranges():
    clip = render_clip(1, 2.0, fps=25, size=(64, 48))
    t, n = 50, 32000
    assert clip.frames.shape == (t, 64, 48, 3) and clip.frames.dtype == np.uint8
    assert clip.audio.shape == (n,) and clip.audio.dtype == np.float32
    assert clip.speaker_audio.shape == (1, n)
    for name in ("mouth_open", "eye_open"):
        value = getattr(clip, name)
        assert value.shape == (1, t) and value.min() >= 0 and value.max() <= 1
    assert clip.mouth_open.max() == 1.0
    assert clip.face_boxes.shape == clip.mouth_boxes.shape == (1, t, 4)
    assert clip.face_masks.shape == (1, t, 64, 48) and clip.face_masks.dtype == bool
    assert clip.prompt == "" and clip.actions == [] and clip.identities[0].style in ("cartoon", "realistic")
    assert np.abs(clip.audio).max() <= 1.0
    # 30 fps: frame count and audio length follow the fps
    other = render_clip(1, 2.0, fps=30)
    assert other.frames.shape[0] == 60 and other.audio.shape == (32000,)


def test_deterministic():
    a = render_clip(42, 3.0, prompt="nodding and smiling", speakers=2, size=(64, 128))
    b = render_clip(42, 3.0, prompt="nodding and smiling", speakers=2, size=(64, 128))
    arrays = ("frames", "audio", "speaker_audio", "mouth_open", "eye_open", "face_boxes", "mouth_boxes", "face_masks")
    for name in arrays:
        assert np.array_equal(getattr(a, name), getattr(b, name)), name  # same seed, same numpy program
    assert a.identities == b.identities
    c = render_clip(43, 3.0, prompt="nodding and smiling", speakers=2, size=(64, 128))
    assert not np.array_equal(a.frames, c.frames) and not np.array_equal(a.audio, c.audio)
    # the prompt changes only the motion: same person, same voice, same blinks
    neutral = render_clip(42, 3.0, speakers=2, size=(64, 128))
    assert neutral.identities == a.identities
    # same seed, same numpy program
    assert np.array_equal(neutral.audio, a.audio) and np.array_equal(neutral.eye_open, a.eye_open)
    # so does forcing the style: everything else about the people stays
    for style in ("cartoon", "realistic"):
        styled = render_clip(42, 1.0, style=style, speakers=2, size=(64, 128))
        for person, original in zip(styled.identities, a.identities):
            assert person.style == style and dataclasses.replace(person, style=original.style) == original


def test_identities_vary():
    people = [Identity.sample(np.random.default_rng(seed)) for seed in range(40)]
    assert {p.style for p in people} == {"cartoon", "realistic"}
    assert len({p.skin for p in people}) > 30 and len({p.background for p in people}) > 30
    assert np.std([p.face_half_width for p in people]) > 0.01 and np.std([p.eye_spacing for p in people]) > 0.02
    for p in people:
        assert np.linalg.norm(np.subtract(p.skin, p.background)) > 90  # faces stand out
    styled = render_clip(5, 0.4, style="realistic")
    assert styled.identities[0].style == "realistic"


def test_speech_audio_is_speech_like():
    clip = render_clip(3, 6.0)
    audio, voice = clip.audio, clip.identities[0].voice_hz
    rms = frame_rms(audio)
    silent = rms < 0.01 * rms.max()
    assert 0.1 < silent.mean() < 0.6  # syllables separated by pauses
    onsets = np.flatnonzero(~silent[1:] & silent[:-1])
    assert len(onsets) >= 3
    # pitch of the loudest 0.1 s: autocorrelation peak between 60 and 400 Hz, near the voice's mean
    centre = int(np.argmax(rms)) * 640 + 320
    seg = audio[centre - 800 : centre + 800] - audio[centre - 800 : centre + 800].mean()
    ac = np.correlate(seg, seg, "full")[len(seg) - 1 :]
    lag = 40 + int(np.argmax(ac[40:267]))
    assert abs(16000 / lag / voice - 1) < 0.3
    # harmonics: energy well above the fundamental (formants), little above 6 kHz
    spectrum = np.abs(np.fft.rfft(audio)) ** 2
    freqs = np.fft.rfftfreq(len(audio), 1 / 16000)
    assert spectrum[(freqs > 500) & (freqs < 3500)].sum() > 0.2 * spectrum.sum()
    assert spectrum[freqs > 6000].sum() < 0.01 * spectrum.sum()


def test_mouth_follows_the_audio_envelope():
    for seed in (0, 1):
        clip = render_clip(seed, 6.0)
        assert corr(clip.mouth_open[0], frame_rms(clip.speaker_audio[0])) > 0.9
        # the mouth is closed in the pauses and opens wide in loud syllables
        rms = frame_rms(clip.audio)
        assert clip.mouth_open[0][rms < 1e-4].max(initial=0) < 0.3
    # silence gives an exact 0
    assert np.array_equal(mouth_envelope(np.zeros(16000, np.float32), 25), np.zeros(25, np.float32))


@pytest.mark.parametrize("style", ["cartoon", "realistic"])
def test_mouth_measured_from_pixels(style):
    clip = render_clip(7, 6.0, style=style, prompt="nodding")
    measured = measure_mouth_open(clip.frames, clip.mouth_boxes[0])
    assert measured.shape == (150,) and measured.dtype == np.float32
    assert corr(measured, clip.mouth_open[0]) > 0.95
    # a frame with the mouth drawn shut measures lower than any clearly open one
    assert measured[clip.mouth_open[0] < 0.05].max() < measured[clip.mouth_open[0] > 0.5].min()


def test_nodding_is_vertical_and_shaking_is_horizontal():
    prompts = ("a person talking", "Nodding while talking", "shaking head")
    neutral, nod, shake = (render_clip(5, 4.0, prompt=p) for p in prompts)
    assert nod.actions == ["nodding"] and shake.actions == ["shaking head"] and neutral.actions == []
    variance = {}
    for name, clip in (("neutral", neutral), ("nod", nod), ("shake", shake)):
        cx, cy = box_centres(clip.face_boxes[0])
        variance[name] = (cx.var(), cy.var())
    assert variance["nod"][1] > 10 * variance["nod"][0]
    assert variance["shake"][0] > 10 * variance["shake"][1]
    assert variance["nod"][1] > 10 * max(variance["neutral"])
    assert variance["shake"][0] > 10 * max(variance["neutral"])
    # the pixels move too: the face mask's vertical centre of mass oscillates when nodding
    rows = np.arange(64)[None, :]
    mass = nod.face_masks[0].sum(axis=2)
    mask_cy = (mass * rows).sum(1) / mass.sum(1)
    assert corr(mask_cy, box_centres(nod.face_boxes[0])[1]) > 0.95


def test_looking_left_and_smiling():
    neutral = render_clip(9, 2.0, size=(128, 128))
    left = render_clip(9, 2.0, size=(128, 128), prompt="looking left")
    right = render_clip(9, 2.0, size=(128, 128), prompt="Looks to the right")
    assert left.actions == ["looking left"] and right.actions == ["looking right"]
    cx = lambda clip: box_centres(clip.face_boxes[0])[0][20:].mean()  # noqa: E731  (after the ease-in)
    assert cx(left) < cx(neutral) - 3 and cx(right) > cx(neutral) + 3

    smile = render_clip(9, 2.0, size=(128, 128), prompt="smiling")
    assert smile.actions == ["smiling"]

    def dark_columns(clip):
        """Mouth-interior width (columns with dark pixels) and corner-vs-middle height, widest frame."""
        t = int(np.argmax(clip.mouth_open[0][15:])) + 15
        x0, y0, x1, y1 = np.round(clip.mouth_boxes[0, t]).astype(int)
        dark = clip.frames[t, y0:y1, x0:x1].astype(float).mean(-1) < 60
        cols = np.flatnonzero(dark.any(0))
        rows = np.arange(dark.shape[0])[:, None]
        centre_row = lambda c: (dark[:, c] * rows[:, 0]).sum() / dark[:, c].sum()  # noqa: E731
        return len(cols), centre_row(cols[len(cols) // 2]) - (centre_row(cols[1]) + centre_row(cols[-2])) / 2

    (width_neutral, lift_neutral), (width_smile, lift_smile) = dark_columns(neutral), dark_columns(smile)
    assert width_smile > 1.15 * width_neutral  # wider
    assert lift_smile > lift_neutral + 0.5  # corners higher (smaller row) than the middle


def test_parse_actions():
    assert parse_actions("") == [] and parse_actions("a calm portrait, talking") == []
    assert parse_actions("She nods, smiles and looks left") == ["nodding", "smiling", "looking left"]
    assert parse_actions("head shaking; looking to the right") == ["shaking head", "looking right"]
    assert parse_actions("Shakes his head") == ["shaking head"]
    assert set(ACTIONS) == set(parse_actions("nodding, shaking head, smiling, looking left, looking right"))


def test_two_speakers_each_mouth_follows_its_own_voice(two_speakers):
    clip = two_speakers
    assert clip.speaker_audio.shape[0] == 2 and clip.mouth_open.shape == (2, 200)
    np.testing.assert_allclose(clip.audio, clip.speaker_audio.sum(0), atol=1e-7)
    envelopes = [frame_rms(a) for a in clip.speaker_audio]
    for s in range(2):
        own, other = corr(clip.mouth_open[s], envelopes[s]), corr(clip.mouth_open[s], envelopes[1 - s])
        assert own > 0.9 and own > other + 0.5
        measured = measure_mouth_open(clip.frames, clip.mouth_boxes[s])
        assert corr(measured, clip.mouth_open[s]) > 0.95
        assert corr(measured, clip.mouth_open[s]) > corr(measured, clip.mouth_open[1 - s]) + 0.5
    # side by side: speaker 0 in the left half, speaker 1 in the right half, sharing one style
    assert clip.face_boxes[0, :, 2].max() <= 64 <= clip.face_boxes[1, :, 0].min()
    assert clip.identities[0].style == clip.identities[1].style
    assert clip.identities[0].background == clip.identities[1].background


def test_masks_cover_the_faces(two_speakers):
    for clip in (render_clip(2, 1.0, style="cartoon"), two_speakers):
        masks, boxes = clip.face_masks, clip.face_boxes
        for s in range(masks.shape[0]):
            skin = np.array(clip.identities[s].skin)
            for t in range(0, masks.shape[1], 7):
                mask, (x0, y0, x1, y1) = masks[s, t], boxes[s, t]
                ys, xs = np.nonzero(mask)
                assert xs.min() >= np.floor(x0) and xs.max() < np.ceil(x1)
                assert ys.min() >= np.floor(y0) and ys.max() < np.ceil(y1)
                ellipse_area = np.pi * (x1 - x0) * (y1 - y0) / 4
                assert abs(mask.sum() / ellipse_area - 1) < 0.08
                # mostly skin (the rest is eyes and mouth); the shaded style darkens up to 25 %
                colour_error = np.abs(clip.frames[t][mask].astype(float) - skin).max(-1)
                assert np.median(colour_error) < (4 if clip.identities[s].style == "cartoon" else 70)
        if masks.shape[0] == 2:
            assert not np.any(masks[0] & masks[1])


def test_blinks():
    clip = render_clip(4, 10.0)
    eye = clip.eye_open[0]
    closed = eye < 0.2
    assert 1 <= np.sum(closed[1:] & ~closed[:-1]) <= 6 and closed.mean() < 0.1


def test_split():
    assert split(0) == split(HELDOUT_SEED_START - 1) == "train"
    assert split(HELDOUT_SEED_START) == split(2_000_000) == "heldout"
    assert render_clip(HELDOUT_SEED_START + 3, 0.2).split == "heldout"
    assert render_clip(3, 0.2).split == "train"
    with pytest.raises(ValueError, match="non-negative"):
        split(-1)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="speakers"):
        render_clip(0, 1.0, speakers=3)
    with pytest.raises(ValueError, match="style"):
        render_clip(0, 1.0, style="anime")
    with pytest.raises(ValueError, match="too small"):
        render_clip(0, 1.0, size=(64, 24), speakers=2)
    with pytest.raises(ValueError, match="seed"):
        render_clip(-5, 1.0)
    with pytest.raises(ValueError, match="seconds"):
        render_clip(0, 0.0)
    with pytest.raises(ValueError, match="boxes"):
        measure_mouth_open(np.zeros((3, 8, 8, 3), np.uint8), np.zeros((2, 4)))


def test_render_speed():
    render_clip(0, 0.5)  # warm-up
    start = time.perf_counter()
    clip = render_clip(1, 10.0, fps=25, size=(64, 64))
    elapsed = time.perf_counter() - start
    assert clip.frames.shape == (250, 64, 64, 3)
    assert elapsed < 2.0, f"64x64, 10 s at 25 fps took {elapsed:.2f} s"


def test_save_writes_readable_files(tmp_path):
    clip = render_clip(1_000_001, 3.0, prompt="smiling")
    paths = clip.save(tmp_path / "clip_0")
    assert sorted(p.rsplit("/", 1)[1] for p in paths.values()) == ["audio.wav", "clip.mp4", "meta.json", "truth.npz"]

    video = read_video(paths["clip.mp4"])
    assert video.frames.shape == clip.frames.shape and video.fps == 25.0
    assert probe(paths["clip.mp4"]).audio_codec == "aac"
    decoded = read_audio(paths["clip.mp4"])
    assert abs(len(decoded) - len(clip.audio)) <= 160 and corr(decoded[:48000], clip.audio[:48000]) > 0.99
    # eval measures mouths on decoded videos: H.264 keeps the measurement faithful
    assert corr(measure_mouth_open(video.frames, clip.mouth_boxes[0]), clip.mouth_open[0]) > 0.95

    wav = load_audio(paths["audio.wav"], normalize=None)
    np.testing.assert_allclose(wav, clip.audio, atol=1e-4)  # 16-bit PCM

    meta, truth = load_truth(tmp_path / "clip_0")
    assert meta == json.loads(json.dumps(clip.metadata()))
    assert meta["split"] == "heldout" and meta["actions"] == ["smiling"] and meta["num_frames"] == 75
    assert meta["identities"][0]["skin"] == list(clip.identities[0].skin)
    for name in ("mouth_open", "eye_open", "face_boxes", "mouth_boxes", "face_masks", "speaker_audio", "audio"):
        assert np.array_equal(truth[name], getattr(clip, name)), name  # the stored truth is the rendered arrays


def test_box_pixels_clip_to_the_frame_and_never_wrap():
    """The mouth and eye measurements read a box's pixels through box_pixels: a box
    partly outside the frame is clipped, one wholly outside (even at negative coordinates,
    which a plain slice would count from the end) is empty."""
    frame = np.arange(8 * 10).reshape(8, 10)
    assert box_pixels(frame, (2.5, 1.2, 4.1, 3.0)).tolist() == frame[1:3, 2:5].tolist()
    assert box_pixels(frame, (-3.0, -2.0, 2.0, 1.5)).tolist() == frame[0:2, 0:2].tolist()
    assert box_pixels(frame, (8.0, 6.0, 30.0, 20.0)).shape == (2, 2)
    for outside in [(1.0, 1.0, 4.0, -2.5), (-5.0, 1.0, -1.5, 4.0), (11.0, 1.0, 14.0, 4.0)]:
        assert box_pixels(frame, outside).size == 0
