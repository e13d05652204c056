"""Calibration of predicted probabilities: reliability curves and the ECE, with a bootstrap CI.

Bins hold equal numbers of samples (``sklearn.calibration.calibration_curve(strategy="quantile")``), and there are
few enough of them that each holds at least ``MIN_PER_BIN`` samples: 15 equal-width bins over 154 test samples
leave most bins with a handful of samples and draw a zig-zag of noise. The ECE is the count-weighted gap between
observed frequency and mean predicted probability over the bins. Curves: the positive class (binary), each label
(multilabel; the ECE is their mean), the top-label confidence against whether the argmax is right (multiclass).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.calibration import calibration_curve

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.bootstrap import resample_weights
from fmprobe.evaluate.metrics import check_inputs, output_names

MIN_PER_BIN = 20
MAX_BINS = 10


def adaptive_bins(n: int) -> int:
    """Bins for ``n`` samples: at least ``MIN_PER_BIN`` samples each, between 2 and ``MAX_BINS``."""
    return int(np.clip(n // MIN_PER_BIN, 2, MAX_BINS))


def _bin_ids(prob: np.ndarray, n_bins: int) -> np.ndarray:
    """Each sample's equal-count bin, by sklearn's own rule (percentile edges, inner edges searched)."""
    edges = np.percentile(prob, np.linspace(0, 100, n_bins + 1))
    return np.searchsorted(edges[1:-1], prob)


def reliability(y: np.ndarray, prob: np.ndarray, n_bins: int | None = None) -> dict[str, Any]:
    """Reliability curve over equal-count bins (non-empty bins only) with the count per bin, and the ECE."""
    y = np.asarray(y, dtype=np.float64)
    prob = np.asarray(prob, dtype=np.float64)
    if prob.min() < 0 or prob.max() > 1:
        raise FmprobeError("calibration needs probabilities in [0, 1]")
    n_bins = adaptive_bins(len(prob)) if n_bins is None else n_bins
    prob_true, prob_pred = calibration_curve(y, prob, n_bins=n_bins, strategy="quantile", pos_label=1)
    counts = np.bincount(_bin_ids(prob, n_bins), minlength=n_bins)
    counts = counts[counts > 0]
    ece = float(np.sum(counts * np.abs(prob_true - prob_pred)) / len(prob))
    return {"ece": ece, "prob_true": prob_true.tolist(), "prob_pred": prob_pred.tolist(), "count": counts.tolist(),
            "bins": n_bins, "binning": "equal-count"}


def _curves_input(task_type: str, y_true: Any, y_score: Any, class_names: Sequence[str] | None
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:  # fmt: skip
    """Per curve: (0/1 outcome, probability)."""
    if task_type == "regression":
        raise FmprobeError("calibration applies to probabilities; a regression task has none")
    y, s = check_inputs(task_type, y_true, y_score)
    if task_type == "binary":
        return {"positive": (y.astype(np.float64), s)}
    if task_type == "multiclass":
        return {"top_label": ((s.argmax(axis=1) == y).astype(np.float64), s.max(axis=1))}
    names = output_names(class_names, s.shape[1], "class_names")
    return {n: (y[:, c].astype(np.float64), s[:, c]) for c, n in enumerate(names)}


def calibration(task_type: str, y_true: Any, y_score: Any, *, class_names: Sequence[str] | None = None,
                n_bins: int | None = None) -> dict[str, Any]:  # fmt: skip
    """``{"ece": float, "curves": {name: reliability(...)}}`` (multilabel: ``ece`` is the mean over labels)."""
    inputs = _curves_input(task_type, y_true, y_score, class_names)
    curves = {n: reliability(y, p, n_bins) for n, (y, p) in inputs.items()}
    return {"ece": float(np.mean([c["ece"] for c in curves.values()])), "curves": curves}


def ece_interval(
    task_type: str, y_true: Any, y_score: Any, *, class_names: Sequence[str] | None = None,
    groups: Sequence[Any] | None = None, n_resamples: int, ci: float, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """``calibration(...)`` of ``y_score`` plus the ECE's percentile bootstrap CI (resampling groups when given).
    Each resample keeps the bins of the full test set and weights the samples by how often they were drawn."""
    inputs = _curves_input(task_type, y_true, y_score, class_names)
    n = len(next(iter(inputs.values()))[0])
    n_bins = adaptive_bins(n)
    out: dict[str, Any] = {**calibration(task_type, y_true, y_score, class_names=class_names, n_bins=n_bins),
                           "ci": [float("nan"), float("nan")], "bins": n_bins, "binning": "equal-count",
                           "resamples": n_resamples}  # fmt: skip
    if n_resamples == 0:
        return out
    draws = []
    for w in resample_weights(n, groups=groups, n_resamples=n_resamples, seed=seed):  # [b, n]
        per_curve = []
        for y, p in inputs.values():
            onehot = np.eye(n_bins)[_bin_ids(p, n_bins)]  # [n, bins]
            gap = w @ (onehot * (y - p)[:, None])  # [b, bins]: sum of (outcome - probability) per bin
            per_curve.append(np.abs(gap).sum(axis=1) / w.sum(axis=1))
        draws.append(np.mean(per_curve, axis=0))
    alpha = (1 - ci) / 2
    out["ci"] = [float(v) for v in np.quantile(np.concatenate(draws), [alpha, 1 - alpha])]
    return out
