"""Face masks: Haar detection on drawn faces (the cascade really fires on them), tracking, gap
filling, smoothing, mask geometry, latent downsampling, several speakers, mask images, errors."""

import cv2
import numpy as np
import pytest
from PIL import Image

from mi_jax.data.faces import (
    as_box_track,
    box_coverage,
    detect_faces,
    dilate_boxes,
    fill_gaps,
    latent_frame_groups,
    latent_num_frames,
    masks_from_boxes,
    masks_from_images,
    masks_from_video,
    mouth_boxes,
    pixel_masks,
    smooth_boxes,
    temporal_pool,
)

BG = 90


def draw_face(img, cx, cy, size):
    """A cartoon face (oval, eyes, brows, nose, mouth) that OpenCV's frontal-face cascade detects."""
    skin, dark = (180,) * 3, 40
    cv2.ellipse(img, (cx, cy), (int(size * 0.3), int(size * 0.4)), 0, 0, 360, skin, -1)
    def blob(x, y, rx, ry, grey):  # offsets and radii as fractions of the face size
        centre, axes = (int(cx + x * size), int(cy + y * size)), (int(rx * size), int(ry * size))
        cv2.ellipse(img, centre, axes, 0, 0, 360, (grey,) * 3, -1)

    for side in (-1, 1):
        blob(side * 0.12, -0.06, 0.06, 0.03, dark)  # eye
        blob(side * 0.12, -0.13, 0.07, 0.015, dark + 20)  # brow
    blob(0, 0.06, 0.03, 0.02, 130)  # nose
    blob(0, 0.18, 0.09, 0.025, dark + 30)  # mouth


def two_speaker_video(T=9, hide=()):
    """[T, 192, 320, 3]: a face drifting right at x = 90 + 2t, another drifting up at y = 100 - t.
    Frames in `hide` show only the second face."""
    frames = np.full((T, 192, 320, 3), BG, np.uint8)
    for t in range(T):
        if t not in hide:
            draw_face(frames[t], 90 + 2 * t, 96, 150)
        draw_face(frames[t], 235, 100 - t, 130)
    return frames


def centres(boxes):
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def test_haar_detects_and_tracks_drawn_faces():
    boxes = detect_faces(two_speaker_video())
    assert boxes.shape == (9, 1, 4) and not np.isnan(boxes).any()
    # one speaker: the larger face, which is the left one
    np.testing.assert_allclose(centres(boxes)[:, 0, 0], 90 + 2 * np.arange(9), atol=6)
    boxes = detect_faces(two_speaker_video(), num_speakers=2)
    assert boxes.shape == (9, 2, 4) and not np.isnan(boxes).any()
    c = centres(boxes)
    np.testing.assert_allclose(c[:, 0, 0], 90 + 2 * np.arange(9), atol=6)  # left to right
    np.testing.assert_allclose(c[:, 1, 1], 100 - np.arange(9), atol=6)
    np.testing.assert_allclose(c[:, 1, 0], 235, atol=6)
    sides = boxes[..., 2] - boxes[..., 0]
    assert (sides[:, 0] > 90).all() and (sides[:, 0] < 170).all()


def test_detection_gap_is_filled():
    frames = two_speaker_video(hide=(4, 5))
    boxes = detect_faces(frames, num_speakers=2)
    assert np.isnan(boxes[4:6, 0]).all() and not np.isnan(boxes[:4, 0]).any() and not np.isnan(boxes[:, 1]).any()
    masks = masks_from_video(frames, num_speakers=2)
    assert not np.isnan(masks.boxes).any()
    # interpolated across the gap: the face keeps drifting right
    np.testing.assert_allclose(centres(masks.boxes)[3:7, 0, 0], 90 + 2 * np.arange(3, 7), atol=6)
    assert masks.face.shape == (2, 3, 24, 40) and masks.face[0].any(axis=(1, 2)).all()
    assert not (masks.face[0] & masks.face[1]).any()
    gappy = masks_from_video(frames, num_speakers=2, max_gap=1)
    assert np.isnan(gappy.boxes[4:6, 0]).all()


