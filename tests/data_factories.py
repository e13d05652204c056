"""Small media files for data-layer tests: written with the same libraries users' files come from."""

from __future__ import annotations

import io
from pathlib import Path

import av
import fsspec
import nibabel as nib
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

CT_SMALL = get_testdata_file("CT_small.dcm")
MR_SMALL = get_testdata_file("MR_small.dcm")


def write_image(url: str | Path, array: np.ndarray, fmt: str = "PNG") -> str:
    """Write ``array`` ([H, W], [H, W, 3] or [H, W, 4]; uint8 or uint16) to a local path or fsspec URL."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    with fsspec.open(str(url), "wb") as f:
        f.write(buf.getvalue())
    return str(url)


def frame_value(i: int) -> int:
    """Gray level of frame ``i`` in videos written here: far enough apart to survive lossy coding."""
    return 20 + 15 * i


def write_video(path: str | Path, n_frames: int = 12, size: int = 32, codec: str = "mpeg4") -> str:
    """A tiny video whose frame ``i`` is uniformly gray at ``frame_value(i)``."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            arr = np.full((size, size, 3), frame_value(i), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def write_nifti(path: str | Path, array: np.ndarray, affine: np.ndarray | None = None) -> str:
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return str(path)


def slice_stack(n: int, shape: tuple[int, int] = (8, 8)) -> np.ndarray:
    """Volume ``[H, W, n]`` whose slice ``i`` is filled with ``i`` (so slice order is visible in values)."""
    return np.broadcast_to(np.arange(n, dtype=np.float32), (*shape, n)).copy()


def write_dicom_series(
    folder: Path, n: int = 5, *, positions: bool = True, seed: int = 0, extension: str = ".dcm"
) -> list[Path]:
    """CT_small copies: slice with stored value ``i`` lies at z = 10 * i. Files get shuffled names and
    InstanceNumber runs opposite to position, so only sorting by position gives 0..n-1."""
    folder.mkdir(parents=True, exist_ok=True)
    names = np.random.default_rng(seed).permutation(n)
    paths = []
    for i in range(n):
        ds = pydicom.dcmread(CT_SMALL)
        ds.PixelData = np.full((ds.Rows, ds.Columns), i, dtype=np.int16).tobytes()
        ds.InstanceNumber = n - i if positions else i + 1
        if positions:
            ds.ImagePositionPatient = [0.0, 0.0, 10.0 * i]
        else:
            del ds.ImagePositionPatient
        path = folder / f"img{names[i]:03d}{extension}"
        ds.save_as(path)
        paths.append(path)
    return paths


def write_csv(path: str | Path, header: list[str], rows: list[list[object]], bom: bool = False) -> str:
    text = ",".join(header) + "\n" + "".join(",".join(str(v) for v in r) + "\n" for r in rows)
    with fsspec.open(str(path), "w", encoding="utf-8-sig" if bom else "utf-8") as f:
        f.write(text)
    return str(path)
