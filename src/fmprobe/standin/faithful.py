"""A spatially faithful stand-in model: tokens built from the pixels, each kept at its own place.

The spatial gates must tell a model that knows where things are from one that does not, and a random stand-in cannot
show the first. This one (``model.kind: python``, factory ``fmprobe.standin.faithful:pixel_faithful``) computes, for
every pixel, how much it looks like an object (a 1 x 1 convolution of its RGB mean against the shapes data's
foreground threshold, through a sigmoid), gathers each patch's pixels into its token (``[B, N, patch**2]``), and
passes the tokens through ``mix``, a token-mixing matrix that is the identity: every token keeps its own patch. The
random-weights control redraws ``mix`` at its mean and sd, which mixes every patch into every token, so the same
architecture with its weights redrawn loses the layout — what a real model's learned weights must beat.
"""

from __future__ import annotations

import torch
from torch import nn

from fmprobe.diagnostics.reconstruction import FOREGROUND

SHARPNESS = 40.0  # sigmoid slope per unit of normalised brightness


class PixelFaithful(nn.Module):
    """``[B, 3, size, size]`` normalised with mean = std = 0.5 -> ``[B, (size/patch)**2, patch**2]`` tokens."""

    def __init__(self, size: int = 64, patch: int = 8):
        super().__init__()
        if size % patch:
            raise ValueError(f"size {size} is not a multiple of patch {patch}")
        self.foreground = nn.Conv2d(3, 1, 1)
        self.patches = nn.PixelUnshuffle(patch)
        n = (size // patch) ** 2
        self.mix = nn.Linear(n, n, bias=False)
        with torch.no_grad():
            self.foreground.weight.fill_(SHARPNESS / 3)  # RGB mean, in [-1, 1] as normalised
            self.foreground.bias.fill_(-SHARPNESS * (2 * FOREGROUND - 1))
            self.mix.weight.copy_(torch.eye(n))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        objectness = torch.sigmoid(self.foreground(pixels))  # [B, 1, H, W]
        tokens = self.patches(objectness).flatten(2)  # [B, patch**2, N]
        return self.mix(tokens).transpose(1, 2)


def pixel_faithful(size: int = 64, patch: int = 8) -> PixelFaithful:
    """The factory a ``kind: python`` config names."""
    return PixelFaithful(size, patch)


def faithful_model(size: int = 64, patch: int = 8) -> dict:
    """The ``model`` section of a config that loads it."""
    return {"kind": "python", "name": "pixel-faithful", "factory": "fmprobe.standin.faithful:pixel_faithful",
            "args": {"size": size, "patch": patch},
            "contract": {"input": "image", "size": [size, size], "mean": [0.5] * 3, "std": [0.5] * 3,
                         "output": "tokens", "patch_size": [patch, patch]}}  # fmt: skip
