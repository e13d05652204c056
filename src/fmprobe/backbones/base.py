"""The one interface every backbone answers through.

Every encoder takes a batch shaped as it declares (images ``[B, C, H, W]``, clips ``[B, T, C, H, W]``,
volumes ``[B, 1, D, H, W]`` for native 3D encoders, axes RAS+ x, y, z) and returns, for each requested extraction
point, patch tokens ``[B, N, D]`` in raster order (t, then h, then w; a 3D encoder's grid is its (d, h, w)) with
prefix tokens (CLS, registers) kept apart, plus the token grid ``(t, h, w)``. A pooled output ``[B, D]`` is one token
on the grid ``(1, 1, 1)``. So every probe works with every backbone.

A point whose tokens are a set with no spatial layout (BLIP-2's learned query tokens after the Q-Former) has the
grid ``None``: pooled and attentive heads take its tokens as they are, and whatever needs positions asks
:func:`spatial_grid`, which refuses it by name instead of inventing a 1 x N image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

LayerRef = int | str  # block index (negative allowed) or a module path such as "visual.merger"
Grid = tuple[int, int, int]  # (t, h, w) of a point's tokens in raster order


@dataclass(frozen=True)
class InputSpec:
    """What the encoder accepts; readers and transforms adapt samples to it or refuse."""

    kind: Literal["image", "video", "volume"]
    image_size: tuple[int, int]  # (H, W) the model was configured for (a volume: its last two axes)
    mean: tuple[float, ...]  # per input channel: RGB for images and clips; (0,) for volumes (see data.intensity)
    std: tuple[float, ...]
    num_frames: int | None = None  # video encoders: frames per clip the model expects (None = any)
    patch_size: int = 16
    tubelet_size: int = 1
    volume_size: tuple[int, int, int] | None = None  # volume encoders: (D, H, W) = voxels along RAS+ x, y, z

    @classmethod
    def volume(cls, size: tuple[int, int, int]) -> "InputSpec":
        """A native 3D encoder's input: one channel, intensities as the volume pipeline leaves them."""
        return cls(kind="volume", image_size=(size[1], size[2]), mean=(0.0,), std=(1.0,), volume_size=tuple(size))


@dataclass
class EncoderOutput:
    """Tokens per extraction point. Keys are ``str(layer_ref)`` as requested."""

    tokens: dict[str, torch.Tensor]  # [B, N, D] patch tokens, raster order
    prefix: dict[str, torch.Tensor]  # [B, P, D] CLS/register tokens (P may be 0)
    grid: dict[str, Grid | None]  # (t, h, w) with t*h*w == N, per extraction point; None: a token set, no grid
    attentions: dict[str, torch.Tensor] = field(default_factory=dict)  # [B, heads, Q, K] per block


class Encoder(nn.Module):
    """Base class: subclasses wrap one model family and implement :meth:`encode`."""

    input_spec: InputSpec
    name: str
    num_blocks: int | None = None  # transformer blocks, which layer indices count (None: the family has no such count)

    def encode(
        self, pixels: torch.Tensor, layers: list[LayerRef], attentions: bool = False
    ) -> EncoderOutput:  # pragma: no cover - interface
        raise NotImplementedError

    def fingerprint(self) -> str:  # pragma: no cover - interface
        """A hash of the weights and the config: part of every feature-cache key."""
        raise NotImplementedError

    def check_input(self, pixels: torch.Tensor) -> None:
        """Refuse input the model would silently mis-handle (wrong size, frames or rank)."""
        from fmprobe.errors import EncoderError

        spec = self.input_spec
        want_dims = 4 if spec.kind == "image" else 5
        if pixels.dim() != want_dims:
            shape = {"image": "[B, C, H, W]", "video": "[B, T, C, H, W]", "volume": "[B, 1, D, H, W]"}[spec.kind]
            raise EncoderError(f"{self.name} takes {spec.kind} batches shaped {shape}, got {tuple(pixels.shape)}")
        if spec.kind == "volume":
            if pixels.shape[1] != 1 or tuple(pixels.shape[2:]) != spec.volume_size:
                raise EncoderError(
                    f"{self.name} takes volumes of 1 x {spec.volume_size} voxels, got {tuple(pixels.shape[1:])}; "
                    "set data.frames_per_clip to its size along data.slice_axis (the other axes are padded or cropped)"
                )
            return
        if tuple(pixels.shape[-2:]) != spec.image_size:
            raise EncoderError(
                f"{self.name} is configured for {spec.image_size[0]}x{spec.image_size[1]} input, "
                f"got {pixels.shape[-2]}x{pixels.shape[-1]}; resize to the model's size or set model.image_size"
            )
        if spec.kind == "video" and spec.num_frames is not None and pixels.shape[1] != spec.num_frames:
            raise EncoderError(
                f"{self.name} is configured for {spec.num_frames} frames per clip, got {pixels.shape[1]}; "
                f"set data.frames_per_clip: {spec.num_frames}"
            )


def spatial_grid(grid: Grid | tuple[int, ...] | list[int] | None, point: str, need: str) -> Grid:
    """The (t, h, w) grid of ``point`` for ``need`` (what asks for positions), or an EncoderError when the point's
    tokens have no spatial layout."""
    from fmprobe.errors import EncoderError

    if grid is None:
        raise EncoderError(
            f"point '{point}' yields a set of tokens with no spatial grid (e.g. BLIP-2's Q-Former query tokens), but "
            f"{need} needs patch positions; read a vision-tower layer (e.g. -1) for it, or pool the tokens "
            "(pooling: mean, or an attentive head) without features.token_grid / temporal_pool"
        )
    t, h, w = grid
    return int(t), int(h), int(w)
