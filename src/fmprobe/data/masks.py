"""Segmentation label masks: read, checked against their sample, and put through the sample's own geometry.

A mask is one 2D array of class indices (0 = background, values 0..K-1) per sample — a single-channel PNG
(L, P or 16-bit; palette PNGs give their indices) or a ``.npy`` — the size of the image, or of the video frame
for a clip (the mask of the clip's center frame). It goes through the same resize, crop and flip as the pixels
(nearest-exact sampling, so labels are never blended), drawn once and applied to both.
"""

from __future__ import annotations

import io
import time
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from fmprobe.backbones.base import InputSpec
from fmprobe.config import DataConfig
from fmprobe.data.dataset import MediaDataset, collate_samples, stage_seconds
from fmprobe.data.readers import read_media
from fmprobe.data.readers.image import open_image
from fmprobe.data.readers.source import Source, extension
from fmprobe.data.transforms import Geometry, Preprocess
from fmprobe.errors import ReaderError

MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".npy")  # lossless only: JPEG would blur class indices
IGNORE = -1  # label of pixels (and samples) without a mask; the loss skips them


def read_mask(url: str, sample_id: str) -> np.ndarray:
    """The mask at ``url`` as ``[H, W]`` int64 class indices."""
    src = Source.from_url(url, sample_id)
    ext = extension(src.path)
    if ext not in MASK_EXTENSIONS:
        raise src.error(f"mask must be a lossless single-channel image or .npy ({', '.join(MASK_EXTENSIONS)}), "
                        f"got '{ext or '(none)'}'")  # fmt: skip
    raw = src.read_bytes()
    try:
        if ext == ".npy":
            array = np.load(io.BytesIO(raw), allow_pickle=False)
        else:
            image = open_image(src, raw)
            if image.mode not in ("1", "L", "P", "I", "I;16", "I;16B", "I;16L", "I;16N"):
                raise src.error(f"mask is a {image.mode} image; save the class indices as a single-channel "
                                "(L or P) PNG or a .npy")  # fmt: skip
            array = np.array(image)
    except (OSError, ValueError) as err:
        raise src.error(f"cannot read mask (corrupt or truncated?): {err}") from None
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise src.error(f"mask must be 2D [H, W] class indices, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(np.isfinite(array) & (array == np.round(array))):
            raise src.error(f"mask holds non-integer values ({array.dtype}); save class indices 0..K-1")
    return array.astype(np.int64)


def mask_tensor(mask: np.ndarray, media_size: tuple[int, int], geometry: Geometry, num_classes: int,
                src: Source) -> torch.Tensor:  # fmt: skip
    """``[H', W']`` int64 labels after the sample's geometry; the mask must match the media and hold 0..K-1."""
    if tuple(mask.shape) != tuple(media_size):
        raise src.error(f"mask is {mask.shape[0]}x{mask.shape[1]} but the image is {media_size[0]}x{media_size[1]} "
                        "(H x W); masks must have the size of their image (of the video frame for clips)")  # fmt: skip
    bad = np.unique(mask[(mask < 0) | (mask >= num_classes)])
    if bad.size:
        raise src.error(f"mask values {bad[:10].tolist()} are outside 0..{num_classes - 1} "
                        f"(segmentation.class_names has {num_classes} classes)")  # fmt: skip
    x = torch.from_numpy(mask.astype(np.float32))[None, None]
    return geometry.apply(x, mode="nearest-exact")[0, 0].round().long()


class MaskedMediaDataset(MediaDataset):
    """A :class:`MediaDataset` whose items also hold ``"mask"``: ``[H', W']`` int64 labels through the same geometry
    as the pixels, or None for a row without a mask (``manifest_df["mask"]`` empty). Mask problems are reported
    in ``"error"`` like unreadable media, naming the sample and the mask file."""

    def __init__(self, manifest_df: pd.DataFrame, data_cfg: DataConfig, preprocess: Preprocess, num_classes: int,
                 seed: int = 0):  # fmt: skip
        super().__init__(manifest_df, data_cfg, preprocess, seed=seed)
        self.masks = [m if isinstance(m, str) and m else None for m in manifest_df["mask"]]
        self.num_classes = num_classes

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample_id, path, mask_url = self.sample_ids[index], self.paths[index], self.masks[index]
        rng = np.random.default_rng([self.seed, index])  # the same draws as MediaDataset: same pixels
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        start, read_end = time.perf_counter(), None
        try:
            media = read_media(path, self.data_cfg, sample_id=sample_id, rng=rng, clip_start=self.clip_starts[index])
            read_end = time.perf_counter()
            geometry = self.preprocess.geometry(media.shape[-2:], generator)
            pixels = self.preprocess(media, geometry=geometry)
            mask = None
            if mask_url is not None:
                src = Source.from_url(mask_url, sample_id)
                mask = mask_tensor(read_mask(mask_url, sample_id), media.shape[-2:], geometry, self.num_classes, src)
        except ReaderError as err:
            if err.sample_id is None:
                err = ReaderError(err.reason, sample_id=sample_id, path=path)
            return {"index": index, "sample_id": sample_id, "pixels": torch.empty(0), "mask": None, "error": str(err),
                    "seconds": stage_seconds(start, read_end)}  # fmt: skip
        return {"index": index, "sample_id": sample_id, "pixels": pixels, "mask": mask, "error": None,
                "seconds": stage_seconds(start, read_end)}  # fmt: skip


def collate_with_masks(items: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`collate_samples` plus ``"mask"``: ``[B, H', W']`` int64 with IGNORE everywhere for rows without
    a mask (None when no item is good)."""
    batch = collate_samples(items)
    good = [it for it in items if it["error"] is None]
    if batch["pixels"] is None:
        batch["mask"] = None
        return batch
    size = batch["pixels"].shape[-2:]
    batch["mask"] = torch.stack([it["mask"] if it["mask"] is not None else torch.full(size, IGNORE, dtype=torch.long)
                                 for it in good])  # fmt: skip
    return batch


def load_masks(rows: pd.DataFrame, data_cfg: DataConfig, spec: InputSpec, num_classes: int,
               batch_size: int = 16) -> np.ndarray:  # fmt: skip
    """Evaluation masks (centre crop, no flip) of ``rows`` that all have a mask: ``[n, H', W']`` uint8.

    Every problem raises (the samples were readable at extraction, so it is the mask): a wrong size, values
    outside 0..K-1, an unreadable file — each naming the sample and the file.
    """
    dataset = MaskedMediaDataset(rows, data_cfg, Preprocess(spec, data_cfg, train=False), num_classes)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_with_masks,
                        num_workers=data_cfg.num_workers)  # fmt: skip
    out = []
    for batch in loader:
        if batch["errors"]:
            raise ReaderError(batch["errors"][0][2])
        out.append(batch["mask"].to(torch.uint8))
    return torch.cat(out).numpy() if out else np.zeros((0, *spec.image_size), np.uint8)
