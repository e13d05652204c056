"""Readers: shapes and dtypes per format, DICOM rescale and slice order, clip sampling, clear errors."""

from __future__ import annotations

import uuid

import fsspec
import nibabel as nib
import numpy as np
import pydicom
import pytest
from data_factories import (
    CT_SMALL,
    MR_SMALL,
    frame_value,
    slice_stack,
    write_dicom_series,
    write_image,
    write_nifti,
    write_video,
)
from nibabel.testing import data_path
from pydicom.pixels import apply_modality_lut

from fmprobe.config import DataConfig
from fmprobe.data.readers import read_media
from fmprobe.data.readers.clips import clip_indices
from fmprobe.errors import ConfigError, ReaderError


def cfg(kind: str = "image", **kw) -> DataConfig:
    return DataConfig(manifest="m.csv", kind=kind, **kw)


# --- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("array", "channels"),
    [
        (np.arange(24 * 16, dtype=np.uint8).reshape(24, 16), 1),
        (np.full((24, 16, 3), 7, dtype=np.uint8), 3),
        (np.full((24, 16, 4), 9, dtype=np.uint8), 3),  # alpha dropped
    ],
)
def test_png_channels(tmp_path, array, channels):
    path = write_image(tmp_path / "x.png", array)
    out = read_media(path, cfg(), sample_id="s")
    assert out.shape == (1, 1, channels, 24, 16) and out.dtype == np.uint8
    assert np.array_equal(out[0, 0].transpose(1, 2, 0), array[..., :channels] if array.ndim == 3 else array[..., None])


def test_16bit_png_keeps_values_as_float(tmp_path):
    array = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    out = read_media(write_image(tmp_path / "x.png", array), cfg(), sample_id="s")
    assert out.dtype == np.float32 and out.shape == (1, 1, 1, 8, 8)
    assert np.array_equal(out[0, 0, 0], array.astype(np.float32))


def test_jpeg_rgb(tmp_path):
    path = write_image(tmp_path / "x.jpg", np.full((10, 12, 3), 128, dtype=np.uint8), fmt="JPEG")
    out = read_media(path, cfg(), sample_id="s")
    assert out.shape == (1, 1, 3, 10, 12) and out.dtype == np.uint8
    assert abs(float(out.mean()) - 128) < 2


def test_memory_url_image():
    url = write_image(f"memory://readers-{uuid.uuid4().hex}/x.png", np.full((5, 6), 3, dtype=np.uint8))
    assert read_media(url, cfg(), sample_id="s").shape == (1, 1, 1, 5, 6)


def test_zero_byte_and_truncated_png(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ReaderError, match=r"sample 'e', file '.*empty.png': file is empty"):
        read_media(str(tmp_path / "empty.png"), cfg(), sample_id="e")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    raw = open(write_image(tmp_path / "x.png", noise), "rb").read()
    (tmp_path / "cut.png").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ReaderError, match=r"sample 'c', file '.*cut.png': cannot decode image") as exc:
        read_media(str(tmp_path / "cut.png"), cfg(), sample_id="c")
    assert exc.value.sample_id == "c" and exc.value.path.endswith("cut.png")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (b"not a png at all", r"named '\.png' but holds no image \(it starts with b'not a png at all'\); replace it"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n", r"Git LFS pointer.*git lfs pull"),
    ],
)
def test_a_png_that_holds_no_image_says_what_to_fix(tmp_path, content, says):
    (tmp_path / "x.png").write_bytes(content)
    with pytest.raises(ReaderError, match=says) as exc:
        read_media(str(tmp_path / "x.png"), cfg(), sample_id="s")
    assert "BytesIO" not in str(exc.value) and str(exc.value).startswith("sample 's', file '")


def test_a_mask_that_holds_no_image_says_what_to_fix(tmp_path):
    from fmprobe.data.masks import read_mask

    (tmp_path / "m.png").write_bytes(b"<html>404</html>")
    with pytest.raises(ReaderError, match=r"file '.*m.png': the file is named '\.png' but holds no image") as exc:
        read_mask(str(tmp_path / "m.png"), "s")
    assert "BytesIO" not in str(exc.value)


