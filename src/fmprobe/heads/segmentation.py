"""Light segmentation decoders on patch tokens: they read what the token grid already holds, nothing more.

``linear``: a 1x1 projection of each (z-scored) token to K logits, bilinearly upsampled to the mask size.
``conv``: 3x3 conv to HIDDEN channels, GELU, x2 bilinear upsampling, 3x3 conv to K logits, then upsampled.
Tokens are z-scored with fixed training-split statistics (buffers), as pooled features are for the other heads.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HIDDEN = 128


def center_slot(t: int, frames: int) -> int:
    """Index along the token grid's t of the tokens covering frame ``frames // 2`` (the clip's center frame).

    Works for video encoders (t = frames / tubelet), image encoders on clips (t = frames) and
    ``features.temporal_pool`` (t = 1); an image has frames = t = 1.
    """
    return (frames // 2) * t // frames


def frame_tokens(tokens: torch.Tensor | np.ndarray, grid: tuple[int, int, int], frames: int
                 ) -> torch.Tensor | np.ndarray:  # fmt: skip
    """``[B, t*h*w, D]`` raster-order tokens -> ``[B, h, w, D]`` of the center frame."""
    t, h, w = grid
    return tokens.reshape(tokens.shape[0], t, h, w, tokens.shape[-1])[:, center_slot(t, frames)]


class SegDecoder(nn.Module):
    """``forward(tokens [B, h, w, D]) -> logits [B, K, *out_size]``."""

    def __init__(self, in_dim: int, num_classes: int, kind: str, out_size: tuple[int, int], mean: np.ndarray,
                 std: np.ndarray):  # fmt: skip
        super().__init__()
        if kind not in ("linear", "conv"):
            raise ValueError(f"decoder must be linear or conv, got {kind!r}")
        self.kind, self.out_size = kind, tuple(out_size)
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float32)).reshape(1, -1, 1, 1))
        if kind == "linear":
            self.layers = nn.ModuleList([nn.Conv2d(in_dim, num_classes, 1)])
        else:
            self.layers = nn.ModuleList([nn.Conv2d(in_dim, HIDDEN, 3, padding=1),
                                         nn.Conv2d(HIDDEN, num_classes, 3, padding=1)])  # fmt: skip

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = (tokens.float().permute(0, 3, 1, 2) - self.mean) / self.std
        if self.kind == "linear":
            x = self.layers[0](x)
        else:
            x = F.gelu(self.layers[0](x))
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.layers[1](x)
        return F.interpolate(x, size=self.out_size, mode="bilinear", align_corners=False)


def segmentation_loss(logits: torch.Tensor, mask: torch.Tensor, ignore: int = -1) -> torch.Tensor:
    """Pixel cross-entropy averaged over labelled pixels; exactly 0 (no gradient) when the batch has none."""
    labelled = (mask != ignore).sum()
    total = F.cross_entropy(logits.float(), mask, ignore_index=ignore, reduction="sum")
    return total / labelled.clamp_min(1)
