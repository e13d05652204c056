"""In-house-style models for ``model.kind: python`` (factory ``custom_models:<function>``; tests/ is on sys.path)."""

from __future__ import annotations

import torch
from torch import nn


class PatchTokens(nn.Module):
    """A CLS token and 8-px patch tokens through residual blocks: ``[B, 3, H, W] -> [B, 1 + N, dim]``."""

    def __init__(self, dim: int = 16, depth: int = 2):
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 8, 8)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.ModuleList([nn.Linear(dim, dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            tokens = tokens + torch.tanh(block(tokens))
        return tokens


class TwoOutputs(PatchTokens):
    """Returns a tuple, as many research models do: not a contract fmprobe can read."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[override]
        return super().forward(x), []


class SwinStage(nn.Module):
    """SwinUNETR's Swin encoder, returning one stage's feature map ``[B, C, d, h, w]``."""

    def __init__(self, swin: nn.Module, stage: int):
        super().__init__()
        self.swin, self.stage = swin, stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swin(x, normalize=True)[self.stage]


def tokens(dim: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return PatchTokens(dim)


def pooled(dim: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, dim, 8, 8), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def two_outputs() -> nn.Module:
    return TwoOutputs()


def swin_encoder(feature_size: int = 12, stage: int = 3) -> nn.Module:
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=2, feature_size=feature_size, depths=(1, 1, 1, 1), spatial_dims=3)
    return SwinStage(net.swinViT, stage)


def not_a_module() -> str:
    return "a string"
