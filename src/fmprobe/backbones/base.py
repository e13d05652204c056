"""The one interface every backbone answers through.

Every encoder takes a batch shaped as it declares (images ``[B, C, H, W]``, clips ``[B, T, C, H, W]``)
and returns, for each requested extraction point, patch tokens ``[B, N, D]`` in raster order
(t, then h, then w) with prefix tokens (CLS, registers) kept apart, plus the token grid ``(t, h, w)``.
So every probe works with every backbone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

LayerRef = int | str  # block index (negative allowed) or a module path such as "visual.merger"


@dataclass(frozen=True)
class InputSpec:
    """What the encoder accepts; readers and transforms adapt samples to it or refuse."""

    kind: Literal["image", "video"]
    image_size: tuple[int, int]  # (H, W) the model was configured for
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    num_frames: int | None = None  # video encoders: frames per clip the model expects (None = any)
    patch_size: int = 16
    tubelet_size: int = 1


@dataclass
class EncoderOutput:
    """Tokens per extraction point. Keys are ``str(layer_ref)`` as requested."""

    tokens: dict[str, torch.Tensor]  # [B, N, D] patch tokens, raster order
    prefix: dict[str, torch.Tensor]  # [B, P, D] CLS/register tokens (P may be 0)
    grid: dict[str, tuple[int, int, int]]  # (t, h, w) with t*h*w == N, per extraction point
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
            shape = "[B, C, H, W]" if spec.kind == "image" else "[B, T, C, H, W]"
            raise EncoderError(f"{self.name} takes {spec.kind} batches shaped {shape}, got {tuple(pixels.shape)}")
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
