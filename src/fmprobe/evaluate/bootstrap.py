"""Percentile bootstrap CIs, resampling groups (patients, videos) when given.

Each resample is a row of multiplicities ``W[b, i]`` (how often sample i was drawn). A plain metric
function is called on the repeated samples; a :class:`WeightedMetric` (e.g. :class:`TaskMetric`)
instead evaluates all resamples at once from the weights (same numbers as scikit-learn on the
repeated data, tested), which makes 1000 resamples cost about as much as a few metric calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from fmprobe.errors import FmprobeError
from fmprobe.evaluate.metrics import check_inputs, compute_metrics, label_thresholds, output_names

MetricFn = Callable[[np.ndarray, np.ndarray], Any]


@runtime_checkable
class WeightedMetric(Protocol):
    """A metric that also scores many resamples at once from multiplicity weights ``[b, n]``."""

    def __call__(self, y_true: Any, y_score: Any) -> Any: ...

    def weighted(self, y_true: Any, y_score: Any, weights: np.ndarray) -> Mapping[str, np.ndarray] | np.ndarray: ...

_CHUNK_CELLS = 4_000_000  # resamples x samples held in memory at once


class Interval(NamedTuple):
    point: float
    lo: float
    hi: float


class BootstrapResult(dict):
    """``{metric: Interval(point, lo, hi)}``; ``.dropped[metric]`` counts resamples where it was undefined."""

    def __init__(self, intervals: dict[str, Interval], dropped: dict[str, int], n_resamples: int):
        super().__init__(intervals)
        self.dropped = dropped
        self.n_resamples = n_resamples


def bootstrap_metrics(
    metric_fn: MetricFn,
    y_true: Any,
    y_score: Any,
    *,
    groups: Sequence[Any] | np.ndarray | None = None,
    n_resamples: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
) -> BootstrapResult:
    """Point estimate on all data + percentile CI for every scalar metric ``metric_fn`` returns.

    With ``groups``, whole groups are drawn with replacement (cluster bootstrap), so correlated samples
    of one patient do not narrow the interval. Resamples where a metric is NaN are dropped and counted.
    """
    if not 0 < ci < 1:
        raise FmprobeError(f"ci must be in (0, 1), got {ci}")
    point = scalar_metrics(metric_fn(y_true, y_score))
    draws: dict[str, list[np.ndarray]] = {k: [] for k in point}
    for weights in resample_weights(len(y_true), groups=groups, n_resamples=n_resamples, seed=seed):
        values = evaluate_weighted(metric_fn, y_true, y_score, weights)
        for k in point:
            draws[k].append(values[k])
    alpha = (1 - ci) / 2
    intervals, dropped = {}, {}
    for k, p in point.items():
        d = np.concatenate(draws[k]) if draws[k] else np.empty(0)
        valid = d[~np.isnan(d)]
        dropped[k] = int(d.size - valid.size)
        if valid.size == 0 or np.isnan(p):
            intervals[k] = Interval(p, float("nan"), float("nan"))
        else:
            lo, hi = np.quantile(valid, [alpha, 1 - alpha])
            intervals[k] = Interval(p, float(lo), float(hi))
    return BootstrapResult(intervals, dropped, n_resamples)


def resample_weights(
    n: int, *, groups: Sequence[Any] | np.ndarray | None = None, n_resamples: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield chunks ``[b, n]`` of per-sample draw counts; same seed -> same resamples for any metric."""
    rng = np.random.default_rng(seed)
    if groups is None:
        inverse, n_units = np.arange(n), n
    else:
        groups = np.asarray(groups)
        if len(groups) != n:
            raise FmprobeError(f"groups has {len(groups)} entries but there are {n} samples")
        _, inverse = np.unique(groups, return_inverse=True)
        n_units = int(inverse.max()) + 1
    chunk = max(1, _CHUNK_CELLS // max(n, n_units))
    done = 0
    while done < n_resamples:
        b = min(chunk, n_resamples - done)
        draws = rng.integers(0, n_units, size=(b, n_units))
        flat = (draws + n_units * np.arange(b)[:, None]).ravel()
        unit_counts = np.bincount(flat, minlength=b * n_units).reshape(b, n_units)
        yield unit_counts[:, inverse].astype(np.float64)
        done += b


def evaluate_weighted(metric_fn: MetricFn, y_true: Any, y_score: Any, weights: np.ndarray) -> dict[str, np.ndarray]:
    """Metric values ``[b]`` for each resample row of ``weights`` (vectorised when metric_fn supports it)."""
    if isinstance(metric_fn, WeightedMetric):
        out = metric_fn.weighted(y_true, y_score, weights)
        return dict(out) if isinstance(out, Mapping) else {"value": np.asarray(out, dtype=np.float64)}
    y_true, y_score = np.asarray(y_true), np.asarray(y_score)
    rows = []
    for w in weights:
        idx = np.repeat(np.arange(len(w)), w.astype(np.int64))
        rows.append(scalar_metrics(metric_fn(y_true[idx], y_score[idx])))
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in rows[0]}


