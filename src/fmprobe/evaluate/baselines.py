"""What a predictor that ignores the image scores: the floor every model must clear.

The trivial predictor is fitted on train (class priors / label prevalences / target means) and scored
on test with the same ``compute_metrics``, so it meets exactly the same metric definitions as the model:
multiclass -> train class priors for every sample (predicts the majority class; AUROC-ovr 0.5);
binary/multilabel -> train prevalence as a constant score (AUROC 0.5, AP = test prevalence);
regression -> train mean (R² <= 0 on test). ``chance_balanced_accuracy`` is 1/K for classification.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fmprobe.evaluate.metrics import check_inputs, compute_metrics


def trivial_scores(task_type: str, y_train: Any, n_test: int, *, n_classes: int | None = None) -> np.ndarray:
    """Scores of the train-fitted trivial predictor for ``n_test`` samples, in the output convention."""
    y_train = np.asarray(y_train)
    if task_type == "multiclass":
        k = n_classes if n_classes is not None else int(y_train.max()) + 1
        y_train, _ = check_inputs("multiclass", y_train, np.full((len(y_train), k), 1 / k))
        priors = np.bincount(y_train, minlength=k) / len(y_train)
        return np.tile(priors, (n_test, 1))
    if task_type == "binary":
        y_train, _ = check_inputs("binary", y_train, np.zeros(len(y_train)))
        return np.full(n_test, y_train.mean())
    y_train, _ = check_inputs(task_type, y_train, np.zeros_like(y_train, dtype=np.float64))
    return np.tile(np.nanmean(y_train, axis=0), (n_test, 1))  # regression: each target's mean over its own rows


def baseline_metrics(
    task_type: str,
    y_train: Any,
    y_test: Any,
    *,
    class_names: Sequence[str] | None = None,
    target_names: Sequence[str] | None = None,
    thresholds: float | Sequence[float] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics of the trivial predictor on test (same keys as ``compute_metrics``), plus chance level."""
    n_classes = len(class_names) if task_type == "multiclass" and class_names is not None else None
    if task_type == "multiclass" and n_classes is None:
        n_classes = int(max(np.max(y_train), np.max(y_test))) + 1
    scores = trivial_scores(task_type, y_train, len(y_test), n_classes=n_classes)
    out = compute_metrics(task_type, y_test, scores, class_names=class_names, target_names=target_names,
                          thresholds=thresholds)
    if task_type == "multiclass":
        out["chance_balanced_accuracy"] = 1 / n_classes
    elif task_type == "binary":
        out["chance_balanced_accuracy"] = 0.5
    return out
