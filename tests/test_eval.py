"""Evaluation metrics and report (mi_jax.eval): near-perfect scores on the ground-truth renderer,
low scores on unrelated or shuffled audio, a lagging mouth, hard cuts, colour drift, a tinted
ending and a blurred face; the report's files. Held-out synthetic clips, 64x64 (128 wide for two
speakers), 6-12 s."""

import dataclasses
import json
import os

import cv2
import numpy as np
import pytest
from PIL import Image

from mi_jax.data.synthetic import render_clip
from mi_jax.eval.metrics import (
    Truth,
    best_offset_correlation,
    colour_shift,
    evaluate,
    eye_detail,
    head_centres,
    head_motion,
    identity_drift,
    measure,
    seam_score,
    srgb_to_lab,
)
from mi_jax.eval.report import check, plot_lip_sync, write_report

SEED = 1_000_001  # held-out split


@pytest.fixture(scope="module")
def clip():
    return render_clip(SEED, 12.0)


@pytest.fixture(scope="module")
def truth(clip):
    return Truth.from_clip(clip)


@pytest.fixture(scope="module")
def actions():
    """The same identity neutral, nodding and shaking its head."""
    return {p: render_clip(SEED + 1, 6.0, prompt=p, style="realistic") for p in ("", "nodding", "shaking head")}


@pytest.fixture(scope="module")
def duo():
    return render_clip(SEED + 10, 8.0, size=(64, 128), speakers=2)


def block_shuffled(audio, block, rng):
    """audio with its blocks of `block` samples in random order (the tail kept in place)."""
    n = len(audio) // block * block
    blocks = audio[:n].reshape(-1, block)
    return np.concatenate([blocks[rng.permutation(len(blocks))].reshape(-1), audio[n:]])


def windows_from(frames, boundaries, jump):
    """frames re-cut so every other window starts `jump` frames later: a hard cut at each boundary."""
    starts, ends = [0, *boundaries], [*boundaries, len(frames)]
    idx = [np.clip(np.arange(s, e) + (k % 2) * jump, 0, len(frames) - 1) for k, (s, e) in enumerate(zip(starts, ends))]
    return frames[np.concatenate(idx)]


# ----------------------------------------------------------------------------- lip sync


@pytest.mark.parametrize("style", ["cartoon", "realistic"])
@pytest.mark.parametrize("box_mode", ["track", "truth"])
def test_lip_sync_on_ground_truth_is_near_perfect(style, box_mode):
    c = render_clip(SEED + 2, 8.0, style=style)
    (lip,) = measure(c.frames, Truth.from_clip(c), box_mode=box_mode)["lip_sync"]
    assert lip["correlation"] >= 0.95 and lip["offset"] == 0, lip


def test_lip_sync_with_unrelated_or_shuffled_audio_is_low(clip, truth):
    other = render_clip(SEED + 100, 12.0).audio
    shuffled = block_shuffled(clip.audio, 16000, np.random.default_rng(0))  # 1 s blocks
    good = measure(clip.frames, truth)["lip_sync"][0]["correlation"]
    for audio in (other, shuffled):
        bad = measure(clip.frames, truth, audio)["lip_sync"][0]["correlation"]
        assert abs(bad) < 0.3 and bad < 0.3 * good, (good, bad)


def test_best_offset_finds_a_delayed_mouth(clip, truth):
    """A video 3 frames late (the mouth lags the audio) is found at offset +3, still well correlated."""
    late = np.concatenate([np.repeat(clip.frames[:1], 3, axis=0), clip.frames[:-3]])
    (lip,) = measure(late, truth, box_mode="truth")["lip_sync"]
    assert lip["offset"] == 3 and lip["correlation"] > 0.95
    envelope = np.sin(np.arange(100) / 3.0)
    assert best_offset_correlation(envelope, np.roll(envelope, -2), 5)[1] == -2


def test_lip_sync_check_fails_when_the_mouth_lags_4_frames(clip):
    """Searched over +-5 frames, a mouth 4 frames late still correlates ~1 with the audio, but the
    check wants every best offset within +-2 frames; the summary shows the lag."""
    def lip_row(frames):
        results = evaluate([frames], [clip])
        return results["summary"]["lip_sync"], next(r for r in check(results) if r["metric"] == "lip-sync correlation")

    late = np.concatenate([np.repeat(clip.frames[:1], 4, axis=0), clip.frames[:-4]])
    summary, row = lip_row(late)
    assert summary["offsets"] == [4] and summary["value"] > 0.95 and summary["ratio"] > 0.6
    assert row["passed"] is False and row["detail"] == "offsets +4 frames"
    summary, row = lip_row(clip.frames)
    assert summary["offsets"] == [0] and row["passed"] is True