def test_detection_errors():
    blank = np.full((3, 192, 320, 3), BG, np.uint8)
    with pytest.raises(ValueError, match="no face detected in any of the 3 frames; pass boxes"):
        detect_faces(blank)
    noise = np.random.default_rng(0).integers(0, 256, (3, 192, 320, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="no face detected"):
        masks_from_video(noise)
    one = np.full((2, 192, 320, 3), BG, np.uint8)
    draw_face(one[0], 160, 96, 150)
    with pytest.raises(ValueError, match="expected 3 faces but no frame shows more than 1"):
        detect_faces(one, num_speakers=3)
    with pytest.raises(ValueError, match="uint8"):
        detect_faces(one.astype(np.float32))
    with pytest.raises(ValueError, match="multiple of 8"):
        masks_from_video(one[:, :190])


def test_latent_frame_groups():
    assert [latent_num_frames(t) for t in (1, 4, 5, 9, 12, 13, 129)] == [1, 1, 2, 3, 3, 4, 33]
    groups = latent_frame_groups(13)
    assert [list(range(13))[g] for g in groups] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    cov = np.arange(13, dtype=np.float32)[None, :, None, None] * np.ones((2, 13, 3, 5), np.float32)
    # means of small integers: exact in binary
    np.testing.assert_array_equal(temporal_pool(cov)[0, :, 0, 0], [0, 2.5, 6.5, 10.5])
    assert temporal_pool(cov[:, :11]).shape == (2, 3, 3, 5)  # frames 9, 10 fall outside


def test_coverage_is_block_mean_of_pixel_masks():
    rng = np.random.default_rng(0)
    H, W = 48, 64
    xy0 = rng.uniform(-4, 40, (6, 3, 2))
    boxes = np.concatenate([xy0, xy0 + rng.uniform(0.3, 30, (6, 3, 2))], axis=-1).astype(np.float32)
    boxes[2, 1] = np.nan
    px = pixel_masks(boxes, H, W)
    assert px.shape == (3, 6, H, W) and not px[1, 2].any()
    block = px.reshape(3, 6, H // 8, 8, W // 8, 8).mean((3, 5))
    # integer box edges: exact fractions
    np.testing.assert_array_equal(box_coverage(boxes, H, W), block.astype(np.float32))
    # pixel-centre rule: [10, 20) x [4.6, 8.4) covers columns 10..19 and rows 5..7
    one = pixel_masks(np.array([[[10, 4.6, 20, 8.4]]], np.float32), H, W)[0, 0]
    assert np.argwhere(one.any(0)).ravel().tolist() == list(range(10, 20))
    assert np.argwhere(one.any(1)).ravel().tolist() == [5, 6, 7]


def test_mask_geometry_dilation_and_mouth():
    H, W, T = 128, 160, 5
    box = [40, 32, 120, 112]  # 80 x 80
    m = masks_from_boxes(box, T, H, W, margin=0.1)
    assert m.face.shape == m.mouth.shape == m.face_coverage.shape == (1, 2, 16, 20)
    np.testing.assert_allclose(m.boxes[0, 0], [32, 24, 128, 120])
    np.testing.assert_allclose(m.mouth_boxes[0, 0], [56, 80, 104, 112])  # lower 40%, middle 60%
    face = np.zeros((16, 20), bool)
    face[3:15, 4:16] = True  # [32, 128) x [24, 120) in 8-px cells, any-pixel rule
    np.testing.assert_array_equal(m.face[0, 0], face)  # boolean masks
    np.testing.assert_array_equal(m.face[0, 1], face)  # a fixed box is fixed over time
    mouth = np.zeros((16, 20), bool)
    mouth[10:14, 7:13] = True
    np.testing.assert_array_equal(m.mouth[0, 0], mouth)  # boolean masks
    assert not (m.mouth & ~m.face).any()
    # a stricter coverage threshold keeps only the cells the box fills
    strict = masks_from_boxes(box, T, H, W, margin=0.1, min_coverage=1.0)
    assert strict.face[0, 0, 3:15, 4:16].all() and strict.face.sum() == m.face.sum()
    partial = masks_from_boxes([36, 28, 124, 116], T, H, W, margin=0, min_coverage=1.0)
    assert partial.face[0, 0].sum() == 10 * 10
    # dilation is clipped to the image
    np.testing.assert_allclose(dilate_boxes(np.array([[2, 2, 42, 22]], np.float32), 0.25, 24, 40), [[0, 0, 40, 24]])
    np.testing.assert_allclose(mouth_boxes(np.array([0, 0, 10, 20.0]), 0.5, 0.4), [3, 10, 7, 20])


def test_mouth_inside_face_for_random_boxes():
    rng = np.random.default_rng(1)
    T, H, W = 17, 64, 96
    xy0 = rng.uniform(0, 30, (T, 2, 2))
    boxes = np.concatenate([xy0, xy0 + rng.uniform(8, 30, (T, 2, 2))], axis=-1)
    for exclusive in (True, False):
        m = masks_from_boxes(boxes, T, H, W, margin=0.0, smooth_window=3, exclusive=exclusive, min_coverage=0.3)
        assert m.face.shape == (2, 5, 8, 12)
        assert not (m.mouth & ~m.face).any()
        assert m.mouth.any()


def test_temporal_smoothing_and_gap_filling():
    T = 21
    t = np.arange(T, dtype=np.float32)
    jitter = np.where(t % 2 == 0, 4.0, -4.0)
    x0 = 20 + t + jitter
    boxes = np.stack([x0, np.full(T, 10), x0 + 40, np.full(T, 50)], -1)[:, None].astype(np.float32)
    smooth = smooth_boxes(boxes, 5)
    # the moving average keeps the linear drift and damps the +-4 px jitter
    np.testing.assert_allclose(smooth[2:-2, 0, 0], 20 + t[2:-2] + jitter[2:-2] / 5, atol=1e-4)
    np.testing.assert_array_equal(smooth_boxes(boxes, 1), boxes)  # a window of 1 copies
    np.testing.assert_allclose(smooth[:, 0, 1], 10)
    with pytest.raises(ValueError, match="odd"):
        smooth_boxes(boxes, 4)

    gappy = boxes.copy()
    gappy[[0, 1, 5, 6, 7, 12, 13, 14, 15, 16, 20]] = np.nan
    filled = fill_gaps(gappy)
    np.testing.assert_allclose(filled[0:2], boxes[[2, 2]])  # leading gap: nearest box
    np.testing.assert_allclose(filled[20], boxes[19])
    np.testing.assert_allclose(filled[6, 0, 0], (x0[4] + x0[8]) / 2)  # linear in between
    short_only = fill_gaps(gappy, max_gap=3)
    assert not np.isnan(short_only[[0, 1, 5, 6, 7, 20]]).any() and np.isnan(short_only[12:17]).all()
    with pytest.raises(ValueError, match="speaker 0 has no box"):
        fill_gaps(np.full((3, 1, 4), np.nan, np.float32))

    # a face that leaves after frame 0: only latent frame 0 is masked
    track = np.full((9, 1, 4), np.nan, np.float32)
    track[0, 0] = [8, 8, 40, 40]
    m = masks_from_boxes(track, 9, 64, 64, margin=0, max_gap=0, smooth_window=1)
    assert m.face[0, 0].sum() == 16 and not m.face[0, 1:].any()


def test_moving_box_latent_union_and_intersection():
    T, H, W = 5, 32, 64
    x = np.array([0, 8, 16, 24, 32], np.float32)
    boxes = np.stack([x, np.zeros(T), x + 16, np.full(T, 16)], -1)[:, None]
    m = masks_from_boxes(boxes, T, H, W, margin=0, smooth_window=1)
    assert m.face[0, 0, :2].any(0).tolist() == [True] * 2 + [False] * 6
    assert m.face[0, 1, :2].any(0).tolist() == [False] + [True] * 5 + [False] * 2  # any of frames 1..4
    np.testing.assert_allclose(m.face_coverage[0, 1, 0, 1:6], [0.25, 0.5, 0.5, 0.5, 0.25])
    both = masks_from_boxes(boxes, T, H, W, margin=0, smooth_window=1, min_coverage=0.5)
    assert both.face[0, 1, 0].tolist() == [False, False, True, True, True, False, False, False]


def test_multi_speaker_disjoint():
    T, H, W = 9, 64, 128
    far = np.array([[4, 8, 40, 56], [80, 8, 120, 56]], np.float32)
    m = masks_from_boxes(far, T, H, W, margin=0.1, exclusive=False)
    assert m.face.shape == (2, 3, 8, 16) and m.face.any(axis=(2, 3)).all()
    assert not (m.face[0] & m.face[1]).any() and not (m.mouth[0] & m.mouth[1]).any()
    # boxes 2 px apart share an 8-px cell: overlapping unless exclusive, where the cell goes to the
    # speaker covering more of it
    near = np.array([[0, 0, 61, 64], [63, 0, 128, 64]], np.float32)
    shared = masks_from_boxes(near, T, H, W, margin=0, exclusive=False)
    assert (shared.face[0] & shared.face[1]).sum() == 3 * 8
    owned = masks_from_boxes(near, T, H, W, margin=0)
    assert not (owned.face[0] & owned.face[1]).any()
    assert owned.face[0, :, :, 7].all() and not owned.face[1, :, :, 7].any()
    assert (owned.face[0] | owned.face[1]).all()
    # exclusivity moves cells, coverage is computed once
    np.testing.assert_array_equal(owned.face_coverage, shared.face_coverage)


def test_masks_from_images(tmp_path):
    T, H, W = 5, 64, 96
    half = np.zeros((32, 48), np.uint8)
    half[4:28, 6:22] = 255  # -> [12, 44) x [8, 56) at full size
    Image.fromarray(half).save(tmp_path / "a.png")
    rgba = np.zeros((64, 96, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[8:56, 56:88, 3] = 255  # painted region on a transparent layer
    Image.fromarray(rgba).save(tmp_path / "b.png")
    m = masks_from_images([tmp_path / "a.png", str(tmp_path / "b.png")], T, H, W)
    ref = masks_from_boxes([[12, 8, 44, 56], [56, 8, 88, 56]], T, H, W, margin=0, smooth_window=1)
    np.testing.assert_array_equal(m.face, ref.face)  # boolean masks
    np.testing.assert_array_equal(m.mouth, ref.mouth)  # boolean masks
    np.testing.assert_allclose(m.boxes[0], [[12, 8, 44, 56], [56, 8, 88, 56]])
    assert m.face.shape == (2, 2, 8, 12)

    # arrays work too; the mouth follows the painted shape, not its bounding box
    disc = np.zeros((H, W), bool)
    yy, xx = np.mgrid[:H, :W]
    disc[(yy - 32) ** 2 + (xx - 48) ** 2 < 24 ** 2] = True
    d = masks_from_images([disc.astype(np.float32)], T, H, W)
    assert not (d.mouth & ~d.face).any() and d.mouth.any() and not d.mouth[0, 0, :4].any()


def test_box_mask_images_gate_generation_as_training_gates():
    """A face box made into a mask image (`box_mask_images`, what the demo and the eval give
    generation) yields the latent face mask `prepare` trains with for that box (same margin)."""
    from mi_jax.data.faces import box_mask_images

    T, H, W = 9, 64, 64
    for box in ([17.3, 12.8, 46.1, 55.4], [0.0, 20.0, 30.5, 64.0]):
        images = box_mask_images([box], H, W, margin=0.15)
        assert images[0].dtype == np.uint8 and images[0].shape == (H, W)
        served = masks_from_images(images, T, H, W)
        trained = masks_from_boxes([box], T, H, W, margin=0.15)
        np.testing.assert_array_equal(served.face, trained.face)  # boolean masks


def test_mask_image_errors(tmp_path):
    T, H, W = 5, 64, 96
    with pytest.raises(ValueError, match="aspect ratios differ"):
        masks_from_images([np.ones((64, 64), np.uint8) * 255], T, H, W)
    with pytest.raises(ValueError, match="empty"):
        masks_from_images([np.zeros((64, 96), np.uint8)], T, H, W)
    with pytest.raises(ValueError, match="shape"):
        masks_from_images([np.ones((2, 64, 96, 3), np.uint8)], T, H, W)
    with pytest.raises(ValueError, match="no file"):
        masks_from_images([tmp_path / "missing.png"], T, H, W)
    with pytest.raises(ValueError, match="one mask image per speaker"):
        masks_from_images(np.ones((64, 96), np.uint8), T, H, W)


def test_box_errors():
    T, H, W = 5, 64, 96
    with pytest.raises(ValueError, match="outside the 96x64"):
        masks_from_boxes([100, 10, 140, 50], T, H, W)
    with pytest.raises(ValueError, match=r"\(x, y, w, h\)"):
        masks_from_boxes([50, 10, 20, 30], T, H, W)
    with pytest.raises(ValueError, match=r"\[T=5, S, 4\]"):
        masks_from_boxes(np.zeros((4, 1, 4)), T, H, W)
    with pytest.raises(ValueError, match="all four coordinates NaN"):
        masks_from_boxes([[10, 10, np.nan, 40]], T, H, W)
    with pytest.raises(ValueError, match="multiple of 8"):
        masks_from_boxes([10, 10, 40, 40], T, 60, W)
    with pytest.raises(ValueError, match="min_coverage"):
        masks_from_boxes([10, 10, 40, 40], T, H, W, min_coverage=2)
    with pytest.raises(ValueError, match="smooth_window"):  # before any detection work
        masks_from_video(np.zeros((T, H, W, 3), np.uint8), smooth_window=4)
    with pytest.raises(ValueError, match="mouth_height"):
        masks_from_images([np.ones((H, W))], T, H, W, mouth_height=0)
    # a face cut by the frame edge is fine (clipped)
    edge = as_box_track([-8, 10, 40, 50], T, H, W)
    assert edge.shape == (5, 1, 4)
    assert masks_from_boxes([-8, 10, 40, 50], T, H, W).face[0, 0, :, 0].any()
