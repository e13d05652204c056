"""Adapters from a model's tokens to a VAE's latent tokens (the VLM study's reconstruction probe, E-P4.6).

Two shapes of adapter, as the study tests them:

- :class:`TokenMLP` — the tokens resampled from their grid onto the latent grid (bilinear, antialiased when
  shrinking), then one MLP per token (Linear, GELU, Linear, GELU, Linear, as the study's ``MLPAdapter``): it can
  only move information it finds at the right place, so it asks whether the layout survived;
- :class:`LatentQueries` — one learned query per latent token attends over all the tokens (keys and values projected
  from them plus a learned position per source token, ``nn.MultiheadAttention``), then a linear map to the latent
  channels (the study's ``SpatialAdapter``): it may gather what a token holds from anywhere in the grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

Grid2 = tuple[int, int]


class TokenMLP(nn.Module):
    def __init__(self, dim: int, out_dim: int, source: Grid2, target: Grid2, hidden: int = 512):
        super().__init__()
        self.source, self.target = source, target
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, out_dim))  # fmt: skip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, h*w, D]`` on the source grid -> ``[B, H*W, C]`` on the latent grid."""
        b, _, d = tokens.shape
        x = tokens.transpose(1, 2).reshape(b, d, *self.source)
        if self.source != self.target:
            shrink = self.target[0] < self.source[0] or self.target[1] < self.source[1]
            x = F.interpolate(x, size=self.target, mode="bilinear", align_corners=False, antialias=shrink)
        return self.net(x.flatten(2).transpose(1, 2))


class LatentQueries(nn.Module):
    def __init__(self, dim: int, out_dim: int, source: Grid2, target: Grid2, hidden: int = 512, heads: int = 8):
        super().__init__()
        n_source, n_target = source[0] * source[1], target[0] * target[1]
        self.queries = nn.Parameter(torch.randn(n_target, hidden) * 0.02)
        self.position = nn.Parameter(torch.randn(n_source, hidden) * 0.02)
        self.key = nn.Linear(dim, hidden)
        self.value = nn.Linear(dim, hidden)
        self.attention = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.out = nn.Linear(hidden, out_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[B, h*w, D]`` -> ``[B, H*W, C]``: one query per latent token."""
        q = self.queries.expand(tokens.shape[0], -1, -1)
        attended, _ = self.attention(q, self.key(tokens) + self.position, self.value(tokens), need_weights=False)
        return self.out(attended)


ADAPTERS: dict[str, type[nn.Module]] = {"mlp": TokenMLP, "queries": LatentQueries}
