"""Linear probe on pooled features: the honest baseline every other head is compared to."""

from __future__ import annotations

import torch
from torch import nn


def check_pooled(x: torch.Tensor, head: str) -> None:
    """Pooled heads take [B, D]; a token tensor here means the wrong pooling was configured."""
    if x.ndim != 2:
        raise ValueError(
            f"{head} head takes pooled features [B, D], got shape {tuple(x.shape)}; "
            "token features [B, N, D] go to an attentive head (pooling: attentive)"
        )


class LinearHead(nn.Module):
    """Optional input dropout, then one plain nn.Linear (no normalisation) to raw logits."""

    def __init__(self, in_dim: int, out_dim: int, *, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_dim, out_dim)

    def reset_parameters(self) -> None:
        self.fc.reset_parameters()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_pooled(x, "linear")
        return self.fc(self.dropout(x))
