"""Two-layer MLP probe on pooled features: tells whether the information is there but not linearly."""

from __future__ import annotations

import torch
from torch import nn

from fmprobe.heads.linear import check_pooled


class MLPHead(nn.Module):
    """Linear -> GELU -> dropout -> linear to raw logits."""

    def __init__(self, in_dim: int, out_dim: int, *, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, out_dim)

    def reset_parameters(self) -> None:
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_pooled(x, "mlp")
        return self.fc2(self.dropout(self.act(self.fc1(x))))
