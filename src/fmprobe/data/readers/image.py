"""2D images (PNG, JPEG, TIFF, BMP) via Pillow, in native intensity.

8-bit images stay uint8; 16-bit and 32-bit ones (common for X-ray PNG/TIFF) become float32 with
their values kept, so the transform windows or min-max scales them like DICOM.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fmprobe.data.readers.source import Source, extension

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_GRAY = {"1", "L", "LA", "La"}
_HIGH_DEPTH = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def open_image(src: Source, data: bytes) -> Image.Image:
    """The image in ``data`` (the bytes of ``src``), opened lazily by Pillow; a file that holds no image is a
    ReaderError that says what it holds instead and what to do."""
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise src.error(_not_an_image(data, extension(src.path))) from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise src.error(f"cannot decode image (corrupt or truncated?): {err}") from None


def _not_an_image(data: bytes, ext: str) -> str:
    named = f"the file is named '{ext}' but" if ext else "the file"
    if data.startswith(b"version https://git-lfs"):
        return (f"{named} holds a Git LFS pointer, not the image: fetch the real files (git lfs pull) or point "
                "the manifest at them")
    return (f"{named} holds no image (it starts with {data[:16]!r}); replace it with the real image, or remove its "
            "row from the manifest (data.on_error: skip skips such files)")


def decode_image(src: Source) -> np.ndarray:
    """``[H, W, C]`` with C = 1 (grayscale) or 3 (colour); alpha dropped, EXIF rotation applied."""
    data = src.read_bytes()
    img = open_image(src, data)
    try:
        n_frames = getattr(img, "n_frames", 1)
        if n_frames > 1:
            raise src.error(f"image has {n_frames} frames; give single-frame images (or use data.kind: video)")
        img = ImageOps.exif_transpose(img)
        img.load()
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise src.error(f"cannot decode image (corrupt or truncated?): {err}") from None
    if img.mode in _HIGH_DEPTH:
        return np.array(img, dtype=np.float32)[:, :, None]
    if img.mode in _GRAY:
        return np.array(img.convert("L"))[:, :, None]
    return np.array(img.convert("RGB"))


def read_image(src: Source) -> np.ndarray:
    """``[1, 1, C, H, W]``: one clip of one frame."""
    return decode_image(src).transpose(2, 0, 1)[None, None]