def scalar_metrics(values: Any) -> dict[str, float]:
    """The scalar entries of a metric result (a bare number becomes ``{"value": x}``)."""
    if isinstance(values, Mapping):
        return {
            k: float(v) for k, v in values.items()
            if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
        }
    return {"value": float(values)}


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
        y, s = check_inputs(self.task_type, y_true, y_score)
        w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
        if self.task_type == "binary":
            return _w_binary(y, s, w, float(label_thresholds(self.thresholds, 1)[0]))
        if self.task_type == "multiclass":
            return _w_multiclass(y, s, w, output_names(self.class_names, s.shape[1], "class_names"))
        if self.task_type == "multilabel":
            names = self.class_names if self.class_names is not None else self.target_names
            names = output_names(names, s.shape[1], "class_names")
            return _w_multilabel(y, s, w, names, label_thresholds(self.thresholds, len(names)))
        return _w_regression(y, s, w, output_names(self.target_names, s.shape[1], "target_names"))

    def stacked(self, y_true: Any, scores: Any) -> dict[str, np.ndarray]:
        """``{metric: [H]}`` for H heads' scores ``[H, N, ...]`` on the same samples, in one vectorised call."""
        from fmprobe.evaluate.stacked import stacked_metrics

        return stacked_metrics(self, y_true, scores)


def _div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    """Mean over defined entries; NaN (no warning) where none is defined."""
    ok = ~np.isnan(a)
    return _div(np.where(ok, a, 0).sum(axis), ok.sum(axis).astype(np.float64))


