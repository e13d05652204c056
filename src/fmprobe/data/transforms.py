"""Turn a reader's ``[K, T, C, H, W]`` array into the encoder's input: ``[K, T, 3, H', W']`` for image and video
encoders, ``[K, 1, x, y, z]`` for native 3D (volume) encoders.

One path for every modality: intensities to [0, 1] (uint8 / 255; volumes mapped by ``data.intensity`` pass as
they are; other dtypes through the CT/MR window when one is set, else a per-sample robust min-max), grayscale to
3 channels, resize of the shorter side then a crop to ``spec.image_size``, and the encoder's mean/std. A 3D encoder
keeps the voxel size: its slab is padded (zeros) or cropped in-plane, never resized, and its axes go back to RAS+
order. Training draws what ``data.augment`` says (a crop after a ``crop_scale`` resize, a horizontal flip); the same
crop and flip apply to every frame of a sample, so clips stay temporally consistent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmprobe.backbones.base import InputSpec
from fmprobe.config import DataConfig
from fmprobe.errors import ConfigError, ReaderError

ROBUST_PERCENTILES = (0.5, 99.5)


class Preprocess:
    """``Preprocess(spec, data_cfg, train)(array, generator=None) -> FloatTensor [K, T, 3, H', W']`` (a volume
    encoder: ``[K, 1, x, y, z]``).

    With ``train=False`` the output depends on the input only. With ``train=True`` the crop and flip of
    ``data.augment`` are drawn from ``generator`` (torch's global RNG when None).
    """

    def __init__(self, spec: InputSpec, data_cfg: DataConfig, train: bool = False):
        self.spec = spec
        self.window = data_cfg.window
        self.intensity = data_cfg.intensity
        self.slice_axis = data_cfg.slice_axis
        self.train = train
        self.crop_scale = float(data_cfg.augment.crop_scale or 1.0)
        self.hflip = bool(data_cfg.augment.hflip)
        channels = len(spec.mean)
        self.mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, channels, 1, 1)
        self.std = torch.tensor(spec.std, dtype=torch.float32).view(1, channels, 1, 1)
        zscored = self.intensity is not None and self.intensity.scale == "zscore"
        if zscored and spec.kind != "volume":
            raise ConfigError(
                "data.intensity.scale: zscore gives MR intensities in foreground standard deviations, but this "
                f"{spec.kind} encoder takes [0, 1] images normalised with its own mean/std; set data.intensity.scale: "
                "unit"
            )
        if spec.kind == "volume":
            _check_volume_data(data_cfg)

    def __call__(
        self, array: np.ndarray, generator: torch.Generator | None = None, geometry: Geometry | None = None
    ) -> torch.Tensor:
        """``geometry`` (from :meth:`geometry`) replaces the draw, so a label mask can share the crop and flip."""
        if array.ndim != 5 or array.shape[2] not in (1, 3):
            raise ReaderError(f"expected media shaped [K, T, C, H, W] with C = 1 or 3, got {array.shape}")
        if self.spec.kind == "volume":
            return self._volume(array, generator)
        k, t = array.shape[:2]
        x = self.to_unit(array).reshape(k * t, *array.shape[2:])
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (geometry or self.geometry(x.shape[-2:], generator)).apply(x)
        x = (x - self.mean) / self.std
        return x.reshape(k, t, 3, *x.shape[-2:]).contiguous()

    def _volume(self, array: np.ndarray, generator: torch.Generator | None) -> torch.Tensor:
        """Slabs ``[K, T, 1, H, W]`` (T along the slice axis) -> ``[K, 1, x, y, z]`` of the encoder's size."""
        assert self.spec.volume_size is not None
        if array.shape[2] != 1:
            raise ReaderError(f"a 3D encoder takes one-channel volumes, got {array.shape[2]} channels")
        k, t = array.shape[:2]
        axis = self.slice_axis
        depth = self.spec.volume_size[axis]
        if t != depth:
            raise ConfigError(
                f"{self.spec.volume_size} voxels go into the 3D encoder, {depth} along data.slice_axis {axis}, but the "
                f"slab has {t} slices; set data.frames_per_clip: {depth}"
            )
        x = self.to_unit(array)[:, :, 0]  # [K, T, H, W]
        plane = tuple(s for i, s in enumerate(self.spec.volume_size) if i != axis)
        x = F.pad(x, _centred_padding(tuple(x.shape[-2:]), plane))
        x = self.geometry(x.shape[-2:], generator, resize=False, size_out=plane).apply(x)
        return x.movedim(1, 1 + axis)[:, None].contiguous()

    def to_unit(self, array: np.ndarray) -> torch.Tensor:
        """Intensities to [0, 1] (volumes mapped by ``data.intensity`` keep their values). A constant sample (no
        contrast at all) maps to 0."""
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
        if self.intensity is not None:
            return x
        if self.window is not None:
            lo = self.window.center - self.window.width / 2
            hi = self.window.center + self.window.width / 2
        else:
            lo, hi = np.percentile(array, ROBUST_PERCENTILES)
        if hi <= lo:
            return torch.zeros_like(x)
        return ((x - lo) / (hi - lo)).clamp_(0.0, 1.0)

    def geometry(
        self, size: tuple[int, int] | torch.Size, generator: torch.Generator | None = None, *, resize: bool = True,
        size_out: tuple[int, int] | None = None,
    ) -> Geometry:  # fmt: skip
        """Scale so the image covers the target (x ``augment.crop_scale`` when training; not at all without
        ``resize``), then crop to the target: the crop (and, with ``augment.hflip``, a horizontal flip) drawn from
        ``generator`` when training, centred otherwise."""
        th, tw = size_out or self.spec.image_size
        h, w = int(size[0]), int(size[1])
        nh, nw = h, w
        if resize:
            scale = max(th / h, tw / w) * (self.crop_scale if self.train else 1.0)
            nh, nw = max(th, math.ceil(h * scale - 1e-6)), max(tw, math.ceil(w * scale - 1e-6))
        if not self.train:
            return Geometry((h, w), (nh, nw), ((nh - th) // 2, (nw - tw) // 2), (th, tw), False)
        top = int(torch.randint(0, nh - th + 1, (1,), generator=generator))
        left = int(torch.randint(0, nw - tw + 1, (1,), generator=generator))
        flip = self.hflip and bool(torch.rand(1, generator=generator) < 0.5)
        return Geometry((h, w), (nh, nw), (top, left), (th, tw), flip)


def _check_volume_data(data: DataConfig) -> None:
    """A 3D encoder takes whole volumes or slabs at their voxel size."""
    if (data.kind, data.volume_mode, data.mask_column) != ("volume", "stack", None):
        raise ConfigError(
            "a 3D encoder takes whole volumes or slabs: data.kind: volume with volume_mode: stack, and no mask_column "
            f"(2D label masks); got data.kind: {data.kind}, volume_mode: {data.volume_mode}, mask_column: "
            f"{data.mask_column}"
        )
    if data.augment.crop_scale != 1.0:
        raise ConfigError(f"data.augment.crop_scale {data.augment.crop_scale} rescales the input, but a 3D encoder "
                          "keeps the voxel size (data.spacing); set data.augment.crop_scale: 1")


def _centred_padding(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) that bring ``size`` up to at least ``target``, centred."""
    dh, dw = max(0, target[0] - size[0]), max(0, target[1] - size[1])
    return dw // 2, dw - dw // 2, dh // 2, dh - dh // 2


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
