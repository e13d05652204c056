"""Metrics by task type, every value computed by scikit-learn (Pearson r by scipy).

A metric that is not defined on the given data (AUROC with one class present, R² of a constant
target, ...) is NaN and named, with the reason, under the key ``"undefined"``; nothing is imputed. A regression
target may lack a value in some rows (NaN, ``task.missing_targets: mask``): it is scored on the rows that have one.
Shapes follow CONTRACTS.md: binary ``[N]``, multiclass ``[N]`` int + ``[N, K]`` probs,
multilabel ``[N, C]`` 0/1 + ``[N, C]`` probs, regression ``[N, C]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import pearsonr
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    mean_absolute_error,
    r2_score,
    roc_auc_score,
    root_mean_squared_error,
)

from fmprobe.config import METRICS_BY_TASK
from fmprobe.errors import FmprobeError

# The one definition of metric direction: errors, losses, calibration error and costs are lower-is-better.
LOWER_IS_BETTER = frozenset({"mae", "rmse", "loss", "ece", "trainable_params", "total_params", "wall_seconds",
                             "lpips", "speed_ratio"})
# prefixes naming where a metric was measured (segmentation decoder; spatial probes on still / moving shapes;
# reconstructions): the direction is the name's after the prefix
MEASURED_ON = ("seg", "still", "moving", "recon")


def lower_is_better(metric: str) -> bool:
    """Direction of a metric name; per-class keys (``mae/<t>``) follow their base name, keys with a prefix of
    ``MEASURED_ON`` (``seg/miou``, ``recon/lpips``) the name after it, a paired difference to a control
    (``recon/lpips-vs-pixel``) its metric's."""
    parts = metric.split("/")
    base = parts[1] if parts[0] in MEASURED_ON and len(parts) > 1 else parts[0]
    return base.split("-vs-")[0] in LOWER_IS_BETTER


def higher_is_better(metric: str) -> bool:
    return not lower_is_better(metric)


def compute_metrics(
    task_type: str,
    y_true: Any,
    y_score: Any,
    *,
    class_names: Sequence[str] | None = None,
    target_names: Sequence[str] | None = None,
    thresholds: float | Sequence[float] | np.ndarray | None = None,
) -> dict[str, Any]:
    """Flat dict of scalar metrics (+ ``confusion_matrix`` for multiclass, + ``undefined``: {name: reason})."""
    y_true, y_score = check_inputs(task_type, y_true, y_score)
    undefined: dict[str, str] = {}
    if task_type == "binary":
        out = _binary(y_true, y_score, _binary_threshold(thresholds), undefined)
    elif task_type == "multiclass":
        if thresholds is not None:
            raise FmprobeError("thresholds do not apply to a multiclass task (predictions are the argmax); pass None")
        out = _multiclass(y_true, y_score, output_names(class_names, y_score.shape[1], "class_names"), undefined)
    elif task_type == "multilabel":
        names = output_names(class_names if class_names is not None else target_names, y_score.shape[1], "class_names")
        out = _multilabel(y_true, y_score, names, label_thresholds(thresholds, len(names)), undefined)
    else:
        if thresholds is not None:
            raise FmprobeError("thresholds do not apply to a regression task; pass None")
        out = _regression(y_true, y_score, output_names(target_names, y_score.shape[1], "target_names"), undefined)
    missing = [m for m in METRICS_BY_TASK[task_type] if m not in out]
    assert not missing, f"metrics {missing} not computed for {task_type}"
    out["undefined"] = undefined
    return out


def check_inputs(task_type: str, y_true: Any, y_score: Any) -> tuple[np.ndarray, np.ndarray]:
    """Coerce to the contract shapes; refuse mismatched lengths, bad labels and non-finite values."""
    if task_type not in METRICS_BY_TASK:
        raise FmprobeError(f"unknown task type '{task_type}'; valid choices: {', '.join(METRICS_BY_TASK)}")
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score, dtype=np.float64)
    if task_type == "binary":
        y_true, y_score = _squeeze(y_true, "y_true"), _squeeze(y_score, "y_score")
    elif task_type == "multiclass":
        y_true = _squeeze(y_true, "y_true")
        _expect_ndim(y_score, 2, "y_score", "[N, K] class probabilities")
    else:
        if y_true.ndim == 1:
            y_true = y_true[:, None]
        if y_score.ndim == 1:
            y_score = y_score[:, None]
        _expect_ndim(y_true, 2, "y_true", "[N, C]")
        _expect_ndim(y_score, 2, "y_score", "[N, C]")
        if y_true.shape[1] != y_score.shape[1]:
            raise FmprobeError(f"y_true has {y_true.shape[1]} columns but y_score has {y_score.shape[1]}")
    if len(y_true) != len(y_score):
        raise FmprobeError(f"y_true has {len(y_true)} samples but y_score has {len(y_score)}")
    if len(y_true) == 0:
        raise FmprobeError("no samples to evaluate (empty y_true)")
    _check_finite(y_score, "model outputs (y_score)")
    if task_type == "regression":  # NaN: a target without a value in that row (task.missing_targets: mask)
        y_true = y_true.astype(np.float64)
        _check_finite(np.nan_to_num(y_true, nan=0.0, posinf=np.inf, neginf=-np.inf), "regression targets (y_true)")
    elif task_type == "multiclass":
        k = y_score.shape[1]
        if not np.issubdtype(y_true.dtype, np.integer):
            if not (np.issubdtype(y_true.dtype, np.floating) and np.all(np.mod(y_true, 1) == 0)):
                raise FmprobeError(f"multiclass y_true must hold integer class indices, got dtype {y_true.dtype}")
        y_true = y_true.astype(np.int64)
        bad = np.flatnonzero((y_true < 0) | (y_true >= k))
        if bad.size:
            raise FmprobeError(
                f"multiclass y_true has {bad.size} labels outside 0..{k - 1} (first at rows {bad[:5].tolist()})"
            )
        y_score = _rows_sum_to_one(y_score)
    else:
        bad = np.flatnonzero(~np.isin(y_true, (0, 1)).reshape(len(y_true), -1).all(axis=1))
        if bad.size:
            raise FmprobeError(
                f"{task_type} y_true must be 0/1; {bad.size} rows are not (first at rows {bad[:5].tolist()})"
            )
        y_true = y_true.astype(np.int64)
    return y_true, y_score


