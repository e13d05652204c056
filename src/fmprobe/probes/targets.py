"""What heads are fitted to, and how their validation outputs are scored.

Regression heads fit standardised targets (training mean/std, per target over the rows that have it) and answer in
the original units; classification targets pass through unchanged. Scoring every epoch uses the vectorised task
metrics (tested equal to scikit-learn's), stacked over the members of a fit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.task import ResolvedTask
from fmprobe.train.scoring import TaskScorer

TARGETS_NOTE = "z-score with training-split mean/std; outputs mapped back"


@dataclass
class FitTargets:
    targets: dict[str, np.ndarray]  # per split, in fit space
    shift: np.ndarray | float
    scale: np.ndarray | float

    @classmethod
    def for_task(cls, task: ResolvedTask, targets: dict[str, np.ndarray]) -> FitTargets:
        shift: np.ndarray | float = 0.0
        scale: np.ndarray | float = 1.0
        if task.type == "regression":  # each target with the mean/std of its own training rows (NaN: no value)
            train = targets["train"]
            for name, values in zip(task.targets, np.atleast_2d(train.T)):
                if np.isfinite(values).sum() < 2:
                    raise FmprobeError(f"regression target '{name}' has {int(np.isfinite(values).sum())} value(s) in "
                                       "the training split; it needs at least 2 to learn from")
            shift = np.nanmean(train, axis=0)
            scale = np.nanstd(train, axis=0) + 1e-12
        return cls({s: ((y - shift) / scale).astype(y.dtype) for s, y in targets.items()}, shift, scale)

    def to_units(self, values: np.ndarray) -> np.ndarray:
        return values * self.scale + self.shift

    def scorer(self, task: ResolvedTask, loss: nn.Module, device: str | torch.device = "cpu") -> TaskScorer:
        """Validation loss and every task metric per member, in the task's units."""
        return TaskScorer(task.type, loss, task.metric().stacked, primary=task.primary,
                          lower_is_better=task.lower_is_better, shift=self.shift, scale=self.scale,
                          device=device)  # fmt: skip