def test_syncnet_hook_is_called_and_reported(clip, truth):
    calls = []

    def scorer(frames, audio, fps, sample_rate, face_boxes):  # a test double, not a SyncNet
        calls.append((frames.shape, audio.shape, fps, sample_rate, face_boxes.shape))
        return 7.5

    results = evaluate([clip.frames[:100]], [truth], syncnet=scorer)
    t = 100
    assert calls[0] == ((t, 64, 64, 3), clip.speaker_audio[0].shape, 25.0, 16000, (t, 4))
    assert results["videos"][0]["video"]["lip_sync"][0]["syncnet_confidence"] == 7.5
    assert results["summary"]["syncnet"]["value"] == 7.5
    with pytest.raises(ValueError, match="finite"):
        evaluate([clip.frames[:100]], [truth], syncnet=lambda **_: float("nan"))


# ----------------------------------------------------------------------------- identity, seams


def test_identity_drift_is_zero_on_ground_truth_and_large_when_colours_drift(clip, truth):
    assert abs(measure(clip.frames, truth)["identity"]["drift"]) < 0.02
    # the face's colours slide towards blue over the clip
    ramp = np.linspace(0, 1, len(clip.frames))[:, None, None, None] * clip.face_masks[0][..., None]
    drifting = np.clip(clip.frames + ramp * np.array([-90.0, 0.0, 90.0]), 0, 255).astype(np.uint8)
    identity = measure(drifting, truth)["identity"]
    assert identity["drift"] > 0.1 and identity["window_frames"] == round(0.2 * len(clip.frames))


def test_identity_drift_uses_the_first_and_last_minute_of_long_videos():
    similarity = np.concatenate([np.ones(1500), np.linspace(1, 0.5, 1500), np.full(1500, 0.5)])  # 3 min at 25 fps
    drift = identity_drift(similarity, fps=25.0)
    assert drift["window_frames"] == 1500 and drift["first"] == 1 and drift["last"] == 0.5 and drift["drift"] == 0.5


def test_face_detail_fails_on_a_blurred_face_and_passes_on_the_renderer(clip, truth):
    """A 1.5 px Gaussian blur keeps identity similarity ~0.96 but loses most of the eye band's
    edges; the renderer's own frames score exactly its own detail (ratio 1)."""
    blurred = np.stack([cv2.GaussianBlur(f, (0, 0), 1.5) for f in clip.frames])
    sharp, soft = evaluate([clip.frames], [truth]), evaluate([blurred], [truth])
    detail = sharp["videos"][0]["truth"]["face_detail"]
    assert detail > 10 and sharp["videos"][0]["video"]["face_detail"] == pytest.approx(detail)
    assert soft["videos"][0]["video"]["face_detail"] / detail < 0.3
    assert soft["videos"][0]["video"]["identity"]["first"] > 0.9  # what identity similarity alone would accept
    sharp_row, soft_row = (next(r for r in check(res) if r["metric"] == "face detail (eye band edge energy)")
                           for res in (sharp, soft))
    assert sharp_row["passed"] is True and sharp_row["ratio"] == pytest.approx(1.0)
    assert soft_row["passed"] is False and soft_row["ratio"] < 0.7
    # the eye box follows the head: on the renderer, tracked and per-frame boxes agree
    assert measure(clip.frames, truth, box_mode="truth")["face_detail"] == pytest.approx(detail, rel=0.02)
    # per frame: a flat image has no edges at all
    assert not eye_detail(np.full_like(clip.frames[:3], 128), clip.eye_boxes[0, :3]).any()
    # a truth saved without eye boxes: no face-detail row, nothing else changes
    no_eyes = evaluate([clip.frames], [dataclasses.replace(truth, eye_boxes=None)])
    assert no_eyes["summary"]["face_detail"] is None
    assert not [r for r in check(no_eyes) if r["metric"].startswith("face detail")]


