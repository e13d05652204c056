"""The task metrics of many heads' outputs on the same samples in one vectorised call.

A HeadBank scores every head every epoch; one ``compute_metrics`` call per head would cost more than the
training. ``stacked_metrics`` takes ``scores [H, N, ...]`` and returns ``{metric: [H]}`` with the keys and
undefined-value (NaN) rules of :meth:`TaskMetric.weighted` at unit weights, which are tested equal to
scikit-learn; here each head's scores are sorted on their own (AUROC from average ranks, AP at the ends
of tied-score blocks), all heads at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fmprobe.evaluate.bootstrap import TaskMetric, _div, _nanmean, _w_f1, multiclass_metrics
from fmprobe.evaluate.metrics import check_inputs, label_thresholds, output_names
from fmprobe.errors import FmprobeError


def stacked_metrics(metric: TaskMetric, y_true: Any, scores: Any) -> dict[str, np.ndarray]:
    """``{metric: [H]}`` for the H score arrays stacked in ``scores`` (each scored against ``y_true``)."""
    s = np.asarray(scores, dtype=np.float64)
    n_heads = len(s)
    if n_heads == 0:
        raise FmprobeError("stacked_metrics needs at least one head's scores")
    # The per-head input checks, all heads at once: targets repeated once per head.
    y_rep = np.concatenate([np.asarray(y_true)] * n_heads)
    y_all, s_all = check_inputs(metric.task_type, y_rep, s.reshape(n_heads * s.shape[1], *s.shape[2:]))
    y, s = y_all[: len(y_all) // n_heads], s_all.reshape(n_heads, -1, *s_all.shape[1:])
    if metric.task_type == "binary":
        return _binary(y, s, float(label_thresholds(metric.thresholds, 1)[0]))
    if metric.task_type == "multiclass":
        return _multiclass(y, s, output_names(metric.class_names, s.shape[2], "class_names"))
    if metric.task_type == "multilabel":
        names = metric.class_names if metric.class_names is not None else metric.target_names
        names = output_names(names, s.shape[2], "class_names")
        return _multilabel(y, s, names, label_thresholds(metric.thresholds, len(names)))
    return _regression(y, s, output_names(metric.target_names, s.shape[2], "target_names"))


def _tie_bounds(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of sorted scores ``[R, N]``: first and last position of each position's block of equal scores."""
    r, n = sorted_scores.shape
    idx = np.broadcast_to(np.arange(n), (r, n))
    new = np.ones((r, n), dtype=bool)
    new[:, 1:] = sorted_scores[:, 1:] != sorted_scores[:, :-1]
    last = np.ones((r, n), dtype=bool)
    last[:, :-1] = new[:, 1:]
    start = np.maximum.accumulate(np.where(new, idx, 0), axis=1)
    end = np.minimum.accumulate(np.where(last, idx, n)[:, ::-1], axis=1)[:, ::-1]
    return start, end


