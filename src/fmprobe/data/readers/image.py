"""2D images (PNG, JPEG, TIFF, BMP) via Pillow, in native intensity.

8-bit images stay uint8; 16-bit and 32-bit ones (common for X-ray PNG/TIFF) become float32 with
their values kept, so the transform windows or min-max scales them like DICOM.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

from fmprobe.data.readers.source import Source

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")

_GRAY = {"1", "L", "LA", "La"}
_HIGH_DEPTH = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


def decode_image(src: Source) -> np.ndarray:
    """``[H, W, C]`` with C = 1 (grayscale) or 3 (colour); alpha dropped, EXIF rotation applied."""
    data = src.read_bytes()
    try:
        img = Image.open(io.BytesIO(data))
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