def test_colour_shift_is_zero_on_the_renderer_and_large_on_a_tinted_ending(clip, truth):
    assert measure(clip.frames, truth)["colour_shift"]["delta_e"] < 0.5
    tinted = clip.frames.copy()
    tail = slice(2 * len(tinted) // 3, None)  # the last third: the window a 12 s video is measured on
    tinted[tail] = np.clip(tinted[tail] + np.array([10, 0, -10]), 0, 255).astype(np.uint8)
    shift = measure(tinted, truth)["colour_shift"]
    assert shift["delta_e"] > 2 and shift["region"] == "face" and shift["window_frames"] == len(clip.frames) // 3
    rows = {r["metric"]: r for r in check(evaluate([tinted, clip.frames], [truth, truth]))}
    assert rows["colour shift, first to last window (dE76, worst video)"]["passed"] is False
    rows = {r["metric"]: r for r in check(evaluate([clip.frames], [truth]))}
    assert rows["colour shift, first to last window (dE76, worst video)"]["passed"] is True


def test_colour_against_the_portrait_catches_a_video_recoloured_from_its_first_frame(clip, truth):
    """A video whose every frame has another background than the portrait keeps its colour from
    first to last (colour shift passes) but fails the portrait check; the renderer passes both."""
    from mi_jax.eval.metrics import portrait_colour

    assert measure(clip.frames, truth)["portrait_colour"]["delta_e"] < 0.5
    recoloured = clip.frames.copy()
    background = np.all(recoloured == recoloured[:, :1, :1], axis=-1)  # the corner's colour, frame by frame
    recoloured[..., 1][background] = recoloured[..., 1][background] // 2  # the green halved, as the demo VAE did
    rows = {r["metric"]: r for r in check(evaluate([recoloured], [truth]))}
    assert rows["colour shift, first to last window (dE76, worst video)"]["passed"] is True
    entry = rows["colour against the portrait, first second (dE76, worst video)"]
    assert entry["passed"] is False and entry["value"] > 5 and entry["truth"] < 0.5
    with pytest.raises(ValueError, match="resize the portrait"):
        portrait_colour(clip.frames, clip.frames[0, :10], 25.0)


def test_colour_shift_uses_the_first_and_last_minute_and_standard_lab():
    lab = srgb_to_lab(np.array([[255, 255, 255], [255, 0, 0], [0, 0, 0]], np.uint8))
    np.testing.assert_allclose(lab, [[100, 0, 0], [53.24, 80.09, 67.20], [0, 0, 0]], atol=0.01)
    # 150 frames at 1 fps: the first 60 grey, then white; the last minute is all white
    frames = np.full((150, 4, 4, 3), 255, np.uint8)
    frames[:60] = 119  # L* = 50.0
    shift = colour_shift(frames, fps=1.0)
    assert shift["window_frames"] == 60 and shift["region"] == "frame"
    assert shift["delta_e"] == pytest.approx(100 - srgb_to_lab(np.array([119, 119, 119], np.uint8))[0])
    assert abs(shift["first"][0] - 50) < 0.3 and colour_shift(frames, fps=1.0, window_s=90)["window_frames"] == 50


def test_seam_score_is_one_on_a_continuous_rendering_and_high_on_hard_cuts(clip):
    boundaries = list(range(7, len(clip.frames), 7))  # arbitrary frames, 42 "windows"
    assert 0.75 < seam_score(clip.frames, boundaries) < 1.25
    assert seam_score(windows_from(clip.frames, boundaries, jump=12), boundaries) > 3.0


def test_seam_over_latents_tells_a_sampler_seam_from_a_decoder_that_holds_each_latent(clip):
    """A video held still over each 4-frame latent (a decoder that jumps from latent to latent) scores
    high on the seam score at window starts that are latent boundaries, but about 1 against the
    other latent boundaries; windows that add a jump of their own score high on both."""
    from mi_jax.eval.metrics import seam_over_latents

    frames = clip.frames[: 1 + 4 * 40]
    held = frames.copy()
    for k in range(40):  # every latent's 4 frames show its last one
        held[1 + 4 * k : 5 + 4 * k] = frames[4 + 4 * k]
    windows = list(range(1 + 4 * 4, len(frames), 4 * 3))  # windows of 5 latents, 2 carried
    assert seam_score(held, windows) > 2.5
    assert 0.75 < seam_over_latents(held, windows, 4) < 1.25
    assert 0.75 < seam_over_latents(frames, windows, 4) < 1.25  # the renderer
    jumpy = windows_from(held, windows, jump=12)
    assert seam_over_latents(jumpy, windows, 4) > 2.0
    assert seam_over_latents(frames, list(range(1, len(frames), 4)), 4) is None  # every latent is a seam


# ----------------------------------------------------------------------------- text control, routing


def test_nodding_moves_vertically_and_shaking_horizontally(actions):
    ratio = {p: head_motion(head_centres(c.frames))["ratio"] for p, c in actions.items()}
    assert ratio["nodding"] > 10 and ratio["shaking head"] < 0.1
    assert ratio["shaking head"] < ratio[""] < ratio["nodding"]


def test_two_speakers_are_routed_to_their_own_streams(duo):
    truth = Truth.from_clip(duo)
    margins = measure(duo.frames, truth)["routing"]["margins"]
    assert min(margins) > 0.5, margins
    swapped = measure(duo.frames, truth, duo.speaker_audio[::-1])["routing"]["margins"]
    assert max(swapped) < -0.5, swapped


# ----------------------------------------------------------------------------- evaluate and report


def test_evaluate_and_report(tmp_path, clip, actions, duo):
    rng = np.random.default_rng(1)
    clips = [clip, *actions.values(), duo]
    boundaries = [list(range(24, len(c.frames), 24)) for c in clips]
    results = evaluate([c.frames for c in clips], clips, boundaries=boundaries, frames_per_latent=4)
    summary = results["summary"]
    assert 0.75 < summary["seam_over_latents"]["value"] < 1.25
    assert summary["lip_sync"]["value"] > 0.95 and summary["lip_sync"]["ratio"] == pytest.approx(1.0)
    assert summary["identity_drift"]["worst"] < 0.02 and 0.8 < summary["seam"]["value"] < 1.2
    assert summary["routing"]["value"] > 0.5
    assert summary["face_detail"]["ratio"] == pytest.approx(1.0) and summary["colour_shift"]["worst"] < 1.0
    assert all(row["passed"] in (True, None) for row in check(results)), check(results)

    # the same videos with block-shuffled audio: lip sync falls far below 0.6 of the renderer's
    shuffled = [np.stack([block_shuffled(s, 16000, rng) for s in c.speaker_audio]) for c in clips]
    bad = evaluate([c.frames for c in clips], clips, audios=shuffled)
    assert bad["summary"]["lip_sync"]["ratio"] < 0.3
    assert next(r for r in check(bad) if r["metric"] == "lip-sync correlation")["passed"] is False

    path = write_report(results, tmp_path / "report")
    text = open(path).read()
    assert path == str(tmp_path / "report" / "report.md")
    assert f"{summary['lip_sync']['value']:.3f}" in text and f"{summary['seam']['value']:.3f}" in text
    assert "| lip-sync correlation |" in text and "**FAIL**" not in text and "Two-speaker routing" in text
    assert "offsets +0, +0, +0, +0, +0, +0 frames" in text and "every \\|offset\\| <= 2 frames" in text
    assert "| face detail (eye band edge energy) |" in text and "## Face detail" in text
    assert "| window seams / other latent boundaries |" in text and "vs latents" in text
    assert "| colour shift, first to last window (dE76, worst video) |" in text and "## Colour shift" in text
    assert json.load(open(tmp_path / "report" / "results.json"))["summary"]["lip_sync"] == summary["lip_sync"]
    pngs = sorted(p for p in os.listdir(tmp_path / "report") if p.endswith(".png"))
    assert len(pngs) == len(clips) + 1 and "identity.png" in pngs
    for name in pngs:
        assert f"({name})" in text
        with Image.open(tmp_path / "report" / name) as image:
            image.verify()
            assert image.format == "PNG"
    assert not [p for p in os.listdir(tmp_path / "report") if p.endswith(".tmp")]
    assert "**FAIL**" in open(write_report(bad, tmp_path / "bad")).read()


def test_evaluate_reads_saved_clips(tmp_path):
    """The CLI's route: truth folders from Clip.save and generated mp4 files (H.264-compressed)."""
    c = render_clip(SEED + 3, 4.0)
    c.save(tmp_path / "truth")
    results = evaluate([str(tmp_path / "truth" / "clip.mp4")], [str(tmp_path / "truth")])
    (record,) = results["videos"]
    assert record["name"] == "truth" and record["video"]["num_frames"] == 100
    assert record["video"]["lip_sync"][0]["correlation"] > 0.9


def test_plot_lip_sync_writes_a_png(tmp_path, clip, truth):
    m = measure(clip.frames, truth)
    path = plot_lip_sync(m["envelope_series"][0], m["mouth_series"][0], clip.fps, tmp_path / "sub" / "sync.png")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 100
        image.verify()


def test_clear_errors(clip, truth):
    with pytest.raises(ValueError, match="uint8"):
        measure(clip.frames / 255.0, truth)
    with pytest.raises(ValueError, match="boundaries"):
        seam_score(clip.frames, [0, 5])
    with pytest.raises(ValueError, match="streams"):
        measure(clip.frames, truth, np.zeros((2, 1000), np.float32))
    with pytest.raises(ValueError, match="box_mode"):
        measure(clip.frames, truth, box_mode="guess")
    with pytest.raises(ValueError, match="one per video"):
        evaluate([clip.frames], [truth, truth])
    with pytest.raises(ValueError, match="too short"):
        measure(clip.frames[:5], truth)
    with pytest.raises(ValueError, match="evaluate"):
        write_report({}, "unused")
    with pytest.raises(ValueError, match="eye_boxes"):
        eye_detail(clip.frames, clip.eye_boxes[0, :5])
    with pytest.raises(ValueError, match="face_boxes"):
        colour_shift(clip.frames, clip.fps, face_boxes=clip.face_boxes[0, :5])
    with pytest.raises(ValueError, match="fps"):
        colour_shift(clip.frames, 0.0)
    with pytest.raises(ValueError, match="uint8"):
        srgb_to_lab(np.ones((2, 3)))
