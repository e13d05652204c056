"""Backbone + head as one trainable module, pooling exactly as the feature cache does.

``encode()`` stays the forward path and the pooling mirrors ``features.extract.encode_batch``: clips of a sample
averaged, an image encoder's frames stacked along t, ``cls+mean`` = [CLS, patch mean], attentive heads on tokens
pooled by ``features.token_grid`` / ``temporal_pool``. Pooled inputs are standardised with fixed training-split
statistics, as the frozen path standardises cached features, so head learning rates mean the same in both.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fmprobe.backbones.base import Encoder, EncoderOutput, LayerRef
from fmprobe.config import FeatureConfig
from fmprobe.errors import ConfigError
from fmprobe.features.extract import encoder_batch, frames_grid, pool_tokens


def encoder_inputs(
    encoder: Encoder, pixels: torch.Tensor, layer: LayerRef, pooling: str, features: FeatureConfig,
    out: EncoderOutput | None = None,
) -> torch.Tensor:
    """``[B, K, T, 3, H, W]`` samples -> the head's input: pooled ``[B, D]`` (``[B, 2D]`` for cls+mean) or
    tokens ``[B, N, D]`` (pooling: attentive); differentiable. ``out``: the encoding of ``encoder_batch(pixels)``
    when the caller already has it (one forward pass serving several outputs)."""
    b, k, t = pixels.shape[:3]
    video = encoder.input_spec.kind != "image"
    name = str(layer)
    out = encoder.encode(encoder_batch(encoder, pixels), [layer]) if out is None else out
    tokens = out.tokens[name].float()
    d = tokens.shape[-1]
    grid = frames_grid(out.grid[name], t, video)
    tokens = tokens.reshape(b, k, -1, d).mean(1)
    if pooling == "attentive":
        return pool_tokens(tokens, grid, features.token_grid, features.temporal_pool, point=name)[0]
    mean = tokens.mean(1)
    if pooling == "mean":
        return mean
    prefix = out.prefix.get(name)
    if prefix is None or prefix.shape[1] == 0:
        raise ConfigError(f"pooling {pooling!r} needs a CLS token, but {encoder.name} has none; use pooling: mean")
    cls = prefix[:, 0].float().reshape(b, -1, d).mean(1)
    return cls if pooling == "cls" else torch.cat([cls, mean], dim=1)


class Standardise(nn.Module):
    """Fixed z-scoring with training-split statistics (buffers: saved with the checkpoint, never trained)."""

    def __init__(self, mean: np.ndarray, std: np.ndarray):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(np.asarray(mean, dtype=np.float32)).reshape(1, -1))
        self.register_buffer("std", torch.as_tensor(np.asarray(std, dtype=np.float32)).reshape(1, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class AdaptModel(nn.Module):
    """``forward(pixels [B, K, T, 3, H, W]) -> logits [B, out_dim]``."""

    def __init__(
        self, encoder: Encoder, head: nn.Module, *, layer: LayerRef, pooling: str, features: FeatureConfig,
        standardise: Standardise | None,
    ):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.standardise = standardise if standardise is not None else nn.Identity()
        self.layer, self.pooling, self.features = layer, pooling, features

    def inputs(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.standardise(encoder_inputs(self.encoder, pixels, self.layer, self.pooling, self.features))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.inputs(pixels))
