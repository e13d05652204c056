"""Volumes made comparable before any slice or slab is taken: RAS+ axes, one voxel size, one intensity scale.

1. Orientation: the closest RAS+ orientation of the file's affine (nibabel: axis flips and permutations, no
   resampling), so axis 0/1/2 are sagittal/coronal/axial for NIfTI and DICOM series alike.
2. Only where the config asks, MONAI on the whole volume (the field's library, imported on first use):
   ``data.spacing`` resamples to that voxel size in mm (``Spacing``, trilinear, the field of view kept: two scans of
   one object at 0.8 and 1.5 mm come out the same shape); ``data.crop_foreground`` crops to the bounding box of the
   foreground (``CropForeground``; foreground = voxels above the CT window's lower bound, else above 0);
   ``data.intensity`` maps intensities (see ``IntensityConfig``: CT ``ScaleIntensityRange`` over a HU window, MR
   percentile clip within the foreground then ``NormalizeIntensity(nonzero=True)`` or ``ScaleIntensityRange``).
"""

from __future__ import annotations

from typing import Any

import nibabel as nib
import numpy as np
import torch

from fmprobe.config import DataConfig, IntensityConfig
from fmprobe.data.readers.source import Source


def to_ras(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``volume`` and ``affine`` in the closest RAS+ orientation."""
    image = nib.as_closest_canonical(nib.Nifti1Image(volume, affine))
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def prepare_volume(volume: np.ndarray, affine: np.ndarray | None, data: DataConfig, src: Source) -> np.ndarray:
    """A float32 volume ``[x, y, z]`` oriented, then resampled / cropped / intensity-mapped as ``data`` says.

    ``affine`` (voxel -> mm, RAS+ world) is None for files without one (.npy): such a volume is taken as stored,
    and ``data.spacing`` cannot apply to it.
    """
    if affine is not None:
        volume, affine = to_ras(volume, affine)
    if data.spacing is None and not data.crop_foreground and data.intensity is None:
        return volume
    if affine is None and data.spacing is not None:
        raise src.error("data.spacing needs the voxel size, which this volume does not carry (a .npy/.npz, or a DICOM "
                        "series without ImagePositionPatient / ImageOrientationPatient / PixelSpacing); give NIfTI or "
                        "a complete DICOM series, or remove data.spacing")
    image = _meta_tensor(volume, affine)
    if data.spacing is not None:
        from monai.transforms import Spacing

        image = Spacing(pixdim=data.spacing, mode="bilinear", padding_mode="border", scale_extent=True)(image)
    if data.crop_foreground:
        from monai.transforms import CropForeground

        ct = data.intensity is not None and data.intensity.modality == "ct"
        threshold = data.intensity.hu_range()[0] if ct and data.intensity is not None else 0.0
        cropped = CropForeground(select_fn=lambda x: x > threshold, allow_smaller=True)(image)
        if min(cropped.shape[1:]) == 0:
            raise src.error(f"data.crop_foreground: no voxel is above {threshold} (the foreground); check the "
                            "modality and data.intensity, or remove crop_foreground")
        image = cropped
    if data.intensity is not None:
        image = _intensity(image, data.intensity, src)
    return np.ascontiguousarray(_plain(image)[0], dtype=np.float32)


def _meta_tensor(volume: np.ndarray, affine: np.ndarray | None) -> Any:
    from monai.data import MetaTensor

    channel_first = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None]
    if affine is None:
        return MetaTensor(channel_first)
    return MetaTensor(channel_first, affine=torch.as_tensor(affine, dtype=torch.float64))


def _intensity(image: Any, cfg: IntensityConfig, src: Source) -> Any:
    from monai.transforms import NormalizeIntensity, ScaleIntensityRange

    if cfg.modality == "ct":
        lo, hi = cfg.hu_range()
        return ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(image)
    assert cfg.percentiles is not None  # IntensityConfig fills the MR defaults
    values = _plain(image)
    foreground = values > 0
    if not foreground.any():
        raise src.error("MR intensity: no voxel is above 0, so there is no foreground to take percentiles of; "
                        "check the file (a CT? use modality: ct)")
    lo, hi = (float(v) for v in np.percentile(values[foreground], cfg.percentiles))
    if cfg.scale == "unit":
        return ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(image)
    # foreground voxels are > 0, so lo > 0 and the clipped foreground stays the nonzero voxels NormalizeIntensity uses
    clipped = np.where(foreground, np.clip(values, lo, hi), 0.0).astype(np.float32)
    return NormalizeIntensity(nonzero=True)(clipped)


def _plain(image: Any) -> np.ndarray:
    """A MONAI MetaTensor, tensor or array as a plain numpy array."""
    from monai.utils import convert_to_numpy

    return convert_to_numpy(image)