def test_unknown_extension_lists_supported(tmp_path):
    (tmp_path / "x.gif2").write_bytes(b"abc")
    with pytest.raises(ReaderError, match=r"extension '.gif2' with data.kind: image; supported: .png, .jpg"):
        read_media(str(tmp_path / "x.gif2"), cfg(), sample_id="s")
    video = write_video(tmp_path / "v.mp4", n_frames=2)
    with pytest.raises(ReaderError, match="'.mp4' is read with data.kind: video"):
        read_media(video, cfg(), sample_id="s")
    with pytest.raises(ReaderError, match="file not found"):
        read_media(str(tmp_path / "nope.bin"), cfg(), sample_id="s")


# --- DICOM --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [CT_SMALL, MR_SMALL])
def test_dicom_rescale_matches_pydicom(name):
    out = read_media(name, cfg(), sample_id="s")
    ds = pydicom.dcmread(name)
    assert out.dtype == np.float32 and out.shape == (1, 1, 1, ds.Rows, ds.Columns)
    assert np.array_equal(out[0, 0, 0], apply_modality_lut(ds.pixel_array, ds).astype(np.float32))


def test_ct_rescale_is_applied():
    ds = pydicom.dcmread(CT_SMALL)
    assert float(ds.RescaleIntercept) == -1024  # the fixture this test relies on
    out = read_media(CT_SMALL, cfg(), sample_id="s")
    assert np.allclose(out[0, 0, 0], ds.pixel_array * float(ds.RescaleSlope) - 1024)


def test_dicom_without_pixel_data(tmp_path):
    ds = pydicom.dcmread(CT_SMALL)
    del ds.PixelData
    ds.save_as(tmp_path / "header.dcm")
    with pytest.raises(ReaderError, match=r"sample 'h', file '.*header.dcm': DICOM file has no pixel data"):
        read_media(str(tmp_path / "header.dcm"), cfg(), sample_id="h")


def test_not_a_dicom(tmp_path):
    (tmp_path / "x.dcm").write_bytes(b"\x00" * 10)
    with pytest.raises(ReaderError, match="not a readable DICOM file"):
        read_media(str(tmp_path / "x.dcm"), cfg(), sample_id="s")


def test_dicom_series_sorted_by_position_not_names_or_instance_number(tmp_path):
    write_dicom_series(tmp_path / "ser", 6, seed=3)
    out = read_media(str(tmp_path / "ser"), cfg("volume", frames_per_clip=6), sample_id="s")
    assert out.shape == (1, 6, 1, 128, 128) and out.dtype == np.float32
    assert out[0, :, 0, 0, 0].tolist() == [i - 1024.0 for i in range(6)]  # stored i, rescaled


def test_dicom_series_instance_number_fallback_and_extensionless(tmp_path):
    write_dicom_series(tmp_path / "ser", 4, positions=False, seed=1, extension="")
    out = read_media(str(tmp_path / "ser"), cfg("volume", frames_per_clip=4), sample_id="s")
    assert out[0, :, 0, 0, 0].tolist() == [i - 1024.0 for i in range(4)]


def test_dicom_series_duplicate_positions_refused(tmp_path):
    paths = write_dicom_series(tmp_path / "ser", 3)
    ds = pydicom.dcmread(paths[0])
    ds.save_as(tmp_path / "ser" / "copy.dcm")
    with pytest.raises(ReaderError, match="share one position"):
        read_media(str(tmp_path / "ser"), cfg("volume"), sample_id="s")


# --- video --------------------------------------------------------------------------------------


def _frame_ids(clips: np.ndarray) -> np.ndarray:
    """Recover which frame each output frame is, from its gray level (see data_factories)."""
    means = clips.astype(float).mean(axis=(2, 3, 4))
    return np.rint((means - frame_value(0)) / (frame_value(1) - frame_value(0))).astype(int)


@pytest.mark.parametrize("codec", ["mpeg4", "libx264"])
def test_mp4_center_clip(tmp_path, codec):
    path = write_video(tmp_path / "v.mp4", n_frames=12, codec=codec)
    out = read_media(path, cfg("video", frames_per_clip=4, frame_step=2), sample_id="s")
    assert out.shape == (1, 4, 3, 32, 32) and out.dtype == np.uint8
    assert _frame_ids(out).tolist() == [[2, 4, 6, 8]]


