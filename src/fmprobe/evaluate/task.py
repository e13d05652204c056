"""The task as the data resolved it: label names, output width, class count and metric definitions, defined once.

A ``TaskConfig`` names target columns; for multiclass the classes come from the manifest (or the config). Every
place that needs the number of outputs, the names metrics are reported under or the primary metric's direction
asks this object instead of recomputing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fmprobe.config import TaskConfig
from fmprobe.evaluate.bootstrap import TaskMetric
from fmprobe.evaluate.metrics import lower_is_better


@dataclass(frozen=True)
class ResolvedTask:
    type: str
    targets: tuple[str, ...]
    primary: str
    class_names: tuple[str, ...] | None = None  # multiclass: the classes, in index order

    @classmethod
    def from_config(cls, task: TaskConfig, class_names: Sequence[str] | None) -> ResolvedTask:
        if task.type == "multiclass" and not class_names:
            raise ValueError("a multiclass task needs its class names (from the manifest or task.class_names)")
        names = tuple(class_names) if task.type == "multiclass" and class_names else None
        assert task.primary_metric is not None
        return cls(task.type, tuple(task.targets), task.primary_metric, names)

    @property
    def label_names(self) -> list[str]:
        """What per-label metrics are named after: the classes (multiclass) or the target columns."""
        return list(self.class_names) if self.class_names is not None else list(self.targets)

    @property
    def score_names(self) -> list[str]:
        """The columns of a score array: one per class (multiclass), per target, or the one binary score."""
        return self.label_names

    @property
    def num_classes(self) -> int | None:
        return len(self.class_names) if self.class_names is not None else None

    @property
    def out_dim(self) -> int:
        """Logits a head emits: 1 (binary), one per class (multiclass), one per target otherwise."""
        if self.type == "binary":
            return 1
        return len(self.label_names)

    @property
    def lower_is_better(self) -> bool:
        return lower_is_better(self.primary)

    def metric(self, thresholds: float | Sequence[float] | np.ndarray | None = None) -> TaskMetric:
        """The task's metric function (vectorised forms included), with decision thresholds when given."""
        return TaskMetric(self.type, class_names=self.label_names, target_names=list(self.targets),
                          thresholds=None if thresholds is None else np.asarray(thresholds))  # fmt: skip