def ranking_rows(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROC and average precision of each row (0/1 labels ``y [R, N]`` against scores ``s [R, N]``), from
    one sort per row; the order within a block of tied scores does not matter to either.

    AUROC: Mann-Whitney with average ranks (ties count 1/2); AP: every positive contributes the precision at
    the far end of its block of tied scores, walking from the highest score down (sklearn's step-wise AP).
    NaN when a row lacks a class (AUROC) or a positive (AP).
    """
    n = s.shape[1]
    order = np.argsort(s, axis=1)
    start, end = _tie_bounds(np.take_along_axis(s, order, axis=1))
    pos = np.take_along_axis(y, order, axis=1) == 1
    n_pos = pos.sum(axis=1).astype(np.float64)
    rank_sum = np.where(pos, (start + end) / 2 + 1, 0.0).sum(axis=1)  # exact: halves of integers
    auroc = _div(rank_sum - n_pos * (n_pos + 1) / 2, n_pos * (n - n_pos))
    pos_down, end_down = pos[:, ::-1], (n - 1 - start)[:, ::-1]  # descending scores
    precision = np.cumsum(pos_down, axis=1) / np.arange(1, n + 1)
    ap = _div(np.where(pos_down, np.take_along_axis(precision, end_down, axis=1), 0.0).sum(axis=1), n_pos)
    return auroc, ap


def _counts(y: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    """tp, fp, fn, tn over the sample axis (1) of 0/1 ``y`` and ``pred`` (broadcast over heads)."""
    yb, pb = y == 1, pred == 1
    return tuple(m.sum(axis=1).astype(np.float64) for m in (yb & pb, ~yb & pb, yb & ~pb, ~yb & ~pb))


def _binary(y: np.ndarray, s: np.ndarray, thr: float) -> dict[str, np.ndarray]:
    tp, fp, fn, tn = _counts(y[None], s >= thr)
    auroc, ap = ranking_rows(np.broadcast_to(y, s.shape), s)
    return {
        "auroc": auroc,
        "ap": ap,
        "f1": _w_f1(tp, fp, fn),
        "accuracy": _div(tp + tn, tp + fp + fn + tn),
        "balanced_accuracy": _nanmean(np.stack([_div(tp, tp + fn), _div(tn, tn + fp)], axis=1), axis=1),
    }


def _multiclass(y: np.ndarray, p: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    n_heads, n, k = p.shape
    code = (y[None] * k + p.argmax(axis=2)) + (k * k) * np.arange(n_heads)[:, None]
    cm = np.bincount(code.ravel(), minlength=n_heads * k * k).reshape(n_heads, k, k).astype(np.float64)
    one_vs_rest = np.repeat((y[None] == np.arange(k)[:, None]).astype(np.int64), n_heads, axis=0)
    aucs = ranking_rows(one_vs_rest, p.transpose(2, 0, 1).reshape(k * n_heads, n))[0].reshape(k, n_heads).T
    return multiclass_metrics(cm, aucs, names)


def _multilabel(y: np.ndarray, s: np.ndarray, names: list[str], thr: np.ndarray) -> dict[str, np.ndarray]:
    n_heads, n, c = s.shape
    rows = np.repeat(y.T, n_heads, axis=0)  # label-major: row l * H + h
    flat = s.transpose(2, 0, 1).reshape(c * n_heads, n)
    auc, ap = (v.reshape(c, n_heads).T for v in ranking_rows(rows, flat))
    tp, fp, fn, _ = _counts(y[None], s >= thr)
    f1 = _w_f1(tp, fp, fn)  # [H, C]
    out = {"map": _nanmean(ap, axis=1), "macro_auroc": _nanmean(auc, axis=1), "macro_f1": _nanmean(f1, axis=1)}
    for j, name in enumerate(names):
        out[f"ap/{name}"], out[f"auroc/{name}"], out[f"f1/{name}"] = ap[:, j], auc[:, j], f1[:, j]
    return out


def _regression(y: np.ndarray, s: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    yc = y - y.mean(axis=0)
    sc = s - s.mean(axis=1, keepdims=True)
    err = s - y
    var_y, var_s = (yc**2).mean(axis=0), (sc**2).mean(axis=1)
    mse = (err**2).mean(axis=1)
    y_ok = np.ptp(y, axis=0) > 0  # a constant target has no R² or r, a constant output no r (as compute_metrics)
    ok = y_ok & (np.ptp(s, axis=1) > 0) & (len(y) > 1)
    r2 = np.where(y_ok, 1 - mse / np.where(y_ok, var_y, 1), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(ok, (yc * sc).mean(axis=1) / np.sqrt(var_y * var_s), np.nan)
    mae, rmse = np.abs(err).mean(axis=1), np.sqrt(mse)
    out = {"r2": r2.mean(axis=1), "mae": mae.mean(axis=1), "rmse": rmse.mean(axis=1), "pearson_r": r.mean(axis=1)}
    for j, name in enumerate(names):
        out[f"r2/{name}"], out[f"mae/{name}"] = r2[:, j], mae[:, j]
        out[f"rmse/{name}"], out[f"pearson_r/{name}"] = rmse[:, j], r[:, j]
    return out
