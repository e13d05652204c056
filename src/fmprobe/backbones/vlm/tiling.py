"""How a VLM's processor cuts one square image into the tiles its vision tower sees, and how the tiles' tokens go
back into grids over the whole image.

Every tile is ``tile`` x ``tile`` pixels (the tower's input size). An image gives up to two *views*:

- ``base``: the whole image at the tower's size (LLaVA-NeXT's base image, first; InternVL's thumbnail, last);
- ``tiles``: a ``rows`` x ``cols`` grid of high-resolution tiles cut from the image resized to that grid (AnyRes
  keeps the aspect and pads black around it, InternVL stretches), reassembled into one token grid; AnyRes crops
  the padding back off the token grid exactly as the model does (``unpad``).

The pixel operations reproduce the processors' on normalised tensors: resizing is bicubic with antialiasing (PIL's
and torchvision's filter; it commutes with the per-channel normalisation up to uint8 rounding) and padding is
black, i.e. ``(0 - mean) / std`` per channel. Tiles that are plain crops of the input (the input already at the
grid's size) are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas
from transformers.models.llava_next.modeling_llava_next import unpad_image

from fmprobe.errors import EncoderError

BASE, TILES = "base", "tiles"
Grid = tuple[int, int]


def resize(pixels: torch.Tensor, size: Grid) -> torch.Tensor:
    """``[B, C, H, W]`` -> ``[B, C, *size]``, bicubic with antialiasing; unchanged when already that size."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    return F.interpolate(pixels, size=size, mode="bicubic", antialias=True, align_corners=False)


@dataclass(frozen=True)
class Tiling:
    """The tiles of one ``size`` x ``size`` image: the base view and/or a ``rows`` x ``cols`` high-resolution grid."""

    size: int  # the input image (square)
    tile: int  # the tower's input size
    rows: int  # high-resolution tile grid; 0 x 0 when there is none
    cols: int
    base_first: bool  # base view first (AnyRes) or last (InternVL's thumbnail); ignored without a base
    has_base: bool = True
    canvas: Grid | None = None  # AnyRes: the image resized into the grid keeping its aspect, before padding
    unpad: bool = False  # AnyRes: crop the reassembled token grid back to the image's aspect

    @property
    def per_image(self) -> int:
        return self.rows * self.cols + int(self.has_base)

    @property
    def views(self) -> tuple[str, ...]:
        return tuple(v for v, on in ((BASE, self.has_base), (TILES, self.rows * self.cols > 0)) if on)

    def _high_res_index(self) -> list[int]:
        start = 1 if self.has_base and self.base_first else 0
        return list(range(start, start + self.rows * self.cols))

    @property
    def base_index(self) -> int:
        """Position of the base view among an image's tiles."""
        return 0 if self.base_first else self.rows * self.cols

    def cut(self, pixels: torch.Tensor, black: torch.Tensor) -> torch.Tensor:
        """``[B, C, size, size]`` -> the tower's batch ``[B, per_image, C, tile, tile]`` (each image's tiles in order)."""
        b, c = pixels.shape[:2]
        t = self.tile
        parts = []
        if self.rows * self.cols:
            height, width = self.rows * t, self.cols * t
            canvas = resize(pixels, self.canvas or (height, width))
            top, left = (height - canvas.shape[-2]) // 2, (width - canvas.shape[-1]) // 2
            padded = black.view(1, c, 1, 1).to(canvas).expand(b, c, height, width).clone()
            padded[..., top : top + canvas.shape[-2], left : left + canvas.shape[-1]] = canvas
            tiles = padded.reshape(b, c, self.rows, t, self.cols, t).permute(0, 2, 4, 1, 3, 5)
            parts.append(tiles.reshape(b, self.rows * self.cols, c, t, t))
        if self.has_base:
            base = resize(pixels, (t, t))[:, None]
            parts.insert(0 if self.base_first else len(parts), base)
        return torch.cat(parts, dim=1)

    def view_tokens(self, x: torch.Tensor, grid: Grid, view: str) -> tuple[torch.Tensor, Grid]:
        """Per-tile tokens ``[B * per_image, h * w, D]`` (raster in each tile) -> one view ``[B, N, D]`` and its grid."""
        h, w = grid
        x = x.reshape(-1, self.per_image, h, w, x.shape[-1])
        if view == BASE:
            return x[:, self.base_index].reshape(x.shape[0], h * w, -1), (h, w)
        tiles = x[:, self._high_res_index()].reshape(x.shape[0], self.rows, self.cols, h, w, -1)
        tiles = tiles.permute(0, 1, 3, 2, 4, 5).reshape(x.shape[0], self.rows * h, self.cols * w, -1)
        if self.unpad:
            tiles = self.crop_padding(tiles)
        return tiles.reshape(x.shape[0], -1, tiles.shape[-1]), (tiles.shape[1], tiles.shape[2])

    def crop_padding(self, tiles: torch.Tensor) -> torch.Tensor:
        """``[B, H, W, D]`` token grid of the padded canvas -> the rows/columns that cover the image (the model's own
        ``unpad_image``, so exactly the tokens the language model receives)."""
        b, height, width, d = tiles.shape
        channels_first = tiles.permute(0, 3, 1, 2).reshape(b * d, height, width)
        cropped = unpad_image(channels_first, (self.size, self.size))
        return cropped.reshape(b, d, *cropped.shape[-2:]).permute(0, 2, 3, 1)

    def tiles_grid(self, grid: Grid) -> Grid:
        """The tiles view's grid for per-tile token grid ``grid`` (after AnyRes unpadding)."""
        if not self.unpad:
            return self.rows * grid[0], self.cols * grid[1]
        shape = unpad_image(torch.empty(0, self.rows * grid[0], self.cols * grid[1]), (self.size, self.size)).shape
        return shape[1], shape[2]


def anyres(size: int, tile: int, pinpoints: list[list[int]]) -> Tiling:
    """LLaVA-NeXT's AnyRes: the best pinpoint for the image, the image resized into it keeping its aspect, padded."""
    height, width = select_best_resolution((size, size), pinpoints)
    if height % tile or width % tile:
        raise EncoderError(f"grid pinpoint {height}x{width} is not a multiple of the tower's {tile}-px tiles")
    canvas = get_patch_output_size(np.empty((1, size, size)), (height, width), ChannelDimension.FIRST)
    return Tiling(size=size, tile=tile, rows=height // tile, cols=width // tile, base_first=True, canvas=canvas,
                  unpad=True)  # fmt: skip


def dynamic(size: int, tile: int, min_tiles: int, max_tiles: int, thumbnail: bool) -> Tiling:
    """InternVL's dynamic tiling: the tile grid whose aspect is closest to the image's; a thumbnail when > 1 tile."""
    cols, rows = get_optimal_tiled_canvas((size, size), (tile, tile), min_tiles, max_tiles)
    if rows * cols == 1:
        return Tiling(size=size, tile=tile, rows=0, cols=0, base_first=False)
    return Tiling(size=size, tile=tile, rows=rows, cols=cols, base_first=False, has_base=thumbnail)


def single(size: int, tile: int) -> Tiling:
    """One view: the whole image resized to the tower's size (LLaVA-1.5, CogVLM2)."""
    return Tiling(size=size, tile=tile, rows=0, cols=0, base_first=True)
