"""Read one sample's media as ``[K, T, C, H, W]`` in native dtype and intensity (see CONTRACTS).

``read_media`` picks the reader from ``data.kind`` and the file extension; a folder is a frame
folder (video) or a DICOM series (volume). Anything it cannot read raises ReaderError naming the
sample id and the file.
"""

from __future__ import annotations

import numpy as np

from fmprobe.config import DataConfig
from fmprobe.data.readers.dicom import read_dicom_image, read_dicom_series
from fmprobe.data.readers.image import IMAGE_EXTENSIONS, read_image
from fmprobe.data.readers.source import Source, extension
from fmprobe.data.readers.video import VIDEO_EXTENSIONS, read_dicom_video, read_frame_folder, read_video
from fmprobe.data.readers.volume import load_nifti, load_numpy, volume_clips

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
    url: str, data: DataConfig, *, sample_id: str, rng: np.random.Generator | None = None
) -> np.ndarray:
    """The sample at ``url`` (local path or fsspec URL) as ``[K, T, C, H, W]``.

    ``rng`` drives ``clip_position: random`` and is needed only then.
    """
    src = Source.from_url(url, sample_id)
    ext = extension(src.path)
    if data.kind == "image":
        if ext in IMAGE_EXTENSIONS:
            return read_image(src)
        if ext == ".dcm":
            return read_dicom_image(src)
    elif data.kind == "video":
        if ext in VIDEO_EXTENSIONS:
            return read_video(src, data, rng)
        if ext == ".dcm":
            return read_dicom_video(src, data, rng)
        if src.is_dir():
            return read_frame_folder(src, data, rng)
    else:
        if ext in NIFTI_EXTENSIONS:
            return volume_clips(load_nifti(src), data, rng, src)
        if ext in NUMPY_EXTENSIONS:
            return volume_clips(load_numpy(src), data, rng, src)
        if src.is_dir():
            return volume_clips(read_dicom_series(src), data, rng, src)
    raise _unsupported(src, ext, data.kind)


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
