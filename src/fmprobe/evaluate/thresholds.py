"""Decision thresholds tuned on validation (never on test).

Thresholds apply to binary and multilabel outputs; multiclass predictions are the argmax and
regression has none, so tuning returns None there. (Calibration of the probabilities: ``calibration.py``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from sklearn.metrics import precision_recall_curve

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.metrics import check_inputs, label_thresholds, output_names


def tune_thresholds(
    task_type: str,
    y_val: Any,
    score_val: Any,
    *,
    mode: Literal["f1", "fixed"] = "f1",
    class_names: Sequence[str] | None = None,
) -> float | np.ndarray | None:
    """Binary: one threshold; multilabel: one per label ``[C]``; multiclass/regression: None.

    ``f1`` picks, per class, the validation score threshold with the highest F1 (precision_recall_curve);
    ``fixed`` is 0.5. A label without positives in validation cannot be tuned and raises.
    """
    if mode not in ("f1", "fixed"):
        raise FmprobeError(f"threshold mode must be 'f1' or 'fixed', got '{mode}'")
    if task_type in ("multiclass", "regression"):
        return None
    y, s = check_inputs(task_type, y_val, score_val)
    if task_type == "binary":
        return 0.5 if mode == "fixed" else _f1_threshold(y, s, "the positive class")
    names = output_names(class_names, s.shape[1], "class_names")
    if mode == "fixed":
        return np.full(s.shape[1], 0.5)
    return np.array([_f1_threshold(y[:, c], s[:, c], f"label '{n}'") for c, n in enumerate(names)])


def _f1_threshold(y: np.ndarray, s: np.ndarray, what: str) -> float:
    if not y.any():
        raise FmprobeError(
            f"cannot tune an F1 threshold for {what}: it has no positives in validation; "
            "set eval.thresholds: fixed, or use a split with positives of every class in validation"
        )
    precision, recall, thr = precision_recall_curve(y, s)
    p, r = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(p + r > 0, 2 * p * r / (p + r), 0.0)
    return float(thr[int(np.argmax(f1))])


def apply_thresholds(task_type: str, y_score: Any, thresholds: Any = None) -> np.ndarray:
    """Predicted labels: binary ``[N]`` / multilabel ``[N, C]`` via ``score >= threshold``; multiclass argmax."""
    s = np.asarray(y_score, dtype=np.float64)
    if task_type == "multiclass":
        return s.argmax(axis=1)
    if task_type == "binary":
        return (s.reshape(-1) >= label_thresholds(thresholds, 1)[0]).astype(np.int64)
    if task_type == "multilabel":
        return (s >= label_thresholds(thresholds, s.shape[1])[None, :]).astype(np.int64)
    raise FmprobeError(f"thresholds do not apply to a {task_type} task")
