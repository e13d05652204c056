"""The task as the data resolved it (label names, output width, class count) and its metric function, defined once.

A ``TaskConfig`` names target columns; for multiclass the classes come from the manifest (or the config). Every
place that needs the number of outputs, the names metrics are reported under or the primary metric's direction
asks this object instead of recomputing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmprobe.config import TaskConfig
from fmprobe.errors import FmprobeError
from fmprobe.evaluate import kernels
from fmprobe.evaluate.metrics import check_inputs, compute_metrics, label_thresholds, lower_is_better, output_names


@dataclass(frozen=True)
class TaskMetric:
    """``compute_metrics`` for one task, plus a vectorised weighted form for resampling."""

    task_type: str
    class_names: Sequence[str] | None = None
    target_names: Sequence[str] | None = None
    thresholds: float | Sequence[float] | np.ndarray | None = None

    def __call__(self, y_true: Any, y_score: Any) -> dict[str, Any]:
        return compute_metrics(self.task_type, y_true, y_score, class_names=self.class_names,
                               target_names=self.target_names, thresholds=self.thresholds)

    def weighted(self, y_true: Any, y_score: Any, weights: np.ndarray) -> dict[str, np.ndarray]:
        """``{metric: [R]}`` for R rows of sample weights ``[R, N]`` (bootstrap draw counts)."""
        y, s = check_inputs(self.task_type, y_true, y_score)
        return self._kernel(y, s, np.atleast_2d(np.asarray(weights, dtype=np.float64)))

    def stacked(self, y_true: Any, scores: Any, *, rank: bool = True) -> dict[str, np.ndarray]:
        """``{metric: [H]}`` for H members' scores ``[H, N, ...]`` on the same samples, in one vectorised call
        (``rank`` False: all but the ranking metrics, ``kernels.RANKED``)."""
        return self._kernel(*self._checked(y_true, scores), None, rank=rank)

    def _checked(self, y_true: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
        """Targets ``[N, ...]`` and per-row scores ``[R, N, ...]`` after the input checks of every row at once."""
        s = np.asarray(scores, dtype=np.float64)
        if len(s) == 0:
            raise FmprobeError("stacked metrics need at least one member's scores")
        # the per-member input checks, all members at once: the targets repeated once per member
        y_all, s_all = check_inputs(self.task_type, np.concatenate([np.asarray(y_true)] * len(s)),
                                    s.reshape(len(s) * s.shape[1], *s.shape[2:]))  # fmt: skip
        return y_all[: len(y_all) // len(s)], s_all.reshape(len(s), -1, *s_all.shape[1:])

    def rows(self, y_true: Any, scores: Any, weights: np.ndarray, thresholds: np.ndarray | None = None, *,
             which: np.ndarray | None = None, rank: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
        """``{metric: [R]}`` for R rows of sample weights ``[R, N]``, row i scoring the set of scores ``which[i]`` of
        ``scores [E, N, ...]`` (default: set i) with its (binary, multilabel) decision thresholds ``[E]`` /
        ``[E, C]`` (None: this metric's own). Each set is checked once, however many rows use it. ``rank`` False
        leaves out the ranking metrics (``kernels.RANKED``), which sort every row."""
        y, s = self._checked(y_true, scores)
        which = np.arange(len(s)) if which is None else np.asarray(which)
        thr = None if thresholds is None else np.asarray(thresholds, dtype=np.float64).reshape(len(s), -1)[which]
        return self._kernel(y, s[which], np.asarray(weights, dtype=np.float64), thr, rank)

    def _kernel(self, y: np.ndarray, s: np.ndarray, w: np.ndarray | None, thr: np.ndarray | None = None,
                rank: bool = True) -> dict[str, np.ndarray]:  # fmt: skip
        """``thr``: per-row decision thresholds ``[R, C]`` instead of this metric's own."""
        width = s.shape[-1]
        if self.task_type == "binary":
            return kernels.binary(y, s, w, float(label_thresholds(self.thresholds, 1)[0]) if thr is None else thr,
                                  rank)  # fmt: skip
        if self.task_type == "multiclass":
            return kernels.multiclass(y, s, w, output_names(self.class_names, width, "class_names"), rank)
        if self.task_type == "multilabel":
            names = self.class_names if self.class_names is not None else self.target_names
            names = output_names(names, width, "class_names")
            return kernels.multilabel(y, s, w, names, label_thresholds(self.thresholds, len(names)) if thr is None
                                      else thr, rank)  # fmt: skip
        return kernels.regression(y, s, w, output_names(self.target_names, width, "target_names"))




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
