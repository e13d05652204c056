"""Decision thresholds tuned on validation (never on test) and calibration of probabilities.

Thresholds apply to binary and multilabel outputs; multiclass predictions are the argmax and
regression has none, so tuning returns None there. Calibration: ECE with 15 equal-width bins and the
reliability-curve points of ``sklearn.calibration.calibration_curve`` (per class for binary and
multilabel, top-label confidence for multiclass).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from sklearn.calibration import calibration_curve
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


def reliability(y: np.ndarray, prob: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Reliability curve (sklearn, uniform bins) with bin counts, and the ECE computed from it."""
    y = np.asarray(y, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    if prob.min() < 0 or prob.max() > 1:
        raise FmprobeError("calibration needs probabilities in [0, 1]")
    prob_true, prob_pred = calibration_curve(y, prob, n_bins=n_bins, strategy="uniform", pos_label=1)
    # the bin counts, with sklearn's own binning rule, to weight the gaps
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    counts = np.bincount(np.searchsorted(edges[1:-1], prob), minlength=n_bins)
    counts = counts[counts > 0]
    ece = float(np.sum(counts * np.abs(prob_true - prob_pred)) / len(prob))
    return {"ece": ece, "prob_true": prob_true.tolist(), "prob_pred": prob_pred.tolist(), "count": counts.tolist()}


def calibration(
    task_type: str,
    y_true: Any,
    y_score: Any,
    *,
    class_names: Sequence[str] | None = None,
    n_bins: int = 15,
) -> dict[str, Any]:
    """``{"ece": float, "curves": {name: reliability(...)}}``.

    binary: the positive-class probability; multilabel: each label, ``ece`` = mean over labels;
    multiclass: top-label confidence against whether the argmax is right (curve name ``"top_label"``).
    """
    if task_type == "regression":
        raise FmprobeError("calibration applies to probabilities; a regression task has none")
    y, s = check_inputs(task_type, y_true, y_score)
    if task_type == "binary":
        curves = {"positive": reliability(y, s, n_bins)}
    elif task_type == "multiclass":
        correct = (s.argmax(axis=1) == y).astype(np.float64)
        curves = {"top_label": reliability(correct, s.max(axis=1), n_bins)}
    else:
        names = output_names(class_names, s.shape[1], "class_names")
        curves = {n: reliability(y[:, c], s[:, c], n_bins) for c, n in enumerate(names)}
    return {"ece": float(np.mean([c["ece"] for c in curves.values()])), "curves": curves}