def label_thresholds(thresholds: Any, n_labels: int) -> np.ndarray:
    """Per-label thresholds as an array ``[C]`` (default 0.5; a scalar applies to all labels)."""
    if thresholds is None:
        return np.full(n_labels, 0.5)
    arr = np.asarray(thresholds, dtype=np.float64).reshape(-1)
    if arr.size == 1:
        return np.full(n_labels, float(arr[0]))
    if arr.size != n_labels:
        raise FmprobeError(f"got {arr.size} thresholds for {n_labels} labels; pass one per label or one for all")
    return arr


def _binary_threshold(thresholds: Any) -> float:
    return float(label_thresholds(thresholds, 1)[0])


def _binary(y: np.ndarray, s: np.ndarray, thr: float, undefined: dict[str, str]) -> dict[str, Any]:
    pred = (s >= thr).astype(np.int64)
    out: dict[str, Any] = {
        "auroc": _auroc(y, s, "auroc", undefined),
        "ap": _ap(y, s, "ap", undefined),
        "f1": _f1(y, pred, "f1", undefined),
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": _balanced_accuracy(y, pred),
    }
    return out


def _multiclass(y: np.ndarray, p: np.ndarray, names: list[str], undefined: dict[str, str]) -> dict[str, Any]:
    k = p.shape[1]
    labels = np.arange(k)
    pred = p.argmax(axis=1)
    per_class = f1_score(y, pred, labels=labels, average=None, zero_division=np.nan)
    out: dict[str, Any] = {
        "balanced_accuracy": _balanced_accuracy(y, pred),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, labels=labels, average="macro", zero_division=np.nan)),
    }
    for name, value in zip(names, per_class, strict=True):
        out[f"f1/{name}"] = float(value)
        if np.isnan(value):
            undefined[f"f1/{name}"] = "class neither present nor predicted"
    absent = [names[c] for c in labels if not np.any(y == c)]
    if absent:
        out["auroc_ovr"] = float("nan")
        undefined["auroc_ovr"] = f"classes absent from y_true: {absent}"
    else:
        out["auroc_ovr"] = float(roc_auc_score(y, p, multi_class="ovr", labels=labels))
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=labels).tolist()
    return out


def _multilabel(
    y: np.ndarray, s: np.ndarray, names: list[str], thr: np.ndarray, undefined: dict[str, str]
) -> dict[str, Any]:
    pred = (s >= thr[None, :]).astype(np.int64)
    out: dict[str, Any] = {}
    ap = [_ap(y[:, c], s[:, c], f"ap/{n}", undefined) for c, n in enumerate(names)]
    auc = [_auroc(y[:, c], s[:, c], f"auroc/{n}", undefined) for c, n in enumerate(names)]
    # macro over the labels where the metric is defined (== sklearn's macro when all are)
    out["map"] = _mean_defined(ap, "map", undefined)
    out["macro_auroc"] = _mean_defined(auc, "macro_auroc", undefined)
    per_f1 = f1_score(y, pred, average=None, zero_division=np.nan)
    out["macro_f1"] = float(f1_score(y, pred, average="macro", zero_division=np.nan))
    if np.isnan(out["macro_f1"]):
        undefined["macro_f1"] = "no label is present or predicted"
    for c, n in enumerate(names):
        out[f"ap/{n}"], out[f"auroc/{n}"], out[f"f1/{n}"] = ap[c], auc[c], float(per_f1[c])
        if np.isnan(per_f1[c]):
            undefined[f"f1/{n}"] = "label neither present nor predicted"
    return out