def _tie_blocks(sorted_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each sorted position: start and end (exclusive) of its block of equal scores."""
    new = np.r_[True, sorted_scores[1:] != sorted_scores[:-1]]
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(sorted_scores)]
    block = np.cumsum(new) - 1
    return starts[block], ends[block]


def w_auroc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUROC (ties count 1/2) per weight row == sklearn roc_auc_score."""
    order = np.argsort(s, kind="mergesort")
    lo, hi = _tie_blocks(s[order])
    pos = y[order] == 1
    neg_w = w[:, order] * ~pos
    cum = np.zeros((len(w), len(s) + 1))
    np.cumsum(neg_w, axis=1, out=cum[:, 1:])
    below, upto = cum[:, lo[pos]], cum[:, hi[pos]]
    pos_w = w[:, order[pos]]
    num = np.einsum("bi,bi->b", pos_w, below + upto) / 2  # below + ties / 2
    return _div(num, pos_w.sum(axis=1) * cum[:, -1])


def w_average_precision(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted step-wise AP (sum of recall increments x precision) == sklearn average_precision_score."""
    order = np.argsort(-s, kind="mergesort")
    starts = np.flatnonzero(np.r_[True, s[order][1:] != s[order][:-1]])
    ends = np.r_[starts[1:], len(s)] - 1
    ws, pos = w[:, order], y[order] == 1
    tp = np.cumsum(ws * pos, axis=1)[:, ends]
    seen = np.cumsum(ws, axis=1)[:, ends]
    total_pos = tp[:, -1]
    precision = _div(tp, seen)
    d_recall = np.diff(tp, axis=1, prepend=0.0)
    return _div((d_recall * np.nan_to_num(precision)).sum(axis=1), total_pos)


def _w_counts(y: np.ndarray, pred: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    yb, pb = y == 1, pred == 1
    return tuple((w * m).sum(axis=1) for m in (yb & pb, ~yb & pb, yb & ~pb, ~yb & ~pb))


def _w_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    return _div(2 * tp, 2 * tp + fp + fn)


def _w_binary(y: np.ndarray, s: np.ndarray, w: np.ndarray, thr: float) -> dict[str, np.ndarray]:
    tp, fp, fn, tn = _w_counts(y, (s >= thr).astype(np.int64), w)
    recalls = np.stack([_div(tp, tp + fn), _div(tn, tn + fp)], axis=1)
    return {
        "auroc": w_auroc(y, s, w),
        "ap": w_average_precision(y, s, w),
        "f1": _w_f1(tp, fp, fn),
        "accuracy": _div(tp + tn, tp + fp + fn + tn),
        "balanced_accuracy": _nanmean(recalls, axis=1),
    }


def _w_multiclass(y: np.ndarray, p: np.ndarray, w: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    k = p.shape[1]
    pred = p.argmax(axis=1)
    code = y * k + pred
    cm = np.stack([w[:, code == c].sum(axis=1) for c in range(k * k)], axis=1).reshape(len(w), k, k)
    aucs = np.stack([w_auroc((y == c).astype(np.int64), p[:, c], w) for c in range(k)], axis=1)
    return multiclass_metrics(cm, aucs, names)


def multiclass_metrics(cm: np.ndarray, aucs: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Multiclass metrics of R confusion matrices ``[R, k, k]`` (true x predicted) and one-vs-rest AUROCs ``[R, k]``
    (R resamples or R heads)."""
    support, predicted, diag = cm.sum(axis=2), cm.sum(axis=1), np.einsum("rkk->rk", cm)
    f1 = _div(2 * diag, support + predicted)
    out = {
        "balanced_accuracy": _nanmean(_div(diag, support), axis=1),
        "accuracy": _div(diag.sum(axis=1), support.sum(axis=1)),
        "macro_f1": _nanmean(f1, axis=1),
        "auroc_ovr": aucs.mean(axis=1),  # NaN when a class is absent, as compute_metrics
    }
    out.update({f"f1/{n}": f1[:, c] for c, n in enumerate(names)})
    return out


def _w_multilabel(
    y: np.ndarray, s: np.ndarray, w: np.ndarray, names: list[str], thr: np.ndarray
) -> dict[str, np.ndarray]:
    ap = np.stack([w_average_precision(y[:, c], s[:, c], w) for c in range(len(names))], axis=1)
    auc = np.stack([w_auroc(y[:, c], s[:, c], w) for c in range(len(names))], axis=1)
    f1 = np.stack(
        [_w_f1(*_w_counts(y[:, c], (s[:, c] >= thr[c]).astype(np.int64), w)[:3]) for c in range(len(names))], axis=1
    )
    out = {"map": _nanmean(ap, axis=1), "macro_auroc": _nanmean(auc, axis=1), "macro_f1": _nanmean(f1, axis=1)}
    for c, n in enumerate(names):
        out[f"ap/{n}"], out[f"auroc/{n}"], out[f"f1/{n}"] = ap[:, c], auc[:, c], f1[:, c]
    return out


def _w_regression(y: np.ndarray, s: np.ndarray, w: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    sw = w.sum(axis=1, keepdims=True)
    yc, sc = y - y.mean(axis=0), s - s.mean(axis=0)  # centre once for numerical stability
    err = s - y
    my, ms = (w @ yc) / sw, (w @ sc) / sw
    var_y = (w @ yc**2) / sw - my**2
    var_s = (w @ sc**2) / sw - ms**2
    cov = (w @ (yc * sc)) / sw - my * ms
    mse = (w @ err**2) / sw
    scale_y = (w @ yc**2) / sw
    r2 = np.where(var_y > 1e-12 * np.maximum(scale_y, 1e-300), 1 - mse / np.where(var_y > 0, var_y, 1), np.nan)
    scale_s = (w @ sc**2) / sw
    ok = (var_y > 1e-12 * np.maximum(scale_y, 1e-300)) & (var_s > 1e-12 * np.maximum(scale_s, 1e-300))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(ok, cov / np.sqrt(np.abs(var_y * var_s)), np.nan)
    mae, rmse = (w @ np.abs(err)) / sw, np.sqrt(mse)
    out = {"r2": r2.mean(axis=1), "mae": mae.mean(axis=1), "rmse": rmse.mean(axis=1), "pearson_r": r.mean(axis=1)}
    for c, n in enumerate(names):
        out[f"r2/{n}"], out[f"mae/{n}"] = r2[:, c], mae[:, c]
        out[f"rmse/{n}"], out[f"pearson_r/{n}"] = rmse[:, c], r[:, c]
    return out
