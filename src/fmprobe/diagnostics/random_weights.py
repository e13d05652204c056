"""The random-weights control: the same architecture, read at the same extraction points, with no learned weights.

A probe's score at a point means little alone: a randomly initialised ViT already keeps much of where things are
(its patch embedding is a random linear map of the pixels, its residual stream carries it up), so a spatial score
must beat what the architecture gives with no training at all. Every parameter tensor is redrawn i.i.d. from a
normal with that tensor's own mean and standard deviation (so activations stay in the trained model's range and
LayerNorm scales stay near 1, while every learned filter, position embedding and projection is gone); buffers
(rotary frequencies, fixed position tables, VAE latent statistics) are part of the architecture and kept. The draw
is seeded, so the control reproduces; the encoder's fingerprint changes with its weights, so its features never mix
with the trained model's in the cache.
"""

from __future__ import annotations

import torch

from fmprobe.backbones.base import Encoder
from fmprobe.train.seeding import seeded

CONTROL = "random-weights"


@torch.no_grad()
def randomise_weights(encoder: Encoder, seed: int = 0) -> Encoder:
    """Redraw every parameter of ``encoder`` in place (see the module docstring); returns it, renamed."""
    with seeded(seed):
        for param in encoder.parameters():
            values = param.detach().float()
            mean, std = values.mean(), values.std() if values.numel() > 1 else torch.zeros(())
            drawn = torch.randn(param.shape, dtype=torch.float32) * std.cpu() + mean.cpu()
            param.copy_(drawn.to(device=param.device, dtype=param.dtype))
    encoder.name = f"{encoder.name} ({CONTROL})"
    return encoder
