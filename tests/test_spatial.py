"""Spatial probes: synthetic shapes, control encoders, COCO-style AP by hand, and the probes' acceptance."""

import numpy as np
import pytest
import torch

from fmprobe.backbones.controls import PixelPatchEncoder, RandomTokenEncoder
from fmprobe.diagnostics.shapes import (
    COLOURS,
    SHAPES,
    SampleObjects,
    load_objects,
    make_shapes,
    mask_box,
    write_shapes_dataset,
)
from fmprobe.diagnostics.spatial import box_iou, coco_average_precision, nms, run_spatial_probes
from fmprobe.diagnostics.spatial_run import spatial_command
from fmprobe.errors import EncoderError, FmprobeError



pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------- shapes data


def test_shapes_are_deterministic_and_samples_do_not_depend_on_n():
    a, b = make_shapes(6, size=64, seed=3), make_shapes(6, size=64, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    assert [o.shapes for o in a.objects] == [o.shapes for o in b.objects]
    prefix = make_shapes(2, size=64, seed=3)
    np.testing.assert_array_equal(prefix.images, a.images[:2])
    assert not np.array_equal(make_shapes(6, size=64, seed=4).images, a.images)


@pytest.mark.parametrize("frames", [None, 5])
def test_boxes_are_the_masks_bounding_boxes(frames):
    data = make_shapes(30, size=64, max_objects=3, seed=1, video_frames=frames)
    f = frames or 1
    assert data.images.shape == ((30, 5, 3, 64, 64) if frames else (30, 3, 64, 64))
    assert data.images.dtype == np.uint8
    counts = set()
    for objs in data.objects:
        k = len(objs.shapes)
        counts.add(k)
        assert objs.boxes.shape == (f, k, 4) and objs.masks.shape == (f, k, 64, 64)
        assert set(objs.shapes) <= set(SHAPES) and set(objs.colours) <= set(COLOURS)
        for frame in range(f):
            for j in range(k):
                mask = objs.masks[frame, j]
                rows, cols = np.nonzero(mask)
                np.testing.assert_array_equal(
                    objs.boxes[frame, j], [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
                )
    assert counts == {1, 2, 3}


def test_objects_are_drawn_in_their_colour_and_do_not_overlap_in_images():
    data = make_shapes(20, size=64, seed=2)
    for image, objs in zip(data.images, data.objects):
        masks = objs.masks[0]
        assert masks.sum(axis=0).max() == 1  # no two objects share a pixel
        for mask, colour in zip(masks, objs.colours):
            np.testing.assert_array_equal(image[:, mask].T, np.tile(COLOURS[colour], (mask.sum(), 1)))
        background = image[:, ~masks.any(axis=0)].astype(float)
        assert background.max() < 100 and background.std() > 1  # dark and lightly noisy


def test_clips_move_linearly_and_bounce_inside_the_frame():
    data = make_shapes(10, size=64, seed=5, video_frames=40)
    moved = bounced = 0
    for objs in data.objects:
        assert objs.masks.any(axis=(2, 3)).all()  # every object visible in every frame
        assert (objs.boxes >= 0).all() and (objs.boxes <= 64).all()
        centres = (objs.boxes[..., :2] + objs.boxes[..., 2:]) / 2  # [F, K, 2]
        steps = np.diff(centres, axis=0)
        moved += int((np.abs(steps).sum(axis=(0, 2)) > 5).sum())
        # a bounce flips the sign of one velocity component; between bounces the sign stays
        bounced += int((np.sign(steps[1:]) * np.sign(steps[:-1]) < 0).any(axis=0).sum())
    assert moved == sum(len(o.shapes) for o in data.objects)
    assert bounced > 0


def test_mask_box_refuses_an_empty_mask():
    with pytest.raises(FmprobeError, match="empty"):
        mask_box(np.zeros((4, 4), dtype=bool))


@pytest.mark.parametrize("frames", [None, 3])
def test_write_shapes_dataset_round_trips(tmp_path, frames):
    import pandas as pd
    from PIL import Image

    manifest = write_shapes_dataset(tmp_path, 4, size=48, seed=7, video_frames=frames)
    df = pd.read_csv(manifest)
    data = make_shapes(4, size=48, seed=7, video_frames=frames)
    assert list(df["sample_id"]) == [f"shapes{i:05d}" for i in range(4)]
    for row, pixels, objs in zip(df.itertuples(), data.images, data.objects):
        if frames:
            files = sorted((tmp_path / row.path).iterdir())
            read = np.stack([np.asarray(Image.open(f)).transpose(2, 0, 1) for f in files])
        else:
            read = np.asarray(Image.open(tmp_path / row.path)).transpose(2, 0, 1)
        np.testing.assert_array_equal(read, pixels)
        loaded = load_objects(tmp_path / row.annotations)
        np.testing.assert_array_equal(loaded.masks, objs.masks)
        np.testing.assert_array_equal(loaded.boxes, objs.boxes)
        assert loaded.shapes == objs.shapes and row.num_objects == len(objs.shapes)
        assert row.largest_shape == objs.shapes[int(objs.masks[0].sum(axis=(1, 2)).argmax())]
        assert [getattr(row, f"has_{s}") for s in SHAPES] == [float(s in objs.shapes) for s in SHAPES]


# ------------------------------------------------------------------------------------------- controls


def test_pixel_patch_tokens_are_the_patches_in_raster_order():
    enc = PixelPatchEncoder(patch=8, image_size=32)
    pixels = torch.randn(2, 3, 32, 32)
    out = enc.encode(pixels, [-1, "0"])
    tokens = out.tokens["-1"]
    assert tokens.shape == (2, 16, 3 * 8 * 8) and out.grid["-1"] == (1, 4, 4) and out.grid["0"] == (1, 4, 4)
    assert out.prefix["-1"].shape == (2, 0, 192)
    torch.testing.assert_close(tokens[:, 0], pixels[:, :, :8, :8].reshape(2, -1))
    torch.testing.assert_close(tokens[:, 1], pixels[:, :, :8, 8:16].reshape(2, -1))  # next along w
    torch.testing.assert_close(tokens[:, 4], pixels[:, :, 8:16, :8].reshape(2, -1))  # next row
    spec = enc.input_spec
    assert spec.kind == "image" and spec.image_size == (32, 32) and spec.patch_size == 8


def test_controls_refuse_what_they_cannot_honour():
    enc = PixelPatchEncoder(patch=8, image_size=32)
    with pytest.raises(EncoderError, match="32x32"):
        enc.encode(torch.zeros(1, 3, 16, 16), [-1])
    with pytest.raises(EncoderError, match="one extraction point"):
        enc.encode(torch.zeros(1, 3, 32, 32), [3])
    with pytest.raises(EncoderError, match="attention"):
        enc.encode(torch.zeros(1, 3, 32, 32), [-1], attentions=True)
    with pytest.raises(EncoderError, match="multiple"):
        PixelPatchEncoder(patch=16, image_size=40)


def test_random_tokens_depend_on_image_identity_only():
    enc = RandomTokenEncoder(dim=16, patch=8, image_size=32, seed=0)
    a, b = torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)
    ta = enc.encode(torch.cat([a, b]), [-1]).tokens["-1"]
    assert ta.shape == (2, 16, 16)
    torch.testing.assert_close(enc.encode(a, [-1]).tokens["-1"][0], ta[0])  # same image, same tokens, any batch
    assert not torch.equal(ta[0], ta[1])
    other = RandomTokenEncoder(dim=16, patch=8, image_size=32, seed=1)
    assert not torch.equal(other.encode(a, [-1]).tokens["-1"][0], ta[0])
    assert other.fingerprint() != enc.fingerprint() == RandomTokenEncoder(16, 8, 32, 0).fingerprint()
    assert PixelPatchEncoder(8, 32).fingerprint() != PixelPatchEncoder(16, 32).fingerprint()


# ------------------------------------------------------------------------------------------- AP by hand

BOX = np.array([[0.0, 0.0, 10.0, 10.0]])
OTHER = np.array([[20.0, 20.0, 30.0, 30.0]])
FAR = np.array([[50.0, 50.0, 60.0, 60.0]])


def _dets(*pairs):
    """(box [1,4], score) pairs -> (boxes, scores) of one image."""
    if not pairs:
        return np.zeros((0, 4)), np.zeros(0)
    return np.concatenate([b for b, _ in pairs]), np.array([s for _, s in pairs])


def test_ap_of_perfect_detections_is_one():
    gt = [np.concatenate([BOX, OTHER]), FAR]
    dets = [_dets((BOX, 0.3), (OTHER, 0.9)), _dets((FAR, 0.5))]
    assert coco_average_precision(dets, gt) == pytest.approx(1.0)


def test_ap_with_a_false_positive_ranked_first():
    # precision 0 at recall 0, then 1/2 at recall 1: the envelope is 1/2 at every recall point
    assert coco_average_precision([_dets((FAR, 0.9), (BOX, 0.8))], [BOX]) == pytest.approx(0.5)
    # TP, FP, TP over two objects: precision 1 up to recall .5 (51 of 101 points), then 2/3 (50 points)
    dets = [_dets((BOX, 0.9), (FAR, 0.8)), _dets((OTHER, 0.7))]
    assert coco_average_precision(dets, [BOX, OTHER]) == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_ap_with_a_missed_object():
    # recall never passes 1/2: precision 1 at the 51 recall points 0..0.5, 0 at the other 50
    assert coco_average_precision([_dets((BOX, 0.9)), _dets()], [BOX, OTHER]) == pytest.approx(51 / 101)
    assert coco_average_precision([_dets(), _dets()], [BOX, OTHER]) == 0.0


def test_duplicate_detections_are_false_positives():
    # a duplicate ranked after all true positives costs nothing at the 101 recall points...
    assert coco_average_precision([_dets((BOX, 0.9), (BOX, 0.8))], [BOX]) == pytest.approx(1.0)
    # ...but ranked before another object's detection it does, exactly like any false positive
    dets = [_dets((BOX, 0.9), (BOX + 0.5, 0.8)), _dets((OTHER, 0.7))]
    assert coco_average_precision(dets, [BOX, OTHER]) == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_ap_matches_at_iou_threshold_and_greedily_by_overlap():
    half = np.array([[0.0, 0.0, 10.0, 5.0]])  # IoU exactly 0.5 with BOX
    assert box_iou(half, BOX)[0, 0] == pytest.approx(0.5)
    assert coco_average_precision([_dets((half, 0.9))], [BOX]) == pytest.approx(1.0)
    below = np.array([[0.0, 0.0, 10.0, 4.9]])
    assert coco_average_precision([_dets((below, 0.9))], [BOX]) == 0.0
    # the first detection overlaps both objects but matches the one it overlaps most, leaving the other free
    gts = np.array([[0.0, 0.0, 10.0, 10.0], [1.0, 0.0, 11.0, 10.0]])
    dets = _dets((np.array([[1.0, 0.0, 11.0, 10.0]]), 0.9), (np.array([[0.0, 0.0, 10.0, 10.0]]), 0.8))
    assert coco_average_precision([dets], [gts]) == pytest.approx(1.0)


def test_ap_keeps_the_best_detections_per_image_and_refuses_no_ground_truth():
    dets = [_dets((FAR, 0.9), (BOX, 0.1))]
    assert coco_average_precision(dets, [BOX], max_detections=1) == 0.0
    with pytest.raises(FmprobeError, match="ground-truth"):
        coco_average_precision([_dets((BOX, 0.9))], [np.zeros((0, 4))])


def test_nms_keeps_the_best_of_overlapping_boxes():
    boxes = np.concatenate([BOX, BOX + 1, OTHER, BOX + 6])
    assert nms(boxes, np.array([0.5, 0.9, 0.7, 0.2])).tolist() == [1, 2, 3]


# ------------------------------------------------------------------------------------------- probes

SIZE, PATCH, N_TRAIN, N_TEST = 96, 8, 240, 80


@pytest.fixture(scope="module")
def shapes():
    # one object per image: which object is largest is then no question, so local pixels can find the box
    return make_shapes(N_TRAIN + N_TEST, size=SIZE, max_objects=1, seed=0)


def _encode(encoder, images):
    spec = encoder.input_spec
    pixels = torch.from_numpy(images).float() / 255
    pixels = (pixels - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    out = encoder.encode(pixels, [-1])
    return out.tokens["-1"].numpy(), out.grid["-1"]


def _probe(tokens, grid, data, **kwargs):
    return run_spatial_probes(
        tokens[:N_TRAIN], grid, data.objects[:N_TRAIN], tokens[N_TRAIN:], data.objects[N_TRAIN:], SIZE, **kwargs
    )


@pytest.fixture(scope="module")
def pixel_results(shapes):
    return _probe(*_encode(PixelPatchEncoder(PATCH, SIZE), shapes.images), shapes)


@pytest.fixture(scope="module")
def random_results(shapes):
    return _probe(*_encode(RandomTokenEncoder(32, PATCH, SIZE, seed=0), shapes.images), shapes)


def test_pixel_patches_hold_boxes_and_masks(pixel_results):
    # measured: box IoU ~0.62, mask IoU ~0.68 (the ceiling of 8-px cells is ~0.75), mAP ~0.16, box prior ~0.13
    r = pixel_results
    assert r["box_iou"] > 0.45 and r["box_iou"] > r["box_iou_prior"] + 0.25
    assert r["mask_iou"] > 0.55
    assert r["n_train_images"] == N_TRAIN and len(r["per_image"]["mask_iou"]) == N_TEST
    assert np.mean(r["per_image"]["box_iou"]) == pytest.approx(r["box_iou"])


def test_random_tokens_reach_only_chance(pixel_results, random_results):
    # measured: box IoU ~0.11 (prior ~0.13), mask IoU 0 (the prior predicts all background), mAP ~0.015
    r = random_results
    assert r["box_iou"] < r["box_iou_prior"] + 0.08
    assert r["mask_iou"] < 0.1 and abs(r["mask_iou"] - r["mask_iou_prior"]) < 0.1
    assert r["map50"] < 0.06 and pixel_results["map50"] > r["map50"] + 0.05
    assert pixel_results["mask_iou"] > r["mask_iou"] + 0.4


def _oracle_tokens(data, h):
    """Tokens that hold the detection targets: (is an object's centre cell, dx, dy, log w, log h, covered)."""
    cell = SIZE / h
    tokens = np.zeros((len(data.objects), h, h, 6), dtype=np.float32)
    for i, objs in enumerate(data.objects):
        for x0, y0, x1, y1 in objs.boxes[0]:
            cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
            r, c = int(cy // cell), int(cx // cell)
            tokens[i, r, c] = [1, cx / cell - c - 0.5, cy / cell - r - 0.5, np.log((x1 - x0) / cell),
                               np.log((y1 - y0) / cell), 0]
        union = objs.masks[0].any(axis=0).reshape(h, SIZE // h, h, SIZE // h).mean(axis=(1, 3))
        tokens[i, ..., 5] = union > 0.5
    noise = np.random.default_rng(0).normal(0, 0.05, tokens.shape)
    return (tokens + noise).reshape(len(data.objects), h * h, 6)


def test_tokens_that_hold_the_answer_detect_every_object():
    data = make_shapes(N_TRAIN + N_TEST, size=SIZE, max_objects=3, seed=1)
    h = SIZE // PATCH
    r = _probe(_oracle_tokens(data, h), (1, h, h), data)
    assert r["map50"] > 0.9
    assert r["mask_iou"] > 0.6


def test_probes_are_seeded_and_read_clips_per_temporal_slice():
    data = make_shapes(24, size=32, max_objects=2, seed=3, video_frames=4)
    enc = PixelPatchEncoder(8, 32)
    frames = [_encode(enc, data.images[:, f])[0] for f in range(4)]
    tokens = np.concatenate(frames, axis=1)  # [N, t*h*w, D], t = 4 frames, raster (t, h, w)
    grid = (4, 4, 4)
    args = (tokens[:16], grid, data.objects[:16], tokens[16:], data.objects[16:], 32)
    a = run_spatial_probes(*args, steps=20, seed=1)
    b = run_spatial_probes(*args, steps=20, seed=1)
    assert a == b
    assert a["n_train_images"] == 16 * 4 and len(a["per_image"]["box_iou"]) == 8 * 4
    # two frames per token slice (a tubelet): 2 slices per clip
    pooled = tokens.reshape(24, 2, 2, 16, -1).mean(axis=2).reshape(24, 32, -1)
    c = run_spatial_probes(pooled[:16], (2, 4, 4), data.objects[:16], pooled[16:], data.objects[16:], 32, steps=20)
    assert c["n_test_images"] == 8 * 2


def test_probes_refuse_mismatched_inputs():
    data = make_shapes(6, size=32, seed=0)
    tokens = np.zeros((6, 16, 4), dtype=np.float32)
    with pytest.raises(FmprobeError, match="token rows"):
        run_spatial_probes(tokens[:3], (1, 4, 4), data.objects[:4], tokens[3:], data.objects[3:], 32)
    with pytest.raises(FmprobeError, match="t\\*h\\*w"):
        run_spatial_probes(tokens[:3], (1, 3, 3), data.objects[:3], tokens[3:], data.objects[3:], 32)
    with pytest.raises(FmprobeError, match="image_size"):
        run_spatial_probes(tokens[:3], (1, 4, 4), data.objects[:3], tokens[3:], data.objects[3:], 64)
    clips = make_shapes(6, size=32, seed=0, video_frames=3)
    with pytest.raises(FmprobeError, match="split evenly"):
        run_spatial_probes(tokens[:3].repeat(2, 1), (2, 4, 4), clips.objects[:3], tokens[3:].repeat(2, 1),
                           clips.objects[3:], 32)


# ------------------------------------------------------------------------------------------- direction


def _clip(start: tuple[float, float], velocity: tuple[float, float], frames: int = 4, r: float = 5.0) -> SampleObjects:
    centres = np.array(start) + np.arange(frames)[:, None] * np.array(velocity)
    boxes = np.concatenate([centres - r, centres + r], axis=1)[:, None].astype(np.float32)  # [F, 1, 4]
    return SampleObjects(shapes=("square",), colours=("red",), boxes=boxes, masks=np.zeros((frames, 1, 2, 2), bool))


def test_direction_of_each_object_from_the_probes_boxes_across_frames():
    from fmprobe.diagnostics.spatial import direction_hits

    clips = [_clip((20, 20), (3, 0)), _clip((40, 40), (0, -3)), _clip((30, 30), (0.1, 0))]  # right, up, still
    t = 4

    def dets(boxes_per_slice):
        return [(np.asarray(b, dtype=np.float64).reshape(-1, 4), np.ones(len(b))) for b in boxes_per_slice]

    truth = [dets([c.boxes[j] for j in range(t)]) for c in clips]
    hits, moved = direction_hits([d for clip in truth for d in clip], clips, t, 64)
    assert moved.tolist() == [1, 1, 0] and hits.tolist() == [1, 1, 0]  # the still object has no direction
    # boxes moving the other way, and a clip whose last slice has no detection overlapping the object
    reversed_ = dets([clips[0].boxes[t - 1 - j] for j in range(t)])
    missing = dets([clips[1].boxes[j] for j in range(t - 1)] + [np.zeros((0, 4))])
    hits, moved = direction_hits(reversed_ + missing + truth[2], clips, t, 64)
    assert moved.tolist() == [1, 1, 0] and hits.tolist() == [0, 0, 0]
    # off by 40 degrees is still right, by 50 wrong (tolerance 45)
    for angle, right in ((40, 1), (50, 0)):
        a = np.radians(angle)
        shifted = [np.concatenate([c - 5, c + 5]) for c in (np.array([20.0, 20.0]) + j * 3 * np.array([np.cos(a), np.sin(a)])
                                                             for j in range(t))]
        assert direction_hits(dets(shifted), clips[:1], t, 64)[0].tolist() == [right]


def test_spatial_command_reports_direction_accuracy_with_a_ci_on_moving_shapes(tmp_path):
    result = spatial_command("pixel", n_train=6, n_test=6, image_size=32, steps=5, frames=4, bootstrap=50,
                             out=tmp_path)  # fmt: skip
    row = result["results"][0]
    assert row["moving_objects"] == sum(row["direction_moved"]) > 0
    assert row["direction_accuracy"] == pytest.approx(sum(row["direction_hits"]) / row["moving_objects"])
    lo, hi = row["ci"]["direction_accuracy"]
    assert 0 <= lo <= row["direction_accuracy"] <= hi <= 1
    still = spatial_command("pixel", n_train=4, n_test=2, image_size=32, steps=2, bootstrap=10, out=tmp_path / "s")
    assert "direction_accuracy" not in still["results"][0]


def test_spatial_progress_counts_the_controls_probes_too(tmp_path):
    ticks = []
    result = spatial_command("pixel", n_train=4, n_test=2, image_size=32, steps=2, bootstrap=10, controls=["random"],
                             out=tmp_path, progress=lambda done, total: ticks.append((done, total)))  # fmt: skip
    probed = len(result["results"]) + len(result["controls"])
    assert ticks == [(i, probed) for i in range(1, probed + 1)] and probed == 2
