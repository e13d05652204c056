"""Percentile bootstrap CIs, resampling groups (patients, videos) when given.

Each resample is a row of multiplicities ``W[b, i]`` (how often sample i was drawn). A plain metric
function is called on the repeated samples; a :class:`WeightedMetric` (e.g. ``evaluate.task.TaskMetric``)
instead evaluates all resamples at once from the weights (same numbers as scikit-learn on the
repeated data, tested), which makes 1000 resamples cost about as much as a few metric calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np

from fmprobe.errors import FmprobeError

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
