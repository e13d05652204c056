"""Mixup and CutMix for image and clip batches, with the labels mixed by exactly the pixel proportion.

Targets become soft: a multiclass index becomes its one-hot row, binary / multilabel 0/1 stay per label, so
``lam * y_a + (1 - lam) * y_b`` is each label's (or class's) share of the mixed input. CutMix pastes one box,
the same in every frame and clip of a sample (clips stay temporally consistent), and mixes labels by the box's
actual area after clipping to the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fmprobe.config import MixConfig


@dataclass(frozen=True)
class Mix:
    """What was done to a batch: ``kind`` none | mixup | cutmix, the label weight ``lam`` of the original
    samples, the partner order ``perm`` and the CutMix box (top, bottom, left, right)."""

    kind: str
    lam: float = 1.0
    perm: torch.Tensor | None = None
    box: tuple[int, int, int, int] | None = None


def soft_targets(y: torch.Tensor, task_type: str, num_outputs: int) -> torch.Tensor:
    """Float targets that can be mixed: one-hot rows for multiclass, the targets themselves otherwise."""
    if task_type == "multiclass":
        return F.one_hot(y.long(), num_outputs).float()
    return y.float()


def enabled(cfg: MixConfig) -> bool:
    return cfg.prob > 0 and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0)


def draw_mix(cfg: MixConfig, batch: int, size: tuple[int, int], rng: np.random.Generator) -> Mix:
    """Draw whether and how to mix a batch of ``batch`` samples of ``size`` (H, W)."""
    if not enabled(cfg) or batch < 2 or rng.random() >= cfg.prob:
        return Mix("none")
    use_cutmix = cfg.cutmix_alpha > 0 and (cfg.mixup_alpha == 0 or rng.random() < 0.5)
    perm = torch.from_numpy(rng.permutation(batch))
    if not use_cutmix:
        return Mix("mixup", float(rng.beta(cfg.mixup_alpha, cfg.mixup_alpha)), perm)
    lam = float(rng.beta(cfg.cutmix_alpha, cfg.cutmix_alpha))
    h, w = size
    cut_h, cut_w = int(round(h * np.sqrt(1 - lam))), int(round(w * np.sqrt(1 - lam)))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    top, bottom = max(0, cy - cut_h // 2), min(h, cy + cut_h - cut_h // 2)
    left, right = max(0, cx - cut_w // 2), min(w, cx + cut_w - cut_w // 2)
    area = (bottom - top) * (right - left)
    return Mix("cutmix", 1 - area / (h * w), perm, (top, bottom, left, right))


def apply_mix(mix: Mix, pixels: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed ``pixels [B, ..., H, W]`` and soft targets ``y [B, ...]``."""
    if mix.kind == "none":
        return pixels, y
    assert mix.perm is not None
    other_y = y[mix.perm]
    if mix.kind == "mixup":
        pixels = mix.lam * pixels + (1 - mix.lam) * pixels[mix.perm]
    else:
        assert mix.box is not None
        top, bottom, left, right = mix.box
        pixels = pixels.clone()
        pixels[..., top:bottom, left:right] = pixels[mix.perm][..., top:bottom, left:right]
    return pixels, mix.lam * y + (1 - mix.lam) * other_y
