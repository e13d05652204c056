"""Read one sample's media as ``[K, T, C, H, W]`` in native dtype and intensity (see CONTRACTS); volumes after
``volume_pipeline`` (RAS+, and the spacing, foreground crop and intensity mapping the config asks for).

``read_media`` picks the reader from ``data.kind`` and the file extension; a folder is a frame
folder (video) or a DICOM series (volume). Anything it cannot read raises ReaderError naming the
sample id and the file.
"""

from __future__ import annotations

import numpy as np

from fmprobe.config import DataConfig
from fmprobe.data.readers.clips import ClipWindowError
from fmprobe.data.readers.dicom import read_dicom_image, read_dicom_series
from fmprobe.data.readers.image import IMAGE_EXTENSIONS, read_image
from fmprobe.data.readers.source import Source, extension
from fmprobe.data.readers.video import VIDEO_EXTENSIONS, read_dicom_video, read_frame_folder, read_video
from fmprobe.data.readers.volume import load_nifti, load_numpy, volume_clips
from fmprobe.data.volume_pipeline import prepare_volume

NIFTI_EXTENSIONS = (".nii", ".nii.gz")
NUMPY_EXTENSIONS = (".npy", ".npz")

SUPPORTED: dict[str, str] = {
    "image": f"{', '.join(IMAGE_EXTENSIONS)}, .dcm (single frame)",
    "video": f"{', '.join(VIDEO_EXTENSIONS)}, .dcm (multi-frame), a folder of frame images",
    "volume": f"{', '.join(NIFTI_EXTENSIONS + NUMPY_EXTENSIONS)}, a folder of DICOM slices",
}
_KIND_OF_EXTENSION = {
    **{e: "image" for e in IMAGE_EXTENSIONS},
    **{e: "video" for e in VIDEO_EXTENSIONS},
    **{e: "volume" for e in NIFTI_EXTENSIONS + NUMPY_EXTENSIONS},
}


def read_media(
    url: str,
    data: DataConfig,
    *,
    sample_id: str,
    rng: np.random.Generator | None = None,
    clip_start: int | None = None,
) -> np.ndarray:
    """The sample at ``url`` (local path or fsspec URL) as ``[K, T, C, H, W]``.

    ``rng`` drives ``clip_position: random`` and is needed only then. ``clip_start`` is the row's value of
    ``data.clip_start_column``: the first frame (slice for volumes) of its one clip.
    """
    src = Source.from_url(url, sample_id)
    if clip_start is not None and data.kind == "image":
        raise src.error("a clip start applies to videos and volumes, but data.kind is image")
    try:
        return _read(src, data, rng, clip_start)
    except ClipWindowError as err:
        raise src.error(_window_reason(err, data)) from None


def _read(src: Source, data: DataConfig, rng: np.random.Generator | None, start: int | None) -> np.ndarray:
    ext = extension(src.path)
    if data.kind == "image":
        if ext in IMAGE_EXTENSIONS:
            return read_image(src)
        if ext == ".dcm":
            return read_dicom_image(src)
    elif data.kind == "video":
        if ext in VIDEO_EXTENSIONS:
            return read_video(src, data, rng, start)
        if ext == ".dcm":
            return read_dicom_video(src, data, rng, start)
        if src.is_dir():
            return read_frame_folder(src, data, rng, start)
    else:
        affine: np.ndarray | None
        if ext in NIFTI_EXTENSIONS:
            volume, affine = load_nifti(src)
        elif ext in NUMPY_EXTENSIONS:
            volume, affine = load_numpy(src), None
        elif src.is_dir():
            volume, affine = read_dicom_series(src, exact_geometry=data.spacing is not None)
        else:
            raise _unsupported(src, ext, data.kind)
        return volume_clips(prepare_volume(volume, affine, data, src), data, rng, src, start)
    raise _unsupported(src, ext, data.kind)


def _window_reason(err: ClipWindowError, data: DataConfig) -> str:
    unit, what = ("frames", "video") if data.kind == "video" else ("slices", f"volume (slice_axis {data.slice_axis})")
    where = "is beyond the end" if err.start >= err.n_frames else "runs past the end"
    return (f"clip start {err.start}: the window of {unit} {err.start}..{err.last} (frames_per_clip "
            f"{data.frames_per_clip}, frame_step {data.frame_step}) {where}; the {what} has {err.n_frames} {unit} "
            f"(0..{err.n_frames - 1}). Fix the row's clip start: a window is never shifted or padded")


def _unsupported(src: Source, ext: str, kind: str) -> Exception:
    if not src.fs.exists(src.path):
        return src.error("file not found")
    hint = ""
    other = _KIND_OF_EXTENSION.get(ext)
    if other and other != kind:
        hint = f"; '{ext}' is read with data.kind: {other}"
    what = "a folder" if src.is_dir() else f"extension '{ext or '(none)'}'"
    return src.error(f"cannot read {what} with data.kind: {kind}; supported: {SUPPORTED[kind]}{hint}")


__all__ = ["read_media", "SUPPORTED"]
