"""Early stopping and best-epoch bookkeeping for H members at once (H = 1 for one model)."""

from __future__ import annotations

import numpy as np

from fmprobe.errors import ConfigError


def improved(value: np.ndarray, best: np.ndarray, lower: bool, min_delta: float) -> np.ndarray:
    """Where ``value`` beats ``best`` by more than ``min_delta`` (False where either is NaN)."""
    with np.errstate(invalid="ignore"):
        return value < best - min_delta if lower else value > best + min_delta


def lookup(metrics: dict[str, np.ndarray], name: str, what: str) -> np.ndarray:
    """``metrics[name]`` as float64 ``[H]``, or an error listing the metrics there are."""
    if name not in metrics:
        raise ConfigError(f"{what} '{name}' is not among the computed metrics: {', '.join(sorted(metrics))}")
    return np.asarray(metrics[name], dtype=np.float64)


class EarlyStopping:
    """Per member: epochs since the watched validation metric last improved by more than ``min_delta``.

    A NaN counts as no improvement. ``update`` returns the members whose patience is now used up."""

    def __init__(self, metric: str, lower: bool, patience: int, min_delta: float, n_members: int):
        self.metric, self.lower, self.patience, self.min_delta = metric, lower, patience, min_delta
        self.best = np.full(n_members, np.nan)
        self.since_best = np.zeros(n_members, dtype=np.int64)

    def update(self, metrics: dict[str, np.ndarray], members: np.ndarray) -> np.ndarray:
        """Record this epoch for ``members`` (bool [H]); True where patience is exhausted."""
        value = lookup(metrics, self.metric, "train.early_stopping.metric")
        better = ~np.isnan(value) & (np.isnan(self.best) | improved(value, self.best, self.lower, self.min_delta))
        self.best = np.where(members & better, value, self.best)
        self.since_best = np.where(members, np.where(better, 0, self.since_best + 1), self.since_best)
        return members & (self.since_best >= self.patience)