def test_video_uniform_clips_and_short_video(tmp_path):
    path = write_video(tmp_path / "v.mp4", n_frames=10)
    out = read_media(path, cfg("video", frames_per_clip=3, clip_position="uniform", num_clips=3), sample_id="s")
    assert out.shape == (3, 3, 3, 32, 32)
    assert _frame_ids(out).tolist() == [[0, 1, 2], [4, 5, 6], [7, 8, 9]]
    short = write_video(tmp_path / "short.mp4", n_frames=5)
    out = read_media(short, cfg("video", frames_per_clip=8), sample_id="s")
    assert _frame_ids(out).tolist() == [[0, 1, 2, 3, 4, 4, 4, 4]]  # last frame repeated


def test_webm_random_clip_is_seeded(tmp_path):
    path = write_video(tmp_path / "v.webm", n_frames=12, codec="libvpx")
    data = cfg("video", frames_per_clip=2, clip_position="random")
    a = read_media(path, data, sample_id="s", rng=np.random.default_rng(5))
    b = read_media(path, data, sample_id="s", rng=np.random.default_rng(5))
    assert np.array_equal(a, b)
    ids = _frame_ids(a)[0]
    assert ids[1] == ids[0] + 1


@pytest.mark.parametrize("keep", [0.2, 0.5, 0.8])
def test_truncated_mp4(tmp_path, keep):
    raw = open(write_video(tmp_path / "v.mp4", n_frames=12), "rb").read()
    (tmp_path / "cut.mp4").write_bytes(raw[: int(len(raw) * keep)])
    with pytest.raises(ReaderError, match=r"sample 'v', file '.*cut.mp4': .*truncated\?"):
        read_media(str(tmp_path / "cut.mp4"), cfg("video", frames_per_clip=4), sample_id="v")


