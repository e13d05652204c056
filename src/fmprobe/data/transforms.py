"""Turn a reader's ``[K, T, C, H, W]`` array into the encoder's input ``[K, T, 3, H', W']``.

One path for every modality: intensities to [0, 1] (uint8 / 255; other dtypes through the CT/MR
window when one is set, else a per-sample robust min-max), grayscale to 3 channels, resize of the
shorter side then a crop to ``spec.image_size``, and the encoder's mean/std. The same crop and flip
apply to every frame of a sample, so clips stay temporally consistent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmprobe.backbones.base import InputSpec
from fmprobe.config import DataConfig
from fmprobe.errors import ReaderError

TRAIN_SCALE = 1.14  # train: resize to 1.14x the target, then a random crop (as in common ImageNet recipes)
ROBUST_PERCENTILES = (0.5, 99.5)


class Preprocess:
    """``Preprocess(spec, data_cfg, train)(array, generator=None) -> FloatTensor [K, T, 3, H', W']``.

    With ``train=False`` the output depends on the input only. With ``train=True`` a random crop
    and a horizontal flip are drawn from ``generator`` (torch's global RNG when None).
    """

    def __init__(self, spec: InputSpec, data_cfg: DataConfig, train: bool = False):
        self.spec = spec
        self.window = data_cfg.window
        self.train = train
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(
        self, array: np.ndarray, generator: torch.Generator | None = None, geometry: Geometry | None = None
    ) -> torch.Tensor:
        """``geometry`` (from :meth:`geometry`) replaces the draw, so a label mask can share the crop and flip."""
        if array.ndim != 5 or array.shape[2] not in (1, 3):
            raise ReaderError(f"expected media shaped [K, T, C, H, W] with C = 1 or 3, got {array.shape}")
        k, t = array.shape[:2]
        x = self.to_unit(array).reshape(k * t, *array.shape[2:])
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (geometry or self.geometry(x.shape[-2:], generator)).apply(x)
        x = (x - self.mean) / self.std
        return x.reshape(k, t, 3, *x.shape[-2:]).contiguous()

    def to_unit(self, array: np.ndarray) -> torch.Tensor:
        """Intensities to [0, 1]. A constant sample (no contrast at all) maps to 0."""
        if array.dtype == np.uint8:
            if self.window is not None:  # 8-bit pixels are display values: a HU/MR window cannot apply
                raise ReaderError(
                    "data.window applies to raw intensities (DICOM, NIfTI, .npy), but this file holds 8-bit "
                    "display values; remove data.window or give the raw scans"
                )
            return torch.from_numpy(array.astype(np.float32)).div_(255.0)
        x = torch.from_numpy(np.array(array, dtype=np.float32))
        if not torch.isfinite(x).all():
            raise ReaderError("media holds NaN or infinite values")
        if self.window is not None:
            lo = self.window.center - self.window.width / 2
            hi = self.window.center + self.window.width / 2
        else:
            lo, hi = np.percentile(array, ROBUST_PERCENTILES)
        if hi <= lo:
            return torch.zeros_like(x)
        return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)

    def geometry(self, size: tuple[int, int] | torch.Size, generator: torch.Generator | None = None) -> Geometry:
        """Scale so the image covers the target (x1.14 when training), then crop to the target: the crop (and a
        horizontal flip) drawn from ``generator`` when training, centred otherwise."""
        th, tw = self.spec.image_size
        h, w = int(size[0]), int(size[1])
        scale = max(th / h, tw / w) * (TRAIN_SCALE if self.train else 1.0)
        nh, nw = max(th, math.ceil(h * scale - 1e-6)), max(tw, math.ceil(w * scale - 1e-6))
        if not self.train:
            return Geometry((h, w), (nh, nw), ((nh - th) // 2, (nw - tw) // 2), (th, tw), False)
        top = int(torch.randint(0, nh - th + 1, (1,), generator=generator))
        left = int(torch.randint(0, nw - tw + 1, (1,), generator=generator))
        flip = bool(torch.rand(1, generator=generator) < 0.5)
        return Geometry((h, w), (nh, nw), (top, left), (th, tw), flip)


@dataclass(frozen=True)
class Geometry:
    """Resize ``source`` -> ``resized``, crop ``size`` at ``offset`` (top, left), then an optional horizontal flip."""

    source: tuple[int, int]
    resized: tuple[int, int]
    offset: tuple[int, int]
    size: tuple[int, int]
    flip: bool

    def apply(self, x: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
        """``x [N, C, H, W]``; ``mode`` nearest-exact for label masks (pixel centres, as bilinear samples them)."""
        if tuple(x.shape[-2:]) != self.source:
            raise ValueError(f"geometry drawn for {self.source}, applied to {tuple(x.shape[-2:])}")
        if self.resized != self.source:
            smooth = {"antialias": True, "align_corners": False} if mode == "bilinear" else {}
            x = F.interpolate(x, size=self.resized, mode=mode, **smooth)
        (top, left), (th, tw) = self.offset, self.size
        x = x[..., top : top + th, left : left + tw]
        return x.flip(-1) if self.flip else x
