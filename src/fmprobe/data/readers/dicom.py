"""DICOM through pydicom: single images, multi-frame cine files and slice series (a folder).

Monochrome pixels go through the modality LUT (RescaleSlope/RescaleIntercept, or a Modality LUT
Sequence) and come out float32 in real units (HU for CT); colour pixels stay uint8.
"""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from fmprobe.data.readers.source import Source, extension

_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def read_dataset(src: Source) -> Dataset:
    raw = src.read_bytes()
    try:
        return pydicom.dcmread(io.BytesIO(raw))
    except Exception as err:  # pydicom raises many types for a bad file; all mean "not readable"
        raise src.error(f"not a readable DICOM file: {err}") from None


def _functional_group_rescale(ds: Dataset) -> bool:
    for name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for item in ds.get(name) or []:
            if "PixelValueTransformationSequence" in item:
                return True
    return False


def dicom_frames(ds: Dataset, src: Source) -> np.ndarray:
    """``[F, H, W, C]``: float32 after the modality LUT for monochrome, uint8 kept for 8-bit colour."""
    if not any(tag in ds for tag in _PIXEL_TAGS):
        raise src.error("DICOM file has no pixel data (a report, DICOMDIR or header-only file?)")
    if "RescaleSlope" not in ds and _functional_group_rescale(ds):
        raise src.error(
            "enhanced multi-frame DICOM with per-frame rescale (functional groups) is not supported; "
            "convert it to single-frame files or NIfTI"
        )
    try:
        arr = ds.pixel_array
    except Exception as err:  # decoder errors vary by transfer syntax and installed handlers
        raise src.error(f"cannot decode DICOM pixel data: {err}") from None
    n_frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    if n_frames == 1:
        arr = arr[None]
    if samples == 1:
        return apply_modality_lut(arr, ds).astype(np.float32)[..., None]
    return arr if arr.dtype == np.uint8 else arr.astype(np.float32)


def read_dicom_image(src: Source) -> np.ndarray:
    """A single-frame DICOM as ``[1, 1, C, H, W]``."""
    frames = dicom_frames(read_dataset(src), src)
    if frames.shape[0] != 1:
        raise src.error(f"DICOM has {frames.shape[0]} frames; set data.kind: video to read it as a clip")
    return frames.transpose(0, 3, 1, 2)[None]


def _slice_order(datasets: list[Dataset], files: list[Source], folder: Source) -> list[float]:
    """Position of each slice along the stack: ImagePositionPatient projected on the slice normal,
    or InstanceNumber when any slice lacks position/orientation."""
    if all("ImagePositionPatient" in ds and "ImageOrientationPatient" in ds for ds in datasets):
        orient = np.array([[float(v) for v in ds.ImageOrientationPatient] for ds in datasets])
        if not np.allclose(orient, orient[0], atol=1e-4):
            raise folder.error("DICOM slices in the folder have different orientations; one series per folder")
        normal = np.cross(orient[0, :3], orient[0, 3:])
        return [float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in datasets]
    missing = [f.name for f, ds in zip(files, datasets) if "InstanceNumber" not in ds]
    if missing:
        raise folder.error(
            "cannot order DICOM slices: no ImagePositionPatient/ImageOrientationPatient on every file and "
            f"no InstanceNumber on {', '.join(missing[:10])}"
        )
    return [float(ds.InstanceNumber) for ds in datasets]


def series_affine(datasets: list[Dataset], positions: list[float], folder: Source, exact: bool) -> np.ndarray | None:
    """Voxel -> RAS+ mm affine of a volume ``[rows, columns, slices]`` built from ``datasets`` in slice order.

    Columns of the LPS affine: the column direction cosine x row spacing (down the rows), the row direction cosine
    x column spacing (along a row), the step between consecutive ImagePositionPatient, the first slice's position;
    DICOM's LPS becomes RAS by negating x and y. None when a slice lacks position, orientation or PixelSpacing.
    Uneven slice steps (a missing slice?) are an error when ``exact`` (the voxel size will be used), else the mean
    step stands in (the orientation only needs directions).
    """
    needed = ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
    if not all(tag in ds for ds in datasets for tag in needed):
        return None
    first = datasets[0]
    orient = np.array([float(v) for v in first.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    origin = np.array([float(v) for v in first.ImagePositionPatient])
    normal = np.cross(orient[:3], orient[3:])
    if len(datasets) > 1:
        steps = np.diff(positions)
        if exact and np.ptp(steps) > 0.01 * abs(float(np.mean(steps))):
            raise folder.error(f"DICOM slices are unevenly spaced (steps {np.round(steps, 3).tolist()} mm; a missing "
                               "slice?), so data.spacing cannot resample them; fix the series or remove data.spacing")
        last = np.array([float(v) for v in datasets[-1].ImagePositionPatient])
        step = (last - origin) / (len(datasets) - 1)
    else:
        step = normal * float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    lps = np.eye(4)
    lps[:3, 0] = orient[3:] * row_spacing
    lps[:3, 1] = orient[:3] * column_spacing
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def read_dicom_series(folder: Source, exact_geometry: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """A folder of single-frame slices (``.dcm`` or extensionless) as a float32 volume ``[H, W, S]``, slices in
    spatial order whatever their file names, and its affine (see :func:`series_affine`; ``exact_geometry``: the
    voxel size will be used, so uneven slice steps are an error)."""
    files = [f for f in folder.list_files() if extension(f.path) in (".dcm", "") and f.name.upper() != "DICOMDIR"]
    if not files:
        raise folder.error("folder has no DICOM files (.dcm or no extension)")
    datasets = [read_dataset(f) for f in files]
    series = Counter(str(ds.get("SeriesInstanceUID", "")) for ds in datasets)
    if len(series) > 1:
        raise folder.error(f"folder mixes {len(series)} DICOM series ({', '.join(series)}); one series per folder")
    order = _slice_order(datasets, files, folder)
    dupes = [k for k, n in Counter(np.round(order, 4)).items() if n > 1]
    if dupes:
        same = [f.name for f, o in zip(files, order) if np.round(o, 4) == dupes[0]]
        raise folder.error(f"DICOM slices share one position ({', '.join(same)}); one series per folder")
    slices = []
    ranked = np.argsort(order, kind="stable")
    for i in ranked:
        frames = dicom_frames(datasets[i], files[i])
        if frames.shape[0] != 1 or frames.shape[3] != 1:
            raise files[i].error("a DICOM series slice must be one monochrome frame")
        if slices and frames.shape[1:3] != slices[0].shape:
            raise files[i].error(f"slice is {frames.shape[1:3]}, other slices are {slices[0].shape}")
        slices.append(frames[0, :, :, 0])
    affine = series_affine([datasets[i] for i in ranked], sorted(order), folder, exact_geometry)
    return np.stack(slices, axis=-1), affine
