"""3D volumes (NIfTI, .npy/.npz, DICOM series) read as a stack of 2D slices.

Loaders return the voxels with their affine (voxel -> mm); ``volume_pipeline.prepare_volume`` brings NIfTI volumes
and DICOM series to the closest RAS+ orientation (then resamples, crops and maps intensities where the config
asks), so ``slice_axis`` means the same for every file: 0 = sagittal, 1 = coronal, 2 = axial. .npy/.npz arrays
have no affine and are taken as stored. The slices along ``data.slice_axis`` become the frames T, and clips (slabs)
are sampled over them exactly like video frames.
"""

from __future__ import annotations

import gzip
import io

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from fmprobe.config import DataConfig
from fmprobe.data.readers.clips import clip_indices
from fmprobe.data.readers.source import Source

NPZ_KEYS = ("volume", "image", "arr_0")


def _as_3d(vol: np.ndarray, src: Source) -> np.ndarray:
    """3D as is; 4D with a single volume (last dim 1) squeezed; anything else refused."""
    if vol.ndim == 4 and vol.shape[-1] == 1:
        vol = vol[..., 0]
    if vol.ndim != 3:
        raise src.error(f"expected a 3D volume (or 4D with last dim 1), got shape {tuple(vol.shape)}")
    return vol


def load_nifti(src: Source) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI-1 or -2 (.nii or .nii.gz): float32 voxels (scl_slope/scl_inter applied) as stored, and the affine."""
    raw = src.read_bytes()
    try:
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        header_size = {int.from_bytes(raw[:4], order) for order in ("little", "big")}
        if 348 in header_size:
            img = nib.Nifti1Image.from_bytes(raw)
        elif 540 in header_size:
            img = nib.Nifti2Image.from_bytes(raw)
        else:
            raise src.error("not a NIfTI file (header size is neither 348 nor 540)")
        vol = img.get_fdata(dtype=np.float32)
    except (OSError, EOFError, ValueError, HeaderDataError, ImageFileError) as err:
        raise src.error(f"cannot read NIfTI (corrupt or truncated?): {err}") from None
    return _as_3d(vol, src), img.affine


def load_numpy(src: Source) -> np.ndarray:
    """.npy, or .npz holding one array or one under 'volume', 'image' or 'arr_0'; as float32."""
    raw = src.read_bytes()
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            keys = list(loaded.keys())
            key = keys[0] if len(keys) == 1 else next((k for k in NPZ_KEYS if k in keys), None)
            if key is None:
                raise src.error(f".npz holds arrays {keys}; keep one, or name it one of {list(NPZ_KEYS)}")
            loaded = loaded[key]
    except (OSError, EOFError, ValueError) as err:
        raise src.error(f"cannot read numpy file (corrupt or truncated?): {err}") from None
    if not (np.issubdtype(loaded.dtype, np.number) or loaded.dtype == np.bool_):
        raise src.error(f"array dtype {loaded.dtype} is not numeric")
    return _as_3d(loaded, src).astype(np.float32)


def volume_clips(
    vol: np.ndarray, data: DataConfig, rng: np.random.Generator | None, src: Source, start: int | None = None
) -> np.ndarray:
    """``[K, T, 1, H, W]``: clips of slices along ``data.slice_axis``; ``start``: the row's first slice."""
    slices = np.moveaxis(_as_3d(vol, src), data.slice_axis, 0)
    idx = clip_indices(slices.shape[0], data, rng, start)
    return np.ascontiguousarray(slices[idx][:, :, None])