def test_frame_folder_natural_order(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        write_image(folder / f"frame_{i}.png", np.full((6, 7), i, dtype=np.uint8))
    (folder / "notes.txt").write_text("not a frame")
    out = read_media(str(folder), cfg("video", frames_per_clip=12), sample_id="s")
    assert out.shape == (1, 12, 1, 6, 7) and out.dtype == np.uint8
    assert out[0, :, 0, 0, 0].tolist() == list(range(12))  # frame_10 after frame_9


def test_frame_folder_mismatched_frame(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    write_image(folder / "0.png", np.zeros((6, 7), dtype=np.uint8))
    write_image(folder / "1.png", np.zeros((6, 8), dtype=np.uint8))
    with pytest.raises(ReaderError, match=r"file '.*frames/1.png': frame is \(6, 8, 1\)"):
        read_media(str(folder), cfg("video", frames_per_clip=2), sample_id="s")


# --- volumes ------------------------------------------------------------------------------------


def test_nifti_shipped_file_matches_nibabel():
    path = f"{data_path}/anatomical.nii"
    out = read_media(path, cfg("volume", frames_per_clip=25), sample_id="s")
    ref = nib.as_closest_canonical(nib.load(path)).get_fdata(dtype=np.float32)
    assert out.dtype == np.float32 and out.shape == (1, 25, 1, *ref.shape[:2])
    assert np.array_equal(out[0, :, 0], np.moveaxis(ref, 2, 0))


def test_nifti_slice_axis_and_gz(tmp_path):
    vol = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    path = write_nifti(tmp_path / "v.nii.gz", vol)
    out = read_media(path, cfg("volume", slice_axis=0, frames_per_clip=4), sample_id="s")
    assert out.shape == (1, 4, 1, 5, 6)
    assert np.allclose(out[0, :, 0], vol)


def test_nifti_4d_singleton_squeezed_other_4d_refused(tmp_path):
    path = write_nifti(tmp_path / "one.nii", slice_stack(3)[..., None])
    assert read_media(path, cfg("volume", frames_per_clip=3), sample_id="s").shape == (1, 3, 1, 8, 8)
    with pytest.raises(ReaderError, match=r"example4d.nii.gz': expected a 3D volume .* got shape \(128, 96, 24, 2\)"):
        read_media(f"{data_path}/example4d.nii.gz", cfg("volume"), sample_id="s")


def test_truncated_nifti(tmp_path):
    raw = open(f"{data_path}/anatomical.nii", "rb").read()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ReaderError, match=r"file '.*cut.nii': cannot read NIfTI"):
        read_media(str(tmp_path / "cut.nii"), cfg("volume"), sample_id="s")


def test_npy_and_npz(tmp_path):
    np.save(tmp_path / "v.npy", slice_stack(10).astype(np.int16))
    out = read_media(str(tmp_path / "v.npy"), cfg("volume", frames_per_clip=4, frame_step=3), sample_id="s")
    assert out.dtype == np.float32 and out[0, :, 0, 0, 0].tolist() == [0, 3, 6, 9]
    np.savez(tmp_path / "one.npz", anything=slice_stack(3))
    np.savez(tmp_path / "named.npz", volume=slice_stack(3), mask=np.zeros((8, 8, 3)))
    np.savez(tmp_path / "many.npz", a=slice_stack(3), b=slice_stack(3))
    for name in ("one.npz", "named.npz"):
        out = read_media(str(tmp_path / name), cfg("volume", frames_per_clip=3), sample_id="s")
        assert out.shape == (1, 3, 1, 8, 8)
    with pytest.raises(ReaderError, match=r"holds arrays \['a', 'b'\]"):
        read_media(str(tmp_path / "many.npz"), cfg("volume"), sample_id="s")
    np.save(tmp_path / "flat.npy", np.zeros((8, 8)))
    with pytest.raises(ReaderError, match=r"got shape \(8, 8\)"):
        read_media(str(tmp_path / "flat.npy"), cfg("volume"), sample_id="s")


# --- clip sampling ------------------------------------------------------------------------------


def test_clip_indices_center_uniform_clamp():
    assert clip_indices(10, cfg(frames_per_clip=4)).tolist() == [[3, 4, 5, 6]]
    assert clip_indices(20, cfg(frames_per_clip=3, frame_step=4)).tolist() == [[5, 9, 13]]
    assert clip_indices(3, cfg(frames_per_clip=5)).tolist() == [[0, 1, 2, 2, 2]]
    u = clip_indices(100, cfg(frames_per_clip=8, frame_step=2, clip_position="uniform", num_clips=4))
    assert u.shape == (4, 8) and u[0, 0] == 0 and u[-1, -1] == 99
    assert np.all(np.diff(u, axis=1) == 2) and np.all(np.diff(u[:, 0]) > 0)


def test_clip_indices_random_is_seeded_and_in_range():
    data = cfg(frames_per_clip=4, frame_step=2, clip_position="random")
    draws = [clip_indices(50, data, np.random.default_rng(s)) for s in range(20)]
    assert np.array_equal(draws[0], clip_indices(50, data, np.random.default_rng(0)))
    assert len({int(d[0, 0]) for d in draws}) > 1
    assert all(d.min() >= 0 and d.max() <= 49 and np.all(np.diff(d) == 2) for d in draws)
    with pytest.raises(ValueError, match="needs an rng"):
        clip_indices(50, data)


def test_num_clips_needs_uniform():
    from fmprobe.config import parse_config

    with pytest.raises(ConfigError, match="num_clips: 2 needs clip_position: uniform"):
        parse_config({"name": "x", "data": {"manifest": "m.csv", "num_clips": 2},
                      "task": {"type": "binary", "targets": ["y"]}})


def test_memory_url_dicom_series_and_video(tmp_path):
    base = f"memory://readers-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    for path in write_dicom_series(tmp_path / "ser", 3):
        fs.pipe(f"{base}/ser/{path.name}", path.read_bytes())
    out = read_media(f"{base}/ser", cfg("volume", frames_per_clip=3), sample_id="s")
    assert out[0, :, 0, 0, 0].tolist() == [-1024.0, -1023.0, -1022.0]
    fs.pipe(f"{base}/v.mp4", open(write_video(tmp_path / "v.mp4", n_frames=6), "rb").read())
    out = read_media(f"{base}/v.mp4", cfg("video", frames_per_clip=6), sample_id="s")
    assert _frame_ids(out).tolist() == [list(range(6))]
