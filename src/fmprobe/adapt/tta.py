"""Test-time augmentation: the scores (probabilities, or values for regression) averaged over the original and
horizontally flipped input and over each clip scored on its own. Logits are never averaged."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fmprobe.config import TTAConfig


def tta_scores(
    model: Callable[[torch.Tensor], torch.Tensor],
    pixels: torch.Tensor,
    tta: TTAConfig,
    to_scores: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """Mean score over views of ``pixels [B, K, T, 3, H, W]``.

    With ``tta.clips > 1`` each of the K clips is one view (the model sees ``[B, 1, ...]`` per clip); otherwise
    the K clips go through together (features averaged, as in the frozen path). ``tta.hflip`` adds the mirror
    image of every view.
    """
    b, k = pixels.shape[:2]
    clips = [pixels[:, i : i + 1] for i in range(k)] if tta.clips > 1 else [pixels]
    views = [v for c in clips for v in ((c, c.flip(-1)) if tta.hflip else (c,))]
    return torch.stack([to_scores(model(v).float()) for v in views]).mean(0)