def _regression(y: np.ndarray, s: np.ndarray, names: list[str], undefined: dict[str, str]) -> dict[str, Any]:
    """Every metric per target on the rows where it has a value (NaN: none); the headline values are their means
    over targets (sklearn's uniform average when nothing is missing)."""
    per: dict[str, list[float]] = {"r2": [], "mae": [], "rmse": [], "pearson_r": []}
    for c, n in enumerate(names):
        for key, value in _one_target(y[:, c], s[:, c], n, undefined).items():
            per[key].append(value)
    out: dict[str, Any] = {key: float(np.mean(values)) for key, values in per.items()}
    unscored = [n for n, v in zip(names, per["r2"]) if np.isnan(v)]
    if unscored:
        undefined["r2"] = f"R² undefined for targets {unscored} (constant or without values in y_true)"
    if np.isnan(out["pearson_r"]):
        undefined["pearson_r"] = "Pearson r undefined for some target"
    for c, n in enumerate(names):
        for key in per:
            out[f"{key}/{n}"] = float(per[key][c])
    return out


def _one_target(y: np.ndarray, s: np.ndarray, name: str, undefined: dict[str, str]) -> dict[str, float]:
    """R², MAE, RMSE and Pearson r of one target on its observed rows (NaN in ``y``: no value)."""
    rows = ~np.isnan(y)
    if not rows.any():
        for key in ("r2", "mae", "rmse", "pearson_r"):
            undefined[f"{key}/{name}"] = "target has no value in y_true"
        return dict.fromkeys(("r2", "mae", "rmse", "pearson_r"), float("nan"))
    y, s = y[rows], s[rows]
    r2 = float("nan")
    if np.ptp(y) == 0:
        undefined[f"r2/{name}"] = "target constant in y_true"
    else:
        r2 = float(r2_score(y, s, force_finite=False))
    return {"r2": r2, "mae": float(mean_absolute_error(y, s)), "rmse": float(root_mean_squared_error(y, s)),
            "pearson_r": _pearson(y, s, f"pearson_r/{name}", undefined)}


def _balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean recall over the classes present in y_true (sklearn's definition; its warning about
    predicted classes absent from y_true is that definition, not a problem)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        return float(balanced_accuracy_score(y, pred))


def _auroc(y: np.ndarray, s: np.ndarray, key: str, undefined: dict[str, str]) -> float:
    if y.min() == y.max():
        undefined[key] = f"only class {int(y[0])} present in y_true"
        return float("nan")
    return float(roc_auc_score(y, s))


def _ap(y: np.ndarray, s: np.ndarray, key: str, undefined: dict[str, str]) -> float:
    if not y.any():
        undefined[key] = "no positives in y_true"
        return float("nan")
    return float(average_precision_score(y, s))


def _f1(y: np.ndarray, pred: np.ndarray, key: str, undefined: dict[str, str]) -> float:
    value = float(f1_score(y, pred, zero_division=np.nan))
    if np.isnan(value):
        undefined[key] = "no positives in y_true and none predicted"
    return value


def _pearson(y: np.ndarray, s: np.ndarray, key: str, undefined: dict[str, str]) -> float:
    if len(y) < 2 or np.ptp(y) == 0 or np.ptp(s) == 0:
        undefined[key] = "constant targets or predictions (or fewer than 2 samples)"
        return float("nan")
    return float(pearsonr(y, s).statistic)


def _mean_defined(values: list[float], key: str, undefined: dict[str, str]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    if np.isnan(arr).all():
        undefined[key] = "undefined for every label"
        return float("nan")
    return float(np.nanmean(arr))


def _rows_sum_to_one(p: np.ndarray) -> np.ndarray:
    """sklearn's AUROC-ovr needs rows summing to 1 (np.allclose); renormalise low-precision (fp16/fp32)
    rounding, refuse scores that are not probabilities."""
    sums = p.sum(axis=1)
    if np.allclose(1, sums):
        return p
    bad = np.flatnonzero(np.abs(sums - 1) > 1e-3)
    if bad.size:
        raise FmprobeError(
            f"multiclass y_score rows must be softmax probabilities summing to 1; {bad.size} rows do not "
            f"(first at row {bad[0]}, sum {sums[bad[0]]:.4g})"
        )
    return p / sums[:, None]


def output_names(names: Sequence[str] | None, n: int, what: str) -> list[str]:
    """Names used in per-class keys ("ap/<name>"): the given ones, or the column index as text."""
    if names is None:
        return [str(i) for i in range(n)]
    names = [str(x) for x in names]
    if len(names) != n:
        raise FmprobeError(f"{what} has {len(names)} entries but the outputs have {n} columns")
    return names


def _squeeze(a: np.ndarray, what: str) -> np.ndarray:
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    _expect_ndim(a, 1, what, "[N]")
    return a


def _expect_ndim(a: np.ndarray, ndim: int, what: str, shape: str) -> None:
    if a.ndim != ndim:
        raise FmprobeError(f"{what} must have shape {shape}, got shape {a.shape}")


def _check_finite(a: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~np.isfinite(a).reshape(len(a), -1).all(axis=1))
    if bad.size:
        raise FmprobeError(f"{what} have non-finite values in {bad.size} rows (first at rows {bad[:5].tolist()})")
