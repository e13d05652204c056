"""What a predictor that ignores the image scores: the floor every model must clear.

The trivial predictor is fitted on train (class priors / label prevalences / target means) and scored
on test with the same ``compute_metrics``, so it meets exactly the same metric definitions as the model:
multiclass -> train class priors for every sample (predicts the majority class; AUROC-ovr 0.5);
binary/multilabel -> train prevalence as a constant score (AUROC 0.5, AP = test prevalence);
regression -> train mean (R² <= 0 on test).

Chance level, one definition (``chance_level``): balanced accuracy averages recall over the classes *present in
test*, so no predictor that ignores the image can expect more than 1 / (classes present in test) — the trivial
predictor scores exactly that. A class declared but absent from test does not lower it; it is named instead.
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
    return np.tile(y_train.mean(axis=0), (n_test, 1))


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
    if task_type in ("binary", "multiclass"):
        out["chance_balanced_accuracy"] = chance_level(task_type, y_test, class_names)["balanced_accuracy"]
    return out


def chance_level(task_type: str, y_test: Any, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Balanced accuracy of chance on ``y_test`` (binary / multiclass): 1 / the classes present in test, with
    how many are present and declared and which declared ones are absent (see the module docstring)."""
    y = np.asarray(y_test).astype(np.int64).ravel()
    if task_type == "binary":
        names = ["negative", "positive"]
    else:
        names = list(class_names) if class_names is not None else [str(c) for c in range(int(y.max()) + 1)]
    present = sorted(set(y.tolist()))
    return {
        "balanced_accuracy": 1 / len(present),
        "classes_present": len(present),
        "classes_declared": len(names),
        "absent_from_test": [n for c, n in enumerate(names) if c not in present],
        "rule": "1 / the classes present in test: balanced accuracy averages recall over those classes, and a "
                "predictor that ignores the image cannot expect more",
    }
