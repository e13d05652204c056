"""The one learning-rate schedule of everything fmprobe trains: linear warmup, then cosine decay to zero."""

from __future__ import annotations

import math


def lr_factor(step: int, *, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of a base learning rate at optimizer step ``step`` (0-based).

    Warmup step s uses (s + 1) / warmup_steps, so the first update is not wasted at lr 0; after warmup the
    factor follows a cosine from 1 to 0 at ``total_steps``.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def steps_per_epoch(n_samples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps in one pass over ``n_samples`` (the last, partial batch and group included)."""
    return math.ceil(math.ceil(n_samples / batch_size) / grad_accum)
