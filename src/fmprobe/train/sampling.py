"""The order of an epoch: a permutation, or class-balanced draws with replacement (every class equally likely)."""

from __future__ import annotations

import numpy as np
import torch

from fmprobe.errors import ConfigError


def balanced_weights(y: np.ndarray, task_type: str) -> np.ndarray:
    """Per-sample weights 1 / (size of its class).

    Multilabel: a sample counts toward its rarest positive label (samples with no positive label form their own
    class), so rare labels are drawn as often as common ones.
    """
    if task_type == "regression":
        raise ConfigError("train.balanced_sampler needs classes; a regression task has none: remove it")
    if task_type in ("binary", "multiclass"):
        classes = np.asarray(y).astype(np.int64).reshape(-1)
        counts = np.bincount(classes)
        return 1.0 / counts[classes]
    y2 = np.asarray(y).reshape(len(y), -1) > 0.5
    label_counts = y2.sum(axis=0)
    none = ~y2.any(axis=1)
    inverse = np.where(y2, 1.0 / np.maximum(label_counts, 1), 0.0).max(axis=1)
    return np.where(none, 1.0 / max(int(none.sum()), 1), inverse)


def epoch_order(n: int, generator: torch.Generator, weights: np.ndarray | None) -> torch.Tensor:
    """The training indices of one epoch: a permutation, or N weighted draws with replacement."""
    if weights is None:
        return torch.randperm(n, generator=generator)
    w = torch.as_tensor(weights, dtype=torch.float64)
    return torch.multinomial(w, n, replacement=True, generator=generator)
