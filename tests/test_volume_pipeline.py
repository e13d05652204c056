"""Volumes through MONAI before any slice is taken: spacing, foreground crop, CT/MR intensity presets; DICOM series
in physical order, in HU, with their geometry from the headers; every setting in the feature-cache key."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from data_factories import CT_SMALL, write_dicom_series, write_nifti
from pydicom.pixels import apply_modality_lut

from fmprobe.config import DataConfig, parse_config
from fmprobe.data.readers import read_media
from fmprobe.data.readers.dicom import read_dicom_series
from fmprobe.data.readers.source import Source
from fmprobe.data.volume_pipeline import to_ras
from fmprobe.errors import ReaderError
from fmprobe.features.keys import cache_key, describe


def volume(**kw) -> DataConfig:
    return DataConfig(manifest="m.csv", kind="volume", **kw)


def blob(n: int, spacing: float, centre: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """A smooth ellipsoid (HU-like values, -1000 outside) sampled on an n^3 grid of ``spacing`` mm, centred at 0."""
    c = (np.arange(n) + 0.5) * spacing - n * spacing / 2
    x, y, z = np.meshgrid(c - centre[0], c - centre[1], c - centre[2], indexing="ij")
    r = np.sqrt((x / 9) ** 2 + (y / 6) ** 2 + (z / 11) ** 2)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    affine[:3, 3] = c[0]
    return (-1000 + 1400 / (1 + np.exp((r - 1) * 8))).astype(np.float32), affine


def test_the_same_object_at_two_voxel_sizes_resamples_to_one_grid(tmp_path):
    fine = write_nifti(tmp_path / "fine.nii.gz", *blob(40, 0.8))
    coarse = write_nifti(tmp_path / "coarse.nii.gz", *blob(20, 1.6))
    cfg = volume(spacing=[1.0, 1.0, 1.0], intensity={"modality": "ct", "range": [-1000, 400]}, frames_per_clip=32)
    a, b = (read_media(p, cfg, sample_id="s")[0, :, 0] for p in (fine, coarse))
    assert a.shape == b.shape == (32, 32, 32)  # 32 mm at 1 mm, whatever the scan's voxel size
    assert 0.0 <= a.min() and a.max() <= 1.0 and np.abs(a - b).mean() < 0.02
    raw = [read_media(p, volume(frames_per_clip=40), sample_id="s")[0, :, 0].shape for p in (fine, coarse)]
    assert raw == [(40, 40, 40), (40, 20, 20)]  # without spacing: 40 and 20 voxels (the last slice repeated)


def test_ct_windows_and_ranges_map_hu_to_unit_interval(tmp_path):
    hu = np.array([-1000, 0, 40, 80, 3000], dtype=np.float32).reshape(5, 1, 1) * np.ones((1, 2, 2), np.float32)
    path = write_nifti(tmp_path / "hu.nii", hu)
    brain = read_media(path, volume(slice_axis=0, frames_per_clip=5, intensity={"modality": "ct", "window": "brain"}),
                       sample_id="s")[0, :, 0, 0, 0]  # fmt: skip
    assert brain.tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])  # brain: 40 +- 40 HU
    lung = read_media(path, volume(slice_axis=0, frames_per_clip=5, intensity={"modality": "ct", "window": "lung"}),
                      sample_id="s")[0, :, 0, 0, 0]  # fmt: skip
    assert lung.tolist() == pytest.approx([(v + 1350) / 1500 if v < 150 else 1.0 for v in (-1000, 0, 40, 80, 3000)])
    with pytest.raises(ValueError, match="exactly one of window"):
        volume(intensity={"modality": "ct"})
    with pytest.raises(ValueError, match="window and intensity both map intensities"):
        volume(window={"center": 40, "width": 80}, intensity={"modality": "ct", "window": "brain"})


def test_mr_percentile_clip_then_zscore_within_the_foreground(tmp_path):
    rng = np.random.default_rng(0)
    vol = np.zeros((20, 20, 20), np.float32)
    vol[4:16, 4:16, 4:16] = rng.gamma(4.0, 50.0, (12, 12, 12)) + 1
    vol[10, 10, 10] = 1e5  # one hot outlier voxel
    path = write_nifti(tmp_path / "t1.nii.gz", vol)
    out = read_media(path, volume(frames_per_clip=20, intensity={"modality": "mr"}), sample_id="s")[0, :, 0]
    fg = np.moveaxis(vol, 2, 0) > 0
    assert np.all(out[~fg] == 0)  # background stays 0
    assert out[fg].mean() == pytest.approx(0.0, abs=1e-5) and out[fg].std() == pytest.approx(1.0, abs=1e-3)
    lo, hi = np.percentile(vol[vol > 0], [0.5, 99.5])
    clipped = np.clip(vol[vol > 0], lo, hi)
    assert out.max() == pytest.approx((hi - clipped.mean()) / clipped.std(), rel=1e-4)  # the outlier clipped
    unit = read_media(path, volume(frames_per_clip=20, intensity={"modality": "mr", "scale": "unit"}), sample_id="s")
    assert unit.min() == 0.0 and unit.max() == 1.0
    with pytest.raises(ValueError, match="window and range are CT settings"):
        volume(intensity={"modality": "mr", "window": "brain"})


def test_foreground_crop_keeps_the_bounding_box_of_voxels_above_the_window(tmp_path):
    vol = np.full((30, 30, 30), -1000.0, np.float32)
    vol[5:12, 8:20, 3:9] = 50.0
    path = write_nifti(tmp_path / "v.nii", vol)
    cfg = volume(frames_per_clip=6, crop_foreground=True, intensity={"modality": "ct", "window": "abdomen"})
    out = read_media(path, cfg, sample_id="s")
    assert out.shape == (1, 6, 1, 7, 12) and np.all(out > 0)
    with pytest.raises(ReaderError, match="no voxel is above -160.0"):
        read_media(write_nifti(tmp_path / "air.nii", np.full((4, 4, 4), -1000.0, np.float32)), cfg, sample_id="s")


def test_spacing_needs_a_volume_that_knows_its_voxel_size(tmp_path):
    np.save(tmp_path / "v.npy", np.zeros((4, 4, 4), np.float32))
    with pytest.raises(ReaderError, match="data.spacing needs the voxel size"):
        read_media(str(tmp_path / "v.npy"), volume(spacing=[1, 1, 1]), sample_id="s")
    with pytest.raises(ValueError, match="apply to volumes"):
        DataConfig(manifest="m.csv", spacing=[1, 1, 1])


def write_ct_series(folder: Path, n: int, *, z_step: float = 2.5, spacing: float = 0.5) -> list[Path]:
    """CT_small's real pixels, one file per slice in shuffled order, with per-slice RescaleSlope/Intercept."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    base = pydicom.dcmread(CT_SMALL)
    paths = []
    for i, name in enumerate(rng.permutation(n)):
        ds = pydicom.dcmread(CT_SMALL)
        ds.PixelData = (base.pixel_array.astype(np.int16) // (i + 1)).tobytes()
        ds.RescaleSlope, ds.RescaleIntercept = [1, 2, 0.5][i % 3], [-1024, -1000, -1100][i % 3]
        ds.ImagePositionPatient = [10.0, -5.0, z_step * i]
        ds.PixelSpacing = [spacing, spacing]
        ds.InstanceNumber = n - i
        ds.save_as(folder / f"x{name:02d}.dcm")
        paths.append(folder / f"x{name:02d}.dcm")
    return paths  # in physical order


def test_ct_series_hu_match_pydicoms_modality_lut_in_physical_order(tmp_path):
    paths = write_ct_series(tmp_path / "ct", 5)
    stack, affine = read_dicom_series(Source.from_url(str(tmp_path / "ct"), "s"))
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        np.testing.assert_array_equal(stack[:, :, k], apply_modality_lut(ds.pixel_array, ds).astype(np.float32))
    out = read_media(str(tmp_path / "ct"), volume(frames_per_clip=5), sample_id="s")[0, :, 0]  # RAS+, axial slices
    ras, _ = to_ras(stack, affine)
    np.testing.assert_array_equal(out, np.moveaxis(ras, 2, 0))


@pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")  # MONAI's optional GPU decoder is absent
def test_series_geometry_from_the_headers_matches_monais_dicom_reader(tmp_path):
    from monai.transforms import LoadImage, Orientation

    write_ct_series(tmp_path / "ct", 4)
    stack, affine = read_dicom_series(Source.from_url(str(tmp_path / "ct"), "s"))
    ours, ours_affine = to_ras(stack, affine)
    theirs = Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(
        LoadImage(reader="PydicomReader", image_only=True, ensure_channel_first=True)(str(tmp_path / "ct")))
    np.testing.assert_allclose(ours, theirs[0].numpy())
    np.testing.assert_allclose(ours_affine, theirs.affine.numpy(), atol=1e-4)
    assert np.allclose(nib.affines.voxel_sizes(ours_affine), [0.5, 0.5, 2.5])
    resampled = read_media(str(tmp_path / "ct"), volume(spacing=[1, 1, 1], frames_per_clip=10), sample_id="s")
    assert resampled.shape == (1, 10, 1, 64, 64)  # 128 x 0.5 mm in-plane, 4 x 2.5 mm slices, at 1 mm


def test_unevenly_spaced_series_cannot_be_resampled(tmp_path):
    paths = write_dicom_series(tmp_path / "ser", 4)
    paths[-1].unlink()
    ds = pydicom.dcmread(paths[0])
    ds.ImagePositionPatient = [0.0, 0.0, 55.0]
    ds.save_as(tmp_path / "ser" / "far.dcm")
    with pytest.raises(ReaderError, match="unevenly spaced.*missing slice"):
        read_media(str(tmp_path / "ser"), volume(spacing=[1, 1, 1]), sample_id="s")
    assert read_media(str(tmp_path / "ser"), volume(frames_per_clip=4), sample_id="s").shape[1] == 4


def test_every_volume_setting_is_in_the_feature_cache_key():
    from fmprobe.backbones.base import InputSpec

    spec = InputSpec(kind="image", image_size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)
    base = {"name": "t", "task": {"type": "binary", "targets": ["y"]}}
    keys = {cache_key(describe(parse_config({**base, "data": {"manifest": "m.csv", "kind": "volume", **extra}}),
                               "enc", "fp", spec))
            for extra in ({}, {"spacing": [1, 1, 1]}, {"spacing": [1, 1, 2]}, {"crop_foreground": True},
                          {"intensity": {"modality": "ct", "window": "brain"}},
                          {"intensity": {"modality": "ct", "window": "bone"}}, {"intensity": {"modality": "mr"}},
                          {"intensity": {"modality": "mr", "percentiles": [1, 99]}})}  # fmt: skip
    assert len(keys) == 8
